"""Context parallelism (CP) for packed THD micro-batches: data split, K/V gather, positions.

Layout (the same load-balanced layout as Transformer Engine and megatron's rotary
embedding use): every sequence of the packed micro-batch is cut into ``2 * CP``
equal chunks and CP rank ``r`` holds chunks ``r`` and ``2*CP - 1 - r`` of EVERY
sequence, so each rank gets the same amount of causal-attention work. The data
pipeline pads every sequence to a multiple of ``2 * CP`` tokens.

Worked example, ``cu_seqlens = [0, 8, 12]`` (lengths 8 and 4), ``CP = 2``::

    seq 0 chunks (size 2): [0 1] [2 3] [4 5] [6 7]     seq 1 chunks (size 1): [8] [9] [10] [11]
    rank 0 holds chunks 0, 3 of each:  [0 1 6 7 | 8 11]   local cu_seqlens [0, 4, 6]
    rank 1 holds chunks 1, 2 of each:  [2 3 4 5 | 9 10]   local cu_seqlens [0, 4, 6]
    positions (restart per sequence):  rank 0 [0 1 6 7 | 0 3], rank 1 [2 3 4 5 | 1 2]

Conventions shared with megatron-core 0.16: ``PackedSeqParams.cu_seqlens_q/kv`` keep
the GLOBAL (whole-sequence, padded) boundaries on every CP rank, while the token
tensors hold only this rank's ``T / CP`` tokens. megatron's unfused THD rotary path
(``rope_utils._apply_rotary_pos_emb_thd`` with ``cp_group``) then picks the right
frequencies per chunk by itself, and :class:`mcore_align.ops.attention.PackedCoreAttention`
rebuilds global positions from the same numbers.

How a trainer uses it (per micro-batch, on every CP rank):

1. ``tokens, labels, loss_mask, position_ids, cu_local = split_packed_for_cp(
   tokens, labels, loss_mask, position_ids, cu_seqlens=cu, cp_rank=r, cp_size=CP)``
2. ``model(tokens, position_ids, None, packed_seq_params=packed_seq_params(cu, cp_group=pgs.cp))``
   with the GLOBAL ``cu``.
3. per-token log-probs on the local tokens; per-sequence sums over ``cu_local``; then
   all-reduce (SUM) the sums over the CP group (backward: identity) so every rank sees
   whole-sequence sums and computes the same objective.
4. gradients: the sum over CP ranks of the local parameter gradients is the full
   gradient; megatron's DDP reduces over the data-parallel-with-CP group.
"""
from __future__ import annotations

import torch

from mcore_align.ops.collectives import all_gather_dim0, group_size

__all__ = [
    "cp_local_token_index",
    "split_packed_for_cp",
    "gather_packed_from_cp",
    "packed_position_ids",
    "packed_seq_params",
    "all_gather_cp",
]


def _seqlens(cu_seqlens: torch.Tensor) -> list[int]:
    return (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()


def check_cp_divisible(cu_seqlens: torch.Tensor, cp_size: int) -> None:
    """Every sequence length must be a multiple of ``2 * cp_size`` (ValueError otherwise)."""
    if cp_size == 1:
        return
    bad = [n for n in _seqlens(cu_seqlens) if n % (2 * cp_size)]
    if bad:
        raise ValueError(
            f"with context_parallel_size={cp_size} every packed sequence length must be a multiple of "
            f"{2 * cp_size} (pad in the data pipeline); got lengths {bad}"
        )


def cp_local_token_index(cu_seqlens: torch.Tensor, cp_rank: int, cp_size: int) -> torch.Tensor:
    """Global token indices held by ``cp_rank``, in local order (``[T / cp_size]``, int64).

    For each sequence ``[start, start + L)`` with chunk ``c = L / (2 * cp_size)``:
    ``[start + r*c, start + (r+1)*c)`` then ``[start + (2cp-1-r)*c, start + (2cp-r)*c)``.
    """
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} out of range for cp_size {cp_size}")
    check_cp_divisible(cu_seqlens, cp_size)
    starts = cu_seqlens[:-1].tolist()
    pieces = []
    for start, n in zip(starts, _seqlens(cu_seqlens)):
        if cp_size == 1:
            pieces.append(torch.arange(start, start + n))
            continue
        c = n // (2 * cp_size)
        first = start + cp_rank * c
        second = start + (2 * cp_size - 1 - cp_rank) * c
        pieces += [torch.arange(first, first + c), torch.arange(second, second + c)]
    if not pieces:
        return torch.zeros(0, dtype=torch.long, device=cu_seqlens.device)
    return torch.cat(pieces).to(cu_seqlens.device)


