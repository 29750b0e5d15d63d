"""The objective protocol, its inputs, and the registry.

An objective is a small pure function of per-sequence statistics: the trainer reduces
token log-probs to one number per sequence (`SequenceStats`), the objective turns those
into a loss. Objectives run no collectives; everything that crosses micro-batches or
data-parallel ranks is either in `GlobalCounts` (known before the step) or reduced by
the trainer through a named hook (`kto.kl_partial_sums`, `Objective.state_partial_sums`).

Normalisation contract: `Objective.__call__` returns this micro-batch's *contribution*,
already divided by global counts, so that

    sum over micro-batches m and DP ranks r of loss(m, r) == loss of the global batch

exactly (up to float rounding), whatever the split. The same holds for the gradient.
Metrics are returned as `(sum, count)` pairs that the trainer sums the same way and
divides once, so a logged mean does not depend on the split either.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

Metrics = dict[str, tuple[Tensor, Tensor]]


@dataclass
class SequenceStats:
    """Per-sequence statistics of ONE micro-batch. All 1-D tensors of length N (fp32).

    Paired objectives: N = 2P with the chosen response of pair p at index 2p and the
    rejected one at 2p + 1 (adjacent, so a micro-batch never splits a pair).
    """

    logps: Tensor
    """[N] sum of policy log-probs over each sequence's loss tokens (requires grad)."""
    num_tokens: Tensor
    """[N] number of loss tokens per sequence (long or float)."""
    ref_logps: Tensor | None = None
    """[N] reference-model sums (no grad), for objectives with `needs_reference`."""
    rewards: Tensor | None = None
    """[N] scalar rewards from a reward-model head (RM only; requires grad)."""
    labels: Tensor | None = None
    """[N] bool, KTO desirability (True = desirable)."""
    kl_logps: Tensor | None = None
    """[N] KTO: policy log-prob sums of the mismatched (prompt_i, completion_j) sequences."""
    ref_kl_logps: Tensor | None = None
    """[N] KTO: reference sums of the same mismatched sequences."""
    kl_reference: Tensor | None = None
    """[] KTO: the KL reference point z0, already reduced over the global batch by the
    trainer (see `kto.kl_partial_sums` / `kto.kl_reference_point`)."""
    margins: Tensor | None = None
    """[P] RM: optional per-pair margin (Llama 2 style)."""


@dataclass
class GlobalCounts:
    """Counts over the WHOLE global batch (all micro-batches, all DP ranks), known before the step."""

    num_pairs: int = 0
    """Paired objectives: number of pairs. Unpaired (KTO, SFT): number of sequences."""
    num_sequences: int = 0
    """Number of sequences (2 * num_pairs for paired objectives)."""
    num_chosen_tokens: int = 0
    """Loss tokens of chosen responses (token-mean NLL terms: rpo_alpha, cpo_alpha, ORPO)."""
    num_tokens: int = 0
    """Loss tokens of all sequences (SFT)."""
    num_desirable: int = 0
    """KTO: desirable sequences."""
    num_undesirable: int = 0
    """KTO: undesirable sequences."""


class Objective:
    """Base class: `loss, metrics = objective(stats, counts)`.

    Subclasses set the class variables, keep their `cfg`, and implement `__call__`.
    Objectives with cross-step state (only DPO `bco_pair` today) override the state
    hooks; the defaults describe a stateless objective.
    """

    name: ClassVar[str]
    """Registry name, e.g. "dpo"."""
    paired: ClassVar[bool]
    """True: stats hold (chosen, rejected) pairs at (even, odd) indices."""
    needs_reference: ClassVar[bool]
    """True: the trainer must fill `stats.ref_logps` (and the KL fields for KTO)."""
    config_cls: ClassVar[type]
    """The keyword-only Config dataclass that `__init__` takes."""
    data_kind: ClassVar[str]
    """Which data the objective consumes: "paired", "kto" (unpaired, labelled, with KL
    mismatched completions) or "sft" (unpaired sequences)."""

    def __init__(self, cfg: Any) -> None:
        if not isinstance(cfg, self.config_cls):
            raise TypeError(f"{type(self).__name__} takes a {self.config_cls.__name__}, got {type(cfg).__name__}")
        self.cfg = cfg

    def __call__(self, stats: SequenceStats, counts: GlobalCounts) -> tuple[Tensor, Metrics]:
        raise NotImplementedError

    # ---- cross-step state (no-op for stateless objectives) -------------------------
    def state_partial_sums(self) -> Tensor | None:
        """This rank's pending state statistics for the step, to be summed over DP ranks
        by the trainer and handed to `update_state`; None when the objective is stateless."""
        return None

    def update_state(self, global_sums: Tensor) -> None:
        """Commit one optimizer step's DP-summed `state_partial_sums()`."""

    def state_dict(self) -> dict[str, Any]:
        """Cross-step state to checkpoint (empty for stateless objectives)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.name} is stateless but got state keys {sorted(state)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.cfg})"


# ---- registry ----------------------------------------------------------------------
_REGISTRY: dict[str, type[Objective]] = {}


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make `cls` buildable by `build_objective(cls.name)`."""
    for attr in ("name", "paired", "needs_reference", "config_cls", "data_kind"):
        assert hasattr(cls, attr), f"{cls.__name__} must define class variable {attr!r}"
    assert cls.paired == (cls.data_kind == "paired"), f"{cls.__name__}: paired and data_kind disagree"
    assert cls.name not in _REGISTRY, f"objective {cls.name!r} registered twice"
    _REGISTRY[cls.name] = cls
    return cls


