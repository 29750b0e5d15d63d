"""Re-initialising megatron's layout in one process must not leak process groups.

megatron's ``destroy_model_parallel`` drops only its own references; every group stays in
torch.distributed's registry with ~3 gloo threads, and 1,500 idle gloo threads were measured
to burn over half a CPU core. A pytest session re-initialises hundreds of times, so the leak
once pushed the suite past CI's time limit. On the old code each re-initialise below adds
17 groups and 51 threads.
"""
from __future__ import annotations

import os

import torch.distributed as dist

from mcore_align.parallel import ParallelConfig
from mcore_align.parallel.runtime import initialize


def _threads() -> int:
    return len(os.listdir(f"/proc/{os.getpid()}/task"))


def test_reinitialize_keeps_groups_and_threads_constant():
    initialize(ParallelConfig(), device="cpu")
    groups, threads = len(dist.distributed_c10d._world.pg_map), _threads()
    assert groups > 5  # megatron's layout is really there (tp, pp, dp, cp, ep, ... groups)
    for _ in range(4):
        initialize(ParallelConfig(), device="cpu")
    assert len(dist.distributed_c10d._world.pg_map) == groups
    assert _threads() <= threads + 5, (threads, _threads())
