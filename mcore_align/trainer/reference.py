"""Where the reference log-probs come from: one small interface, chosen once at setup.

The step (trainer/step.py) asks ``reference.models()`` for model chunks to run forward-only
and never knows which kind it got:

* :class:`FrozenModel`: a separate frozen copy of the policy's architecture (the usual
  case; ``model.ref_load`` or ``model.load``), built by ``setup.build_reference``.
* :class:`PolicyWithoutAdapters`: the policy itself with its LoRA adapters switched off
  (train_type=lora: the base *is* the reference, no second copy in memory).

``ref_model=precompute`` is not a third kind: the trainer runs one of these once over the
data before training and then frees it (``Trainer._precompute_reference``).
"""
from __future__ import annotations

import contextlib
from typing import Iterator


class FrozenModel:
    """A separate frozen model (list of chunks, same layout as the policy)."""

    def __init__(self, chunks: list) -> None:
        self.chunks = chunks

    @contextlib.contextmanager
    def models(self) -> Iterator[list]:
        yield self.chunks


class PolicyWithoutAdapters:
    """The policy with every adapter switched off for the duration of the pass."""

    def __init__(self, policy: list) -> None:
        self.policy = policy

    @contextlib.contextmanager
    def models(self) -> Iterator[list]:
        from mcore_align.models.lora import adapters_disabled

        with adapters_disabled(self.policy):
            yield self.policy
