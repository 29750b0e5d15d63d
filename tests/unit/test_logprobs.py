"""mcore_align.ops: chunked log-prob kernels and packed segment sums against float64 references.

Every reference here is the plain unsharded computation in float64:
``log_softmax(logits.double()).gather(target)``, entropy ``-sum p log p``, and python
loops over ``cu_seqlens``. Multi-rank (TP/SP/CP) checks live in
tests/distributed/test_logprobs_dist.py.
"""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mcore_align.ops import allreduce_segment_sums, fused_linear_logprobs, segment_sums, vocab_parallel_logprobs


def _ref_logprobs(logits, target):
    """float64 unsharded reference: (logprob, entropy) with target's shape."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent


def _grads(fn, inputs, weights):
    """Gradients of sum_k (outputs_k * weights_k) w.r.t. inputs (random weights: not just sum)."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.double() * w).sum() for o, w in zip(outs, weights))
    return torch.autograd.grad(loss, inputs)


def _case(shape_lead, vocab, dtype=torch.float64, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape_lead, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, vocab, shape_lead, generator=g)
    return logits.requires_grad_(), target


@pytest.mark.parametrize(
    "shape_lead,chunk_size",
    [((13,), 1), ((13,), 5), ((13,), 4096), ((4, 3), 5), ((1,), 1)],  # 5 does not divide 13 or 12
)
@pytest.mark.parametrize("return_entropy", [False, True])
def test_logprobs_match_float64_reference(shape_lead, chunk_size, return_entropy):
    logits, target = _case(shape_lead, vocab=37)
    out = vocab_parallel_logprobs(logits, target, None, chunk_size=chunk_size, return_entropy=return_entropy)
    lp_ref, ent_ref = _ref_logprobs(logits, target)
    lp = out[0] if return_entropy else out
    assert lp.shape == target.shape
    assert_close(lp, lp_ref)
    if return_entropy:
        assert_close(out[1], ent_ref)

    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(target.shape, generator=g, dtype=torch.float64) for _ in range(2)]
    (grad,) = _grads(lambda x: vocab_parallel_logprobs(x, target, None, chunk_size, return_entropy), [logits], weights)
    (grad_ref,) = _grads(
        lambda x: _ref_logprobs(x, target) if return_entropy else _ref_logprobs(x, target)[0], [logits], weights
    )
    assert_close(grad, grad_ref)


def test_logprobs_fp32_logits_are_not_modified():
    # The fp32 path must copy the chunk: `.to(float32)` would alias and the in-place exp would corrupt it.
    logits, target = _case((9,), 17, dtype=torch.float32)
    before = logits.detach().clone()
    lp = vocab_parallel_logprobs(logits, target, None, chunk_size=4, return_entropy=True)[0]
    lp.sum().backward()
    assert torch.equal(logits.detach(), before)
    assert lp.dtype == torch.float32 and logits.grad.dtype == torch.float32
    assert_close(lp.double(), _ref_logprobs(before, target)[0], rtol=1e-6, atol=1e-5)


def test_gradcheck_vocab_parallel_logprobs():
    logits, target = _case((5,), 7, scale=1.0)
    for ent in (False, True):
        assert torch.autograd.gradcheck(lambda x: vocab_parallel_logprobs(x, target, None, 2, ent), (logits,))


def test_gradcheck_fused_linear_logprobs():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 7, (5,), generator=g)
    assert torch.autograd.gradcheck(lambda h, w: fused_linear_logprobs(h, w, target, None, chunk_size=2), (hidden, weight))


def test_bf16_logits_against_float64_reference():
    logits, target = _case((4, 6), 301, dtype=torch.bfloat16, scale=4.0)
    lp, ent = vocab_parallel_logprobs(logits, target, None, chunk_size=7, return_entropy=True)
    assert lp.dtype == torch.float32
    # Upcasting bf16 -> fp64 is exact, so the only error left is fp32 accumulation.
    lp_ref, ent_ref = _ref_logprobs(logits, target)
    assert_close(lp.double(), lp_ref, rtol=1e-5, atol=1e-5)
    assert_close(ent.double(), ent_ref, rtol=1e-5, atol=1e-5)
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(target.shape, generator=g, dtype=torch.float64) for _ in range(2)]
    (grad,) = _grads(lambda x: vocab_parallel_logprobs(x, target, None, 7, True), [logits], weights)
    logits64 = logits.detach().double().requires_grad_()  # exact copy as an fp64 leaf
    (grad_ref,) = _grads(lambda x: _ref_logprobs(x, target), [logits64], weights)
    assert grad.dtype == torch.bfloat16
    assert_close(grad.double(), grad_ref, rtol=1.6e-2, atol=1e-3)  # bf16 rounding of the result


