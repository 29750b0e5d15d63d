"""RLOO outcome advantages (Ahmadian et al. 2024, arXiv:2402.14740; verl
``compute_rloo_outcome_advantage``): each response's baseline is the mean score of the
other G - 1 responses to its prompt,

    A_i = s_i - (sum_j s_j - s_i) / (G - 1)  =  G / (G - 1) * (s_i - mean_j s_j)

broadcast over the response's tokens (0 at padding); returns = advantages (no critic).
"""
from __future__ import annotations

import torch

from mcore_align.algorithms.ppo.advantages import register_advantage_estimator, response_scores
from mcore_align.algorithms.ppo.masks import padding_masks


@register_advantage_estimator("rloo", group_based=True)
def rloo_advantages(rewards_BT: torch.Tensor, lengths_B: torch.Tensor, *, values_BT=None,
                    num_generations: int, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    scores_PG = response_scores(rewards_BT, num_generations)
    baseline_PG = (scores_PG.sum(dim=1, keepdim=True) - scores_PG) / (num_generations - 1)
    padding_mask, _ = padding_masks(lengths_B, rewards_BT.shape[1])
    adv_BT = (scores_PG - baseline_PG).reshape(-1, 1).expand_as(rewards_BT).masked_fill(padding_mask, 0.0)
    return adv_BT, adv_BT.clone()
