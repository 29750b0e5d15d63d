"""SFT: token-mean negative log-likelihood over all response (loss) tokens.

    L_SFT = -(1 / T) sum_{sequences i} sum_{loss tokens t of i} log pi(y_t | x, y_<t)

with T the number of loss tokens of the whole GLOBAL batch (counts.num_tokens), so the
loss is the token mean over the global batch however it is split into micro-batches,
data-parallel ranks or packed sequences (Megatron's `calculate_per_token_loss`
convention). Unpaired; no reference model. No departures to note.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mcore_align.algorithms.base import (
    GlobalCounts,
    Metrics,
    Objective,
    SequenceStats,
    register_objective,
    require_positive,
    scalar_metric,
)


@dataclass(kw_only=True)
class SFTConfig:
    """SFT has no hyperparameters of its own."""


@register_objective
class SFT(Objective):
    """Token-mean NLL; see the module docstring."""

    name = "sft"
    config_cls = SFTConfig
    inputs = frozenset({"logps", "num_tokens"})
    data_kind = "sft"

    def __call__(self, stats: SequenceStats, counts: GlobalCounts) -> tuple[Tensor, Metrics]:
        num_tokens = require_positive(counts.num_tokens, "num_tokens", self.name)
        nll_sum = -stats.logps.sum()
        loss = nll_sum / num_tokens
        return loss, {"nll_loss": scalar_metric(nll_sum, stats.num_tokens.sum().to(nll_sum.dtype))}
