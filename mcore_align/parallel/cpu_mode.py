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
* MoE (``_patch_moe``): the alltoall dispatcher's CUDA side stream and events -> stand-ins;
  its all-to-all split sizes are moved to the host only when CUDA -> numpy on CPU too;
  ``te_general_gemm`` read unguarded without TE -> None (``bridge_moe_without_te``, also
  called when a MoE model is built on CUDA without TE).
* Multi-head latent attention without TE: ``multi_latent_attention.HAVE_TE`` is True because
  TE's stand-in is a MagicMock -> set from the extensions module's real flag
  (``bridge_mla_without_te``, called when an MLA layer spec is built, CPU or CUDA).
  Uneven all-gather / reduce-scatter over the expert-TP group (ETP > 1 with EP > 1), which
  gloo lacks -> padded all-gather / all-reduce and slice.

Not supported in this mode. Refused with a clear error before training
(``trainer.setup.check_device_support``): the distributed optimizer, bf16/fp16
training (megatron's mixed-precision optimizer wraps CUDA tensors only), and virtual
pipeline stages at PP=2 (gloo crosses the two directions' messages to the single peer).
Switched off: Transformer Engine (the local layer spec is built; the start-up line
``model: ...`` says so) and gradient-reduce overlap (it needs CUDA streams; gradients
are reduced once after the last micro-batch).
"""
from __future__ import annotations

import contextlib
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
    _patch_moe()
    _MODE = _CudaToCpu()
    _MODE.__enter__()  # stays on the mode stack for the life of the process
    _ENABLED = True
    log.info("megatron-core CPU execution mode enabled (gloo, CUDA device arguments mapped to CPU)")


def is_cpu_mode() -> bool:
    return _ENABLED



# -- Mixture of Experts ------------------------------------------------------------------------
class _CpuStream:
    """Stand-in for the CUDA side stream of megatron's alltoall dispatcher (CPU work is
    synchronous: waiting and events are no-ops)."""

    def wait_stream(self, other) -> None:
        pass

    def record_event(self, event=None) -> "_CpuEvent":
        return _CpuEvent()

    def synchronize(self) -> None:
        pass


class _CpuEvent:
    def synchronize(self) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass


_CPU_STREAM = _CpuStream()


def _cpu_maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
    """megatron's ``maybe_move_tensor_to_cpu`` converts only CUDA tensors, so on CPU the
    all-to-all split sizes stay tensors and ``all_to_all_single`` raises TypeError; here
    they become what the CUDA path yields (numpy arrays when ``as_numpy``)."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.detach().cpu().numpy()
    return tensor


def bridge_moe_without_te() -> None:
    """Needed wherever Transformer Engine does not import (CPU, and CUDA machines without TE):
    ``moe_utils`` defines ``te_general_gemm`` only when TE imports, but the router's gating
    linear reads it unguarded, so every MoE forward raises NameError. Idempotent."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def bridge_mla_without_te() -> None:
    """Needed wherever Transformer Engine does not import: megatron's extensions module then
    puts a ``MagicMock`` in place of ``te``, so ``multi_latent_attention`` imports
    ``TELinear`` / ``TEColumnParallelLinear`` (mocks) without error and sets ``HAVE_TE = True``;
    its ``isinstance(self.linear_proj, TELinear)`` then raises TypeError (a mock is not a type).
    Copy the extensions module's own flag. Idempotent; a no-op with TE."""
    from megatron.core.extensions import transformer_engine as te_ext
    from megatron.core.transformer import multi_latent_attention

    if not te_ext.HAVE_TE:
        multi_latent_attention.HAVE_TE = False


def _uneven_gather_along_first_dim(orig):
    """gloo's ``all_gather`` needs equal shapes; megatron's alltoall dispatcher gathers uneven
    row counts over the expert-TP group (ETP > 1 with EP > 1: each rank received a different
    number of tokens). Same result: pad every part to the largest, gather, cut.
    Example: output_split_sizes [16, 28] -> both ranks send 28 rows, rank 0's part keeps 16."""

    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return orig(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        padded_MH = input_.new_zeros((max(sizes), *input_.shape[1:]))
        padded_MH[: input_.shape[0]] = input_
        parts = [torch.empty_like(padded_MH) for _ in sizes]
        torch.distributed.all_gather(parts, padded_MH, group=group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)

    return gather


def _uneven_reduce_scatter_along_first_dim(orig):
    """The uneven reduce-scatter of the same dispatcher (combine, and the gather's backward):
    all-reduce the whole tensor and keep this rank's rows (same sums; gloo has no uneven
    reduce-scatter). Example: input_split_sizes [16, 28]: rank 1 keeps rows 16..43."""

    def reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return orig(input_, group, input_split_sizes, use_global_buffer)
        sizes = [int(n) for n in input_split_sizes]
        total = input_.contiguous().clone()
        torch.distributed.all_reduce(total, group=group)
        start = sum(sizes[: group.rank()])
        return total[start: start + sizes[group.rank()]]

    return reduce_scatter


def _patch_moe() -> None:
    """CPU mode for megatron's MoE layer (alltoall dispatcher): stream stand-ins, split sizes
    as host values, uneven expert-TP collectives. See ``bridge_moe_without_te`` for the part CUDA without TE needs too."""
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer.moe import token_dispatcher

    bridge_moe_without_te()
    mappings._gather_along_first_dim = _uneven_gather_along_first_dim(mappings._gather_along_first_dim)
    mappings._reduce_scatter_along_first_dim = _uneven_reduce_scatter_along_first_dim(
        mappings._reduce_scatter_along_first_dim)
    token_dispatcher.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _CPU_STREAM
    token_dispatcher.maybe_move_tensor_to_cpu = _cpu_maybe_move_tensor_to_cpu
    torch.cuda.current_stream = lambda device=None: _CPU_STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
