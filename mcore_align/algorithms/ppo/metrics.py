"""TRL PPOTrainer's logged metrics, on one rank's rollout batch (averaging over DP ranks is the
trainer's job, as ``accelerator.gather_for_metrics(...).mean()`` is TRL's)."""
from __future__ import annotations

import torch


def rollout_metrics(scores_B: torch.Tensor, kl_BT: torch.Tensor, non_score_reward_BT: torch.Tensor,
                    logprobs_BT: torch.Tensor, padding_mask_BT: torch.Tensor,
                    response_ids_BT: torch.Tensor, stop_token_ids: tuple[int, ...]) -> dict[str, float]:
    """``objective/*`` and ``val/num_eos_tokens``.

    * ``objective/kl`` = mean over responses of the summed per-token KL;
    * ``objective/entropy`` = mean over responses of ``-sum logp`` (a one-sample entropy estimate);
    * ``objective/non_score_reward`` = mean summed ``-kl_coef * kl``;
    * ``objective/rlhf_reward`` = that + mean score; ``objective/scores`` = mean score (after the
      missing-EOS penalty);
    * ``val/num_eos_tokens``: stop tokens among the response tokens.

    Departures from TRL: ``objective/entropy`` sums response tokens only (TRL's padding log-probs
    hold ``INVALID_LOGPROB = 1`` and add -1 per padding position); ``val/num_eos_tokens`` counts
    within the responses, so a pad id equal to the EOS id is not counted.
    """
    valid = ~padding_mask_BT
    mean_kl = kl_BT.sum(1).mean()
    mean_entropy = (-logprobs_BT.masked_fill(padding_mask_BT, 0.0)).sum(1).mean()
    mean_nsr = non_score_reward_BT.sum(1).mean()
    stops = torch.tensor(stop_token_ids, dtype=response_ids_BT.dtype, device=response_ids_BT.device)
    return {
        "objective/kl": float(mean_kl),
        "objective/entropy": float(mean_entropy),
        "objective/non_score_reward": float(mean_nsr),
        "objective/rlhf_reward": float(mean_nsr + scores_B.mean()),
        "objective/scores": float(scores_B.mean()),
        "val/num_eos_tokens": int((torch.isin(response_ids_BT, stops) & valid).sum()),
    }


_TRAIN_KEYS = {"approxkl": "policy/approxkl_avg", "clipfrac": "policy/clipfrac_avg", "pg_loss": "loss/policy_avg",
               "vf_loss": "loss/value_avg", "vf_clipfrac": "val/clipfrac_avg", "entropy": "policy/entropy_avg",
               "ratio": "val/ratio"}


def train_metrics(per_micro_batch: list[dict]) -> dict[str, float]:
    """Average ``losses.ppo_loss`` stats over the micro-batches of all PPO epochs (TRL keeps one
    value per (epoch, mini-batch, micro-batch) and logs their mean); ``val/ratio_var`` is the
    unbiased variance of the per-micro-batch mean ratios."""
    if not per_micro_batch:
        raise ValueError("train_metrics needs the stats of at least one micro-batch")
    out = {}
    for k, name in _TRAIN_KEYS.items():
        if k in per_micro_batch[0]:
            out[name] = float(torch.stack([torch.as_tensor(s[k]) for s in per_micro_batch]).mean())
    ratios = torch.stack([torch.as_tensor(s["ratio"]) for s in per_micro_batch])
    out["val/ratio_var"] = float(ratios.var()) if len(ratios) > 1 else 0.0
    return out
