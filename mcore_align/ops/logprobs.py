"""Per-token log-probs of target tokens from vocab-parallel logits, chunked over tokens.

Preference objectives (DPO, KTO, ORPO, ...) need ``log p(target_t)`` for every token,
not a loss. Computing ``log_softmax(logits.float()).gather(target)`` materialises an
fp32 copy of the whole ``[tokens, V]`` logits (and its softmax again in backward):
8192 tokens x 152064 vocab is 5 GB per copy. The kernels here never do that:

* :func:`vocab_parallel_logprobs` reads bf16 logits ``[..., V/TP]`` chunk by chunk
  (``chunk_size`` tokens at a time), accumulates in fp32 and keeps only per-token
  statistics. Backward recomputes the softmax of one chunk at a time.
* :func:`fused_linear_logprobs` goes one step further and starts from the final hidden
  states and the output-layer weight shard: the ``[tokens, V/TP]`` logits only ever
  exist for one chunk of tokens, in forward and (recomputed) in backward.

Tensor parallelism follows megatron's vocab partition
(``VocabUtility.vocab_range_from_per_partition_vocab_size``): rank ``r`` of the TP
group owns global vocab ids ``[r * V/TP, (r + 1) * V/TP)``. Communication is minimal:
one all-reduce(MAX) of the per-token max over ``[tokens]`` and one all-reduce(SUM) of
a stacked ``[2, tokens]`` tensor (sum-exp and target logit; ``[3, tokens]`` with
entropy). Backward needs no communication for the logits (every TP rank receives the
same ``grad_output`` because the loss is computed identically on every TP rank, as in
megatron's ``vocab_parallel_cross_entropy``).

The per-chunk statistics use a *local* max (one pass over the chunk), and are
rescaled to the global max after the MAX all-reduce, so forward reads each logit once::

    s_r = sum_v exp(z_v - m_r)            (rank r, local max m_r)
    S   = sum_r s_r * exp(m_r - M)        (M = max_r m_r)
    lse = M + log(S)

Target ids outside ``[0, V)`` (e.g. ``-100`` padding) are owned by no rank: their
log-prob is ``-lse`` (finite, gradient ``-softmax``) and must be removed by the loss
mask. Nothing is validated on device (that would need a host sync).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.utils import VocabUtility

from mcore_align.ops.collectives import all_gather_dim0, group_rank, group_size


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for bf16/fp16/fp32 logits; fp64 stays fp64 (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


class VocabParallelLogprobs:
    """Named static helpers; the autograd functions below only sequence them."""

    @staticmethod
    def local_target(target_T: torch.Tensor, partition_vocab_size: int, tp_group):
        """Global ids -> (ids local to this rank's shard, clamped to 0 where not owned; owned mask).

        Example, V=8, TP=2, rank 1 owns ids [4, 8): target [1, 5, 7] -> local [0, 1, 3],
        owned [False, True, True].
        """
        start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(
            partition_vocab_size, group_rank(tp_group), group_size(tp_group)
        )
        owned_T = (target_T >= start) & (target_T < end)
        local_T = torch.where(owned_T, target_T - start, torch.zeros_like(target_T))
        return local_T.long(), owned_T

    @staticmethod
    def chunk_partial_stats(
        logits_CV: torch.Tensor, local_C: torch.Tensor, owned_C: torch.Tensor, with_entropy: bool
    ) -> torch.Tensor:
        """Statistics of one chunk of this rank's shard, relative to the shard's own max.

        Returns ``stats_KC`` in the compute dtype with rows
        ``[local max m, sum exp(z - m), target logit (0 where not owned), sum exp(z - m) (z - m)]``
        (the last row only with entropy). The only [C, V/TP] temporaries are the
        fp32 copy of the chunk (and exp of it with entropy).
        """
        cdtype = _compute_dtype(logits_CV.dtype)
        # Gather the target logit from the original chunk (exact in any dtype).
        tgt_C = logits_CV.gather(1, local_C.unsqueeze(1)).squeeze(1).to(cdtype)
        tgt_C = torch.where(owned_C, tgt_C, torch.zeros_like(tgt_C))
        # copy=True: for fp32 input `.to` would alias the logits and the in-place ops
        # below would overwrite them.
        z_CV = logits_CV.to(cdtype, copy=True)
        max_C = z_CV.amax(dim=-1)
        z_CV.sub_(max_C.unsqueeze(1))  # z - m <= 0: exp cannot overflow
        if with_entropy:
            e_CV = z_CV.exp()
            sumexp_C = e_CV.sum(dim=-1)
            # sum e^(z-m) (z-m): every term is in [-1/e, 0], so no cancellation blow-up.
            zexp_C = z_CV.mul_(e_CV).sum(dim=-1)
            return torch.stack([max_C, sumexp_C, tgt_C, zexp_C])
        sumexp_C = z_CV.exp_().sum(dim=-1)
        return torch.stack([max_C, sumexp_C, tgt_C])

    @staticmethod
    def combine_across_tp(stats_KT: torch.Tensor, tp_group):
        """Per-rank statistics -> global (logprob_T, lse_T, entropy_T or None).

        Two collectives: all-reduce(MAX) of the local max [T], then one all-reduce(SUM)
        of the rescaled [2 or 3, T] statistics.
        """
        with_entropy = stats_KT.shape[0] == 4
        max_T, sumexp_T = stats_KT[0], stats_KT[1]
        if group_size(tp_group) > 1:
            gmax_T = max_T.clone()
            dist.all_reduce(gmax_T, op=dist.ReduceOp.MAX, group=tp_group)
            # Rescale from the local max m_r to the global max M:
            #   sum e^(z-M)       = e^(m_r-M) * s_r
            #   sum e^(z-M)(z-M)  = e^(m_r-M) * (sum e^(z-m_r)(z-m_r) + (m_r-M) s_r)
            shift_T = max_T - gmax_T  # <= 0
            scale_T = shift_T.exp()
            rows = [sumexp_T * scale_T, stats_KT[2]]
            if with_entropy:
                rows.append(scale_T * (stats_KT[3] + shift_T * sumexp_T))
            summed_KT = torch.stack(rows)
            dist.all_reduce(summed_KT, op=dist.ReduceOp.SUM, group=tp_group)
        else:
            gmax_T, summed_KT = max_T, stats_KT[1:]
        log_sumexp_T = summed_KT[0].log()
        lse_T = gmax_T + log_sumexp_T
        logprob_T = summed_KT[1] - lse_T
        entropy_T = None
        if with_entropy:
            # H = lse - sum p z = log S - sum e^(z-M)(z-M) / S
            entropy_T = log_sumexp_T - summed_KT[2] / summed_KT[0]
        return logprob_T, lse_T, entropy_T

    @staticmethod
    def chunk_grad_logits(
        logits_CV: torch.Tensor,
        lse_C: torch.Tensor,
        local_C: torch.Tensor,
        owned_C: torch.Tensor,
        grad_logprob_C: torch.Tensor,
        entropy_C: torch.Tensor | None = None,
        grad_entropy_C: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """d loss / d logits for one chunk, in the compute dtype ([C, V/TP]).

        log-prob:  d lp_t / d z_v = onehot_v(target_t) - p_v
        entropy:   d H_t  / d z_v = -p_v (log p_v + H_t)
        """
        cdtype = _compute_dtype(logits_CV.dtype)
        g_CV = logits_CV.to(cdtype, copy=True)
        g_CV.sub_(lse_C.unsqueeze(1))  # log p
        if entropy_C is not None:
            p_CV = g_CV.exp()
            # -(gH (log p + H) + gL) * p, in place on the log p buffer
            g_CV.add_(entropy_C.unsqueeze(1)).mul_(grad_entropy_C.unsqueeze(1))
            g_CV.add_(grad_logprob_C.unsqueeze(1)).mul_(p_CV).neg_()
            del p_CV
        else:
            g_CV.exp_().mul_(grad_logprob_C.neg().unsqueeze(1))  # -gL * p
        # One-hot part: only the rank owning the target adds gL (scatter-add, no [C, V] one-hot).
        onehot_C = torch.where(owned_C, grad_logprob_C, torch.zeros_like(grad_logprob_C))
        g_CV.scatter_add_(1, local_C.unsqueeze(1), onehot_C.unsqueeze(1).to(cdtype))
        return g_CV


def _chunks(num_tokens: int, chunk_size: int):
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for start in range(0, num_tokens, chunk_size):
        yield slice(start, min(start + chunk_size, num_tokens))


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, tp_group, chunk_size, return_entropy):
        vocab_p = logits.shape[-1]
        logits_TV = logits.reshape(-1, vocab_p)
        local_T, owned_T = VocabParallelLogprobs.local_target(target.reshape(-1), vocab_p, tp_group)
        num_rows = 4 if return_entropy else 3
        stats_KT = logits_TV.new_empty((num_rows, logits_TV.shape[0]), dtype=_compute_dtype(logits.dtype))
        for sl in _chunks(logits_TV.shape[0], chunk_size):
            stats_KT[:, sl] = VocabParallelLogprobs.chunk_partial_stats(
                logits_TV[sl], local_T[sl], owned_T[sl], return_entropy
            )
        logprob_T, lse_T, entropy_T = VocabParallelLogprobs.combine_across_tp(stats_KT, tp_group)

        # Saved: the logits themselves (no copy), target ids and per-token lse (+ entropy).
        ctx.save_for_backward(logits, target, lse_T, entropy_T)
        ctx.tp_group, ctx.chunk_size = tp_group, chunk_size
        logprob = logprob_T.view(target.shape)
        if return_entropy:
            return logprob, entropy_T.view(target.shape)
        return logprob

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy=None):
        logits, target, lse_T, entropy_T = ctx.saved_tensors
        vocab_p = logits.shape[-1]
        logits_TV = logits.reshape(-1, vocab_p)
        local_T, owned_T = VocabParallelLogprobs.local_target(target.reshape(-1), vocab_p, ctx.tp_group)
        gl_T = grad_logprob.reshape(-1).to(lse_T.dtype)
        ge_T = None if entropy_T is None else grad_entropy.reshape(-1).to(lse_T.dtype)
        # Gradient in the logits' dtype; each chunk is computed in fp32 then cast in.
        grad_TV = torch.empty_like(logits_TV)
        for sl in _chunks(logits_TV.shape[0], ctx.chunk_size):
            grad_TV[sl] = VocabParallelLogprobs.chunk_grad_logits(
                logits_TV[sl], lse_T[sl], local_T[sl], owned_T[sl], gl_T[sl],
                None if entropy_T is None else entropy_T[sl], None if ge_T is None else ge_T[sl],
            )
        return grad_TV.view(logits.shape), None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    tp_group: dist.ProcessGroup | None,
    chunk_size: int = 4096,
    return_entropy: bool = False,
):
    """Log-probs of ``target`` under ``softmax(logits)`` with the vocabulary split over ``tp_group``.

    Args:
        logits: ``[..., V/TP]`` this rank's vocab shard (``[s, b, V/TP]`` or packed
            ``[T, V/TP]``), any float dtype; bf16 stays bf16 (never copied whole to fp32).
        target: ``[...]`` global vocab ids (the leading shape of ``logits``).
        tp_group: tensor-parallel group the vocabulary is split over; ``None`` or a
            group of size 1 means an unsharded vocabulary and no communication.
        chunk_size: tokens per fp32 chunk (peak extra memory ~ ``chunk_size * V/TP * 4`` bytes,
            twice that with entropy).
        return_entropy: also return the per-token entropy ``-sum_v p_v log p_v`` over the
            full vocabulary. It is differentiable (gradient ``-p (log p + H)``).

    Returns:
        ``logprobs`` ``[...]`` (fp32; fp64 for fp64 logits), or ``(logprobs, entropy)``.
        Gradients flow to ``logits`` in the logits' dtype.
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"target shape {tuple(target.shape)} must be logits shape {tuple(logits.shape)} without V")
    return _VocabParallelLogprobs.apply(logits, target, tp_group, chunk_size, return_entropy)


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, tp_group, chunk_size, allreduce_grad_hidden, with_entropy=False):
        hidden_TH = hidden.reshape(-1, hidden.shape[-1])
        vocab_p = weight.shape[0]
        local_T, owned_T = VocabParallelLogprobs.local_target(target.reshape(-1), vocab_p, tp_group)
        rows = 4 if with_entropy else 3
        stats_KT = hidden_TH.new_empty((rows, hidden_TH.shape[0]), dtype=_compute_dtype(hidden.dtype))
        for sl in _chunks(hidden_TH.shape[0], chunk_size):
            logits_CV = hidden_TH[sl] @ weight.t()  # only this chunk's logits exist
            stats_KT[:, sl] = VocabParallelLogprobs.chunk_partial_stats(logits_CV, local_T[sl], owned_T[sl],
                                                                        with_entropy)
            del logits_CV
        logprob_T, lse_T, entropy_T = VocabParallelLogprobs.combine_across_tp(stats_KT, tp_group)
        ctx.save_for_backward(hidden, weight, target, lse_T)
        ctx.tp_group, ctx.chunk_size, ctx.allreduce_grad_hidden = tp_group, chunk_size, allreduce_grad_hidden
        if not with_entropy:
            return logprob_T.view(target.shape)
        # The entropy is a metric here: no gradient flows through it (backward ignores it).
        entropy = entropy_T.view(target.shape)
        ctx.mark_non_differentiable(entropy)
        return logprob_T.view(target.shape), entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy=None):
        hidden, weight, target, lse_T = ctx.saved_tensors
        hidden_TH = hidden.reshape(-1, hidden.shape[-1])
        local_T, owned_T = VocabParallelLogprobs.local_target(target.reshape(-1), weight.shape[0], ctx.tp_group)
        gl_T = grad_logprob.reshape(-1).to(lse_T.dtype)
        grad_hidden_TH = torch.empty_like(hidden_TH)
        # fp32 accumulator over chunks (a bf16 running sum would lose small contributions).
        need_grad_weight = ctx.needs_input_grad[1]
        grad_weight_VH = torch.zeros_like(weight, dtype=_compute_dtype(weight.dtype)) if need_grad_weight else None
        for sl in _chunks(hidden_TH.shape[0], ctx.chunk_size):
            h_CH = hidden_TH[sl]
            logits_CV = h_CH @ weight.t()  # recompute instead of saving [T, V/TP]
            g_CV = VocabParallelLogprobs.chunk_grad_logits(logits_CV, lse_T[sl], local_T[sl], owned_T[sl], gl_T[sl])
            del logits_CV
            # Matmuls run in the activations' dtype (bf16 tensor cores on GPU).
            g_CV = g_CV.to(hidden.dtype)
            grad_hidden_TH[sl] = g_CV @ weight
            if need_grad_weight:
                grad_weight_VH += g_CV.t() @ h_CH
            del g_CV
        if ctx.allreduce_grad_hidden and group_size(ctx.tp_group) > 1:
            # hidden is replicated over TP; each rank has the part from its vocab shard.
            dist.all_reduce(grad_hidden_TH, group=ctx.tp_group)
        grad_weight = grad_weight_VH.to(weight.dtype) if need_grad_weight else None
        return grad_hidden_TH.view(hidden.shape), grad_weight, None, None, None, None, None


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    tp_group: dist.ProcessGroup | None,
    chunk_size: int = 1024,
    sequence_parallel: bool = False,
    return_entropy: bool = False,
):
    """Target log-probs straight from final hidden states; the logits are never materialised.

    Equivalent to ``vocab_parallel_logprobs(hidden @ weight.T, target, tp_group)`` but per
    chunk of ``chunk_size`` tokens it does matmul -> statistics, and backward recomputes
    the chunk's logits to produce ``grad_hidden`` and (accumulated in fp32) ``grad_weight``.

    Args:
        hidden: ``[T, H]`` or ``[s, b, H]`` final hidden states, replicated over the TP group;
            with ``sequence_parallel`` this rank's sequence slice ``[s/TP, b, H]``.
        weight: ``[V/TP, H]`` this rank's output-layer shard (a tied embedding weight works the
            same: its gradient is returned and autograd adds the embedding's part).
        target: global vocab ids for the full sequence, ``hidden``'s (gathered) leading shape.
        tp_group: TP group (vocab split; with sequence parallelism also the sequence split,
            as in megatron). ``None`` or size 1: no communication.
        chunk_size: tokens per chunk (peak extra memory ~ ``chunk_size * V/TP`` x (2 + 4) bytes
            for bf16).
        sequence_parallel: all-gather ``hidden`` along dim 0 first; backward reduce-scatters
            ``grad_hidden``. Without it, backward all-reduces ``grad_hidden`` over TP (megatron's
            ``copy_to_tensor_model_parallel_region``).

        return_entropy: also return the per-token entropy of the full distribution (same
            shape), computed in the same pass (one more row of statistics per chunk) and
            detached: a metric (PPO/GRPO's ``policy/entropy_avg``), not a loss term.

    Returns:
        ``logprobs`` with ``target``'s shape, fp32 (fp64 for fp64 inputs); or
        ``(logprobs, entropy)``.
    """
    if weight.shape[-1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} and hidden {tuple(hidden.shape)} disagree on H")
    if sequence_parallel and group_size(tp_group) > 1:
        hidden = all_gather_dim0(hidden, tp_group)  # backward: reduce-scatter of grad_hidden
    if hidden.shape[:-1] != target.shape:
        raise ValueError(f"target shape {tuple(target.shape)} must be (gathered) hidden shape {tuple(hidden.shape)} without H")
    return _FusedLinearLogprobs.apply(hidden, weight, target, tp_group, chunk_size, not sequence_parallel,
                                      return_entropy)
