"""Process start-up: torch.distributed, megatron parallel_state, seeding, device.

``initialize(ParallelConfig(...), device="auto")`` is the only place that creates
process groups. It returns a :class:`Runtime` whose ``pgs`` (megatron's
``ProcessGroupCollection``) is passed explicitly to everything that communicates.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


@dataclass(kw_only=True)
class ParallelConfig:
    """Megatron parallel layout. World size = TP * PP * CP * DP."""

    tensor_model_parallel_size: int = 1
    """Tensor (intra-layer) model parallel size."""
    pipeline_model_parallel_size: int = 1
    """Pipeline (inter-layer) model parallel size."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Model chunks per pipeline rank for the interleaved 1F1B schedule (None: off)."""
    context_parallel_size: int = 1
    """Context parallel size: each sequence is split over this many ranks."""
    sequence_parallel: bool = False
    """Split LayerNorm/dropout activations along the sequence over the TP group."""
    expert_model_parallel_size: int = 1
    """Expert parallel size (MoE): each MoE layer's experts are split over this many ranks
    (must divide the number of experts); tokens reach their experts by all-to-all."""
    expert_tensor_parallel_size: int | None = None
    """Tensor parallel size inside each expert (MoE); None: tensor_model_parallel_size.
    Expert layout: world = ETP * EP * expert-DP * PP."""

    def __post_init__(self) -> None:
        from mcore_align.config.types import check_field_types  # local: mcore_align.config imports this module

        check_field_types(self, "parallel")
        for f in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and (vpp < 1 or self.pipeline_model_parallel_size < 2):
            raise ValueError(
                "virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size >= 2 "
                f"and a value >= 1 (got vpp={vpp}, pp={self.pipeline_model_parallel_size})"
            )
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError("sequence_parallel=True needs tensor_model_parallel_size > 1")
        self._check_expert_sizes()

    def _check_expert_sizes(self) -> None:
        if self.expert_model_parallel_size < 1:
            raise ValueError(f"expert_model_parallel_size must be >= 1, got {self.expert_model_parallel_size}")
        etp = self.expert_tensor_parallel_size
        if etp is not None and etp < 1:
            raise ValueError(f"expert_tensor_parallel_size must be >= 1 or None, got {etp}")

    @property
    def expert_layout_size(self) -> int:
        """ETP * EP * PP: what the world size must be a multiple of for the expert groups."""
        etp = self.expert_tensor_parallel_size or self.tensor_model_parallel_size
        return etp * self.expert_model_parallel_size * self.pipeline_model_parallel_size

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size


@dataclass
class Runtime:
    device: torch.device
    parallel: ParallelConfig
    rank: int
    world_size: int
    local_rank: int
    pgs: object  # megatron.core.process_groups_config.ProcessGroupCollection

    @property
    def dp_size(self) -> int:
        return self.pgs.dp.size()

    @property
    def dp_rank(self) -> int:
        return self.pgs.dp.rank()

    @property
    def is_cpu(self) -> bool:
        return self.device.type == "cpu"


def resolve_device(device: str) -> torch.device:
    """"auto" is CUDA when available, else the CPU execution mode (logged, never silent)."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        log.warning("device=auto resolved to %s", device)
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was requested but torch sees no CUDA device; use device=cpu")
    return torch.device(device)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timeout():
    """Collective timeout: $MCORE_ALIGN_DIST_TIMEOUT seconds (default 30 minutes, as megatron)."""
    import datetime

    return datetime.timedelta(seconds=float(os.environ.get("MCORE_ALIGN_DIST_TIMEOUT", 1800)))


def init_process_group(device: torch.device) -> None:
    """torch.distributed from the torchrun environment; a 1-rank group when run plainly."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if "RANK" not in os.environ:
        # Plain `python ...`: a world of one. The rendezvous address is passed, not written
        # into os.environ, so child processes (converters, torchrun launches from tests)
        # do not inherit RANK/MASTER_PORT and collide with this process's store.
        dist.init_process_group(backend=backend, timeout=_timeout(), rank=0, world_size=1,
                                init_method=f"tcp://127.0.0.1:{_free_port()}")
        return
    dist.init_process_group(backend=backend, timeout=_timeout())


def initialize(parallel: ParallelConfig, device: str = "auto", seed: int = 1234) -> Runtime:
    """Start torch.distributed and megatron parallel_state; seed every RNG.

    Re-entrant: an existing megatron layout is destroyed first, so tests may run
    several layouts in one process.
    """
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    dev = resolve_device(device)
    if dev.type == "cpu":
        from mcore_align.parallel.cpu_mode import enable_cpu_mode

        enable_cpu_mode()
    init_process_group(dev)
    world = dist.get_world_size()
    if world % parallel.model_parallel_size:
        raise ValueError(
            f"world size {world} is not divisible by TP*PP*CP = {parallel.model_parallel_size} "
            f"({dataclasses.asdict(parallel)})"
        )
    if world % parallel.expert_layout_size:
        raise ValueError(
            f"world size {world} is not divisible by expert_tensor_parallel_size x "
            f"expert_model_parallel_size x pipeline_model_parallel_size = {parallel.expert_layout_size} "
            f"({dataclasses.asdict(parallel)})"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
        _destroy_stale_groups()
    parallel_state.initialize_model_parallel(
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        create_gloo_process_groups=dev.type == "cuda",
        distributed_timeout_minutes=_timeout().total_seconds() / 60,
    )
    seed_everything(seed)
    return Runtime(
        device=dev,
        parallel=parallel,
        rank=dist.get_rank(),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        pgs=ProcessGroupCollection.use_mpu_process_groups(),
    )


def _destroy_stale_groups() -> None:
    """Destroy every process group but WORLD after megatron's layout is torn down.

    megatron's ``destroy_model_parallel`` only drops its references to the groups it made;
    torch.distributed still holds each one (and gloo keeps ~3 threads per group until the
    group object is freed).
    Without this, every re-``initialize`` in one process (tests, offline tools converting
    several layouts) leaks ~17 groups and ~50 threads, and a long pytest session slows
    to a crawl. Only megatron's ``initialize_model_parallel`` creates subgroups here
    (see the module docstring), so nothing live is destroyed.
    """
    world = dist.group.WORLD
    for pg in list(dist.distributed_c10d._world.pg_map):
        if pg is not world:
            dist.destroy_process_group(pg)
    # gloo joins a group's threads only when the group object is freed; the last references
    # are usually in reference cycles of the previous layout's modules (hooks, DDP buckets).
    gc.collect()


def seed_everything(seed: int) -> None:
    """Seed python/torch and megatron's model-parallel RNG tracker.

    Like Megatron-LM, the seed is offset by the pipeline rank so that different
    stages draw different dropout masks; the tracker offsets by the TP rank.
    """
    import random

    from megatron.core import parallel_state, tensor_parallel

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
