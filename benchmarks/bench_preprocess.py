"""Tokenizing a dataset into the trainer's cache: the trainer's serial build vs
tools/preprocess_data.py with N worker processes. Records/s and tokens/s.

The dataset is the shared DPO demo (300 pairs) repeated ``--repeat`` times (``#N`` sampling),
tokenized with a tiny model's byte-level BPE (vocab 512; a real 150k-vocabulary tokenizer
spends more time per character in the Rust encoder, chat templating costs the same).

    .venv/bin/python benchmarks/bench_preprocess.py --repeat 10 --workers 1,2
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))


def main() -> None:
    from transformers import AutoTokenizer

    from mcore_align.data.config import DataConfig
    from mcore_align.data.store import load_or_build_store
    from mcore_align.models.tiny import make_tiny_model
    from preprocess_data import preprocess

    p = argparse.ArgumentParser()
    p.add_argument("--data", default=os.path.join(os.environ.get("MCORE_ALIGN_DATA", str(ROOT.parent / "shared" / "data")),
                                                  "dpo_en_demo.json"))
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--trials", type=int, default=3, help="builds of each kind; the fastest is reported")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_prep"))
    try:
        hf = make_tiny_model(work / "hf", "qwen2", num_layers=1, hidden_size=32, ffn_hidden_size=64, vocab_size=512)
        tok = AutoTokenizer.from_pretrained(str(hf))
        n = 300 * a.repeat
        rows = []

        def cfg(name):
            return DataConfig(dataset=[f"{a.data}#{n}"], max_length=4096, cache_dir=str(work / name), seed=1)

        dt = float("inf")
        for t in range(a.trials):  # min over trials: the machine may be shared
            t0 = time.perf_counter()
            store = load_or_build_store(cfg(f"serial{t}"), tok, "paired")
            dt = min(dt, time.perf_counter() - t0)
        tokens = int(store.meta["num_tokens"])
        rows.append(("trainer build (serial)", dt, store.meta["records_kept"], tokens))
        for w in (int(x) for x in a.workers.split(",")):
            best = float("inf")
            for t in range(a.trials):
                t0 = time.perf_counter()
                s = preprocess(cfg(f"w{w}_{t}"), str(hf), "paired", workers=w, chunk=a.chunk, log=lambda m: None)
                best = min(best, time.perf_counter() - t0)
            rows.append((f"preprocess_data.py --workers {w}", best, s["records_kept"], s["tokens"]))
        print(f"{n} records, {tokens} tokens; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
        print("| build | seconds (best of trials, incl. worker start-up) | records/s | tokens/s |")
        print("|---|---:|---:|---:|")
        for name, secs, recs, toks in rows:
            print(f"| {name} | {secs:.2f} | {recs / secs:.0f} | {toks / secs:.0f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
