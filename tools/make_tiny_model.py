#!/usr/bin/env python
"""Write a tiny random-init HF checkpoint (any supported family) with a real tokenizer.

    python tools/make_tiny_model.py --family qwen2 --out /tmp/tiny-qwen2
"""
import argparse

import torch

from mcore_align.models.tiny import TINY_FAMILIES, make_tiny_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--family", default="qwen2", choices=sorted(TINY_FAMILIES))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--ffn", type=int, default=160)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--tie", action="store_true", help="tie input and output embeddings")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--max-shard-size", default="2GB", help="e.g. 100KB to get a sharded checkpoint")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    out = make_tiny_model(
        a.out, a.family, num_layers=a.layers, hidden_size=a.hidden, ffn_hidden_size=a.ffn,
        num_heads=a.heads, num_kv_heads=a.kv_heads, vocab_size=a.vocab, tie_word_embeddings=a.tie,
        dtype=DTYPES[a.dtype], max_shard_size=a.max_shard_size, seed=a.seed,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
