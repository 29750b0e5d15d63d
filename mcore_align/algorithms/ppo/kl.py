"""Per-token KL estimators between the rollout policy and the reference (registry by name).

Both take ``logprobs_BT`` (policy at rollout time) and ``ref_logprobs_BT`` ``[B, T]`` and return
``kl_BT``; see http://joschu.net/blog/kl-approx.html. With ``r = ref - logp``:

* k1: ``-r = logp - ref`` (unbiased, can be negative per token)
* k3: ``(exp(r) - 1) - r`` (unbiased, always >= 0)
"""
from __future__ import annotations

from typing import Callable

import torch


def k1(logprobs_BT: torch.Tensor, ref_logprobs_BT: torch.Tensor) -> torch.Tensor:
    return logprobs_BT - ref_logprobs_BT


def k3(logprobs_BT: torch.Tensor, ref_logprobs_BT: torch.Tensor) -> torch.Tensor:
    logr = ref_logprobs_BT - logprobs_BT
    return torch.expm1(logr) - logr


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"k1": k1, "k3": k3}


def kl_estimate(logprobs_BT: torch.Tensor, ref_logprobs_BT: torch.Tensor, padding_mask_BT: torch.Tensor,
                estimator: str = "k1") -> torch.Tensor:
    """``kl_BT``, 0 at padding (TRL fills both log-probs with the same invalid value there)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl estimator must be one of {sorted(KL_ESTIMATORS)}, got {estimator!r}")
    return KL_ESTIMATORS[estimator](logprobs_BT, ref_logprobs_BT).masked_fill(padding_mask_BT, 0.0)
