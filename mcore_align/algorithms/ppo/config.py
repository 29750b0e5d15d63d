"""PPO / GRPO / RLOO hyperparameters (defaults: HF TRL's PPOConfig, which ms-swift also uses)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class PPOConfig:
    """Hyperparameters of the online RLHF maths in this package (no trainer wiring yet)."""

    kl_coef: float = 0.05
    """Weight of the per-token KL penalty in the reward: ``r_t = -kl_coef * kl_t``."""
    kl_estimator: str = "k1"
    """Per-token KL estimator (``kl.KL_ESTIMATORS``): "k1" ``logp - logp_ref`` or "k3"
    ``(exp(r) - 1) - r`` with ``r = logp_ref - logp`` (http://joschu.net/blog/kl-approx.html)."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of a response that produced no stop token (None: off)."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards over valid positions (mean kept) before GAE."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Whiten GAE advantages over response tokens (TRL always does)."""
    cliprange: float = 0.2
    """PPO ratio clip: ``clip(rho, 1 - cliprange, 1 + cliprange)``."""
    cliprange_value: float = 0.2
    """Value clip around the rollout-time values."""
    vf_coef: float = 0.1
    """Weight of the value loss: ``loss = pg_loss + vf_coef * vf_loss``."""
    temperature: float = 0.7
    """Sampling temperature; training log-probs use ``logits / (temperature + 1e-7)`` (TRL)."""
    advantage_estimator: str = "gae"
    """``advantages.ADVANTAGE_ESTIMATORS``: "gae" (needs a critic), "grpo", "rloo"."""
    num_generations: int = 1
    """Responses per prompt (GRPO / RLOO: >= 2, consecutive in the batch)."""
    grpo_scale_by_std: bool = True
    """GRPO: divide by the group std (False: Dr. GRPO, mean-centred only)."""
    grpo_epsilon: float = 1e-6
    """GRPO: ``(s - mean) / (std + epsilon)`` (verl's value)."""

    def __post_init__(self) -> None:
        from mcore_align.algorithms.ppo.advantages import ADVANTAGE_ESTIMATORS
        from mcore_align.algorithms.ppo.kl import KL_ESTIMATORS

        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {sorted(KL_ESTIMATORS)}, got {self.kl_estimator!r}")
        if self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage_estimator must be one of {sorted(ADVANTAGE_ESTIMATORS)}, "
                             f"got {self.advantage_estimator!r}")
        for f in ("cliprange", "cliprange_value"):
            if getattr(self, f) <= 0:
                raise ValueError(f"{f} must be > 0, got {getattr(self, f)}")
        for f in ("kl_coef", "vf_coef"):
            if getattr(self, f) < 0:
                raise ValueError(f"{f} must be >= 0, got {getattr(self, f)}")
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            raise ValueError(f"gamma and lam must be in [0, 1], got gamma={self.gamma}, lam={self.lam}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for PPO log-probs, got {self.temperature}")
        if ADVANTAGE_ESTIMATORS[self.advantage_estimator].group_based and self.num_generations < 2:
            raise ValueError(f"advantage_estimator={self.advantage_estimator!r} compares responses to the same "
                             f"prompt: num_generations must be >= 2, got {self.num_generations}")