def available_objectives() -> list[str]:
    return sorted(_REGISTRY)


def _lookup(name: str) -> type[Objective]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown objective {name!r}; available: {available_objectives()}")
    return _REGISTRY[name]


def objective_config_cls(name: str) -> type:
    """The Config dataclass of objective `name`."""
    return _lookup(name).config_cls


def build_objective(name: str, **overrides: Any) -> Objective:
    """`build_objective("dpo", beta=0.2)` -> DPO(DPOConfig(beta=0.2))."""
    cls = _lookup(name)
    fields = {f.name for f in dataclasses.fields(cls.config_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown {name} option(s) {unknown}; valid: {sorted(fields)}")
    return cls(cls.config_cls(**overrides))


# ---- small shared helpers (no collectives, no host syncs) ---------------------------
def require(stats: SequenceStats, field: str, objective: str) -> Tensor:
    """`stats.<field>`, or a ValueError saying the trainer did not provide it."""
    value = getattr(stats, field)
    if value is None:
        raise ValueError(f"objective {objective!r} needs stats.{field}, which is None")
    return value


def require_positive(value: int, field: str, objective: str) -> int:
    if value <= 0:
        raise ValueError(f"objective {objective!r} needs counts.{field} > 0, got {value}")
    return value


def split_pairs(x: Tensor) -> tuple[Tensor, Tensor]:
    """[2P] -> ([P] chosen, [P] rejected); chosen at even indices, rejected at odd.

    Example: x = [c0, r0, c1, r1] -> ([c0, c1], [r0, r1]).
    """
    if x.dim() != 1 or x.shape[0] % 2 != 0:
        raise ValueError(f"paired stats must be 1-D of even length 2P, got shape {tuple(x.shape)}")
    return x[0::2], x[1::2]


def per_token(logps: Tensor, num_tokens: Tensor) -> Tensor:
    """Length-normalised log-probs: sum over tokens / number of tokens."""
    return logps / num_tokens.to(logps.dtype)


def metric(values: Tensor) -> tuple[Tensor, Tensor]:
    """A (sum, count) metric over the elements of `values` (detached)."""
    values = values.detach()
    return values.sum(), torch.tensor(float(values.numel()), dtype=values.dtype, device=values.device)


def scalar_metric(value: Tensor, count: Tensor | float) -> tuple[Tensor, Tensor]:
    """A (sum, count) metric from a precomputed sum and its count (detached)."""
    value = value.detach()
    if not isinstance(count, Tensor):
        count = torch.tensor(float(count), dtype=value.dtype, device=value.device)
    return value, count.detach().to(value.dtype)


def pair_reward_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor,
                        chosen_logps: Tensor, rejected_logps: Tensor) -> Metrics:
    """TRL's paired metric names: rewards/{chosen,rejected,accuracies,margins}, logps/{chosen,rejected}."""
    return {
        "rewards/chosen": metric(chosen_rewards),
        "rewards/rejected": metric(rejected_rewards),
        "rewards/accuracies": metric((chosen_rewards > rejected_rewards).to(chosen_rewards.dtype)),
        "rewards/margins": metric(chosen_rewards - rejected_rewards),
        "logps/chosen": metric(chosen_logps),
        "logps/rejected": metric(rejected_logps),
    }


def chosen_nll(logps_c: Tensor, num_tokens_c: Tensor, counts: GlobalCounts, objective: str) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Token-mean NLL of the chosen responses (TRL's `nll_loss`), as a global contribution.

    TRL computes cross_entropy(mean) over all chosen tokens of the batch, i.e.
    -sum(token logps) / #chosen tokens; we divide by the GLOBAL chosen-token count.
    Returns (contribution, (sum, count) metric).
    """
    n = require_positive(counts.num_chosen_tokens, "num_chosen_tokens", objective)
    nll_sum = -logps_c.sum()
    return nll_sum / n, scalar_metric(nll_sum, num_tokens_c.sum().to(logps_c.dtype))


def check_unit_interval(value: float, field: str, *, hi: float = 1.0) -> None:
    """ValueError unless 0 <= value < hi."""
    if not (isinstance(value, (int, float)) and 0.0 <= value < hi):
        raise ValueError(f"{field} must be in [0, {hi}), got {value!r}")


def check_positive(value: float, field: str) -> None:
    if not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"{field} must be a positive number, got {value!r}")


def check_non_negative(value: float | None, field: str, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not (isinstance(value, (int, float)) and value >= 0):
        raise ValueError(f"{field} must be a non-negative number{' or None' if allow_none else ''}, got {value!r}")


def check_choice(value: str, field: str, choices: dict[str, Callable] | list[str]) -> None:
    if value not in choices:
        raise ValueError(f"{field}={value!r} is not valid; choose one of {sorted(choices)}")