def test_extreme_logits():
    # Huge spread (+-3e4), a row that is constant (uniform softmax), and a row where one
    # logit dominates everything by 1e4 (p = 1 exactly in fp32).
    logits, target = _case((6,), 50, scale=1e4)
    with torch.no_grad():
        logits[1] = -3e4
        logits[2] = -1e4
        logits[2, 7] = 0.0
        target[2] = 7
        logits[3] = 3e4
    lp, ent = vocab_parallel_logprobs(logits.float(), target, None, chunk_size=4, return_entropy=True)
    lp_ref, ent_ref = _ref_logprobs(logits, target)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    assert_close(lp.double(), lp_ref, rtol=1e-5, atol=1e-2)  # fp32 ulp at 3e4 is ~2e-3
    assert_close(ent.double(), ent_ref, rtol=1e-5, atol=1e-4)
    assert ent[2].item() == 0.0 and lp[2].item() == 0.0

    (grad,) = _grads(lambda x: vocab_parallel_logprobs(x, target, None, 4, True), [logits], [torch.ones(6)] * 2)
    (grad_ref,) = _grads(lambda x: _ref_logprobs(x, target), [logits], [torch.ones(6)] * 2)
    assert torch.isfinite(grad).all()
    assert_close(grad, grad_ref)


def test_target_outside_vocab_gives_minus_logsumexp():
    # Padding ids (-100) are owned by no shard: value -lse, gradient -softmax; the loss mask drops them.
    logits, target = _case((3,), 11)
    target[1] = -100
    lp = vocab_parallel_logprobs(logits, target, None)
    assert_close(lp[1], -torch.logsumexp(logits[1], dim=-1))
    (grad,) = torch.autograd.grad(lp[1], logits)
    assert_close(grad[1], -torch.softmax(logits[1].detach(), dim=-1))


def _fused_ref(hidden, weight, target):
    return _ref_logprobs(hidden.double() @ weight.double().t(), target)[0]


