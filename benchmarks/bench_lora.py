#!/usr/bin/env python
"""LoRA DPO next to full DPO: peak memory and step time on the same model, data and batch.

    .venv/bin/python benchmarks/bench_lora.py [--steps 6] [--hidden 512 --layers 8 --vocab 8192]

Builds a random Qwen2-style model, converts it, and trains DPO (sigmoid, beta 0.1, no RPO
term, co-resident reference for full DPO) with `python -m mcore_align.train` as one CPU
process (TP=1, 2 threads) on a synthetic preference set of fixed-length pairs, once with
`train_type=full` and once per LoRA setting. Peak RSS of the training process is sampled
every 10 ms (psutil, `bench_conversion.run_measured`); "baseline" is a process that only
imports the stack and builds the model once (no reference, no optimizer, no step), so
`peak - baseline` is what training adds. Step time is the mean over the steps after the
first two.

Where LoRA saves: no reference copy of the weights (the reference is the base with the
adapters off), no fp32 gradient buffer and no Adam state for the base weights, and no
weight-gradient matmuls for the frozen linears in backward.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_conversion import run_measured

ROOT = Path(__file__).resolve().parents[1]

BASELINE = r'''
import sys
from mcore_align.checkpoint import load_model_weights, read_model_spec
from mcore_align.models.provider import build_model
from mcore_align.parallel.runtime import ParallelConfig, initialize
rt = initialize(ParallelConfig(), device="cpu")
chunks = build_model(read_model_spec(sys.argv[1]), rt)
load_model_weights(chunks, sys.argv[1])
'''


def make_pairs(path: Path, n: int, words: int, seed: int = 0) -> None:
    """Fixed-length prompt/chosen/rejected strings (every step has the same token count)."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(200)]

    def text() -> str:
        return " ".join(rng.choice(vocab) for _ in range(words))

    path.write_text("".join(json.dumps({"prompt": text(), "chosen": text(), "rejected": text()}) + "\n"
                            for _ in range(n)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--gbs", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--words", type=int, default=25, help="words per prompt / response")
    a = p.parse_args()
    from mcore_align.models.tiny import make_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench_lora_"))
    hf = make_tiny_model(work / "hf", "qwen2", num_layers=a.layers, hidden_size=a.hidden,
                         ffn_hidden_size=4 * a.hidden, num_heads=8, num_kv_heads=2, vocab_size=a.vocab)
    subprocess.run([sys.executable, "tools/convert_hf_to_mcore.py", "--hf", str(hf), "--out", str(work / "mcore")],
                   cwd=ROOT, check=True, capture_output=True)
    data = work / "pairs.jsonl"
    make_pairs(data, a.gbs * a.steps, a.words)
    _, baseline = run_measured([sys.executable, "-c", BASELINE, str(work / "mcore")])

    runs = {
        "full DPO (co-resident reference)": ["train_type=full"],
        "LoRA DPO, r=8, DEFAULT (q/k/v)": ["train_type=lora", "lora_rank=8", "lora_target_modules=DEFAULT"],
        "LoRA DPO, r=8, ALL linears": ["train_type=lora", "lora_rank=8", "lora_target_modules=ALL"],
    }
    rows = []
    for i, (name, extra) in enumerate(runs.items()):
        save = work / f"run{i}"
        cmd = [sys.executable, "-m", "mcore_align.train", f"model.load={work / 'mcore'}", f"data.dataset=[{data}]",
               "max_length=1024", "max_tokens_per_micro_batch=4096", f"global_batch_size={a.gbs}",
               f"train_iters={a.steps}", "learning_rate=1e-5", "rpo_alpha=null", "device=cpu", "progress_bar=false",
               "plot=false", f"train.save={save}", f"data.cache_dir={work / 'cache'}", "lora_dropout=0.0", *extra]
        _, peak = run_measured(cmd)
        metrics = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines()]
        times = [m["step_time"] for m in metrics if "step_time" in m][2:]
        rows.append((name, peak, sum(times) / len(times), metrics[0].get("tokens_per_sec")))
        print(f"done: {name}", flush=True)

    print(f"\nDPO, {a.gbs} pairs/step, hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}, fp32, TP=1 on CPU, "
          f"steps 3..{a.steps}; baseline (stack + one model) {baseline / 2**20:.0f} MiB")
    print("| run | peak RSS (MiB) | peak - baseline (MiB) | vs full | s/step | vs full |")
    print("|---|---:|---:|---:|---:|---:|")
    full_mem, full_t = rows[0][1] - baseline, rows[0][2]
    for name, peak, t, _ in rows:
        extra_mem = peak - baseline
        print(f"| {name} | {peak / 2**20:.0f} | {extra_mem / 2**20:.0f} | {extra_mem / full_mem:.2f}x | {t:.2f} | "
              f"{t / full_t:.2f}x |")


if __name__ == "__main__":
    main()
