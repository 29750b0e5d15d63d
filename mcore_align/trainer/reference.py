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
    """A separate frozen model (list of chunks, same layout as the policy).

    ``offload``: keep the weights in host memory and move them to the GPU only for the pass
    (``offload_ref_rm`` of online objectives: the reference and the reward model are used once
    per rollout, so their GPU memory is freed for generation and training). The cost is two
    host<->device copies of the weights per pass (~2 x params x bytes / PCIe bandwidth, e.g.
    ~0.6 s for 7B bf16 at 50 GB/s). In the CPU execution mode there is nothing to move."""

    def __init__(self, chunks: list, offload: bool = False, device=None) -> None:
        self.chunks, self.offload, self.device = chunks, offload, device
        if offload:
            self._to("cpu")

    def _to(self, device) -> None:
        if self.device is None or getattr(self.device, "type", "cpu") == "cpu":
            return
        for c in self.chunks:
            c.to(device)

    @contextlib.contextmanager
    def models(self) -> Iterator[list]:
        if self.offload:
            self._to(self.device)
        try:
            yield self.chunks
        finally:
            if self.offload:
                self._to("cpu")


class PolicyWithoutAdapters:
    """The policy with every adapter switched off for the duration of the pass."""

    def __init__(self, policy: list) -> None:
        self.policy = policy

    @contextlib.contextmanager
    def models(self) -> Iterator[list]:
        from mcore_align.models.lora import adapters_disabled

        with adapters_disabled(self.policy):
            yield self.policy
