"""Peak memory and time of one DPO-like forward+backward step, CP=1 vs CP=2, packed sequences.

    python benchmarks/bench_cp.py                       # 8k,16k,32k tokens x CP 1,2 (CPU)
    python benchmarks/bench_cp.py --tokens 8192 --cp 2  # one cell

Each cell is a fresh process group (``torchrun --nproc-per-node=CP``) so peak memory is per
cell. The micro-batch is ``tokens`` tokens of packed (chosen, rejected) pairs of
``--seq-len`` each; the step is: GPTModel forward on this rank's tokens (PackedCoreAttention,
K/V all-gathered over CP) -> per-token log-probs -> per-sequence sums all-reduced over CP ->
DPO loss -> backward. Memory: on CUDA ``max_memory_allocated``; on CPU the growth of the
process's peak RSS over the RSS after building the model (rank max). Time: best of the
timed steps after one warm-up step. On CPU each rank runs ``--threads-per-rank`` threads
(default 1: on a 2-core machine shared with other work, 2 threads in one process were slower
than 1), so CP=2 also uses twice the cores; compare per-rank memory first.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from mcore_align.models.provider import ModelOptions, build_model
    from mcore_align.models.spec import ModelSpec
    from mcore_align.ops.context_parallel import packed_position_ids, packed_seq_params, split_packed_for_cp
    from mcore_align.ops.logprobs import vocab_parallel_logprobs
    from mcore_align.ops.segments import allreduce_segment_sums, segment_sums
    from mcore_align.parallel import ParallelConfig, initialize

    cp_size = int(os.environ.get("WORLD_SIZE", 1))
    rt = initialize(ParallelConfig(context_parallel_size=cp_size), device=args.device)
    if rt.is_cpu:
        torch.set_num_threads(args.threads_per_rank)
    spec = ModelSpec(
        family="llama", num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=4 * args.hidden,
        num_attention_heads=args.hidden // 32, num_query_groups=max(1, args.hidden // 64), head_dim=32,
        vocab_size=args.vocab, max_position_embeddings=args.seq_len, rope_theta=10000.0,
    )
    (model,) = build_model(spec, rt, opts=ModelOptions(core_attention="packed"))
    cp = rt.pgs.cp
    dev = rt.device
    n_seq = args.tokens // args.seq_len
    cu = torch.arange(0, args.tokens + 1, args.seq_len, dtype=torch.int32, device=dev)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, spec.vocab_size, (args.tokens,), generator=g).to(dev)
    labels = torch.roll(tokens, -1)
    loss_mask = torch.ones(args.tokens, device=dev)
    loss_mask[(cu[1:] - 1).long()] = 0
    tok, lab, mask, pos, cu_local = split_packed_for_cp(
        tokens, labels, loss_mask, packed_position_ids(cu), cu_seqlens=cu, cp_rank=cp.rank(), cp_size=cp_size
    )
    psp = packed_seq_params(cu, cp_group=cp)

    def step():
        logits = model(tok[None], pos[None], None, packed_seq_params=psp)
        lp = vocab_parallel_logprobs(logits[0], lab, None)
        sums, counts = allreduce_segment_sums(*segment_sums(lp, mask, cu_local), cp)
        chosen, rejected = sums[0::2], sums[1::2]
        loss = -F.logsigmoid(0.1 * (chosen - rejected)).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mib()
    times = []
    for _ in range(1 + args.steps):
        dist.barrier()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20 - base
    else:
        peak = _peak_rss_mib() - base
    stats = torch.tensor([peak, min(times[1:])], dtype=torch.float64)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    if rt.rank == 0:
        Path(args.out).write_text(json.dumps(dict(
            tokens=args.tokens, cp=cp_size, seqs=n_seq, peak_mib=stats[0].item(), step_s=stats[1].item(),
            tokens_per_rank=args.tokens // cp_size, device=str(dev), warmup_s=times[0],
        )))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cell(args, tokens: int, cp: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cell.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={cp}", "--master-addr=127.0.0.1",
               f"--master-port={_free_port()}",
               str(Path(__file__).resolve()), "--worker", "--tokens", str(tokens), "--out", str(out),
               "--seq-len", str(args.seq_len), "--hidden", str(args.hidden), "--layers", str(args.layers),
               "--vocab", str(args.vocab), "--steps", str(args.steps), "--device", args.device,
               "--threads-per-rank", str(args.threads_per_rank)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads_per_rank)}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0 or not out.exists():
            return dict(tokens=tokens, cp=cp, error=(proc.stdout + proc.stderr)[-2000:])
        return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 32768], help="tokens per micro-batch")
    p.add_argument("--cp", type=int, nargs="+", default=[1, 2], help="context parallel sizes")
    p.add_argument("--seq-len", type=int, default=1024, help="length of each packed sequence")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads-per-rank", type=int, default=1, help="torch CPU threads per rank")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per cell")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.tokens = args.tokens[0]
        return worker(args)

    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, device={args.device}, {args.threads_per_rank} thread(s)/rank")
    print(f"# model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; sequences of {args.seq_len} tokens")
    print(f"| tokens/micro-batch | CP | tokens/rank | peak mem/rank (MiB) | step time (s) |")
    print(f"|---:|---:|---:|---:|---:|")
    for tokens in args.tokens:
        for cp in args.cp:
            r = run_cell(args, tokens, cp)
            if "error" in r:
                print(f"| {tokens} | {cp} | - | failed | - |\n<!-- {r['error'][-400:]} -->", flush=True)
                continue
            print(f"| {tokens} | {cp} | {r['tokens_per_rank']} | {r['peak_mib']:.0f} | {r['step_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
