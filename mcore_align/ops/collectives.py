"""Differentiable collectives along dim 0, shared by the kernels (CP K/V gather, the fused
log-prob kernel under sequence parallelism) and the LoRA adapters.

megatron's ``gather_from_sequence_parallel_region`` / ``reduce_scatter_to_sequence_parallel_region``
do the same maths but allocate their buffers on ``torch.cuda.current_device()``, also inside
autograd's backward; these allocate like their input, so they need nothing from the CPU
execution mode's device patches. Groups are passed explicitly; ``None`` means a group of one.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _gather(x: torch.Tensor, group) -> torch.Tensor:
    """[n, ...] on each of W ranks -> [W * n, ...], rank-major."""
    out = x.new_empty((x.shape[0] * group_size(group), *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    """[W * n, ...] partial sums on each rank -> this rank's [n, ...] slice of the sum."""
    world = group_size(group)
    assert x.shape[0] % world == 0, (tuple(x.shape), world)
    out = x.new_empty((x.shape[0] // world, *x.shape[1:]))
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


class _AllGatherDim0(torch.autograd.Function):
    """Forward: all-gather along dim 0. Backward: reduce-scatter (sum), because every rank
    used the whole gathered tensor, so the gradient of this rank's slice is the sum of all
    ranks' partial gradients for it."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather(x, group)

    @staticmethod
    def backward(ctx, grad_out):
        return _reduce_scatter(grad_out, ctx.group), None


class _ReduceScatterDim0(torch.autograd.Function):
    """Forward: sum over ranks and keep this rank's dim-0 slice. Backward: all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, grad_out):
        return _gather(grad_out, ctx.group), None


def all_gather_dim0(x: torch.Tensor, group) -> torch.Tensor:
    """``[n, ...]`` -> ``[W * n, ...]`` (rank-major); backward reduce-scatters. Identity for one rank."""
    return x if group_size(group) == 1 else _AllGatherDim0.apply(x, group)


def reduce_scatter_dim0(x: torch.Tensor, group) -> torch.Tensor:
    """``[W * n, ...]`` partial sums -> this rank's ``[n, ...]`` of the sum; backward all-gathers."""
    return x if group_size(group) == 1 else _ReduceScatterDim0.apply(x, group)