@pytest.mark.parametrize("shape_lead,chunk_size", [((11,), 4), ((3, 2), 1), ((5, 2), 1024)])
def test_fused_linear_matches_float64_reference(shape_lead, chunk_size):
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(*shape_lead, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(23, 8, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 23, shape_lead, generator=g)
    lp = fused_linear_logprobs(hidden, weight, target, None, chunk_size=chunk_size)
    assert_close(lp, _fused_ref(hidden, weight, target))
    w = [torch.randn(shape_lead, generator=g, dtype=torch.float64)]
    got = _grads(lambda h, W: fused_linear_logprobs(h, W, target, None, chunk_size), [hidden, weight], w)
    ref = _grads(lambda h, W: _fused_ref(h, W, target), [hidden, weight], w)
    assert_close(got, ref)


def test_fused_linear_bf16_and_frozen_weight():
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(12, 16, generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(97, 16, generator=g) * 0.3).bfloat16()  # frozen: no grad_weight work
    target = torch.randint(0, 97, (12,), generator=g)
    lp = fused_linear_logprobs(hidden, weight, target, None, chunk_size=5)
    assert lp.dtype == torch.float32
    # The bf16 matmul output is rounded to bf16 before fp32 accumulation: ~1e-2 absolute.
    assert_close(lp.double(), _fused_ref(hidden, weight, target), rtol=1e-2, atol=3e-2)
    (gh,) = torch.autograd.grad(lp.sum(), hidden)
    hidden64 = hidden.detach().double().requires_grad_()
    (gh_ref,) = torch.autograd.grad(_fused_ref(hidden64, weight, target).sum(), hidden64)
    assert gh.dtype == torch.bfloat16
    assert_close(gh.double(), gh_ref, rtol=3e-2, atol=3e-2)


def _loop_segment_sums(values, mask, cu):
    sums, counts = [], []
    for i in range(len(cu) - 1):
        s, c = 0.0, 0
        for t in range(cu[i], cu[i + 1]):
            if mask[t]:
                s += float(values[t])
                c += 1
        sums.append(s)
        counts.append(c)
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(counts, dtype=torch.float64)


@pytest.mark.parametrize(
    "cu",
    [
        [0, 3, 3, 4, 7, 7],  # docstring example: empty segments (also trailing) and a length-1 one
        [0, 0, 1, 2, 9],  # leading empty segment, two length-1 segments
        [0, 9],  # one sequence
    ],
)
def test_segment_sums_match_python_loop(cu):
    T = cu[-1]
    g = torch.Generator().manual_seed(6)
    values = torch.randn(T, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(T, generator=g) > 0.3
    cu_t = torch.tensor(cu, dtype=torch.int32)
    sums, counts = segment_sums(values, mask, cu_t)
    ref_sums, ref_counts = _loop_segment_sums(values.detach(), mask, cu)
    assert_close(sums, ref_sums)
    assert_close(counts, ref_counts)
    w = torch.randn(len(cu) - 1, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((sums * w).sum(), values)
    # d sum_i w_i sums_i / d values_t = w_{segment(t)} * mask_t
    expected = torch.zeros(T, dtype=torch.float64)
    for i in range(len(cu) - 1):
        expected[cu[i] : cu[i + 1]] = w[i]
    assert_close(grad, expected * mask)


def test_segment_sums_ignores_nan_under_mask_and_rejects_tokens_past_last_boundary():
    values = torch.tensor([1.0, float("nan"), 2.0, float("-inf")])
    mask = torch.tensor([1, 0, 1, 0])
    sums, counts = segment_sums(values, mask, torch.tensor([0, 2, 4], dtype=torch.int32))
    assert_close(sums, torch.tensor([1.0, 2.0]))
    assert_close(counts, torch.tensor([1.0, 1.0]))
    with pytest.raises((IndexError, RuntimeError)):
        segment_sums(values, mask, torch.tensor([0, 2, 3], dtype=torch.int32))  # token 3 past cu[-1]


def test_allreduce_segment_sums_without_group_is_identity():
    sums = torch.randn(3, requires_grad=True)
    counts = torch.ones(3)
    out_s, out_c = allreduce_segment_sums(sums, counts, None)
    assert out_s is sums and out_c is counts


class _RecordAllocations(TorchDispatchMode):
    """Records (dtype, numel) of every tensor produced by an aten op (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.outputs: list[tuple[torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.outputs.append((t.dtype, t.numel()))
        return out

    def max_numel(self, dtypes):
        return max((n for d, n in self.outputs if d in dtypes), default=0)


def test_chunked_kernel_never_builds_full_fp32_logits():
    T, V, chunk = 64, 1000, 16
    logits, target = _case((T,), V, dtype=torch.bfloat16)

    # The recorder sees the naive path's full fp32 copy (so the check below can fail).
    with _RecordAllocations() as naive:
        lp = torch.log_softmax(logits.float(), -1).gather(-1, target[:, None])
        lp.sum().backward()
    assert naive.max_numel({torch.float32}) == T * V
    logits.grad = None

    with _RecordAllocations() as rec:
        lp, ent = vocab_parallel_logprobs(logits, target, None, chunk_size=chunk, return_entropy=True)
        (lp + ent).sum().backward()
    # Largest fp32 temporary is one chunk; the only full-size tensor is the bf16 gradient.
    assert rec.max_numel({torch.float32, torch.float64}) == chunk * V
    assert rec.max_numel({torch.bfloat16}) == T * V
    assert logits.grad.dtype == torch.bfloat16


def test_fused_path_never_builds_full_logits_in_any_dtype():
    T, V, H, chunk = 64, 1000, 8, 16
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(T, H, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(V, H, generator=g).bfloat16().requires_grad_()
    target = torch.randint(0, V, (T,), generator=g)
    with _RecordAllocations() as rec:
        fused_linear_logprobs(hidden, weight, target, None, chunk_size=chunk).sum().backward()
    assert rec.max_numel({torch.float32, torch.bfloat16, torch.float64}) == chunk * V
    assert hidden.grad.shape == (T, H) and weight.grad.shape == (V, H)


def test_fused_entropy_equals_float64_softmax_entropy_and_leaves_gradients_alone():
    """return_entropy: the entropy of softmax(h W^T) per token (float64 reference) in the same
    chunked pass; the log-probs and their gradients are those of the plain call."""
    from mcore_align.ops.logprobs import fused_linear_logprobs

    g = torch.Generator().manual_seed(5)
    h = torch.randn(37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    tgt = torch.randint(0, 50, (37,), generator=g)
    lp, ent = fused_linear_logprobs(h, w, tgt, None, chunk_size=8, return_entropy=True)
    p = torch.softmax(h.detach() @ w.detach().t(), -1)
    torch.testing.assert_close(ent, -(p * p.log()).sum(-1), rtol=1e-10, atol=1e-12)
    assert not ent.requires_grad
    lp.sum().backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    fused_linear_logprobs(h, w, tgt, None, chunk_size=8).sum().backward()
    torch.testing.assert_close(gh, h.grad, rtol=0, atol=0)
    torch.testing.assert_close(gw, w.grad, rtol=0, atol=0)
