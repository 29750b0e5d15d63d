"""DPO and its pairwise relatives: one objective, a dict of loss types.

Paper: Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly
a Reward Model", arXiv:2305.18290, Eq. (7):

    L_DPO = -E log sigma( beta * [ (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) ] )

With TRL's names (trl.DPOTrainer.dpo_loss), per pair:
    chosen_logratios   = pol_c - ref_c
    rejected_logratios = pol_r - ref_r
    logits             = (pol_c - pol_r) - (ref_c - ref_r)
and each loss type below is a function of these. The loss types, their papers and
equations are listed on `_LOSSES`. `loss_type` may be a list; the per-pair losses are
combined as sum_k loss_weights[k] * loss_k (TRL's MPO-style mixing). `rpo_alpha` adds
rpo_alpha * (token-mean NLL of the chosen responses), Pang et al., "Iterative Reasoning
Preference Optimization", arXiv:2404.19733, Eq. (1).

Departures from TRL (all deliberate, each pinned by a test):
  * Normalisation is by GLOBAL counts (pairs, chosen tokens) so micro-batching and data
    parallelism do not change the loss; TRL averages per micro-batch.
  * exo_pair with label_smoothing == 0 uses epsilon = 1e-3 for the exo term only; TRL
    overwrites `self.label_smoothing` in place, which also changes a co-listed sigmoid.
  * bco_pair's running mean delta (TRL: a RunningMoments updated on every call, including
    the current micro-batch, then used at once) is kept on this instance as detached
    state and updated once per optimizer step from the DP-summed rewards of the whole
    global batch (`state_partial_sums` -> all-reduce by the trainer -> `update_state`).
    The delta used in step t is the mean of the per-step global-batch reward means of
    steps 0..t-1 (0.0 at step 0), so every micro-batch of a step sees the same delta
    and the loss stays invariant to micro-batching and DP. Only calls whose `logps`
    requires grad (training forwards) feed the pending statistics; eval forwards do not.
    A step whose summed rewards are non-finite is dropped from the mean (with a warning).
    The trainer must call update_state after EVERY training step, skipped ones included.
  * discopop evaluates exp(-z) * sigmoid(z / tau) as exp(logsigmoid(z / tau) - z), which
    is equal but does not overflow (inf * 0 = nan) for very negative z.
  * "ipo" length-normalises inside its own term only, as TRL 1.16's DPOTrainer does:
    (chosen log-ratio / chosen tokens) - (rejected log-ratio / rejected tokens). Every
    other term and every metric (logps/*, rewards/*, accuracies) uses raw token sums.
    (Older TRL normalised all log-probs, metrics included, whenever "ipo" was set.)
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mcore_align.algorithms.pair_losses import hinge_pair_loss, ipo_pair_loss, sigmoid_pair_loss
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
    require,
    require_positive,
    split_pairs,
)


@dataclass
class _Terms:
    """Per-pair quantities shared by all loss types (all [P], in the input dtype)."""

    chosen_logratios: Tensor
    rejected_logratios: Tensor
    logits: Tensor
    avg_logits: Tensor
    """Length-normalised logits (IPO): chosen_logratios / |y_c| - rejected_logratios / |y_r|."""
    num_pairs: int
    """Global number of pairs: pairwise losses contribute sum(per-pair) / num_pairs."""
    nll: Tensor | None
    """[] this micro-batch's contribution to the global token-mean chosen NLL (None when
    neither rpo_alpha nor the "sft" loss type needs it)."""
    bco_delta: Tensor
    """[] bco_pair's running reward mean (detached)."""


def _pairwise(per_pair: Callable[[_Terms, "DPOConfig"], Tensor]) -> Callable[[_Terms, "DPOConfig"], Tensor]:
    """Turn a per-pair loss [P] into a global-batch contribution: sum / global #pairs."""

    def contribution(t: _Terms, cfg: "DPOConfig") -> Tensor:
        return per_pair(t, cfg).sum() / t.num_pairs

    contribution.__doc__ = per_pair.__doc__
    return contribution


