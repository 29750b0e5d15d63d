"""The objective protocol, its inputs, and the registry.

An objective is a small pure function of per-sequence statistics: the trainer reduces
token log-probs to one number per sequence (`SequenceStats`), the objective turns those
into a loss. Objectives run no collectives; everything that crosses micro-batches or
data-parallel ranks is either in `GlobalCounts` (known before the step) or reduced by
the trainer through a named hook (`Objective.global_partial_sums`, `Objective.state_partial_sums`).

Declarations: an objective says what it consumes and the step computes exactly that
(trainer/step.py never names an objective):

* ``head``: "lm" (per-sequence sums of token log-probs from the vocabulary projection) or
  "value" (a scalar value head; ``stats.rewards`` = its value at each sequence's last token).
* ``inputs``: the `SequenceStats` fields read. ``ref_logps`` / ``ref_kl_logps`` make the
  step run the frozen reference; ``kl_logps`` a no-grad policy pass over the auxiliary
  (mismatched-KL) sequences of the batch; ``kl_reference`` a global pre-pass statistic
  (`global_partial_sums` summed over the step, then `global_statistic`); ``labels`` and
  ``margins`` are read from the batch.
* ``data_kind``: which sequences the data pipeline builds ("paired", "kto", "sft"), or
  "prompt" for online objectives: the trainer's rollout phase (trainer/rollout.py) samples
  responses, scores them and attaches the per-token ``token_*`` inputs before the step.

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

    logps: Tensor | None = None
    """[N] sum of policy log-probs over each sequence's loss tokens (requires grad); "lm" head."""
    num_tokens: Tensor | None = None
    """[N] number of loss tokens per sequence (long or float)."""
    seq_logps: Tensor | None = None
    """[N] sum of policy log-probs over EVERY predicted token of the sequence, prompt and
    response (tokens 1..L-1 of a length-L sequence), for NLL terms taken over the whole
    chosen sequence (TRL's ORPOTrainer). Requires grad."""
    seq_num_tokens: Tensor | None = None
    """[N] number of those tokens (L - 1)."""
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
    trainer (`Objective.global_partial_sums` -> sum over the step -> `global_statistic`)."""
    margins: Tensor | None = None
    """[P] RM: optional per-pair margin (Llama 2 style)."""
    # ---- per-token fields (online objectives): [T] over this rank's flattened positions of
    # the micro-batch; position t holds what concerns its label (the token at t + 1).
    token_logps: Tensor | None = None
    """[T] policy log-prob of each position's label at the objective's temperature (grad)."""
    token_mask: Tensor | None = None
    """[T] 1.0 where the label is a response token (the loss mask), else 0."""
    token_entropy: Tensor | None = None
    """[T] entropy of the policy's distribution at each position (detached; a metric)."""
    token_old_logps: Tensor | None = None
    """[T] log-probs of the policy that sampled the responses (no grad)."""
    token_ref_logps: Tensor | None = None
    """[T] reference-model log-probs (no grad)."""
    token_advantages: Tensor | None = None
    """[T] advantage of each response token (the estimator's output)."""
    token_values: Tensor | None = None
    """[T] the critic's value at every position (value head; grad)."""
    token_value_mask: Tensor | None = None
    """[T] 1.0 at the positions the critic is trained on (response tokens and one more, TRL)."""
    token_returns: Tensor | None = None
    """[T] value targets (GAE returns)."""
    token_old_values: Tensor | None = None
    """[T] the critic's values at rollout time (for value clipping)."""


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
    num_chosen_seq_tokens: int = 0
    """Predicted tokens (prompt and response, L - 1 each) of chosen sequences (ORPO's NLL)."""
    num_value_tokens: int = 0
    """Positions a critic is trained on (PPO: response tokens and one more per response)."""
    num_desirable: int = 0
    """KTO: desirable sequences."""
    num_undesirable: int = 0
    """KTO: undesirable sequences."""


class Objective:
    """Base class: `loss, metrics = objective(stats, counts)`.

    Subclasses set the class variables (the declarations the step reads), keep their
    `cfg`, and implement `__call__`. Objectives with cross-step state (only DPO `bco_pair`
    today) override the state hooks; objectives that read a global pre-pass statistic (KTO's
    z0) override `global_partial_sums` / `global_statistic`.
    """

    name: ClassVar[str]
    """Registry name, e.g. "dpo"."""
    config_cls: ClassVar[type]
    """The keyword-only Config dataclass that `__init__` takes."""
    data_kind: ClassVar[str]
    """Which data the objective consumes: "paired", "kto" (unpaired, labelled, with KL
    mismatched completions) or "sft" (unpaired sequences)."""
    inputs: ClassVar[frozenset[str]]
    """The `SequenceStats` fields `__call__` reads; the step fills exactly these."""
    head: ClassVar[str] = "lm"
    """"lm": the model ends in its vocabulary projection; "value": a scalar value head
    (models/heads.py) whose value at each sequence's last token is `stats.rewards`."""
    logprob_temperature: float = 1.0
    """Temperature of ``token_logps`` (online objectives: the sampling temperature)."""
    # Derived from the declarations by `register_objective`:
    paired: ClassVar[bool]
    """True: stats hold (chosen, rejected) pairs at (even, odd) indices."""
    needs_reference: ClassVar[bool]
    """True: the step runs the frozen reference (``ref_logps`` / ``ref_kl_logps`` in inputs)."""

    def __init__(self, cfg: Any) -> None:
        if not isinstance(cfg, self.config_cls):
            raise TypeError(f"{type(self).__name__} takes a {self.config_cls.__name__}, got {type(cfg).__name__}")
        self.cfg = cfg

    def __call__(self, stats: SequenceStats, counts: GlobalCounts) -> tuple[Tensor, Metrics]:
        raise NotImplementedError

    # ---- global pre-pass statistic (objectives with "kl_reference" in inputs) ------------
    def global_partial_sums(self, stats: SequenceStats) -> Tensor:
        """[k] this micro-batch's share of the statistic, from no-grad stats (policy and
        reference sums, no loss). The step sums it over micro-batches and DP ranks."""
        raise NotImplementedError(f"{self.name} declares no global statistic")

    def global_statistic(self, total: Tensor) -> Tensor:
        """The statistic (`stats.kl_reference`) from the step's summed partial sums."""
        raise NotImplementedError(f"{self.name} declares no global statistic")

    # ---- online objectives (data_kind "prompt") ------------------------------------------
    def critic_objective(self) -> "Objective | None":
        """The objective of a value model trained beside the policy (PPO's critic), or None.
        The trainer builds the model, its optimizer and a step for it when one is declared."""
        return None

    @property
    def updates_per_step(self) -> int:
        """Optimizer steps per trainer iteration (PPO: num_ppo_epochs x num_mini_batches over
        each rollout batch); the LR schedule counts these."""
        return 1

    def check_data(self, labels: Any) -> None:
        """Called once on rank 0 with the training set's per-record labels (KTO
        desirability; None for other data kinds): warn about data the objective handles
        badly. Default: nothing to check."""

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


