"""CPO: Contrastive Preference Optimization (reference-free DPO + NLL on the chosen).

Paper: Xu et al., "Contrastive Preference Optimization: Pushing the Boundaries of LLM
Performance in Machine Translation", arXiv:2401.08417, Eq. (3) (L_prefer) plus the NLL
regulariser of Sec. 3:

    L_CPO = -E log sigma( beta * (log pi(y_w|x) - log pi(y_l|x)) )  +  cpo_alpha * L_NLL(y_w)

As TRL's CPOTrainer.cpo_loss, with logits = pol_c - pol_r, per pair:
    sigmoid: -(1 - eps) * logsigmoid(beta * logits) - eps * logsigmoid(-beta * logits)
    hinge:   relu(1 - beta * logits)
    ipo:     (logits - 1 / (2 beta))^2, on length-normalised log-probs (Azar et al.,
             arXiv:2310.12036, Eq. 17; TRL sets average_log_prob for ipo)
rewards = beta * logps (length-normalised for ipo), L_NLL = token-mean NLL of the chosen.

Departures from TRL: normalisation by global counts (pairs, chosen tokens) instead of
per micro-batch; the `nll_loss` metric reports the chosen NLL even when cpo_alpha == 0
(TRL logs 0 then); TRL's "alphapo" loss type is not implemented; SimPO lives in simpo.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from torch import Tensor

from mcore_align.algorithms.pair_losses import PairLoss, hinge_pair_loss, ipo_pair_loss, sigmoid_pair_loss
from mcore_align.algorithms.base import (
    GlobalCounts,
    Metrics,
    Objective,
    SequenceStats,
    check_choice,
    check_non_negative,
    check_positive,
    check_unit_interval,
    chosen_nll,
    pair_reward_metrics,
    per_token,
    register_objective,
    require_positive,
    split_pairs,
)

CPO_LOSSES: dict[str, PairLoss] = {"sigmoid": sigmoid_pair_loss, "hinge": hinge_pair_loss, "ipo": ipo_pair_loss}
_LENGTH_NORMALISED = {"ipo"}


def reference_free_pair_objective(
    objective: str,
    stats: SequenceStats,
    counts: GlobalCounts,
    *,
    pair_loss: PairLoss,
    beta: float,
    label_smoothing: float,
    nll_alpha: float,
    length_normalised: bool,
    logits_offset: float = 0.0,
) -> tuple[Tensor, Metrics]:
    """Shared by CPO and SimPO: pair_loss(lp_c - lp_r - logits_offset) + nll_alpha * NLL.

    lp = logps / num_tokens when `length_normalised`, else logps. Returns the global
    contribution sum(per-pair) / counts.num_pairs + nll_alpha * sum(NLL) / #chosen tokens.
    """
    num_pairs = require_positive(counts.num_pairs, "num_pairs", objective)
    lp = per_token(stats.logps, stats.num_tokens) if length_normalised else stats.logps
    lp_c, lp_r = split_pairs(lp)
    raw_c, _ = split_pairs(stats.logps)
    ntok_c, _ = split_pairs(stats.num_tokens)

    loss = pair_loss(lp_c - lp_r - logits_offset, beta, label_smoothing).sum() / num_pairs
    if nll_alpha != 0:
        nll, nll_metric = chosen_nll(raw_c, ntok_c, counts, objective)
        loss = loss + nll_alpha * nll
    else:  # the metric only; counts.num_chosen_tokens may legitimately be 0 here
        nll_sum = -raw_c.detach().sum()
        nll_metric = (nll_sum, ntok_c.sum().to(nll_sum.dtype))

    metrics = pair_reward_metrics(beta * lp_c.detach(), beta * lp_r.detach(), lp_c, lp_r)
    metrics["nll_loss"] = nll_metric
    return loss, metrics


@dataclass(kw_only=True)
class CPOConfig:
    beta: float = 0.1
    """Inverse temperature of the reward beta * log pi (tau for ipo)."""
    cpo_alpha: float = 1.0
    """Weight of the token-mean NLL on the chosen responses."""
    loss_type: str = "sigmoid"
    """"sigmoid", "hinge" or "ipo" (ipo uses length-normalised log-probs)."""
    label_smoothing: float = 0.0
    """Label-flip probability for the sigmoid loss (conservative form), in [0, 0.5)."""

    def __post_init__(self) -> None:
        check_positive(self.beta, "beta")
        check_non_negative(self.cpo_alpha, "cpo_alpha")
        check_choice(self.loss_type, "loss_type", CPO_LOSSES)
        check_unit_interval(self.label_smoothing, "label_smoothing", hi=0.5)


@register_objective
class CPO(Objective):
    """Reference-free contrastive preference objective; see the module docstring."""

    name = "cpo"
    config_cls = CPOConfig
    inputs = frozenset({"logps", "num_tokens"})
    data_kind = "paired"

    def __call__(self, stats: SequenceStats, counts: GlobalCounts) -> tuple[Tensor, Metrics]:
        cfg = self.cfg
        return reference_free_pair_objective(
            self.name,
            stats,
            counts,
            pair_loss=CPO_LOSSES[cfg.loss_type],
            beta=cfg.beta,
            label_smoothing=cfg.label_smoothing,
            nll_alpha=cfg.cpo_alpha,
            length_normalised=cfg.loss_type in _LENGTH_NORMALISED,
        )
