"""Small rule-based reward functions for online objectives (``reward_funcs=mcore_align.rewards:NAME``).

They follow the reward-function signature of ``algorithms/ppo/reward_funcs.py`` (TRL's GRPO
convention): ``fn(prompts, completions, completion_ids, **columns) -> list of B floats``.
They are examples and test fixtures that a tiny random model can learn in a few steps; real
runs bring their own functions (a verifier, a unit-test runner, a format checker).
"""
from __future__ import annotations


def even_token_fraction(prompts, completions, completion_ids=None, **_) -> list[float]:
    """Fraction of the completion's tokens with an even id (0 for an empty completion)."""
    return [sum(1 for t in ids if t % 2 == 0) / len(ids) if ids else 0.0 for ids in completion_ids]


def short_completion(prompts, completions, completion_ids=None, **_) -> list[float]:
    """1 / (1 + number of completion tokens): prefers stopping early (learning to emit EOS)."""
    return [1.0 / (1 + len(ids)) for ids in completion_ids]