@_pairwise
def _sigmoid(t: _Terms, cfg: "DPOConfig") -> Tensor:
    return sigmoid_pair_loss(t.logits, cfg.beta, cfg.label_smoothing)


@_pairwise
def _robust(t: _Terms, cfg: "DPOConfig") -> Tensor:
    """rDPO, Chowdhury et al., "Provably Robust DPO", arXiv:2403.00409, Eq. (8)."""
    z = cfg.beta * t.logits
    eps = cfg.label_smoothing
    return (-F.logsigmoid(z) * (1 - eps) + F.logsigmoid(-z) * eps) / (1 - 2 * eps)


@_pairwise
def _hinge(t: _Terms, cfg: "DPOConfig") -> Tensor:
    return hinge_pair_loss(t.logits, cfg.beta, cfg.label_smoothing)


@_pairwise
def _ipo(t: _Terms, cfg: "DPOConfig") -> Tensor:
    """On length-normalised logits (TRL 1.16)."""
    return ipo_pair_loss(t.avg_logits, cfg.beta, cfg.label_smoothing)


# EXO with label_smoothing == 0 would take log(0); TRL substitutes this epsilon.
_EXO_DEFAULT_EPS = 1e-3


@_pairwise
def _exo_pair(t: _Terms, cfg: "DPOConfig") -> Tensor:
    """EXO (pairwise), Ji et al., arXiv:2402.00856, Eq. (16): reverse KL between the
    model's and the (label-smoothed) data preference distributions."""
    z = cfg.beta * t.logits
    eps = cfg.label_smoothing if cfg.label_smoothing > 0 else _EXO_DEFAULT_EPS
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


@_pairwise
def _nca_pair(t: _Terms, cfg: "DPOConfig") -> Tensor:
    """NCA (pairwise), Chen et al., "Noise Contrastive Alignment", arXiv:2402.05369, Eq. (12)."""
    rc = cfg.beta * t.chosen_logratios
    rr = cfg.beta * t.rejected_logratios
    return -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)


@_pairwise
def _bco_pair(t: _Terms, cfg: "DPOConfig") -> Tensor:
    """BCO (pairwise), Jung et al., "Binary Classifier Optimization", arXiv:2404.04656,
    Eq. (8), with delta = running mean of the rewards (see module docstring)."""
    rc = cfg.beta * t.chosen_logratios
    rr = cfg.beta * t.rejected_logratios
    return -F.logsigmoid(rc - t.bco_delta) - F.logsigmoid(-(rr - t.bco_delta))


@_pairwise
def _sppo_hard(t: _Terms, cfg: "DPOConfig") -> Tensor:
    """SPPO (hard labels: P(y_w > y_l) = 1), Wu et al., arXiv:2405.00675, Eq. (4.8)."""
    return (t.chosen_logratios - 0.5 / cfg.beta) ** 2 + (t.rejected_logratios + 0.5 / cfg.beta) ** 2


@_pairwise
def _apo_zero(t: _Terms, cfg: "DPOConfig") -> Tensor:
    """APO-zero, D'Oosterlinck et al., arXiv:2408.06266, Eq. (7)."""
    return (1 - torch.sigmoid(cfg.beta * t.chosen_logratios)) + torch.sigmoid(cfg.beta * t.rejected_logratios)


@_pairwise
def _apo_down(t: _Terms, cfg: "DPOConfig") -> Tensor:
    """APO-down, D'Oosterlinck et al., arXiv:2408.06266, Eq. (8)."""
    return torch.sigmoid(cfg.beta * t.chosen_logratios) + (
        1 - torch.sigmoid(cfg.beta * (t.chosen_logratios - t.rejected_logratios))
    )


@_pairwise
def _discopop(t: _Terms, cfg: "DPOConfig") -> Tensor:
    """DiscoPOP / LRML, Lu et al., arXiv:2406.08414, Eq. (5):
    (1 - s) * -logsigmoid(z) + s * exp(-z) with s = sigmoid(z / tau), z = beta * logits."""
    z = cfg.beta * t.logits
    s = torch.sigmoid(z / cfg.discopop_tau)
    # s * exp(-z) == exp(logsigmoid(z / tau) - z): no overflow for very negative z.
    return -F.logsigmoid(z) * (1 - s) + torch.exp(F.logsigmoid(z / cfg.discopop_tau) - z)


