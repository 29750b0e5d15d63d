"""PPO's clipped policy and value losses (Schulman et al. 2017, arXiv:1707.06347), written as
TRL's PPOTrainer computes them on right-padded ``[B, T]`` micro-batches.

Departures from TRL: none in the formulas. Normalisation is TRL's (masked means over this
micro-batch); a Megatron trainer that splits a batch over micro-batches and DP ranks should
turn the returned ``*_sum`` / ``num_*`` pairs into global-count contributions instead.
"""
from __future__ import annotations

import torch

from mcore_align.algorithms.ppo.masks import masked_mean


def logprobs_from_logits(logits_BTV: torch.Tensor, tokens_BT: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(logits / (temperature + 1e-7))`` at ``tokens`` -> ``[B, T]`` (TRL's tempering;
    unsharded logits, for tests and tools; training uses the vocab-parallel kernels in ops/)."""
    logp_BTV = torch.log_softmax(logits_BTV / (temperature + 1e-7), dim=-1)
    return logp_BTV.gather(-1, tokens_BT.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits_BTV: torch.Tensor) -> torch.Tensor:
    """Per-position entropy ``[B, T]``: ``logsumexp(z) - sum softmax(z) * z`` (TRL's form)."""
    p = torch.softmax(logits_BTV, dim=-1)
    return torch.logsumexp(logits_BTV, dim=-1) - (p * logits_BTV).sum(-1)


def policy_loss(logprobs_BT: torch.Tensor, old_logprobs_BT: torch.Tensor, advantages_BT: torch.Tensor,
                padding_mask_BT: torch.Tensor, cliprange: float = 0.2) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate ``mean_t max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps))`` over response
    tokens, ``rho = exp(logp - logp_old)``.

    Returns ``(pg_loss [], stats)``; stats (detached): ``approxkl`` = ``0.5 * mean (logp - logp_old)^2``
    over all B*T positions (TRL: padding counts with difference 0), ``clipfrac`` (fraction of
    response tokens where the clipped term is larger), ``ratio`` = mean rho over all positions
    (1 at padding), and ``pg_loss_sum`` / ``num_tokens`` for global normalisation.
    """
    valid = ~padding_mask_BT
    diff_BT = (logprobs_BT - old_logprobs_BT).masked_fill(padding_mask_BT, 0.0)
    ratio_BT = torch.exp(diff_BT)
    pg1_BT = -advantages_BT * ratio_BT
    pg2_BT = -advantages_BT * torch.clamp(ratio_BT, 1.0 - cliprange, 1.0 + cliprange)
    pg_max_BT = torch.max(pg1_BT, pg2_BT)
    loss = masked_mean(pg_max_BT, valid)
    with torch.no_grad():
        stats = {
            "approxkl": 0.5 * (diff_BT ** 2).mean(),
            "clipfrac": masked_mean((pg2_BT > pg1_BT).float(), valid),
            "ratio": ratio_BT.mean(),
            "pg_loss_sum": (pg_max_BT * valid).sum(),
            "num_tokens": valid.sum(),
        }
    return loss, stats


def value_loss(values_BT: torch.Tensor, old_values_BT: torch.Tensor, returns_BT: torch.Tensor,
               padding_mask_p1_BT: torch.Tensor, cliprange_value: float = 0.2) -> tuple[torch.Tensor, dict]:
    """Clipped value loss ``0.5 * mean max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2)``
    over ``idx <= length`` (``padding_mask_p1``: the critic is trained one position further).

    Returns ``(vf_loss [], stats)``; stats: ``clipfrac`` (fraction where the clipped error is
    larger), ``vf_loss_sum`` / ``num_values``.
    """
    valid = ~padding_mask_p1_BT
    v_BT = values_BT.masked_fill(padding_mask_p1_BT, 0.0)
    v_clip_BT = torch.clamp(v_BT, old_values_BT - cliprange_value, old_values_BT + cliprange_value)
    vf1_BT = (v_BT - returns_BT) ** 2
    vf2_BT = (v_clip_BT - returns_BT) ** 2
    vf_max_BT = torch.max(vf1_BT, vf2_BT)
    loss = 0.5 * masked_mean(vf_max_BT, valid)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((vf2_BT > vf1_BT).float(), valid),
                 "vf_loss_sum": 0.5 * (vf_max_BT * valid).sum(), "num_values": valid.sum()}
    return loss, stats


def ppo_loss(logprobs_BT, old_logprobs_BT, advantages_BT, values_BT, old_values_BT, returns_BT,
             padding_mask_BT, padding_mask_p1_BT, *, cliprange: float = 0.2, cliprange_value: float = 0.2,
             vf_coef: float = 0.1, entropy_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """``loss = pg_loss + vf_coef * vf_loss`` and one micro-batch's TRL train stats:
    ``approxkl, clipfrac, pg_loss, vf_loss, vf_clipfrac, entropy, ratio`` (``entropy``: the mean of
    ``entropy_BT`` over all B*T positions, as TRL; omitted without it)."""
    pg, pg_stats = policy_loss(logprobs_BT, old_logprobs_BT, advantages_BT, padding_mask_BT, cliprange)
    vf, vf_stats = value_loss(values_BT, old_values_BT, returns_BT, padding_mask_p1_BT, cliprange_value)
    stats = {"approxkl": pg_stats["approxkl"], "clipfrac": pg_stats["clipfrac"], "pg_loss": pg.detach(),
             "vf_loss": vf.detach(), "vf_clipfrac": vf_stats["clipfrac"], "ratio": pg_stats["ratio"]}
    if entropy_BT is not None:
        stats["entropy"] = entropy_BT.detach().mean()
    return pg + vf_coef * vf, stats


def clipped_surrogate_tokens(logp_T: torch.Tensor, old_T: torch.Tensor, adv_T: torch.Tensor, mask_T: torch.Tensor,
                             eps_low: float, eps_high: float) -> tuple[torch.Tensor, dict]:
    """The clipped surrogate per token on flat ``[T]`` positions (the trainer's layout), for the
    online objectives: ``pg_T = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high)) * mask``,
    ``rho = exp(logp - logp_old)`` (1 off the mask). Returns ``(pg_T, parts)`` with the
    (sum, count)-ready detached sums ``clipped`` (tokens where the clipped term is larger),
    ``approxkl`` (``0.5 (logp - logp_old)^2``) and ``ratio`` over the masked tokens."""
    diff_T = (logp_T - old_T) * mask_T
    ratio_T = torch.exp(diff_T)
    pg1_T = -adv_T * ratio_T
    pg2_T = -adv_T * torch.clamp(ratio_T, 1 - eps_low, 1 + eps_high)
    pg_T = torch.max(pg1_T, pg2_T) * mask_T
    with torch.no_grad():
        parts = {"clipped": ((pg2_T > pg1_T).to(mask_T.dtype) * mask_T).sum(),
                 "approxkl": (0.5 * diff_T ** 2).sum(), "ratio": (ratio_T * mask_T).sum()}
    return pg_T, parts
