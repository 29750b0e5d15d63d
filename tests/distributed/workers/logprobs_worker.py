"""2-rank (gloo) cases for mcore_align.ops, run in one torchrun launch by tests.dist_utils.

Every rank builds the same full tensors from a fixed seed, takes its shard (vocab rows,
sequence slice or CP tokens), and compares against the unsharded computation: the TP=1
/ CP=1 kernel and a float64 ``log_softmax`` reference.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.testing import assert_close

from mcore_align.ops import (
    allreduce_segment_sums,
    fused_linear_logprobs,
    segment_sums,
    vocab_parallel_logprobs,
)

WORLD = dist.group.WORLD


def _rank_world():
    return dist.get_rank(), dist.get_world_size()


def _vocab_shard(full_VX: torch.Tensor, dim: int) -> torch.Tensor:
    """This rank's contiguous vocab shard [r*V/TP, (r+1)*V/TP) along `dim` (megatron's partition)."""
    rank, world = _rank_world()
    return full_VX.chunk(world, dim=dim)[rank]


def _ref_logprobs(logits, target):
    logp = torch.log_softmax(logits.double(), dim=-1)
    return logp.gather(-1, target.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def _assert_same_on_all_ranks(x: torch.Tensor) -> None:
    gathered = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, x.contiguous())
    for other in gathered:
        assert torch.equal(other, gathered[0])


def case_tp2_logprobs_and_entropy_equal_tp1():
    g = torch.Generator().manual_seed(0)
    s, b, V = 5, 3, 42  # 15 tokens, chunk 4 does not divide
    full = torch.randn(s, b, V, generator=g, dtype=torch.float64) * 3
    full[0, 0] -= 50.0  # very different maxima on the two shards for one token
    full[0, 0, :21] += 80.0
    target = torch.randint(0, V, (s, b), generator=g)
    w_lp, w_ent = torch.randn(s, b, generator=g, dtype=torch.float64), torch.randn(s, b, generator=g, dtype=torch.float64)

    shard = _vocab_shard(full, dim=-1).clone().requires_grad_()
    lp, ent = vocab_parallel_logprobs(shard, target, WORLD, chunk_size=4, return_entropy=True)
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()

    ref_in = full.clone().requires_grad_()
    lp1, ent1 = vocab_parallel_logprobs(ref_in, target, None, chunk_size=4, return_entropy=True)
    ((lp1 * w_lp).sum() + (ent1 * w_ent).sum()).backward()
    full64 = full.clone().requires_grad_()
    lp64, ent64 = _ref_logprobs(full64, target)
    ((lp64 * w_lp).sum() + (ent64 * w_ent).sum()).backward()

    assert_close(lp, lp1)
    assert_close(ent, ent1)
    assert_close(lp, lp64.detach())
    assert_close(ent, ent64.detach())
    assert_close(shard.grad, _vocab_shard(ref_in.grad, dim=-1))
    assert_close(shard.grad, _vocab_shard(full64.grad, dim=-1))
    _assert_same_on_all_ranks(lp)


def case_tp2_bf16_logits_equal_tp1():
    g = torch.Generator().manual_seed(1)
    T, V = 9, 64
    full = (torch.randn(T, V, generator=g) * 4).bfloat16()
    target = torch.randint(0, V, (T,), generator=g)
    shard = _vocab_shard(full, dim=-1).clone().requires_grad_()
    lp = vocab_parallel_logprobs(shard, target, WORLD, chunk_size=2)
    lp.sum().backward()
    ref_in = full.clone().requires_grad_()
    lp1 = vocab_parallel_logprobs(ref_in, target, None, chunk_size=2)
    lp1.sum().backward()
    assert lp.dtype == torch.float32 and shard.grad.dtype == torch.bfloat16
    assert_close(lp, lp1, rtol=1e-5, atol=1e-5)  # only fp32 summation order differs
    assert_close(lp.double(), _ref_logprobs(full, target)[0], rtol=1e-5, atol=1e-5)
    assert_close(shard.grad, _vocab_shard(ref_in.grad, dim=-1), rtol=1.6e-2, atol=1e-3)


def _fused_inputs(seed, lead_shape, H=6, V=30):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead_shape, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    target = torch.randint(0, V, lead_shape, generator=g)
    w = torch.randn(lead_shape, generator=g, dtype=torch.float64)
    return hidden, weight, target, w


def _fused_reference(hidden, weight, target, w):
    """Unsharded fp64: (logprobs, grad_hidden, grad_weight) of sum(w * logprobs)."""
    h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp = _ref_logprobs(h @ W.t(), target)[0]
    (lp * w).sum().backward()
    return lp.detach(), h.grad, W.grad


def case_fused_tp2_equals_float64_reference():
    hidden, weight, target, w = _fused_inputs(2, (11,))
    h = hidden.clone().requires_grad_()  # replicated over TP
    W = _vocab_shard(weight, dim=0).clone().requires_grad_()
    lp = fused_linear_logprobs(h, W, target, WORLD, chunk_size=3)
    (lp * w).sum().backward()
    lp_ref, gh_ref, gw_ref = _fused_reference(hidden, weight, target, w)
    assert_close(lp, lp_ref)
    assert_close(h.grad, gh_ref)  # full grad: backward all-reduced the per-shard parts
    assert_close(W.grad, _vocab_shard(gw_ref, dim=0))


def case_fused_tp2_sequence_parallel_equals_float64_reference():
    rank, world = _rank_world()
    s, b = 6, 2
    hidden, weight, target, w = _fused_inputs(3, (s, b))
    h = hidden.chunk(world, dim=0)[rank].clone().requires_grad_()  # [s/TP, b, H]
    W = _vocab_shard(weight, dim=0).clone().requires_grad_()
    lp = fused_linear_logprobs(h, W, target, WORLD, chunk_size=5, sequence_parallel=True)
    assert lp.shape == (s, b)  # full sequence
    (lp * w).sum().backward()
    lp_ref, gh_ref, gw_ref = _fused_reference(hidden, weight, target, w)
    assert_close(lp, lp_ref)
    assert_close(h.grad, gh_ref.chunk(world, dim=0)[rank])  # reduce-scattered to my slice
    assert_close(W.grad, _vocab_shard(gw_ref, dim=0))


class _VocabParallelLookup(torch.autograd.Function):
    """Megatron-style vocab-parallel embedding lookup: masked local lookup + all-reduce(SUM).

    Backward of the all-reduce is the identity (the loss is the same on every TP rank).
    """

    @staticmethod
    def forward(ctx, weight_shard_VH, ids_T, group):
        rank = dist.get_rank(group)
        vp = weight_shard_VH.shape[0]
        owned = (ids_T >= rank * vp) & (ids_T < (rank + 1) * vp)
        local = torch.where(owned, ids_T - rank * vp, torch.zeros_like(ids_T))
        out = weight_shard_VH[local] * owned.unsqueeze(-1)
        dist.all_reduce(out, group=group)
        ctx.save_for_backward(local, owned)
        ctx.vp = vp
        return out

    @staticmethod
    def backward(ctx, grad_TH):
        local, owned = ctx.saved_tensors
        grad_w = grad_TH.new_zeros(ctx.vp, grad_TH.shape[-1])
        grad_w.index_add_(0, local, grad_TH * owned.unsqueeze(-1))
        return grad_w, None, None


def case_fused_tp2_tied_embedding_weight_equals_float64_reference():
    # The same [V/TP, H] parameter serves as input embedding and output layer; its gradient
    # is the sum of both uses.
    hidden_unused, weight, target, w = _fused_inputs(4, (10,))
    g = torch.Generator().manual_seed(40)
    input_ids = torch.randint(0, weight.shape[0], (10,), generator=g)

    W = _vocab_shard(weight, dim=0).clone().requires_grad_()
    h = torch.tanh(_VocabParallelLookup.apply(W, input_ids, WORLD))
    lp = fused_linear_logprobs(h, W, target, WORLD, chunk_size=4)
    (lp * w).sum().backward()

    W_ref = weight.clone().requires_grad_()
    lp_ref = _ref_logprobs(torch.tanh(W_ref[input_ids]) @ W_ref.t(), target)[0]
    (lp_ref * w).sum().backward()
    assert_close(lp, lp_ref.detach())
    assert_close(W.grad, _vocab_shard(W_ref.grad, dim=0))


def _cp_local_indices(cu: list[int], rank: int, world: int) -> list[int]:
    """Token indices a CP rank holds under megatron's load-balanced split.

    Each sequence (length a multiple of 2*CP) is cut into 2*CP equal pieces; rank r
    holds pieces r and 2*CP-1-r. E.g. CP=2, one sequence of 8 tokens: rank 0 gets
    tokens [0,1, 6,7], rank 1 gets [2,3, 4,5].
    """
    idx = []
    for a, e in zip(cu[:-1], cu[1:]):
        piece = (e - a) // (2 * world)
        for p in (rank, 2 * world - 1 - rank):
            idx.extend(range(a + p * piece, a + (p + 1) * piece))
    return idx


def case_cp2_segment_sums_and_grads_equal_cp1():
    rank, world = _rank_world()
    cu = [0, 8, 8, 12, 28, 28]  # zero-length segments in the middle and at the end
    T = cu[-1]
    g = torch.Generator().manual_seed(5)
    values = torch.randn(T, generator=g, dtype=torch.float64)
    mask = torch.rand(T, generator=g) > 0.25
    mask[8:12] = False  # a sequence with no loss tokens at all

    def loss_of(sums, counts):
        # DPO-like nonlinear loss of per-sequence means, identical on every CP rank.
        return torch.nn.functional.logsigmoid(sums / counts.clamp_min(1.0)).sum() + (sums**2).sum()

    # CP=1 reference: all tokens, global cu_seqlens.
    v1 = values.clone().requires_grad_()
    sums1, counts1 = segment_sums(v1, mask, torch.tensor(cu, dtype=torch.int32))
    loss_of(sums1, counts1).backward()

    # CP=2: my half of every sequence, local cu_seqlens = cu // CP.
    idx = torch.tensor(_cp_local_indices(cu, rank, world))
    v2 = values[idx].clone().requires_grad_()
    local_cu = torch.tensor(cu, dtype=torch.int32) // world
    part_sums, part_counts = segment_sums(v2, mask[idx], local_cu)
    sums2, counts2 = allreduce_segment_sums(part_sums, part_counts, WORLD)
    loss2 = loss_of(sums2, counts2)
    loss2.backward()

    assert_close(sums2, sums1)
    assert_close(counts2, counts1)
    assert_close(loss2, loss_of(sums1, counts1))
    # Identity backward: each rank gets exactly the CP=1 gradient of its own tokens, so
    # the CP ranks' gradients together (a sum, no double counting) are the CP=1 gradient.
    assert_close(v2.grad, v1.grad[idx])
    assert not torch.equal(part_sums.detach(), sums2.detach())  # the all-reduce did something


def case_cp2_end_to_end_logprobs_then_segment_sums():
    # Log-probs (TP=1 per CP rank) -> partial segment sums -> CP all-reduce equals CP=1.
    rank, world = _rank_world()
    cu = [0, 4, 12]
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(12, 17, generator=g, dtype=torch.float64)
    target = torch.randint(0, 17, (12,), generator=g)
    mask = torch.ones(12, dtype=torch.bool)

    full = logits.clone().requires_grad_()
    s1, _ = segment_sums(vocab_parallel_logprobs(full, target, None), mask, torch.tensor(cu, dtype=torch.int32))
    s1.sum().backward()

    idx = torch.tensor(_cp_local_indices(cu, rank, world))
    mine = logits[idx].clone().requires_grad_()
    ps, pc = segment_sums(vocab_parallel_logprobs(mine, target[idx], None), mask[idx], torch.tensor(cu) // world)
    s2, _ = allreduce_segment_sums(ps, pc, WORLD)
    s2.sum().backward()
    assert_close(s2, s1)
    assert_close(mine.grad, full.grad[idx])
