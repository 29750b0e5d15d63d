"""MoE load-balancing loss over the GLOBAL batch, exact for any micro-batch split and layout.

The Switch-Transformer loss of one MoE layer over a batch of T real tokens, with E experts,
top-k routing, ``p_te`` the router's softmax score of token t for expert e and ``F_e`` the
number of tokens whose top-k contains e (megatron's ``compute_routing_scores_for_aux_loss``)::

    aux = coeff * E * sum_e f_e * P_e,   f_e = F_e / (k T),   P_e = S_e / T,   S_e = sum_t p_te
        = coeff * E / (k T^2) * sum_e F_e * S_e

``F_e`` is a count (no gradient) and ``S_e`` a sum over tokens, so once ``F`` and ``T`` of the
whole global batch are known, the contribution of one micro-batch on one rank,
``coeff * E / (k T^2) * sum_e F_e * S_e(local tokens)``, sums over micro-batches, DP, CP and
SP ranks to exactly the global loss: the same value and gradient however the batch is split.
That contribution is what megatron's ``switch_load_balancing_loss_func(scores_local, F, T, ...)``
computes; we hand it global ``F`` and ``T``.

Why not megatron's own options (0.16.1, ``moe_router_load_balancing_type``): ``aux_loss`` uses
each micro-batch's own ``F`` and ``T`` (summed over TP x CP only); ``seq_aux_loss`` uses each
row's (a packed row of many sequences counts as one); ``global_aux_loss`` sums ``F`` over DP
but keeps a running average over the micro-batches seen so far, so micro-batch 1 sees only its
own loads and the result depends on the split and the order. With ``calculate_per_token_loss``
all three are also multiplied by the micro-batch's token count, for a later division by the
global token count that this project does not do (losses arrive normalised).

How (this module only, on megatron's own router instances): each ``TopKRouter`` of the policy
gets its ``routing(logits, padding_mask)`` wrapped (an instance attribute, the class is
untouched; megatron's own aux-loss types are off):

1. Counting pass (``counting()``): one extra forward-only pass of the policy over the step's
   micro-batches, before the training pass (the weights do not change in between). Each router
   adds its top-k map of the real tokens to ``counts[layer, E]``. ``reduce_counts`` sums them
   over all ranks (one all-reduce of ``[L, E]``): every real token of a layer is routed by
   exactly one rank (DP, CP and, with SP, TP ranks hold different tokens; EP ranks are DP ranks
   of the dense part; PP stages fill their own layers' rows), as megatron's ``global_aux_loss``
   sums over TP x DP x CP.
2. Training pass: with gradients enabled and the module in training mode, each router computes
   its scores from the logits (megatron's ``compute_routing_scores_for_aux_loss``, padding
   masked), the contribution above, and attaches it to the routing probabilities with
   megatron's ``MoEAuxLossAutoScaler`` (its backward scale is set by the schedule: 1, or the
   fp16 loss scale). Activation recomputation attaches it once (the checkpointed forward runs
   without gradients).

Padding: the step passes megatron's ``padding_mask`` (True at positions that are not real
tokens: sequence/context-parallel padding, padded mode); masked tokens count neither in ``F``,
``T`` nor ``S``. Cost: one extra policy forward (no backward) per step when the loss is on.
The counting pass routes like the training pass (same weights, same tokens); with dropout > 0
the two would see different noise (the families here have none).
"""
from __future__ import annotations

import contextlib
from functools import partial

import torch


