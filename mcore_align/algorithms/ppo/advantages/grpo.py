"""GRPO outcome advantages (Shao et al. 2024, arXiv:2402.03300; verl
``compute_grpo_outcome_advantage``): per prompt group of G responses with scores s_i,

    A_i = (s_i - mean_j s_j) / (std_j s_j + epsilon)     (std unbiased, as torch.std)
    A_i =  s_i - mean_j s_j                              (grpo_scale_by_std=False: Dr. GRPO,
                                                          arXiv:2503.20783)

broadcast over the response's tokens (0 at padding); returns = advantages (no critic).
"""
from __future__ import annotations

import torch

from mcore_align.algorithms.ppo.advantages import register_advantage_estimator, response_scores
from mcore_align.algorithms.ppo.masks import padding_masks


@register_advantage_estimator("grpo", group_based=True)
def grpo_advantages(rewards_BT: torch.Tensor, lengths_B: torch.Tensor, *, values_BT=None,
                    num_generations: int, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    scores_PG = response_scores(rewards_BT, num_generations)
    adv_PG = scores_PG - scores_PG.mean(dim=1, keepdim=True)
    if cfg.grpo_scale_by_std:
        adv_PG = adv_PG / (scores_PG.std(dim=1, keepdim=True) + cfg.grpo_epsilon)
    padding_mask, _ = padding_masks(lengths_B, rewards_BT.shape[1])
    adv_BT = adv_PG.reshape(-1, 1).expand_as(rewards_BT).masked_fill(padding_mask, 0.0)
    return adv_BT, adv_BT.clone()
