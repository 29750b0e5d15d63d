"""Reductions over packed sequences: per-token values -> per-sequence sums.

Packed (THD) batches concatenate N sequences into one token axis of length T and
describe the boundaries with ``cu_seqlens`` (int32, ``[N + 1]``, cumulative lengths,
as in megatron's ``PackedSeqParams`` and flash-attention). Sequence ``i`` owns tokens
``[cu_seqlens[i], cu_seqlens[i + 1])``. Worked example, T = 7::

    cu_seqlens = [0, 3, 3, 4, 7, 7]      # N = 5 sequences
    lengths    = [3, 0, 1, 3, 0]         # seq 1 and 4 are zero-length padding segments
    token t    =  0  1  2  3  4  5  6
    segment    =  0  0  0  2  3  3  3

``segment_of_token[t]`` is the number of boundaries ``cu_seqlens[1:]`` that are
``<= t``: for t = 3 the boundaries ``<= 3`` are 3 (seq 0 end) and 3 (seq 1 end), so
t = 3 belongs to segment 2 -- empty segments are skipped automatically.
``cu_seqlens[-1]`` must equal T: a token past it would map to segment N, and the
``index_add_`` below rejects that out-of-range index instead of dropping the token.

With context parallelism each CP rank holds a subset of every sequence's tokens and
calls :func:`segment_sums` with its *local* ``cu_seqlens`` (megatron's padded
``cu_seqlens // cp_size``); :func:`allreduce_segment_sums` then adds the partial sums.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def segment_of_token(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``[T]`` int64 index of the packed sequence each token belongs to (see module docstring)."""
    positions_T = torch.arange(num_tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    # right=True: a token exactly at a boundary belongs to the next non-empty segment.
    return torch.searchsorted(cu_seqlens[1:].contiguous(), positions_T, right=True)


def segment_sums(
    values: torch.Tensor, loss_mask: torch.Tensor, cu_seqlens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence masked sums of ``values`` and counts of unmasked tokens.

    Args:
        values: ``[T]`` per-token values (e.g. log-probs), any float dtype.
        loss_mask: ``[T]`` bool or 0/1; treated as boolean (nonzero keeps the token).
            Masked tokens contribute exactly 0 even if their value is inf/nan.
        cu_seqlens: ``[N + 1]`` int boundaries, ``cu_seqlens[0] == 0``, ``cu_seqlens[-1] == T``;
            zero-length segments allowed.

    Returns:
        ``(sums [N], counts [N])`` in ``values``' dtype. ``sums`` is differentiable w.r.t.
        ``values`` (gradient = mask); ``counts`` is float so that ``sums / counts`` works and
        the pair can be all-reduced in one call.
    """
    if values.dim() != 1 or values.shape != loss_mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and loss_mask {tuple(loss_mask.shape)} must both be [T]")
    num_seqs = cu_seqlens.numel() - 1
    seg_T = segment_of_token(cu_seqlens, values.shape[0])
    keep_T = loss_mask.bool()
    masked_T = torch.where(keep_T, values, torch.zeros_like(values))
    sums_N = values.new_zeros(num_seqs).index_add(0, seg_T, masked_T)
    counts_N = values.new_zeros(num_seqs).index_add(0, seg_T, keep_T.to(values.dtype))
    return sums_N, counts_N


class _AllReduceSumIdentityGrad(torch.autograd.Function):
    """Forward: all-reduce(SUM). Backward: identity (megatron's ``reduce_from_tensor_model_parallel_region``)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()  # never modify the caller's partial sums in place
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out, None


def allreduce_segment_sums(
    sums: torch.Tensor, counts: torch.Tensor, cp_group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add partial per-sequence ``sums`` and ``counts`` ``[N]`` over the context-parallel group.

    One all-reduce of the stacked ``[2, N]`` pair. ``cp_group=None`` or size 1: returned as is.

    Gradient convention: every CP rank then computes the *same* loss L from the total
    sums. The backward is the identity, so rank r receives ``dL/d total`` for its partial
    sums and back-propagates exactly the gradient of L through its own tokens, once.
    Parameter gradients must therefore be **summed** over CP ranks to give dL/dparams,
    which is what the trainer's megatron DDP does: the provider builds with
    ``calculate_per_token_loss=True`` and ``finalize_model_grads`` runs without a token
    count, so gradients are summed over DP x CP, never averaged (no ``cp_size`` factor; see
    trainer/step.py). A sum-backward (all-reduce of the gradient) would count L cp_size times.
    """
    if cp_group is None or dist.get_world_size(cp_group) == 1:
        return sums, counts
    total_2N = _AllReduceSumIdentityGrad.apply(torch.stack([sums, counts.to(sums.dtype)]), cp_group)
    return total_2N[0], total_2N[1]