class GlobalBatchAuxLoss:
    """The global-batch load-balancing loss of one model's routers (see the module docstring).

    Per step: ``with aux.counting(): <forward-only passes over the step's micro-batches>``,
    ``aux.reduce_counts(device)``, the training pass, then ``aux.metrics(device)`` (reports the
    global aux loss and clears the counts). A forward with gradients between ``metrics`` and the
    next ``reduce_counts`` raises: the global loads are unknown then.
    """

    def __init__(self, model_chunks, coeff: float):
        from megatron.core.transformer.moe.router import TopKRouter
        from megatron.core.utils import get_model_config

        if coeff <= 0:
            raise ValueError(f"moe_aux_loss_coeff must be > 0 for the load-balancing loss, got {coeff}")
        self.coeff = float(coeff)
        cfg = get_model_config(model_chunks[0])
        # A pipeline stage may hold no MoE layer (no router): it still joins the collectives.
        self.routers = [m for c in model_chunks for m in c.modules() if isinstance(m, TopKRouter)]
        self.num_layers, self.num_experts = cfg.num_layers, cfg.num_moe_experts
        self.counts_LE = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64)  # this rank's
        self.global_LE: torch.Tensor | None = None  # all ranks' counts, set by reduce_counts
        self.value = torch.zeros((), dtype=torch.float64)  # sum of this rank's contributions this step
        self._counting = False
        for r in self.routers:
            if r.is_aux_loss_enabled() or r.config.moe_expert_capacity_factor is not None:
                raise ValueError("the global-batch aux loss replaces megatron's aux-loss types and "
                                 "assumes no token dropping")
            r.routing = partial(self._routing, r, r.routing)
        cfg.mca_global_aux_loss = self  # found by ``of`` (the policy's config, not the reference's)

    @staticmethod
    def of(model_chunks) -> "GlobalBatchAuxLoss | None":
        """The instance installed on these (possibly DDP-wrapped) chunks, or None (loss off)."""
        from megatron.core.utils import get_model_config

        return getattr(get_model_config(model_chunks[0]), "mca_global_aux_loss", None)

    @contextlib.contextmanager
    def counting(self):
        """Forward passes inside count the expert loads (call it under ``torch.no_grad()``)."""
        assert not torch.is_grad_enabled(), "the counting pass runs without gradients"
        self.counts_LE.zero_()
        self.global_LE = None
        self._counting = True
        try:
            yield
        finally:
            self._counting = False

    def reduce_counts(self, device) -> None:
        """Sum the counted loads over all ranks (a collective; every rank calls it)."""
        total = self.counts_LE.to(device, copy=True)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
        self.global_LE = total.cpu()
        self.value.zero_()

    def metrics(self, device) -> dict[str, float]:
        """``moe/aux_loss``: the global aux loss of this step (coefficient included, summed over
        the MoE layers), summed over all ranks (a collective). Clears the step's loads."""
        v = self.value.to(device, copy=True)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(v)
        self.global_LE = None
        self.value.zero_()
        return {"moe/aux_loss": float(v)}

    # -- the wrapped router ------------------------------------------------------------------
    def _routing(self, router, routing, logits, padding_mask=None):
        """``TopKRouter.routing`` plus counting (counting pass) or the global-batch aux loss
        (training pass). ``logits`` [S, B, E] (S this rank's positions), ``padding_mask``
        [S, B] bool, True at padding (megatron's convention)."""
        from megatron.core.transformer.moe.moe_utils import (
            MoEAuxLossAutoScaler,
            compute_routing_scores_for_aux_loss,
            switch_load_balancing_loss_func,
        )

        probs, routing_map = routing(logits, padding_mask)
        counting = self._counting
        training = router.training and torch.is_grad_enabled()
        if not (counting or training):
            return probs, routing_map
        logits_TE = logits.reshape(-1, self.num_experts)
        pad_T = padding_mask.reshape(-1) if padding_mask is not None else None
        if pad_T is not None and pad_T.numel() != logits_TE.shape[0]:
            raise RuntimeError(f"padding_mask has {pad_T.numel()} positions, the router {logits_TE.shape[0]} tokens")
        # map_TE: top-k of the softmax scores, 0 on padding; scores_TE: softmax scores, 0 on padding
        map_TE, scores_TE = compute_routing_scores_for_aux_loss(
            logits_TE, router.topk, router.score_function, padding_mask=pad_T)
        layer = router.layer_number - 1  # layer_number: 1-based, global (PP offset included)
        if counting:
            self.counts_LE[layer] += map_TE.sum(0).to("cpu", torch.float64)
            return probs, routing_map
        if self.global_LE is None:
            raise RuntimeError("MoE aux loss: a training forward without the global expert loads; the step "
                               "runs GlobalBatchAuxLoss.counting() and reduce_counts() first (models/moe_aux.py)")
        tokens_per_expert_E = self.global_LE[layer].to(scores_TE.device, scores_TE.dtype)
        total_tokens = float(self.global_LE[layer].sum()) / router.topk  # T: real tokens of the global batch
        if total_tokens == 0:
            return probs, routing_map
        aux = switch_load_balancing_loss_func(
            probs=scores_TE, tokens_per_expert=tokens_per_expert_E, total_num_tokens=total_tokens,
            topk=router.topk, num_experts=self.num_experts, moe_aux_loss_coeff=self.coeff)
        self.value += aux.detach().to("cpu", torch.float64)
        return MoEAuxLossAutoScaler.apply(probs, aux), routing_map


def install_global_aux_loss(model_chunks, coeff: float) -> GlobalBatchAuxLoss | None:
    """Wrap the routers of a MoE policy (coeff > 0, on every rank, routers or not); None for
    a dense model or coeff 0."""
    from megatron.core.utils import get_model_config

    if not coeff or not getattr(get_model_config(model_chunks[0]), "num_moe_experts", None):
        return None
    return GlobalBatchAuxLoss(model_chunks, coeff)