def split_packed_for_cp(
    *tensors: torch.Tensor, cu_seqlens: torch.Tensor, cp_rank: int, cp_size: int, dim: int = -1
):
    """This CP rank's share of packed token tensors, plus the local ``cu_seqlens``.

    Args:
        *tensors: packed token-level tensors with the ``T`` tokens along ``dim`` (tokens,
            labels, loss_mask, position_ids: ``[T]`` or megatron's ``[1, T]``).
        cu_seqlens: ``[N + 1]`` global (padded) boundaries, int32/int64; every length a
            multiple of ``2 * cp_size``.
        cp_rank, cp_size: this rank's place in the CP group.
        dim: the token dimension (default last).

    Returns:
        ``(*split_tensors, cu_seqlens_local)``: each tensor with ``T / cp_size`` tokens along
        ``dim`` (see the module docstring for the order) and ``cu_seqlens // cp_size``, the
        boundaries of each sequence's local tokens (for per-sequence log-prob sums). Keep
        passing the GLOBAL ``cu_seqlens`` to the model in ``PackedSeqParams``.
    """
    total = int(cu_seqlens[-1])
    idx = cp_local_token_index(cu_seqlens, cp_rank, cp_size)
    out = []
    for t in tensors:
        if t.shape[dim] != total:
            raise ValueError(f"tensor of shape {tuple(t.shape)} has {t.shape[dim]} tokens on dim {dim}, cu_seqlens say {total}")
        out.append(t.index_select(dim, idx.to(t.device)))
    return (*out, torch.div(cu_seqlens, cp_size, rounding_mode="floor"))


def packed_position_ids(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 in every sequence: ``[0, 8, 12] -> [0..7, 0..3]`` (``[T]``, int64)."""
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    starts_T = torch.repeat_interleave(cu_seqlens[:-1].long(), lens.long())
    return torch.arange(int(cu_seqlens[-1]), device=cu_seqlens.device) - starts_T


def packed_seq_params(cu_seqlens: torch.Tensor, *, cp_group=None):
    """megatron ``PackedSeqParams`` (qkv_format "thd") for a packed micro-batch.

    ``cu_seqlens`` are the GLOBAL padded boundaries (also under CP), int32 as TE wants.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens.to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
        max_seqlen_q=max_len, max_seqlen_kv=max_len, cp_group=cp_group,
    )


def all_gather_cp(x: torch.Tensor, cu_seqlens: torch.Tensor, cp_group) -> torch.Tensor:
    """Differentiable gather of a CP-split packed tensor back to GLOBAL token order (dim 0).

    ``x``: ``[T / CP, ...]`` this rank's tokens in local order -> ``[T, ...]``. Backward
    reduce-scatters: gradients from every rank's use of the full tensor are summed onto the
    owner of each token (the right rule for K/V, where all ranks read the whole tensor).
    """
    cp_size = group_size(cp_group)
    if cp_size == 1:
        return x
    # [CP * T/CP, ...] rank-major, local order; backward reduce-scatters, because every rank's
    # queries read every rank's K/V, so a K/V gradient is the sum of all ranks' parts.
    gathered = all_gather_dim0(x, cp_group)
    # gathered[j] is global token perm[j]; global[g] = gathered[inv[g]].
    perm = torch.cat([cp_local_token_index(cu_seqlens, r, cp_size) for r in range(cp_size)])
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return gathered.index_select(0, inv.to(x.device))


@torch.no_grad()
def gather_packed_from_cp(x: torch.Tensor, cu_seqlens: torch.Tensor, cp_group, dim: int = 0) -> torch.Tensor:
    """Non-differentiable gather of CP-split tokens back to global order along ``dim``.

    For evaluation, logging and tests (e.g. logits ``[1, T/CP, V]`` with ``dim=1``).
    """
    moved = x.movedim(dim, 0)
    full = all_gather_cp(moved.contiguous(), cu_seqlens, cp_group)
    return full.movedim(0, dim)
