"""Generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438), as in TRL's
PPOTrainer: over all ``T`` positions, values zeroed beyond ``length`` (``padding_mask_p1``)::

    delta_t = r_t + gamma * V_{t+1} - V_t          (V_T = 0)
    A_t     = delta_t + gamma * lam * A_{t+1}
    R_t     = A_t + V_t                            (value targets, before whitening A)
    A       = whiten(A) over response tokens, 0 at padding (``whiten_advantages``)
"""
from __future__ import annotations

import torch

from mcore_align.algorithms.ppo.advantages import register_advantage_estimator
from mcore_align.algorithms.ppo.masks import masked_whiten, padding_masks


@register_advantage_estimator("gae", needs_values=True)
def gae_advantages(rewards_BT: torch.Tensor, lengths_B: torch.Tensor, *, values_BT: torch.Tensor,
                   num_generations: int = 1, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages_BT, returns_BT)`` from rewards ``[B, T]`` and rollout values ``[B, T]``
    (``values_BT[b, t]``: the critic's value at response position t)."""
    T = rewards_BT.shape[1]
    padding_mask, padding_mask_p1 = padding_masks(lengths_B, T)
    values_BT = values_BT.masked_fill(padding_mask_p1, 0.0)
    last_B = torch.zeros_like(rewards_BT[:, 0])
    adv_rev = []
    for t in reversed(range(T)):
        next_B = values_BT[:, t + 1] if t < T - 1 else torch.zeros_like(last_B)
        delta_B = rewards_BT[:, t] + cfg.gamma * next_B - values_BT[:, t]
        last_B = delta_B + cfg.gamma * cfg.lam * last_B
        adv_rev.append(last_B)
    advantages_BT = torch.stack(adv_rev[::-1], dim=1)
    returns_BT = advantages_BT + values_BT
    if cfg.whiten_advantages:
        advantages_BT = masked_whiten(advantages_BT, ~padding_mask)
    return advantages_BT.masked_fill(padding_mask, 0.0), returns_BT
