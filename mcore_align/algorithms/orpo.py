"""ORPO: Odds Ratio Preference Optimization (reference-free, SFT + odds-ratio penalty).

Paper: Hong et al., "ORPO: Monolithic Preference Optimization without Reference Model",
arXiv:2403.07691, Eqs. (6)-(7):

    odds(y|x) = P(y|x) / (1 - P(y|x)),   P(y|x) = exp( (1/|y|) sum_t log pi(y_t | x, y_<t) )
    L_OR      = -log sigma( log( odds(y_w|x) / odds(y_l|x) ) )
    L_ORPO    = L_SFT + lambda * L_OR

As TRL's ORPOTrainer.odds_ratio_loss, with average log-probs a = logps / num_tokens:

    log_odds = (a_c - a_r) - ( log(1 - exp(a_c)) - log(1 - exp(a_r)) )
    loss     = nll - beta * mean( logsigmoid(log_odds) ),   beta = lambda

nll is the token-mean NLL of the chosen sequences; rewards = beta * a (TRL).

Which tokens the NLL covers (``nll_tokens``):
  * "prompt_and_response" (default, TRL's ORPOTrainer and so ms-swift): every predicted
    token of the chosen sequence, prompt included (TRL's decoder-only labels are the
    input ids themselves), divided by the global count of those tokens.
  * "response": the chosen response tokens only (the paper's L_SFT; what the NLL terms of
    DPO's rpo_alpha and CPO use).
The odds ratio always uses the response-only average log-probs a.
log(1 - exp(a)) is evaluated with the log1mexp trick (Maechler, "Accurately Computing
log(1 - exp(-|a|))", 2012): log(-expm1(a)) for a > -ln 2, log1p(-exp(a)) otherwise,
which stays accurate both near a = 0 and for very negative a. (At a == 0 exactly,
i.e. every token has probability 1, the odds are infinite; as in TRL the loss is then
not finite. We do not clamp that away.)

Departures from TRL: normalisation by global counts (pairs, chosen tokens); log1mexp
instead of log1p(-exp(a)) (same value, better accuracy for a near 0).
Metrics: TRL names, including log_odds_ratio = mean(logsigmoid(log_odds)) and
log_odds_chosen = mean(log_odds).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mcore_align.algorithms.base import (
    GlobalCounts,
    Metrics,
    Objective,
    SequenceStats,
    check_choice,
    check_positive,
    chosen_nll,
    metric,
    pair_reward_metrics,
    per_token,
    register_objective,
    require,
    require_positive,
    split_pairs,
)

_LN2 = math.log(2.0)
NLL_TOKENS = ("prompt_and_response", "response")


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate everywhere (Maechler 2012).

    Both branches are evaluated; the `where` keeps the one that is accurate, and
    clamping the argument of each branch to its own domain keeps the discarded branch
    finite so its (zero-weighted) gradient cannot poison the selected one with nan.
    """
    near_zero = x > -_LN2
    a = torch.log(-torch.expm1(torch.where(near_zero, x, torch.full_like(x, -1.0))))
    b = torch.log1p(-torch.exp(torch.where(near_zero, torch.full_like(x, -1.0), x)))
    return torch.where(near_zero, a, b)


@dataclass(kw_only=True)
class ORPOConfig:
    beta: float = 0.1
    """lambda of the paper: weight of the odds-ratio term against the NLL."""
    nll_tokens: str = "prompt_and_response"
    """Tokens of the chosen sequence the NLL averages over: "prompt_and_response" (TRL's
    ORPOTrainer, ms-swift) or "response" (the paper's SFT term on the response only)."""

    def __post_init__(self) -> None:
        check_positive(self.beta, "beta")
        check_choice(self.nll_tokens, "nll_tokens", list(NLL_TOKENS))


@register_objective
class ORPO(Objective):
    """Reference-free odds-ratio objective with built-in SFT; see the module docstring."""

    name = "orpo"
    config_cls = ORPOConfig
    inputs = frozenset({"logps", "num_tokens", "seq_logps", "seq_num_tokens"})
    data_kind = "paired"

    def __call__(self, stats: SequenceStats, counts: GlobalCounts) -> tuple[Tensor, Metrics]:
        beta = self.cfg.beta
        num_pairs = require_positive(counts.num_pairs, "num_pairs", self.name)
        avg_c, avg_r = split_pairs(per_token(stats.logps, stats.num_tokens))
        if self.cfg.nll_tokens == "response":
            raw_c, ntok_c, count_field = stats.logps[0::2], stats.num_tokens[0::2], "num_chosen_tokens"
        else:
            raw_c = require(stats, "seq_logps", self.name)[0::2]
            ntok_c = require(stats, "seq_num_tokens", self.name)[0::2]
            count_field = "num_chosen_seq_tokens"

        log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))  # [P]
        ratio = F.logsigmoid(log_odds)  # [P], <= 0
        nll, nll_metric = chosen_nll(raw_c, ntok_c, counts, self.name, count_field)
        loss = nll - beta * ratio.sum() / num_pairs

        metrics = pair_reward_metrics(beta * avg_c.detach(), beta * avg_r.detach(), avg_c, avg_r)
        metrics["nll_loss"] = nll_metric
        metrics["log_odds_ratio"] = metric(ratio)
        metrics["log_odds_chosen"] = metric(log_odds)
        return loss, metrics
