"""DPO training throughput on one device: step time, tokens/s, TFLOP/s per GPU, MFU, memory.

Run by tools/gpu_check.sh. A random-init Qwen2-shaped model is written and converted
here (nothing is downloaded), trained for a few steps on synthetic pairs through the real
Trainer, and each step's FLOPs are counted by mcore_align/flops.py from the step's packed
sequence lengths. The first step (warm-up: allocator, kernels) is left out of the means.

    python benchmarks/gpu/bench_train.py --size 0.5b --out $OUT          # GPU (bf16)
    python benchmarks/gpu/bench_train.py --size tiny --device cpu --out /tmp/x   # dry run
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# name -> make_tiny_model shape (Qwen2 family); 0.5b is Qwen2.5-0.5B's shape (vocab 151936).
SIZES = {
    "tiny": dict(num_layers=2, hidden_size=64, ffn_hidden_size=160, num_heads=4, num_kv_heads=2, vocab_size=512),
    "0.5b": dict(num_layers=24, hidden_size=896, ffn_hidden_size=4864, num_heads=14, num_kv_heads=2,
                 vocab_size=151936),
    "1.5b": dict(num_layers=28, hidden_size=1536, ffn_hidden_size=8960, num_heads=12, num_kv_heads=2,
                 vocab_size=151936),
}


def long_pairs(n: int, words: int, seed: int = 0) -> list[dict]:
    from tests.cuda.conftest import WORDS
    import random

    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    return [{"conversations": [{"from": "human", "value": text(rng.randint(words // 4, words // 2))}],
             "chosen": {"from": "gpt", "value": text(rng.randint(words // 2, words))},
             "rejected": {"from": "gpt", "value": text(rng.randint(words // 2, words))}} for _ in range(n)]


def run(args) -> list[dict]:
    from mcore_align.config import build_config
    from mcore_align.flops import device_peak, micro_batch_lengths, step_flops_for_config
    from mcore_align.models.tiny import make_tiny_model
    from mcore_align.trainer.trainer import Trainer

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / f"mcore_{args.size}"
    if not (ckpt / "model_spec.json").exists():
        hf = make_tiny_model(work / f"hf_{args.size}", "qwen2", **SIZES[args.size], max_position_embeddings=8192)
        subprocess.run([sys.executable, "tools/convert_hf_to_mcore.py", "--hf", str(hf), "--out", str(ckpt)],
                       cwd=ROOT, check=True, capture_output=True)
    data = work / f"pairs_{args.words}.json"
    data.write_text(json.dumps(long_pairs(args.global_batch * (args.steps + 1), args.words)))
    rows = []
    for variant in args.variants.split(","):
        overrides = {"bf16": ["bf16=true"], "fp32": [], "bf16_recompute": ["bf16=true", "recompute_granularity=full"],
                     "bf16_precompute": ["bf16=true", "ref_model=precompute"],
                     "bf16_distopt": ["bf16=true", "use_distributed_optimizer=true"]}[variant]
        raw = {"model": {"load": str(ckpt)},
               "data": {"dataset": [str(data)], "max_length": args.max_length,
                        "max_tokens_per_micro_batch": args.tokens_per_micro_batch, "cache_dir": str(work / "cache")},
               "optim": {"learning_rate": 1e-5, "lr_decay_style": "constant"},
               "train": {"global_batch_size": args.global_batch, "train_iters": args.steps, "device": args.device,
                         "progress_bar": False, "plot": False, "seed": 1},
               "algo": {"rlhf_type": "dpo", "beta": 0.1, "rpo_alpha": None}}
        tr = Trainer(build_config(raw, overrides))
        steps: list[dict] = []
        inner = tr.stepper.train_step

        def timed(gb, *a, **k):  # the step's lengths and wall time (synchronised on CUDA)
            if tr.rt.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = inner(gb, *a, **k)
            if tr.rt.device.type == "cuda":
                torch.cuda.synchronize()
            steps.append({"seconds": time.perf_counter() - t0, "lengths": micro_batch_lengths(gb.micro_batches),
                          "real_tokens": gb.real_tokens})
            return out

        tr.stepper.train_step = timed
        if tr.rt.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        res = tr.train()
        peak = device_peak(tr.rt, args.peak_tflops)
        measured = steps[1:] or steps
        secs = sum(s["seconds"] for s in measured)
        flops = [step_flops_for_config(tr.spec, tr.cfg, tr.objective, s["lengths"]) for s in measured]
        model_tf = sum(f.model_flops for f in flops) / secs / 1e12
        hw_tf = sum(f.hardware_flops for f in flops) / secs / 1e12
        rows.append({
            "variant": variant, "size": args.size, "device": args.device,
            "step_s": statistics.median(s["seconds"] for s in measured),
            "tokens_per_s": sum(s["real_tokens"] for s in measured) / secs,
            "tflops_per_gpu": model_tf, "mfu": model_tf / peak if peak else None,
            "hfu": hw_tf / peak if peak else None,
            "peak_mem_gib": (torch.cuda.max_memory_allocated() / 2**30 if tr.rt.device.type == "cuda"
                             else res["history"][-1]["mem_gib"]),
            "final_loss": res["history"][-1]["loss"],
        })
        del tr
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    cols = ["variant", "size", "device", "step_s", "tokens_per_s", "tflops_per_gpu", "mfu", "hfu", "peak_mem_gib",
            "final_loss"]

    def fmt(v):
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", default="bf16,bf16_recompute,bf16_precompute,bf16_distopt")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--words", type=int, default=250,
                   help="max words per response (~5 tiny-BPE tokens a word: 250 -> pairs of 900-1800 tokens)")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--tokens-per-micro-batch", type=int, default=8192)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--work", default="/tmp/mcore_align_bench_gpu")
    p.add_argument("--out", default=None, help="folder for bench_train.json / .md")
    args = p.parse_args()
    rows = run(args)
    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU {platform.processor() or platform.machine()}"
    text = f"DPO training, {machine}, torch {torch.__version__}\n\n{table(rows)}\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_train.json").write_text(json.dumps({"machine": machine, "args": vars(args), "rows": rows}, indent=1))
        (out / "bench_train.md").write_text(text)


if __name__ == "__main__":
    main()