def _sft(t: _Terms, cfg: "DPOConfig") -> Tensor:
    """Token-mean NLL of the chosen responses (no preference term)."""
    return t.nll


_LOSSES: dict[str, Callable[[_Terms, "DPOConfig"], Tensor]] = {
    "sigmoid": _sigmoid,
    "robust": _robust,
    "hinge": _hinge,
    "ipo": _ipo,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
    "sft": _sft,
}
"""Loss type name -> fn(terms, cfg) returning this micro-batch's global-batch contribution."""

DPO_LOSS_TYPES: tuple[str, ...] = tuple(_LOSSES)


@dataclass(kw_only=True)
class DPOConfig:
    beta: float = 0.1
    """Inverse temperature of the implicit reward beta * log(pi / ref) (tau for ipo)."""
    loss_type: str | list[str] = "sigmoid"
    """One loss type or a list of them (mixed with `loss_weights`); see DPO_LOSS_TYPES."""
    loss_weights: list[float] | None = None
    """Weights of a `loss_type` list (same length); None = all 1.0."""
    label_smoothing: float = 0.0
    """Probability that a preference label is flipped (cDPO for sigmoid, rDPO for robust,
    the data-distribution epsilon for exo_pair). In [0, 0.5)."""
    rpo_alpha: float | None = 1.0
    """Weight of the token-mean NLL on the chosen responses (RPO); None disables it."""
    discopop_tau: float = 0.05
    """Temperature of DiscoPOP's mixing sigmoid."""

    def __post_init__(self) -> None:
        check_positive(self.beta, "beta")
        if not isinstance(self.loss_type, (str, list, tuple)):
            raise ValueError(f"loss_type must be a name or a list of names, got {self.loss_type!r}")
        types = self.loss_types
        if not types:
            raise ValueError("loss_type must name at least one loss type")
        for t in types:
            check_choice(t, "loss_type", _LOSSES)
        if len(set(types)) != len(types):
            raise ValueError(f"loss_type lists a loss type twice: {types}")
        if self.loss_weights is not None:
            if len(self.loss_weights) != len(types):
                raise ValueError(
                    f"loss_weights has {len(self.loss_weights)} entries but loss_type has {len(types)}: {types}"
                )
            for w in self.loss_weights:
                if not (isinstance(w, (int, float)) and math.isfinite(w)):
                    raise ValueError(f"loss_weights must be finite numbers, got {self.loss_weights!r}")
        check_unit_interval(self.label_smoothing, "label_smoothing", hi=0.5)
        check_non_negative(self.rpo_alpha, "rpo_alpha", allow_none=True)
        check_positive(self.discopop_tau, "discopop_tau")

    @property
    def loss_types(self) -> list[str]:
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    @property
    def weights(self) -> list[float]:
        return [1.0] * len(self.loss_types) if self.loss_weights is None else [float(w) for w in self.loss_weights]


