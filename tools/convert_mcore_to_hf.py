#!/usr/bin/env python
"""Megatron-core checkpoint (converted or from training, any layout) -> HF safetensors.

    python tools/convert_mcore_to_hf.py --ckpt runs/dpo/checkpoints --out /models/my-dpo --dtype bf16

``--ckpt`` is a checkpoint directory or a training save directory (its latest
iteration is exported). See docs/conversion.md.

LoRA checkpoints (model.train_type=lora; docs/lora.md) hold the adapters only:

    # base + alpha/r * B @ A folded in (base: the run's model.load unless --base)
    python tools/convert_mcore_to_hf.py --ckpt runs/lora --out /models/merged --lora merged
    # PEFT adapter dir for peft.PeftModel.from_pretrained(hf_base, dir)
    python tools/convert_mcore_to_hf.py --ckpt runs/lora --out /models/adapter --lora peft

Reward models (rlhf_type=rm; docs/algorithms.md) export the backbone (no lm_head) plus
``value_head.safetensors``; ``--sequence-classification`` also writes ``score.weight`` and a
config for ``AutoModelForSequenceClassification`` (num_labels=1):

    python tools/convert_mcore_to_hf.py --ckpt runs/rm --out /models/rm --sequence-classification
"""
import argparse
import logging
import sys

from mcore_align.checkpoint import convert_mcore_to_hf
from mcore_align.checkpoint.layout import DTYPES
from mcore_align.parallel.quiet import quiet_library_warnings


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint dir or training save dir")
    p.add_argument("--out", required=True, help="output HF directory (must be empty or absent)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the checkpoint's dtype")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (e.g. 5GB, 500MB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--lora", choices=("merged", "peft"), default=None,
                   help="LoRA checkpoint: merged HF weights (default for LoRA checkpoints) or a PEFT adapter dir")
    p.add_argument("--base", default=None,
                   help="LoRA: base mcore checkpoint (merged) or HF name/path recorded in adapter_config.json (peft); "
                        "default: the run's model.load")
    p.add_argument("--sequence-classification", action="store_true",
                   help="reward model: write an AutoModelForSequenceClassification checkpoint (score = value head)")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_library_warnings()
    try:
        from mcore_align.checkpoint.lora_export import export_merged, export_peft, is_lora_checkpoint

        lora = is_lora_checkpoint(a.ckpt)
        if a.lora and not lora:
            raise ValueError(f"--lora {a.lora}: {a.ckpt} is not a LoRA checkpoint")
        if lora and (a.lora or "merged") == "peft":
            out = export_peft(a.ckpt, a.out, base_model_name_or_path=a.base, dtype=a.dtype, overwrite=a.overwrite)
        elif lora:
            out = export_merged(a.ckpt, a.out, base=a.base, dtype=a.dtype, max_shard_size=a.max_shard_size,
                                overwrite=a.overwrite)
        else:
            out = convert_mcore_to_hf(a.ckpt, a.out, dtype=a.dtype, max_shard_size=a.max_shard_size,
                                      overwrite=a.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.sequence_classification:  # [RM]
        from pathlib import Path

        from mcore_align.checkpoint.heads import write_sequence_classification
        from mcore_align.models.heads import VALUE_HEAD_FILE

        if not (Path(out) / VALUE_HEAD_FILE).exists():
            print(f"error: --sequence-classification: {a.ckpt} is not a reward model (no value head)", file=sys.stderr)
            return 2
        write_sequence_classification(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from mcore_align.checkpoint.layout import run_tool

    sys.exit(run_tool(main))
