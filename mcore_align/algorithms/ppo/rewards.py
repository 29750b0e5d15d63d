"""Scores and per-token rewards (TRL PPOTrainer, steps 3-5 of its rollout phase)."""
from __future__ import annotations

import torch

from mcore_align.algorithms.ppo.kl import kl_estimate
from mcore_align.algorithms.ppo.masks import masked_whiten, padding_masks


def apply_missing_eos_penalty(scores_B: torch.Tensor, eos_B: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """``scores_B - penalty`` where the response has no stop token (``eos_B`` False); a copy."""
    if penalty is None:
        return scores_B.clone()
    return torch.where(eos_B, scores_B, scores_B - penalty)


def per_token_rewards(scores_B: torch.Tensor, logprobs_BT: torch.Tensor, ref_logprobs_BT: torch.Tensor,
                      lengths_B: torch.Tensor, *, kl_coef: float = 0.05, kl_estimator: str = "k1",
                      whiten_rewards: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rewards_BT, non_score_reward_BT, kl_BT)``.

    ``kl_BT`` is the estimator's per-token KL (0 at padding); ``non_score_reward = -kl_coef * kl``;
    ``rewards`` adds the score at the position after the last response token, ``lengths_B[b]``,
    or at the last position ``T - 1`` when the response fills ``T`` (TRL's ``actual_end``)::

        T = 5, length 3, score s:  rewards = [-c*kl0, -c*kl1, -c*kl2, s, 0]
        T = 5, length 5:           rewards = [-c*kl0, ..., -c*kl3, -c*kl4 + s]

    ``whiten_rewards``: whitened over ``idx <= length`` (``padding_mask_p1``) keeping the mean,
    zero beyond. Shapes: scores ``[B]``, log-probs ``[B, T]``, lengths ``[B]``.
    """
    B, T = logprobs_BT.shape
    padding_mask, padding_mask_p1 = padding_masks(lengths_B, T)
    kl_BT = kl_estimate(logprobs_BT, ref_logprobs_BT, padding_mask, kl_estimator)
    non_score_reward_BT = -kl_coef * kl_BT
    rewards_BT = non_score_reward_BT.clone()
    end_B = torch.where(lengths_B < T, lengths_B, lengths_B - 1)
    rewards_BT[torch.arange(B, device=rewards_BT.device), end_B] += scores_B.to(rewards_BT.dtype)
    if whiten_rewards:
        rewards_BT = masked_whiten(rewards_BT, ~padding_mask_p1, shift_mean=False).masked_fill(padding_mask_p1, 0.0)
    return rewards_BT, non_score_reward_BT, kl_BT
