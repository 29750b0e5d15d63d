"""PPO (``rlhf_type=ppo``): the clipped policy objective and its critic, as TRL's PPOTrainer.

Schulman et al., "Proximal Policy Optimization Algorithms", arXiv:1707.06347, Eq. (7) (the
clipped surrogate) and the clipped value loss of Ziegler et al. / TRL. The rollout phase
(trainer/rollout.py) samples responses, scores them (reward model and/or reward functions),
computes the old log-probs with the training forward at the sampling temperature, the
reference log-probs, the critic's values, the per-token rewards (``-kl_coef * KL`` per token
plus the score after the last response token), GAE advantages and returns
(``algorithms/ppo``, checked against a float64 transcription of TRL). Then for
``num_ppo_epochs`` x ``num_mini_batches`` updates:

    policy:  l_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - cliprange, 1 + cliprange)),
             loss = sum_t l_t / #response tokens of the mini-batch
    critic:  e_t = max((V_t - R_t)^2, (clip(V_t, V_old - cliprange_value, V_old + cliprange_value) - R_t)^2)
             loss = vf_coef * 0.5 * sum_t e_t / #value positions (response tokens and one more)

Departures from TRL: (1) the policy and the critic are two models with two optimizers
(TRL wraps both in one module with one optimizer), so gradient clipping applies to each
model's norm separately; the summed loss and each model's gradient are otherwise TRL's.
(2) Losses are normalised by the mini-batch's global token counts (TRL: per micro-batch
means), so they do not depend on the micro-batch split. (3) No entropy metrics (the fused
log-prob head does not compute the full distribution).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mcore_align.algorithms.base import (
    GlobalCounts,
    Metrics,
    Objective,
    SequenceStats,
    check_choice,
    check_non_negative,
    check_positive,
    check_declarations,
    register_objective,
    require,
    require_positive,
    scalar_metric,
)
from mcore_align.algorithms.online import OnlineConfig
from mcore_align.algorithms.ppo.losses import clipped_surrogate_tokens


@dataclass(kw_only=True)
class PPOConfig(OnlineConfig):
    value_model: str | None = None
    """Critic initialisation: a reward-model checkpoint (value head included). None: the
    ``reward_model`` when given, else ``model.load`` with a freshly initialised value head."""
    response_length: int = 53
    """TRL's default."""
    temperature: float = 0.7
    """TRL's default; the training log-probs use ``logits / temperature``."""
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    """"k1" (logp - logp_ref) or "k3"."""
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    num_ppo_epochs: int = 4
    """Passes over each rollout batch."""
    num_mini_batches: int = 1
    """Mini-batches per pass (each one optimizer step of the policy and of the critic)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.kl_estimator, "kl_estimator", ["k1", "k3"])
        for f in ("cliprange", "cliprange_value"):
            check_positive(getattr(self, f), f)
        for f in ("kl_coef", "vf_coef"):
            check_non_negative(getattr(self, f), f)
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            raise ValueError(f"gamma and lam must be in [0, 1], got gamma={self.gamma}, lam={self.lam}")
        for f in ("num_ppo_epochs", "num_mini_batches"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")


class PPOCritic(Objective):
    """The critic's clipped value loss over one mini-batch (see the module docstring). Built by
    `PPO.critic_objective`; not selectable as an rlhf_type."""

    name = "ppo_critic"
    config_cls = PPOConfig
    head = "value"
    inputs = frozenset({"token_values", "token_value_mask", "token_returns", "token_old_values"})
    data_kind = "prompt"

    def __call__(self, stats: SequenceStats, counts: GlobalCounts) -> tuple[Tensor, Metrics]:
        cfg = self.cfg
        n = require_positive(counts.num_value_tokens, "num_value_tokens", self.name)
        v = require(stats, "token_values", self.name)
        mask = require(stats, "token_value_mask", self.name).to(v.dtype)
        ret = require(stats, "token_returns", self.name).to(v.dtype)
        old = require(stats, "token_old_values", self.name).to(v.dtype)
        v_clip = torch.clamp(v, old - cfg.cliprange_value, old + cfg.cliprange_value)
        e1, e2 = (v - ret) ** 2, (v_clip - ret) ** 2
        vf = 0.5 * torch.max(e1, e2) * mask
        loss = cfg.vf_coef * vf.sum() / n
        n_local = mask.sum()
        return loss, {"loss/value_avg": scalar_metric(vf.sum(), n_local),
                      "val/clipfrac_avg": scalar_metric(((e2 > e1).to(v.dtype) * mask).sum(), n_local)}


check_declarations(PPOCritic)


@register_objective
class PPO(Objective):
    """Clipped-surrogate policy objective with a critic; see the module docstring."""

    name = "ppo"
    config_cls = PPOConfig
    inputs = frozenset({"token_logps", "token_mask", "token_entropy", "token_old_logps", "token_advantages"})
    data_kind = "prompt"

    def __init__(self, cfg: PPOConfig) -> None:
        super().__init__(cfg)
        self.logprob_temperature = cfg.temperature
        # The reference scores the samples for the KL penalty in the reward (not in the loss).
        self.needs_reference = cfg.kl_coef > 0

    @property
    def updates_per_step(self) -> int:
        return self.cfg.num_ppo_epochs * self.cfg.num_mini_batches

    def critic_objective(self) -> PPOCritic:
        """The critic's objective: the trainer builds a value-head model, its optimizer and
        a second step for it (declared here, so the trainer never names PPO)."""
        return PPOCritic(self.cfg)

    def __call__(self, stats: SequenceStats, counts: GlobalCounts) -> tuple[Tensor, Metrics]:
        cfg = self.cfg
        n = require_positive(counts.num_tokens, "num_tokens", self.name)
        logp = require(stats, "token_logps", self.name)
        mask = require(stats, "token_mask", self.name).to(logp.dtype)
        adv = require(stats, "token_advantages", self.name).to(logp.dtype)
        old = require(stats, "token_old_logps", self.name).to(logp.dtype)
        pg, parts = clipped_surrogate_tokens(logp, old, adv, mask, cfg.cliprange, cfg.cliprange)  # [T]
        loss = pg.sum() / n
        n_local = mask.sum()
        return loss, {
            "loss/policy_avg": scalar_metric(pg.sum(), n_local),
            "policy/approxkl_avg": scalar_metric(parts["approxkl"], n_local),
            "policy/clipfrac_avg": scalar_metric(parts["clipped"], n_local),
            "val/ratio": scalar_metric(parts["ratio"], n_local),
            **({"policy/entropy_avg": scalar_metric((stats.token_entropy * mask).sum(), n_local)}
               if stats.token_entropy is not None else {}),
        }
