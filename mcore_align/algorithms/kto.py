"""KTO: Kahneman-Tversky Optimization on unpaired desirable / undesirable examples.

Paper: Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic Optimization",
arXiv:2402.01306, Section 3.2, the KTO loss (the form TRL's KTOTrainer.kto_loss implements;
cite the loss by this section, as the paper's equation numbers differ between its versions):

    r(x, y) = log pi(y|x) - log ref(y|x)
    z0      = max(0, E_{x', y'} [ log pi(y'|x') - log ref(y'|x') ])          (detached)
    v(x, y) = lambda_D * sigma(beta * (r - z0))   if y is desirable
              lambda_U * sigma(beta * (z0 - r))   if y is undesirable
    L_KTO   = E [ lambda_y - v(x, y) ]

i.e. per sequence: desirable_weight * (1 - sigmoid(beta * (r - z0))) and
undesirable_weight * (1 - sigmoid(beta * (z0 - r))), averaged over sequences.

The KL estimate z0 uses mismatched pairs (prompt_i, completion_j) that the data
pipeline builds (TRL shifts completions within the batch). The step sums
`KTO.global_partial_sums(stats)` (from a no-grad pre-pass) over all micro-batches and DP
ranks of the step and sets `stats.kl_reference = KTO.global_statistic(sum)`; this module
runs no collectives.

Departures from TRL:
  * z0 is the mean over the whole GLOBAL batch (all micro-batches, all DP ranks), clamped
    at 0 afterwards; TRL estimates it per micro-batch and averages the per-rank means.
    The global estimate is what the paper defines and makes the loss split-invariant.
  * The loss is sum(weighted per-sequence losses) / counts.num_sequences (global),
    where TRL takes nanmean over the micro-batch.
  * TRL's `rewards/margins` (difference of two group means) is not a (sum, count)
    metric and is not emitted; it is rewards/chosen - rewards/rejected of the logs.
  * Extra loss_type "apo_zero_unpaired" (TRL's KTO option; D'Oosterlinck et al.,
    arXiv:2408.06266) ignores z0.
"""
from __future__ import annotations

import warnings
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
    register_objective,
    require,
    require_positive,
    scalar_metric,
)

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kl_partial_sums(stats: SequenceStats) -> tuple[Tensor, Tensor]:
    """This micro-batch's share of z0: (sum of (kl_logps - ref_kl_logps), #sequences), detached.

    The trainer sums both over all micro-batches and DP ranks of the step (one all-reduce)
    and then calls `kl_reference_point`.
    """
    kl = require(stats, "kl_logps", "kto").detach() - require(stats, "ref_kl_logps", "kto").detach()
    return kl.sum(), torch.tensor(float(kl.numel()), dtype=kl.dtype, device=kl.device)


def kl_reference_point(kl_sum: Tensor, kl_count: Tensor) -> Tensor:
    """z0 = clamp(sum / count, min=0), detached: the value for `stats.kl_reference`."""
    return (kl_sum / kl_count).clamp(min=0).detach()


def check_weight_ratio(n_desirable: int, n_undesirable: int, desirable_weight: float, undesirable_weight: float) -> None:
    """Warn (as TRL does) when (dw * n_D) / (uw * n_U) is outside [1, 4/3], the range the
    KTO paper (Sec. 4.3) recommends, and suggest weights that bring it back."""
    if n_desirable == 0 or n_undesirable == 0:
        warnings.warn(
            f"KTO data has {n_desirable} desirable and {n_undesirable} undesirable examples; "
            "with one class absent the desirable/undesirable weights cannot be balanced."
        )
        return
    ratio = (desirable_weight * n_desirable) / (undesirable_weight * n_undesirable)
    if 1.0 <= ratio <= 4 / 3:
        return
    dw_lo = undesirable_weight * n_undesirable / n_desirable
    uw_hi = desirable_weight * n_desirable / n_undesirable
    warnings.warn(
        f"KTO: (desirable_weight * #desirable) / (undesirable_weight * #undesirable) = {ratio:.3f} "
        f"is outside the recommended [1, 4/3]. Set EITHER desirable_weight in "
        f"[{dw_lo:.3g}, {4 / 3 * dw_lo:.3g}] OR undesirable_weight in [{0.75 * uw_hi:.3g}, {uw_hi:.3g}] "
        "(not both)."
    )