STATS_FIELDS = frozenset(f.name for f in dataclasses.fields(SequenceStats))
HEADS = ("lm", "value")
DATA_KINDS = ("paired", "kto", "sft", "prompt")
REFERENCE_INPUTS = frozenset({"ref_logps", "ref_kl_logps", "token_ref_logps"})
TOKEN_EXTRAS = frozenset({"token_old_logps", "token_ref_logps", "token_advantages", "token_value_mask",
                          "token_returns", "token_old_values"})
"""Per-token inputs computed by the rollout phase and carried by the micro-batch (``extras``)."""


def check_declarations(cls: type[Objective]) -> type[Objective]:
    """Check an objective's declarations and derive `paired` / `needs_reference` (also for
    objectives that are built by another one and not registered, like PPO's critic)."""
    for attr in ("name", "config_cls", "data_kind", "inputs"):
        assert hasattr(cls, attr), f"{cls.__name__} must define class variable {attr!r}"
    inputs = frozenset(cls.inputs)
    assert inputs <= STATS_FIELDS, f"{cls.__name__}: unknown inputs {sorted(inputs - STATS_FIELDS)}"
    assert cls.head in HEADS, f"{cls.__name__}: head {cls.head!r} not in {HEADS}"
    assert cls.data_kind in DATA_KINDS, f"{cls.__name__}: data_kind {cls.data_kind!r} not in {DATA_KINDS}"
    # The value head gives rewards or per-token values, not log-probs; the LM head the reverse.
    assert (cls.head == "value") == bool(inputs & {"rewards", "token_values"}), \
        f"{cls.__name__}: head and rewards input disagree"
    assert not (cls.head == "value" and inputs & {"logps", "seq_logps", "ref_logps", "kl_logps", "ref_kl_logps",
                                                   "token_logps"}), cls.__name__
    # KTO-style inputs exist only for data with labelled, mismatched-KL sequences.
    kto_inputs = inputs & {"labels", "kl_logps", "ref_kl_logps", "kl_reference"}
    assert not kto_inputs or cls.data_kind == "kto", f"{cls.__name__}: {sorted(kto_inputs)} need data_kind 'kto'"
    # Per-token inputs come from rollouts: online objectives (prompt data) and only those.
    token_inputs = {i for i in inputs if i.startswith("token_")}
    assert bool(token_inputs) == (cls.data_kind == "prompt"), \
        f"{cls.__name__}: per-token inputs and data_kind 'prompt' go together"
    assert not token_inputs or {"token_logps", "token_mask"} <= token_inputs or "token_values" in token_inputs, \
        cls.__name__
    overrides_global = cls.global_partial_sums is not Objective.global_partial_sums
    assert overrides_global == ("kl_reference" in inputs), \
        f"{cls.__name__}: kl_reference input and global_partial_sums/global_statistic go together"
    cls.inputs = inputs
    cls.paired = cls.data_kind == "paired"
    cls.needs_reference = bool(inputs & REFERENCE_INPUTS)
    return cls


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Class decorator: check the declarations and make `cls` buildable by name."""
    check_declarations(cls)
    assert cls.name not in _REGISTRY, f"objective {cls.name!r} registered twice"
    _REGISTRY[cls.name] = cls
    return cls


def available_objectives() -> list[str]:
    return sorted(_REGISTRY)


def objective_class(name: str) -> type[Objective]:
    """The registered class of objective ``name`` (its declarations, without building it)."""
    return _lookup(name)


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


def chosen_nll(logps_c: Tensor, num_tokens_c: Tensor, counts: GlobalCounts, objective: str,
               count_field: str = "num_chosen_tokens") -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Token-mean NLL of the chosen sequences (TRL's `nll_loss`), as a global contribution.

    TRL computes cross_entropy(mean) over all chosen tokens of the batch, i.e.
    -sum(token logps) / #chosen tokens; we divide by the GLOBAL chosen-token count
    ``counts.<count_field>``: response tokens (``num_chosen_tokens``, DPO's rpo_alpha, CPO)
    or prompt and response tokens (``num_chosen_seq_tokens``, ORPO).
    Returns (contribution, (sum, count) metric).
    """
    n = require_positive(getattr(counts, count_field), count_field, objective)
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