@register_objective
class DPO(Objective):
    """Reference-based pairwise preference objective; see the module docstring."""

    name = "dpo"
    config_cls = DPOConfig
    inputs = frozenset({"logps", "num_tokens", "ref_logps"})
    data_kind = "paired"

    def __init__(self, cfg: DPOConfig) -> None:
        super().__init__(cfg)
        self._losses = [(_LOSSES[t], w) for t, w in zip(cfg.loss_types, cfg.weights)]
        self._uses_bco = "bco_pair" in cfg.loss_types
        # bco_pair running mean: sum of committed per-step means and the number of steps.
        self._bco_sum = 0.0
        self._bco_steps = 0
        # Pending statistics of the current step on this rank (detached): reward sum, #rewards.
        self._bco_pending_sum: Tensor | None = None
        self._bco_pending_pairs = 0

    def __call__(self, stats: SequenceStats, counts: GlobalCounts) -> tuple[Tensor, Metrics]:
        cfg = self.cfg
        num_pairs = require_positive(counts.num_pairs, "num_pairs", self.name)
        logps, ref_logps = stats.logps, require(stats, "ref_logps", self.name)
        pol_c, pol_r = split_pairs(logps)
        ref_c, ref_r = split_pairs(ref_logps.detach())
        chosen_logratios, rejected_logratios = pol_c - ref_c, pol_r - ref_r
        ntok_c, ntok_r = split_pairs(stats.num_tokens)
        nll, nll_metric = chosen_nll(pol_c, ntok_c, counts, self.name) if self._needs_nll else (None, None)

        terms = _Terms(
            chosen_logratios=chosen_logratios,
            rejected_logratios=rejected_logratios,
            logits=(pol_c - pol_r) - (ref_c - ref_r),
            avg_logits=per_token(chosen_logratios, ntok_c) - per_token(rejected_logratios, ntok_r),
            num_pairs=num_pairs,
            nll=nll,
            bco_delta=self._bco_delta(logps),
        )
        loss = sum(w * fn(terms, cfg) for fn, w in self._losses)
        if cfg.rpo_alpha is not None:
            loss = loss + cfg.rpo_alpha * nll

        chosen_rewards = cfg.beta * chosen_logratios.detach()
        rejected_rewards = cfg.beta * rejected_logratios.detach()
        if self._uses_bco and logps.requires_grad:
            self._accumulate_bco(torch.cat([chosen_rewards, rejected_rewards]), num_pairs)
        metrics = pair_reward_metrics(chosen_rewards, rejected_rewards, pol_c, pol_r)
        if nll_metric is not None:  # rpo_alpha set, or "sft" among the loss types
            metrics["nll_loss"] = nll_metric
        return loss, metrics

    @property
    def _needs_nll(self) -> bool:
        return self.cfg.rpo_alpha is not None or "sft" in self.cfg.loss_types

    # ---- bco_pair running mean ---------------------------------------------------
    def _bco_delta(self, like: Tensor) -> Tensor:
        mean = self._bco_sum / self._bco_steps if self._bco_steps else 0.0
        return torch.tensor(mean, dtype=like.dtype, device=like.device)

    def _accumulate_bco(self, rewards: Tensor, global_pairs: int) -> None:
        local_pairs = self._bco_pending_pairs + rewards.numel() // 2
        if local_pairs > global_pairs:
            # More pairs than a whole global batch since the last commit: the trainer did
            # not call update_state() at the end of the previous step. Fail, do not drift.
            raise RuntimeError(
                "dpo bco_pair: update_state(all_reduce(state_partial_sums())) was not called after "
                f"the last optimizer step ({local_pairs} pending pairs > counts.num_pairs={global_pairs})"
            )
        s = rewards.sum().to(torch.float64)
        self._bco_pending_sum = s if self._bco_pending_sum is None else self._bco_pending_sum + s
        self._bco_pending_pairs = local_pairs

    def state_partial_sums(self) -> Tensor | None:
        """bco_pair: float64 [reward sum, #rewards] of this rank's step so far; else None."""
        if not self._uses_bco:
            return None
        if self._bco_pending_sum is None:
            return torch.zeros(2, dtype=torch.float64)
        s = self._bco_pending_sum
        return torch.stack([s, torch.tensor(2.0 * self._bco_pending_pairs, dtype=s.dtype, device=s.device)])

    def update_state(self, global_sums: Tensor) -> None:
        """Commit the step: running mean gains the global-batch mean reward sum / count."""
        if not self._uses_bco:
            return
        total, count = (float(v) for v in global_sums.detach().cpu())
        if not math.isfinite(total):
            # A step with non-finite rewards (the trainer skips it) must not poison the mean.
            warnings.warn("dpo bco_pair: non-finite rewards in this step; running mean not updated")
        elif count > 0:
            self._bco_sum += total / count
            self._bco_steps += 1
        self._bco_pending_sum, self._bco_pending_pairs = None, 0

    def state_dict(self) -> dict[str, Any]:
        return {"bco_sum": self._bco_sum, "bco_steps": self._bco_steps} if self._uses_bco else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self._uses_bco:
            return super().load_state_dict(state)
        self._bco_sum, self._bco_steps = float(state["bco_sum"]), int(state["bco_steps"])
