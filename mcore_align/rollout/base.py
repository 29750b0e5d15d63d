"""The generation-engine interface used by online RLHF (PPO / GRPO / RLOO rollouts).

A backend turns prompt token ids into sampled responses::

    engine.generate(prompts, SamplingParams(...)) -> RolloutBatch

Everything is token ids (no text): the caller tokenizes with the chat template it trains
with, and decodes for reward functions. Each backend is one file in this package and is
registered by name in :mod:`mcore_align.rollout.registry`.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch


@dataclass(kw_only=True)
class SamplingParams:
    """How responses are sampled (HF/vLLM conventions; a backend maps them to its own)."""

    temperature: float = 1.0
    """Softmax temperature. 0 means greedy decoding (argmax)."""
    top_k: int = 0
    """Keep the k most likely tokens before sampling; 0 = off; 1 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with probability >= top_p; 1.0 = off."""
    response_length: int = 53
    """Maximum number of new tokens per response (TRL's ``response_length``)."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end a response (EOS ids). The stop token is part of the response (it is
    sampled, so PPO learns its log-prob); nothing is generated after it. Empty: always
    ``response_length`` tokens."""
    seed: int = 0
    """Sampling seed. Backends derive per-batch seeds from it (see the backend's docstring)."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.response_length < 1:
            raise ValueError(f"response_length must be >= 1, got {self.response_length}")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative token ids, got {self.stop_token_ids}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class RolloutBatch:
    """Sampled responses of B prompts, right-padded to ``T = response_length``.

    Worked example (T=4, stop id 2)::

        response_ids_BT = [[7, 9, 2, pad],     response_lengths = [3, 4]
                           [5, 5, 8, 6]]       eos              = [True, False]
    """

    response_ids_BT: torch.Tensor
    """[B, T] int64 sampled token ids, ``pad_token_id`` after ``response_lengths``."""
    response_lengths_B: torch.Tensor
    """[B] int64 number of response tokens, the stop token included."""
    eos_B: torch.Tensor
    """[B] bool: the response ended with a stop token (False: it hit ``response_length``)."""
    logprobs_BT: torch.Tensor
    """[B, T] float32 generator log-probs of the sampled tokens, 0 at padding:
    ``log_softmax(logits / logprob_temperature)`` of the full (not top-k / top-p filtered)
    distribution, what a training forward at that temperature computes (TRL's convention)."""
    prompt_lengths_B: torch.Tensor
    """[B] int64 prompt lengths (the prompts themselves stay with the caller)."""
    pad_token_id: int = 0
    logprob_temperature: float = 1.0
    """The temperature ``logprobs_BT`` are taken at: the sampling temperature (1 when greedy)."""
    stats: dict = field(default_factory=dict)
    """Backend timings and counts (e.g. ``tokens``, ``seconds``)."""

    @property
    def response_mask_BT(self) -> torch.Tensor:
        """[B, T] bool, True at response tokens (stop token included)."""
        t = torch.arange(self.response_ids_BT.shape[1])
        return t[None, :] < self.response_lengths_B[:, None]


class RolloutEngine(abc.ABC):
    """Generates responses with the policy. One file per backend in this package."""

    name: str = ""

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        """Sample one response per prompt. Collective over the model-parallel group: every
        rank of a TP/PP group passes the same prompts and gets the same batch back."""


def validate_prompts(prompts, vocab_size: int) -> list[list[int]]:
    """Prompts as lists of ints; a clear error naming the prompt otherwise."""
    out = []
    for i, p in enumerate(prompts):
        p = [int(t) for t in (p.tolist() if isinstance(p, torch.Tensor) else p)]
        if not p:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")
        out.append(p)
    return out
