#!/usr/bin/env python
"""HF safetensors checkpoint -> megatron-core dist checkpoint (loads at any TP/PP/VPP).

    python tools/convert_hf_to_mcore.py --hf /models/Qwen2.5-7B --out /ckpt/qwen2.5-7b-mcore --dtype bf16

One CPU process, memory bounded by a few times the largest tensor. See docs/conversion.md.
"""
import argparse
import logging
import sys

from mcore_align.checkpoint import convert_hf_to_mcore
from mcore_align.checkpoint.layout import DTYPES
from mcore_align.parallel.quiet import quiet_library_warnings


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="HF checkpoint directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the dtype of the safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_library_warnings()
    try:
        out = convert_hf_to_mcore(a.hf, a.out, dtype=a.dtype, overwrite=a.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # guard: dist_checkpointing may spawn helper processes
    from mcore_align.checkpoint.layout import run_tool

    sys.exit(run_tool(main))
