"""SimPO: Simple Preference Optimization with a length-normalised, reference-free reward.

Paper: Meng et al., "SimPO: Simple Preference Optimization with a Reference-Free Reward",
arXiv:2405.14734, Eq. (6):

    L_SimPO = -E log sigma( beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma )

Implemented as TRL's CPOTrainer with loss_type="simpo": with average log-probs
a_c = logps_c / |y_w|, a_r = logps_r / |y_l|,

    logits = (a_c - a_r) - gamma_beta_ratio,   gamma_beta_ratio = simpo_gamma / beta
    sigmoid: -(1 - eps) logsigmoid(beta * logits) - eps * logsigmoid(-beta * logits)

so beta * logits = beta * (a_c - a_r) - simpo_gamma: `simpo_gamma` is the paper's gamma
(a margin in reward units), NOT the ratio gamma/beta that the SimPO repository's
`gamma_beta_ratio` option takes. With the defaults beta = 2, simpo_gamma = 1 the
target margin in average log-prob is 0.5.

rewards = beta * a (TRL). `cpo_alpha` adds cpo_alpha * token-mean NLL of the chosen
responses (the seed's CPO-SimPO default 1.0; 0.0 gives the paper's SimPO).

Departures from TRL: normalisation by global counts; the extra "hinge" loss type,
relu(1 - beta * logits) = relu(1 - (beta * (a_c - a_r) - gamma)), is not in TRL (whose
simpo loss is sigmoid only); the `nll_loss` metric is reported even when cpo_alpha == 0.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mcore_align.algorithms.base import (
    GlobalCounts,
    Metrics,
    Objective,
    SequenceStats,
    check_choice,
    check_non_negative,
    check_positive,
    check_unit_interval,
    register_objective,
)
from mcore_align.algorithms.cpo import hinge_pair_loss, reference_free_pair_objective, sigmoid_pair_loss

SIMPO_LOSSES = {"sigmoid": sigmoid_pair_loss, "hinge": hinge_pair_loss}


@dataclass(kw_only=True)
class SimPOConfig:
    beta: float = 2.0
    """Reward scale beta (paper: 2.0-2.5 typical)."""
    simpo_gamma: float = 1.0
    """Target reward margin gamma (reward units); the logit offset is simpo_gamma / beta."""
    cpo_alpha: float = 1.0
    """Weight of the token-mean NLL on the chosen responses; 0.0 gives the original SimPO."""
    loss_type: str = "sigmoid"
    """"sigmoid" (paper) or "hinge"."""
    label_smoothing: float = 0.0
    """Label-flip probability for the sigmoid loss, in [0, 0.5)."""

    def __post_init__(self) -> None:
        check_positive(self.beta, "beta")
        check_non_negative(self.simpo_gamma, "simpo_gamma")
        check_non_negative(self.cpo_alpha, "cpo_alpha")
        check_choice(self.loss_type, "loss_type", SIMPO_LOSSES)
        check_unit_interval(self.label_smoothing, "label_smoothing", hi=0.5)

    @property
    def gamma_beta_ratio(self) -> float:
        return self.simpo_gamma / self.beta


@register_objective
class SimPO(Objective):
    """Length-normalised reference-free pairwise objective; see the module docstring."""

    name = "simpo"
    config_cls = SimPOConfig
    inputs = frozenset({"logps", "num_tokens"})
    data_kind = "paired"

    def __call__(self, stats: SequenceStats, counts: GlobalCounts) -> tuple[Tensor, Metrics]:
        cfg = self.cfg
        return reference_free_pair_objective(
            self.name,
            stats,
            counts,
            pair_loss=SIMPO_LOSSES[cfg.loss_type],
            beta=cfg.beta,
            label_smoothing=cfg.label_smoothing,
            nll_alpha=cfg.cpo_alpha,
            length_normalised=True,
            logits_offset=cfg.gamma_beta_ratio,
        )
