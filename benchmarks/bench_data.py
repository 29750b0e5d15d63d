"""Data pipeline throughput and packing efficiency on dpo_en_demo.json.

    .venv/bin/python benchmarks/bench_data.py [--data /work/shared/data] [--style llama3]

Tokenize+cache throughput is measured cold (fresh cache dir); pack throughput is the
time to plan and collate one epoch of global batches from the cache. Efficiency = real
tokens / token slots (micro-batches * max_tokens packed; B * S padded).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mcore_align.data import DataConfig, build_data  # noqa: E402
from mcore_align.models.tiny_tokenizer import build_tiny_tokenizer  # noqa: E402


def run(data_file: str, tok, packing: bool, max_tokens: int, max_length: int, gbs: int) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        cfg = DataConfig(dataset=[data_file], max_length=max_length, max_tokens_per_micro_batch=max_tokens,
                         packing=packing, micro_batch_size=4, cache_dir=cache)
        t0 = time.perf_counter()
        data = build_data(cfg, tok, "paired", global_batch_size=gbs, pad_multiple=8, report_batches=0)
        t1 = time.perf_counter()
        real = slots = mbs = 0
        for _ in range(data.train.batches_per_epoch):
            gb = next(data.train)
            real, slots, mbs = real + gb.real_tokens, slots + gb.slot_tokens, mbs + len(gb.micro_batches)
        t2 = time.perf_counter()
        n = data.report["records_read_total"]
        kept = data.train.batches_per_epoch * gbs
        return {"tok_rps": n / (t1 - t0), "pack_rps": kept / (t2 - t1), "eff": real / slots,
                "mbs": mbs / data.train.batches_per_epoch, "kept": data.report["records_kept"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.environ.get("MCORE_ALIGN_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")))
    ap.add_argument("--style", default="llama3")
    ap.add_argument("--gbs", type=int, default=32)
    args = ap.parse_args()
    data_file = str(Path(args.data) / "dpo_en_demo.json")
    with tempfile.TemporaryDirectory() as d:
        tok = build_tiny_tokenizer(d, args.style)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"data: {data_file}, tokenizer: tiny {args.style} (512 vocab), global batch {args.gbs} pairs, pad_multiple 8")
    print("| mode | max_tokens | max_length | pairs kept | tokenize+cache rec/s | pack+collate pairs/s | micro-batches/step | efficiency |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for max_tokens in (2048, 4096):
        max_length = max_tokens // 2
        for packing in (True, False):
            r = run(data_file, tok, packing, max_tokens, max_length, args.gbs)
            mode = "packed" if packing else "padded (mbs 4)"
            print(f"| {mode} | {max_tokens if packing else '-'} | {max_length} | {r['kept']} | {r['tok_rps']:.0f} | "
                  f"{r['pack_rps']:.0f} | {r['mbs']:.1f} | {r['eff']:.3f} |")


if __name__ == "__main__":
    main()
