"""Advantage estimators, registered by name, one file each (like verl's ``register_adv_est``).

Every estimator has the same signature::

    fn(rewards_BT, lengths_B, *, values_BT=None, num_generations=1, cfg) -> (advantages_BT, returns_BT)

``rewards_BT`` are the per-token rewards of ``rewards.per_token_rewards`` (the score placed after
the last response token, plus ``-kl_coef * kl`` per token); ``lengths_B`` the response lengths.
Group estimators reduce them to one score per response (``rewards_BT.sum(-1)``, verl's
convention) and compare responses to the same prompt, which sit consecutively in the batch in
groups of ``num_generations``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class AdvantageEstimator:
    name: str
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    needs_values: bool
    """Needs the critic's values (GAE)."""
    group_based: bool
    """Compares the ``num_generations`` responses of a prompt (needs >= 2)."""


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_advantage_estimator(name: str, *, needs_values: bool = False, group_based: bool = False):
    def deco(fn):
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ADVANTAGE_ESTIMATORS[name] = AdvantageEstimator(name, fn, needs_values, group_based)
        return fn

    return deco


def compute_advantages(name: str, rewards_BT: torch.Tensor, lengths_B: torch.Tensor, *,
                       values_BT: torch.Tensor | None = None, num_generations: int = 1, cfg=None):
    """Run the estimator ``name``; ``(advantages_BT, returns_BT)``."""
    from mcore_align.algorithms.ppo.config import PPOConfig

    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; choose from {sorted(ADVANTAGE_ESTIMATORS)}")
    est = ADVANTAGE_ESTIMATORS[name]
    if est.needs_values and values_BT is None:
        raise ValueError(f"advantage estimator {name!r} needs values_BT (a critic)")
    if est.group_based:
        check_groups(name, rewards_BT.shape[0], num_generations)
    return est.fn(rewards_BT, lengths_B, values_BT=values_BT, num_generations=num_generations,
                  cfg=cfg or PPOConfig(advantage_estimator=name, num_generations=num_generations))


def check_groups(name: str, batch: int, num_generations: int) -> None:
    if num_generations < 2:
        raise ValueError(f"advantage estimator {name!r} compares responses to the same prompt: "
                         f"num_generations must be >= 2, got {num_generations}")
    if batch % num_generations:
        raise ValueError(f"advantage estimator {name!r}: batch of {batch} responses is not a whole number "
                         f"of groups of num_generations={num_generations}")


def response_scores(rewards_BT: torch.Tensor, num_generations: int) -> torch.Tensor:
    """``[P, G]`` one score per response (token rewards summed), grouped by prompt."""
    return rewards_BT.sum(-1).view(-1, num_generations)


# Importing the modules registers the estimators.
from mcore_align.algorithms.ppo.advantages import gae, grpo, rloo  # noqa: E402,F401

__all__ = ["ADVANTAGE_ESTIMATORS", "AdvantageEstimator", "compute_advantages", "register_advantage_estimator"]
