#!/usr/bin/env python
"""Building FlexAttention's document-causal BlockMask for a packed micro-batch.

    .venv/bin/python benchmarks/bench_block_mask.py [--doc-len 2048]

`PackedAttentionKernels.block_mask` works at 128 x 128 tile granularity from `cu_seqlens`
(each query's keys are one contiguous range), so its cost grows with (T/CP) x (T/128).
torch's uncompiled `create_block_mask` evaluates the mask on every (query, key) pair: the
"pairs" column is what it would touch. Peak memory is the growth of this process's peak
RSS during the build (each row runs in a fresh process).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r'''
import json, resource, sys, time, torch
from mcore_align.ops.attention import PackedAttentionKernels
tokens, doc, cp = (int(x) for x in sys.argv[1:4])
cu = torch.arange(0, tokens + 1, doc, dtype=torch.int32)
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
bm = PackedAttentionKernels.block_mask(cu, 0, cp, "cpu")
dt = time.perf_counter() - t
grow = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r0) / 1024
print(json.dumps({"s": dt, "mib": grow, "sparsity": bm.sparsity()}))
'''


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--doc-len", type=int, default=2048, help="length of every packed document")
    a = p.parse_args()
    print(f"documents of {a.doc_len} tokens; 128 x 128 tiles; CPU")
    print("| tokens | CP | (query, key) pairs | build (s) | peak RSS growth (MiB) | sparsity |")
    print("|---:|---:|---:|---:|---:|---:|")
    for tokens in (8192, 32768, 131072):
        for cp in (1, 2):
            out = subprocess.run([sys.executable, "-c", CHILD, str(tokens), str(a.doc_len), str(cp)],
                                 check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            pairs = tokens // cp * tokens
            print(f"| {tokens} | {cp} | {pairs:.2e} | {r['s']:.3f} | {r['mib']:.0f} | {r['sparsity']:.2f}% |")


if __name__ == "__main__":
    main()
