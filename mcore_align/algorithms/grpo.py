"""GRPO and RLOO: critic-free online objectives on the policy's own samples.

GRPO: Shao et al., "DeepSeekMath", arXiv:2402.03300, Sec. 4.1 (Eq. 3 with outcome
supervision): for each prompt the policy samples G = ``num_generations`` responses, a reward
function scores them, and each response's advantage is its score standardised within its
group. RLOO: Ahmadian et al., "Back to Basics", arXiv:2402.14740: the baseline of a response
is the mean score of the OTHER G - 1 responses. The advantage estimators are registered in
``algorithms/ppo/advantages`` (one file each); the rollout phase (trainer/rollout.py) runs
them and hands this objective per-token tensors.

Per response token t (ratio rho_t = exp(logp_t - logp_old_t)):

    l_t = max(-A rho_t, -A clip(rho_t, 1 - epsilon, 1 + epsilon_high)) + beta * KL_t
    KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1            (k3 estimator, as TRL's GRPO)
    loss = sum over response tokens of the global batch of l_t / #response tokens

The normalisation is TRL's ``loss_type="dapo"`` (its default in 1.x): by the global count of
response tokens, so the loss and its gradient do not depend on the micro-batch or DP split.
With one optimizer step per rollout batch (the only mode implemented) the sampling policy is
the current one, so ``logp_old`` is ``logp`` detached (rho = 1, TRL does the same when
``num_iterations == 1``) and clipping never triggers; ``policy/clipfrac_avg`` is 0 then.

Departures from TRL's GRPOTrainer: the KL coefficient ``beta`` defaults to 0.04 (ms-swift's
default; TRL 1.x defaults to 0.0); only ``num_iterations = 1``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mcore_align.algorithms.online import OnlineConfig
from mcore_align.algorithms.ppo.losses import clipped_surrogate_tokens
from mcore_align.algorithms.base import (
    GlobalCounts,
    Metrics,
    Objective,
    SequenceStats,
    check_choice,
    check_non_negative,
    check_positive,
    register_objective,
    require,
    require_positive,
    scalar_metric,
)



@dataclass(kw_only=True)
class GRPOConfig(OnlineConfig):
    num_generations: int = 8
    """G: responses sampled per prompt (>= 2); ``global_batch_size`` counts prompts."""
    temperature: float = 1.0
    """Sampling temperature; the training log-probs are taken at the same temperature."""
    beta: float = 0.04
    """KL coefficient (k3 estimator, in the loss); 0 builds no reference model."""
    epsilon: float = 0.2
    """Lower clip of the ratio: 1 - epsilon."""
    epsilon_high: float | None = None
    """Upper clip (DAPO's clip-higher); None: epsilon."""
    advantage_estimator: str = "grpo"
    """"grpo" (group mean/std) or "rloo" (leave-one-out mean)."""
    scale_rewards: bool = True
    """GRPO: divide by the group std (False: Dr. GRPO, arXiv:2503.20783)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (responses to the same prompt are compared), "
                             f"got {self.num_generations}")
        check_positive(self.epsilon, "epsilon")
        check_non_negative(self.epsilon_high, "epsilon_high", allow_none=True)
        check_non_negative(self.beta, "beta")
        check_choice(self.advantage_estimator, "advantage_estimator", ["grpo", "rloo"])


@register_objective
class GRPO(Objective):
    """Group-relative policy optimisation on the policy's own samples; see the module docstring."""

    name = "grpo"
    config_cls = GRPOConfig
    inputs = frozenset({"token_logps", "token_mask", "token_entropy", "token_advantages", "token_ref_logps"})
    data_kind = "prompt"

    def __init__(self, cfg: GRPOConfig) -> None:
        super().__init__(cfg)
        self.logprob_temperature = cfg.temperature
        if cfg.beta == 0:  # no KL term: no reference model, no reference pass
            self.inputs = type(self).inputs - {"token_ref_logps"}
            self.needs_reference = False

    def __call__(self, stats: SequenceStats, counts: GlobalCounts) -> tuple[Tensor, Metrics]:
        cfg = self.cfg
        n_tokens = require_positive(counts.num_tokens, "num_tokens", self.name)
        logp = require(stats, "token_logps", self.name)
        mask = require(stats, "token_mask", self.name)
        adv = require(stats, "token_advantages", self.name).to(logp.dtype)
        old = stats.token_old_logps.to(logp.dtype) if stats.token_old_logps is not None else logp.detach()
        hi = cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon
        pg, parts = clipped_surrogate_tokens(logp, old, adv, mask, cfg.epsilon, hi)  # [T]
        per_token = pg
        metrics = {}
        if "token_ref_logps" in self.inputs:
            d = (require(stats, "token_ref_logps", self.name).to(logp.dtype) - logp) * mask
            kl = (torch.exp(d) - d - 1) * mask  # k3 >= 0
            per_token = per_token + cfg.beta * kl
            metrics["objective/kl"] = scalar_metric(kl.sum(), mask.sum())
        loss = per_token.sum() / n_tokens
        n_local = mask.sum()
        metrics["loss/policy_avg"] = scalar_metric(pg.sum(), n_local)
        metrics["policy/clipfrac_avg"] = scalar_metric(parts["clipped"], n_local)
        metrics["policy/approxkl_avg"] = scalar_metric(parts["approxkl"], n_local)
        if stats.token_entropy is not None:
            metrics["policy/entropy_avg"] = scalar_metric((stats.token_entropy * mask).sum(), n_local)
        return loss, metrics


@dataclass(kw_only=True)
class RLOOConfig(GRPOConfig):
    advantage_estimator: str = "rloo"
    """"rloo" (leave-one-out mean, the default here) or "grpo"."""


@register_objective
class RLOO(GRPO):
    """GRPO's loss with RLOO's leave-one-out baseline by default (``rlhf_type=rloo``)."""

    name = "rloo"
    config_cls = RLOOConfig
