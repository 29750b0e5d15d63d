"""CPU execution mode: run megatron-core (written for CUDA) on CPU with gloo.

This is an explicit, opt-in mode (``train.device=cpu`` in the config, ``--device cpu`` of
the tools; ``auto`` picks it only where CUDA is absent) for tests, laptops and debugging.
Everything that bends megatron-core to the CPU lives in this one module, so the CUDA path
never goes through it.

What megatron-core 0.16 does that fails on a CPU-only torch build, and what we do
(see also ``shared/notes/megatron-core-on-cpu.md``):

* ``torch.cuda.current_device()`` is used as a device for buffers (rotary
  embeddings, TP gather buffers, sequence-parallel reduce-scatter in backward, p2p).
  -> returns ``torch.device("cpu")``.
* Literal ``device="cuda"`` in factory calls (schedules' ``total_num_tokens``,
  ``get_default_causal_mask``, ``clip_grads``, ``grad_scaler``) and ``.cuda()`` calls.
  -> a :class:`torch.overrides.TorchFunctionMode` rewrites CUDA device arguments
  to CPU for the life of the process.
* The model-parallel RNG tracker reads and writes CUDA RNG state. -> the CPU
  default generator serves as the "CUDA" generator (dropout on CPU draws from it).
* ``clip_grad_by_total_norm_fp32`` asserts ``torch.cuda.FloatTensor`` grads. ->
  replaced by the same computation without the device assertion.
* ``torch.cuda.synchronize`` / ``empty_cache`` / streams raise without CUDA. ->
  no-ops (there is nothing asynchronous to wait for on CPU).
* Generation (``megatron.core.inference``, used by ``mcore_align.rollout``): the text
  generation controller times every step with ``torch.cuda.Event``, which cannot be built
  on a CPU torch. -> :class:`_CpuTimingEvent`, a wall-clock stand-in with the same
  ``record`` / ``synchronize`` / ``elapsed_time`` (milliseconds). Its pipeline p2p helpers
  assert ``tensor.is_cuda`` before every send/recv/broadcast. -> the same check without
  the device part (not None, contiguous where asked).

Not supported in this mode. Refused with a clear error before training
(``trainer.setup.check_device_support``): the distributed optimizer, bf16/fp16
training (megatron's mixed-precision optimizer wraps CUDA tensors only), and virtual
pipeline stages at PP=2 (gloo crosses the two directions' messages to the single peer).
Switched off: Transformer Engine (the local layer spec is built; the start-up line
``model: ...`` says so) and gradient-reduce overlap (it needs CUDA streams; gradients
are reduced once after the last micro-batch).
"""
from __future__ import annotations

import logging

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_ENABLED = False
_MODE: "_CudaToCpu | None" = None


def _is_cuda_device(dev) -> bool:
    if dev is None:
        return False
    if isinstance(dev, int):  # torch.cuda.current_device() style index
        return True
    if isinstance(dev, str):
        return dev.startswith("cuda")
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    return False


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA device arguments of torch calls to CPU (see module docstring)."""

    _CPU = torch.device("cpu")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": self._CPU}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], self._CPU, *args[2:])
        return func(*args, **kwargs)


def _cpu_clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's clip_grad_by_total_norm_fp32 without its CUDA-tensor assertion.

    Same maths: grads *= max_norm / (total_norm + 1e-6) when that factor is < 1.
    """
    from megatron.core.utils import to_local_if_dtensor

    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = []
    for param in parameters:
        g = getattr(param, "decoupled_grad", None) if use_decoupled_grad else param.grad
        if g is not None:
            assert g.dtype in (torch.float32, torch.bfloat16), f"grad dtype {g.dtype}"
            grads.append(to_local_if_dtensor(g).detach())
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device="cuda", clone=False, graph_safe=False):
        state = torch.get_rng_state()
        return state.clone() if clone else state

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: None  # CPU generator is seeded by torch.manual_seed
    torch.cuda.manual_seed_all = lambda seed: None


def _patch_cuda_runtime() -> None:
    # A device object, not index 0: megatron passes it straight to factory calls, some of
    # them inside autograd backward functions, where the (thread-local) redirect mode below
    # is not active.
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.set_device = lambda device: None


def _patch_clip_grads() -> None:
    from megatron.core.optimizer import clip_grads, optimizer

    clip_grads.clip_grad_by_total_norm_fp32 = _cpu_clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = _cpu_clip_grad_by_total_norm_fp32


class _CpuTimingEvent:
    """Stand-in for ``torch.cuda.Event(enable_timing=True)`` on CPU: CPU work is synchronous,
    so the wall clock at ``record()`` is the event's time."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self._t: float | None = None

    def record(self, stream=None) -> None:
        import time

        self._t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "_CpuTimingEvent") -> float:
        """Milliseconds from this event to ``end`` (CUDA's unit)."""
        assert self._t is not None and end._t is not None, "elapsed_time on an event that was never recorded"
        return (end._t - self._t) * 1e3


def _patch_inference() -> None:
    from megatron.core.inference import communication_utils

    def not_none(tensor):  # ``_is_cuda`` without the device assertion
        assert tensor is not None

    def not_none_contiguous(tensor):
        assert tensor is not None
        assert tensor.is_contiguous()

    communication_utils._is_cuda = not_none
    communication_utils._is_cuda_contiguous = not_none_contiguous
    torch.cuda.Event = _CpuTimingEvent


def enable_cpu_mode() -> None:
    """Install the CPU execution mode for this process (idempotent)."""
    global _ENABLED, _MODE
    if _ENABLED:
        return
    if torch.cuda.is_available():
        log.warning("CPU execution mode selected although CUDA is available; running on CPU as asked")
    _patch_cuda_runtime()
    _patch_rng()
    _patch_clip_grads()
    _patch_inference()
    _MODE = _CudaToCpu()
    _MODE.__enter__()  # stays on the mode stack for the life of the process
    _ENABLED = True
    log.info("megatron-core CPU execution mode enabled (gloo, CUDA device arguments mapped to CPU)")


def is_cpu_mode() -> bool:
    return _ENABLED

