"""Reward modelling: Bradley-Terry pairwise loss on a scalar reward head.

Papers: Bradley & Terry (1952); as used for RLHF reward models in Ouyang et al.,
"Training language models to follow instructions with human feedback",
arXiv:2203.02155, Eq. (1):

    L_RM = -E log sigma( r(x, y_w) - r(x, y_l) - m(y_w, y_l) )

with the optional per-pair margin m of Touvron et al., "Llama 2: Open Foundation and
Fine-Tuned Chat Models", arXiv:2307.09288, Eq. (2). `center_rewards_coefficient` c adds
c * E[(r_w + r_l)^2] (Eisenstein et al., "Helping or Herding? Reward Model Ensembles
Mitigate but do not Eliminate Reward Hacking", arXiv:2312.09244), exactly as TRL's
RewardTrainer.compute_loss: c * mean((r_c + r_r)^2) over pairs.

Departures from TRL: both terms are sum over pairs / counts.num_pairs (global) instead
of a per-micro-batch mean. Metrics use the preference names rewards/chosen,
rewards/rejected, rewards/accuracies, rewards/margins (TRL's RewardTrainer reports
`accuracy` and `margin` from its eval loop instead).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from mcore_align.algorithms.base import (
    GlobalCounts,
    Metrics,
    Objective,
    SequenceStats,
    check_non_negative,
    metric,
    register_objective,
    require,
    require_positive,
    split_pairs,
)


@dataclass(kw_only=True)
class RMConfig:
    center_rewards_coefficient: float | None = None
    """Weight of the reward-centering penalty E[(r_c + r_r)^2]; None or 0 disables it."""

    def __post_init__(self) -> None:
        check_non_negative(self.center_rewards_coefficient, "center_rewards_coefficient", allow_none=True)


@register_objective
class RM(Objective):
    """Bradley-Terry reward-model objective; see the module docstring."""

    name = "rm"
    config_cls = RMConfig
    inputs = frozenset({"rewards", "margins"})
    data_kind = "paired"
    head = "value"
    """The model ends in a scalar value head (models/heads.py); stats.rewards is its value
    at each sequence's last token."""

    def __call__(self, stats: SequenceStats, counts: GlobalCounts) -> tuple[Tensor, Metrics]:
        num_pairs = require_positive(counts.num_pairs, "num_pairs", self.name)
        r_c, r_r = split_pairs(require(stats, "rewards", self.name))
        diff = r_c - r_r  # [P]
        if stats.margins is not None:
            if stats.margins.shape != diff.shape:
                raise ValueError(f"stats.margins must have shape [P]={tuple(diff.shape)}, got {tuple(stats.margins.shape)}")
            diff = diff - stats.margins.to(diff.dtype)
        loss = -F.logsigmoid(diff).sum() / num_pairs
        coef = self.cfg.center_rewards_coefficient
        if coef:
            loss = loss + coef * ((r_c + r_r) ** 2).sum() / num_pairs

        metrics = {
            "rewards/chosen": metric(r_c),
            "rewards/rejected": metric(r_r),
            "rewards/accuracies": metric((r_c > r_r).to(r_c.dtype)),
            "rewards/margins": metric(r_c - r_r),
        }
        return loss, metrics
