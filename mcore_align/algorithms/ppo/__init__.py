"""Online RLHF maths (PPO, GRPO, RLOO) as small pure functions; no collectives, no trainer.

Pieces, in the order a PPO step uses them (TRL PPOTrainer's order):

1. ``rewards.apply_missing_eos_penalty`` -> scores
2. ``rewards.per_token_rewards`` -> ``-kl_coef * kl`` per token + the score after the last token
3. ``advantages.compute_advantages("gae" | "grpo" | "rloo", ...)`` -> advantages, returns
4. ``losses.ppo_loss`` (clipped policy + clipped value loss) per micro-batch
5. ``metrics.rollout_metrics`` / ``metrics.train_metrics`` -> TRL's metric names

Trainer integration (rollout phase, reference/critic forwards, PPO epochs) is not done yet.
"""
from mcore_align.algorithms.ppo.advantages import ADVANTAGE_ESTIMATORS, compute_advantages, register_advantage_estimator
from mcore_align.algorithms.ppo.config import PPOConfig
from mcore_align.algorithms.ppo.kl import KL_ESTIMATORS, kl_estimate
from mcore_align.algorithms.ppo.losses import entropy_from_logits, logprobs_from_logits, policy_loss, ppo_loss, value_loss
from mcore_align.algorithms.ppo.masks import masked_mean, masked_var, masked_whiten, padding_masks
from mcore_align.algorithms.ppo.metrics import rollout_metrics, train_metrics
from mcore_align.algorithms.ppo.rewards import apply_missing_eos_penalty, per_token_rewards

__all__ = [
    "ADVANTAGE_ESTIMATORS", "KL_ESTIMATORS", "PPOConfig", "apply_missing_eos_penalty", "compute_advantages",
    "entropy_from_logits", "kl_estimate", "logprobs_from_logits", "masked_mean", "masked_var", "masked_whiten",
    "padding_masks", "per_token_rewards", "policy_loss", "ppo_loss", "register_advantage_estimator",
    "rollout_metrics", "train_metrics", "value_loss",
]
