"""The fused log-prob head's peak memory on CUDA at Qwen2's vocabulary (152064).

UNVERIFIED until a session with a GPU runs tools/gpu_check.sh. Unfused: ``hidden @ W.T``
materialises [T, V] bf16 logits (and their gradient); fused: one chunk of logits at a
time. Peak is ``torch.cuda.max_memory_allocated`` above the inputs, forward + backward.
Values are also checked against the unfused path (bf16 tolerance).
"""
from __future__ import annotations

import pytest
import torch

from mcore_align.ops import fused_linear_logprobs, vocab_parallel_logprobs

V, H, T = 152064, 1024, 8192

pytestmark = pytest.mark.cuda  # also set by tests/cuda/conftest.py, with the CPU skip


def _peak(fn) -> tuple[float, torch.Tensor, torch.Tensor]:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out, grad = fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, out, grad


def test_fused_head_peak_memory_vs_unfused():
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, generator=g)
    weight = (torch.randn(V, H, device="cuda", dtype=torch.bfloat16, generator=g) * H**-0.5)
    target = torch.randint(0, V, (T,), device="cuda", generator=g)

    def run(fused: bool):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        if fused:
            lp = fused_linear_logprobs(h, w, target, None, chunk_size=1024)
        else:
            lp = vocab_parallel_logprobs(h @ w.t(), target, None)
        lp.sum().backward()
        return lp.detach(), h.grad

    unfused_peak, lp_u, gh_u = _peak(lambda: run(False))
    fused_peak, lp_f, gh_f = _peak(lambda: run(True))
    logits_bytes = T * V * 2  # one bf16 [T, V] tensor: 2.5 GB
    assert unfused_peak > logits_bytes, (unfused_peak, logits_bytes)
    # Fused keeps O(chunk * V) extra plus the [V, H] fp32 grad accumulator, far below the logits.
    assert fused_peak < 0.5 * unfused_peak, (fused_peak / 2**30, unfused_peak / 2**30)
    torch.testing.assert_close(lp_f, lp_u, rtol=0, atol=5e-2)
    rel = (gh_f.float() - gh_u.float()).norm() / gh_u.float().norm()
    assert rel < 2e-2, rel
