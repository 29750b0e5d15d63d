"""Checkpoint side of the output heads (models/heads.py): loading a checkpoint that may lack
the head, and turning an exported reward model into an HF sequence-classification model.

The value head is exported beside the backbone as ``value_head.safetensors`` by the
extra-head registry of ``checkpoint/mcore_to_hf.py``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

from mcore_align.models.heads import VALUE_HEAD_FILE, VALUE_HEAD_KEY, VALUE_HEAD_SEED

log = logging.getLogger(__name__)


def load_weights_allowing_fresh_head(chunks, ckpt_dir: str | Path) -> bool:
    """Load ``ckpt_dir`` into chunks that carry a value head. A checkpoint without the head
    (a base or SFT model) loads the backbone only and keeps the fresh head; an RM checkpoint
    loads everything. Returns True when the head came from the checkpoint. Collective."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from torch.distributed.checkpoint import FileSystemReader

    from mcore_align.checkpoint.loading import load_model_weights
    from mcore_align.checkpoint.layout import resolve_checkpoint_dir

    path = resolve_checkpoint_dir(ckpt_dir)
    if VALUE_HEAD_KEY in FileSystemReader(str(path)).read_metadata().state_dict_metadata:
        load_model_weights(chunks, path)
        log.warning("value head loaded from %s", path)
        return True
    from megatron.core.dist_checkpointing.validation import StrictHandling

    request = {}
    for i, c in enumerate(chunks):
        sd = c.sharded_state_dict()
        request[f"chunk{i}"] = {k: v for k, v in sd.items()
                                if not (isinstance(v, ShardedTensor) and v.key == VALUE_HEAD_KEY)}
    loaded = dist_checkpointing.load(request, str(path), strict=StrictHandling.RAISE_UNEXPECTED)
    for i, c in enumerate(chunks):
        missing, unexpected = c.load_state_dict(loaded[f"chunk{i}"], strict=False)
        assert not unexpected and all(m.startswith("output_layer.") for m in missing), (missing, unexpected)
    if dist.get_rank() == 0:
        log.warning("%s has no %s: value head freshly initialised (seed %d, std %.3g)", path, VALUE_HEAD_KEY,
                    VALUE_HEAD_SEED, chunks[-1].config.init_method_std)
    return False


def write_sequence_classification(hf_dir: str | Path) -> Path:
    """Turn an exported reward model (backbone + value_head.safetensors) into an HF
    ``AutoModelForSequenceClassification`` checkpoint in place: ``score.weight [1, H]``
    (the value head; HF's score has no bias either) goes to ``score.safetensors`` beside
    the backbone shards (indexed by ``model.safetensors.index.json``), and config.json
    gets ``<Family>ForSequenceClassification``, ``num_labels=1`` and ``pad_token_id``.

    HF pools the logit of the LAST NON-PAD token of each row; training reads the last
    real token. They agree when no sequence ends in the pad token: the pad id is taken
    from the tokenizer and a warning is logged when it equals EOS (then right-padded
    batches of sequences ending in EOS would be pooled one token early; score one
    sequence per call, as `mcore_align.score` does, or set a distinct pad token).
    """
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    hf_dir = Path(hf_dir)
    with safe_open(str(hf_dir / VALUE_HEAD_FILE), "pt") as f:
        head_1H = f.get_tensor(VALUE_HEAD_KEY)
    save_file({"score.weight": head_1H.contiguous()}, hf_dir / "score.safetensors", metadata={"format": "pt"})
    index_path = hf_dir / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
    else:  # single-file export: index it so the extra file is found (transformers reads a present
        # model.safetensors alone, ignoring any index, so the file is renamed to a shard name)
        single = "model-00001-of-00001.safetensors"
        (hf_dir / "model.safetensors").rename(hf_dir / single)
        with safe_open(str(hf_dir / single), "pt") as f:
            index = {"metadata": {}, "weight_map": {k: single for k in f.keys()}}
    assert "score.weight" not in index["weight_map"], "already a sequence-classification export"
    index["weight_map"]["score.weight"] = "score.safetensors"
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = (cfg.get("architectures") or ["ForCausalLM"])[0]
    if not arch.endswith("ForCausalLM"):
        raise ValueError(f"{hf_dir}: cannot derive a sequence-classification class from {arch!r}")
    cfg["architectures"] = [arch[: -len("ForCausalLM")] + "ForSequenceClassification"]
    cfg["num_labels"] = 1
    cfg["id2label"], cfg["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
    try:
        from transformers import AutoTokenizer

        if not any((hf_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            # transformers would build an empty tokenizer from config.json alone (pad id 0)
            raise OSError("no tokenizer.json / tokenizer_config.json / tokenizer.model")
        tok = AutoTokenizer.from_pretrained(str(hf_dir))
        pad = tok.pad_token_id
        if pad is not None and pad == tok.eos_token_id:
            log.warning("pad token == EOS (%d): batched HF scoring pools one token early for sequences "
                        "ending in EOS; score one sequence per call", pad)
    except (OSError, ValueError) as e:
        pad = cfg.get("pad_token_id")
        log.warning("%s: the exported tokenizer does not load (%s: %s); the classifier's pad_token_id is "
                    "taken from config.json: %s", hf_dir, type(e).__name__, e, pad)
    if pad is None:
        log.warning("%s: no pad token id (tokenizer and config.json have none): transformers' "
                    "ForSequenceClassification then scores batches of one sequence only", hf_dir)
    cfg["pad_token_id"] = pad
    (hf_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return hf_dir
