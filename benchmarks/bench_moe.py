"""Step time and peak RSS of DPO on a small Qwen3-MoE through the trainer, EP=1 vs EP=2 (CPU).

    python benchmarks/bench_moe.py                      # EP 1 and 2 on 2 ranks (DP=2)
    python benchmarks/bench_moe.py --ep 2 --steps 6     # one cell

Model: Qwen3-MoE, ``--layers`` layers, h=``--hidden``, ``--experts`` experts of width
``--expert-ffn``, top-2, vocab 512 (random init, converted once to a megatron checkpoint in
``--work``). Data: the demo's preference task (``mcore_align/demo.py`` make_task), global
batch 16 pairs, max_length 64. Each cell is one ``torchrun --nproc-per-node=2`` launch of the
real trainer (``mcore_align.trainer.Trainer``): at EP=1 each rank holds every expert (DP=2);
at EP=2 each holds half and tokens travel by all-to-all (DP=2 for the dense part, expert-DP 1).
Time: median of the per-step ``step_time`` after ``--warmup`` steps (reference pass, forward,
backward, optimizer). Memory: peak RSS of the process (``ru_maxrss``), the max over ranks,
and its growth over the RSS before the trainer was built. One thread per rank.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(a) -> None:
    import torch
    import torch.distributed as dist

    from mcore_align.config import build_config
    from mcore_align.trainer.trainer import Trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    base = _rss_mib()
    work = Path(a.work)
    raw = {
        "model": {"load": str(work / "mc")},
        "data": {"dataset": [str(work / "task.jsonl")], "max_length": 64, "max_tokens_per_micro_batch": 512,
                 "cache_dir": str(work / "cache")},
        "optim": {"learning_rate": 1e-3, "lr_decay_style": "constant", "clip_grad": 1.0},
        "train": {"global_batch_size": 16, "train_iters": a.warmup + a.steps, "device": "cpu",
                  "progress_bar": False, "plot": False, "seed": 7},
        "algo": {"rlhf_type": "dpo", "beta": 0.1, "rpo_alpha": None},
    }
    h = Trainer(build_config(raw, [f"expert_model_parallel_size={a.ep}"])).train()["history"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    stats = torch.tensor([peak, peak - base], dtype=torch.float64)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        times = [x["step_time"] for x in h[a.warmup:]]
        Path(a.out).write_text(json.dumps(dict(
            ep=a.ep, step_s=statistics.median(times), step_s_min=min(times), peak_rss_mib=stats[0].item(),
            rss_growth_mib=stats[1].item(), tokens_per_s=statistics.median(x["tokens_per_sec"] for x in h[a.warmup:]),
            loss_first=h[0]["loss"], loss_last=h[-1]["loss"])))
    dist.destroy_process_group()


def _prepare(a) -> None:
    work = Path(a.work)
    if (work / "mc").exists():
        return
    from mcore_align.checkpoint import convert_hf_to_mcore
    from mcore_align.demo import make_task
    from mcore_align.models.tiny import make_tiny_model

    make_tiny_model(work / "hf", "qwen3_moe", num_layers=a.layers, hidden_size=a.hidden, num_heads=4,
                    num_kv_heads=2, hf_overrides={"num_experts": a.experts, "num_experts_per_tok": 2,
                                                  "moe_intermediate_size": a.expert_ffn})
    convert_hf_to_mcore(work / "hf", work / "mc", dtype="fp32")
    make_task(work / "task.jsonl", 320, seed=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ep", type=int, nargs="*", default=[1, 2])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--expert-ffn", type=int, default=512)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--work", default="/tmp/bench_moe")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        a.ep = a.ep[0]
        return worker(a)
    _prepare(a)
    rows = []
    for ep in a.ep:
        out = Path(a.work) / f"ep{ep}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
               f"--master-port={29500 + ep}", __file__, "--worker", "--ep", str(ep), "--out", str(out),
               "--work", a.work, "--steps", str(a.steps), "--warmup", str(a.warmup)]
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows.append(json.loads(out.read_text()))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, 2 ranks x 1 thread, torch CPU/gloo")
    print("| EP | step (s, median) | tokens/s | peak RSS per rank (MiB) | RSS growth (MiB) | loss first -> last |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['ep']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_rss_mib']:.0f} | "
              f"{r['rss_growth_mib']:.0f} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} |")


if __name__ == "__main__":
    main()