@dataclass(kw_only=True)
class KTOConfig:
    beta: float = 0.1
    """Inverse temperature of the implicit reward beta * log(pi / ref)."""
    desirable_weight: float = 1.0
    """lambda_D: weight of the desirable-example losses."""
    undesirable_weight: float = 1.0
    """lambda_U: weight of the undesirable-example losses."""
    loss_type: str = "kto"
    """"kto" (the paper's loss, Sec. 3.2) or "apo_zero_unpaired" (APO-zero on unpaired data, no z0)."""

    def __post_init__(self) -> None:
        check_positive(self.beta, "beta")
        check_non_negative(self.desirable_weight, "desirable_weight")
        check_non_negative(self.undesirable_weight, "undesirable_weight")
        check_choice(self.loss_type, "loss_type", list(KTO_LOSS_TYPES))


@register_objective
class KTO(Objective):
    """Unpaired prospect-theoretic objective; see the module docstring."""

    name = "kto"
    config_cls = KTOConfig
    inputs = frozenset({"logps", "num_tokens", "ref_logps", "labels", "kl_logps", "ref_kl_logps", "kl_reference"})
    data_kind = "kto"

    def global_partial_sums(self, stats: SequenceStats) -> Tensor:
        """[2] this micro-batch's (sum of (kl_logps - ref_kl_logps), #sequences), for z0."""
        return torch.stack(kl_partial_sums(stats))

    def global_statistic(self, total: Tensor) -> Tensor:
        """z0 from the step's summed partial sums."""
        return kl_reference_point(total[0], total[1])

    def check_data(self, labels) -> None:
        """TRL's weight-balance warning on the training set's desirable/undesirable counts."""
        labels = [bool(x) for x in labels]
        check_weight_ratio(sum(labels), len(labels) - sum(labels), self.cfg.desirable_weight,
                           self.cfg.undesirable_weight)

    def __call__(self, stats: SequenceStats, counts: GlobalCounts) -> tuple[Tensor, Metrics]:
        cfg = self.cfg
        num_sequences = require_positive(counts.num_sequences, "num_sequences", self.name)
        labels = require(stats, "labels", self.name).to(torch.bool)
        ref = require(stats, "ref_logps", self.name).detach()
        logratios = stats.logps - ref  # [N] r(x, y)
        if cfg.loss_type == "kto":
            z0 = require(stats, "kl_reference", self.name).detach().to(logratios.dtype)
        else:  # apo_zero_unpaired: anchored at zero
            z0 = torch.zeros((), dtype=logratios.dtype, device=logratios.device)

        # Both branches are computed for every sequence and selected by the label, so the
        # code has no data-dependent shapes (no host sync); the unselected branch gets zero grad.
        desirable = cfg.desirable_weight * (1 - torch.sigmoid(cfg.beta * (logratios - z0)))
        undesirable = cfg.undesirable_weight * (1 - torch.sigmoid(cfg.beta * (z0 - logratios)))
        loss = torch.where(labels, desirable, undesirable).sum() / num_sequences

        rewards = cfg.beta * logratios.detach()
        logps = stats.logps.detach()
        n_pos = labels.sum().to(rewards.dtype)
        n_neg = (~labels).sum().to(rewards.dtype)

        def group_sum(x: Tensor, mask: Tensor) -> Tensor:  # where(), not x * mask: keeps -inf * 0 out
            return torch.where(mask, x, torch.zeros_like(x)).sum()

        metrics = {
            "rewards/chosen": scalar_metric(group_sum(rewards, labels), n_pos),
            "rewards/rejected": scalar_metric(group_sum(rewards, ~labels), n_neg),
            "logps/chosen": scalar_metric(group_sum(logps, labels), n_pos),
            "logps/rejected": scalar_metric(group_sum(logps, ~labels), n_neg),
            # One z0 per micro-batch, each counted once: the trainer's mean is z0 itself.
            "kl": scalar_metric(z0, 1.0),
        }
        return loss, metrics


__all__ = ["KTO", "KTOConfig", "KTO_LOSS_TYPES", "check_weight_ratio", "kl_partial_sums", "kl_reference_point"]
