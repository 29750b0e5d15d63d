"""Peak memory and time of per-token log-probs, forward + backward.

Compares, at Qwen2's vocabulary (152064) and 8192 tokens with bf16 logits:

  naive      full fp32 ``log_softmax(logits.float()).gather(target)``
  chunked    ``vocab_parallel_logprobs`` (fp32 only per chunk of tokens)
  unfused    ``hidden @ weight.T`` then ``vocab_parallel_logprobs`` (materialises bf16 logits)
  fused      ``fused_linear_logprobs`` from hidden states (logits exist one chunk at a time)

Peak memory is the peak of *extra* live tensor storage during forward + backward,
above the inputs (logits, or hidden + weight). On CUDA it is
``torch.cuda.max_memory_allocated``; on CPU every aten op is seen by a
``TorchDispatchMode`` that adds the bytes of each newly allocated storage and
subtracts them when the storage is freed (a ``weakref.finalize`` on the storage).
That is exact and deterministic, unlike process RSS.

    .venv/bin/python benchmarks/bench_logprobs.py            # ~2 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_logprobs.py --tokens 1024 --hidden 256   # quick
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mcore_align.ops import fused_linear_logprobs, vocab_parallel_logprobs

GiB = 1024**3


class StoragePeakTracker(TorchDispatchMode):
    """Live bytes of storages allocated by aten ops inside the mode, and their peak.

    An op output is a new allocation unless it shares storage with one of the op's
    tensor arguments (views and in-place ops) or was already counted.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def _free(self, ptr: int, nbytes: int) -> None:
        self._tracked.discard(ptr)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        in_ptrs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0 or ptr in in_ptrs or ptr in self._tracked:
                continue
            self._tracked.add(ptr)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, ptr, storage.nbytes())
        return out


def measure(step, device: torch.device) -> tuple[float, float]:
    """(seconds, peak extra GiB) of one call of `step` (forward + backward)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        return time.perf_counter() - t0, (torch.cuda.max_memory_allocated() - base) / GiB
    with StoragePeakTracker() as tracker:
        t0 = time.perf_counter()
        step()
        seconds = time.perf_counter() - t0
    return seconds, tracker.peak / GiB


def random_bf16(shape, device, scale=1.0, rows_per_block=512):
    """bf16 N(0, scale^2) filled block by block (no full-size fp32 temporary)."""
    out = torch.empty(shape, dtype=torch.bfloat16, device=device)
    flat = out.view(-1, shape[-1])
    for i in range(0, flat.shape[0], rows_per_block):
        flat[i : i + rows_per_block] = torch.randn(flat[i : i + rows_per_block].shape, device=device) * scale
    return out


def cpu_name() -> str:
    name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def warm_up(device: torch.device) -> None:
    """One tiny call of every path, so one-time initialisation is not timed."""
    x = torch.randn(8, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    h = torch.randn(8, 16, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(64, 16, device=device, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 64, (8,), device=device)
    torch.log_softmax(x.float(), -1).gather(-1, t[:, None]).sum().backward()
    vocab_parallel_logprobs(x, t, None, chunk_size=3).sum().backward()
    vocab_parallel_logprobs(h @ w.t(), t, None, chunk_size=3).sum().backward()
    fused_linear_logprobs(h, w, t, None, chunk_size=3).sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--chunk-sizes", default="4096,1024", help="chunk sizes for the logits kernel")
    parser.add_argument("--fused-chunk", type=int, default=1024)
    parser.add_argument("--skip", default="", help="comma list of rows to skip: naive,chunked,unfused,fused")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    skip = set(filter(None, args.skip.split(",")))
    warm_up(device)
    torch.manual_seed(0)
    T, V, H = args.tokens, args.vocab, args.hidden
    target = torch.randint(0, V, (T,), device=device)

    rows = []  # (name, seconds, peak GiB)
    logits = random_bf16((T, V), device, scale=2.0).requires_grad_()

    def run_logits(fn):
        def step():
            fn(logits).sum().backward()
            logits.grad = None  # freed inside the measured region; its allocation still counts

        return step

    if "naive" not in skip:
        naive = run_logits(lambda x: torch.log_softmax(x.float(), dim=-1).gather(-1, target[:, None]).squeeze(-1))
        rows.append(("naive fp32 log_softmax + gather", *measure(naive, device)))
    if "chunked" not in skip:
        for c in (int(c) for c in args.chunk_sizes.split(",")):
            step = run_logits(lambda x, c=c: vocab_parallel_logprobs(x, target, None, chunk_size=c))
            rows.append((f"chunked vocab_parallel_logprobs (chunk {c})", *measure(step, device)))
    del logits
    gc.collect()

    hidden = random_bf16((T, H), device).requires_grad_()
    weight = random_bf16((V, H), device, scale=H**-0.5).requires_grad_()

    def run_hidden(fn):
        def step():
            fn().sum().backward()
            hidden.grad = weight.grad = None

        return step

    if "unfused" not in skip:
        c = int(args.chunk_sizes.split(",")[0])
        step = run_hidden(lambda: vocab_parallel_logprobs(hidden @ weight.t(), target, None, chunk_size=c))
        rows.append((f"unfused hidden@W.T + chunked (chunk {c})", *measure(step, device)))
    if "fused" not in skip:
        step = run_hidden(lambda: fused_linear_logprobs(hidden, weight, target, None, chunk_size=args.fused_chunk))
        rows.append((f"fused_linear_logprobs (chunk {args.fused_chunk})", *measure(step, device)))

    machine = torch.cuda.get_device_name() if device.type == "cuda" else cpu_name()
    print(f"tokens={T} vocab={V} hidden={H} bf16, forward+backward, device={device} ({machine}), torch {torch.__version__}")
    print(f"inputs: logits {T * V * 2 / GiB:.2f} GiB; hidden + weight {(T * H + V * H) * 2 / GiB:.2f} GiB (not counted)")
    ref = next((r for r in rows if r[0].startswith("naive")), None)
    print("| path | time (s) | peak extra memory (GiB) | time vs naive | memory vs naive |")
    print("|---|---:|---:|---:|---:|")
    for name, sec, peak in rows:
        vs_t = f"{sec / ref[1]:.2f}x" if ref else "-"
        vs_m = f"{peak / ref[2]:.3f}x" if ref else "-"
        print(f"| {name} | {sec:.2f} | {peak:.2f} | {vs_t} | {vs_m} |")


if __name__ == "__main__":
    main()
