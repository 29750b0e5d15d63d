"""Pre-clip gradient norms of every objective at every layout, for tests/e2e/test_grad_norm_e2e.py.

With one rank (world size 1) each case runs the unsharded baseline (TP=1, PP=1, DP=1, CP=1)
and dumps its step-1 global batch (and the RM's initial value head) for the float64
`transformers` check; with two ranks it runs TP=2, PP=2, DP=2, CP=2 and TP=2+SP. Every run
writes its per-step history to $MA_TEST_WORK/gn_<algo>_<layout>.json; the pytest side compares
the `grad_norm` (megatron's global norm before clipping) of every step with the baseline.

Why grad norms: a loss is insensitive to a wrong gradient scale (Adam normalises it and
clipping bounds it), so a 2x error from a DP/CP/TP reduction barely moves a 3-step loss
curve, but it doubles the norm.
"""
from __future__ import annotations

import json

import torch.distributed as dist

from mcore_align.trainer.trainer import Trainer
from tests.distributed.workers.algorithms_worker import WORK, _cfg, _dump_first_batch

STEPS = 3
LAYOUTS = {
    1: {"base": []},
    2: {"tp2": ["tensor_model_parallel_size=2"],
        "pp2": ["pipeline_model_parallel_size=2"],
        "dp2": [],
        "cp2": ["context_parallel_size=2"],
        "tp2sp": ["tensor_model_parallel_size=2", "sequence_parallel=true"]},
}


def _run(algo: str) -> None:
    for layout, overrides in LAYOUTS[dist.get_world_size()].items():
        name = f"gn_{algo}_{layout}"
        tr = Trainer(_cfg(algo, None, f"train_iters={STEPS}", *overrides))
        if layout == "base":
            _dump_first_batch(tr, name)
        h = tr.train()["history"]
        assert len(h) == STEPS and not any(x["skipped"] for x in h), h
        if dist.get_rank() == 0:
            (WORK / f"{name}.json").write_text(json.dumps(h))
        dist.barrier()


def case_sft():
    _run("sft")


def case_dpo():
    _run("dpo")


def case_kto():
    _run("kto")


def case_cpo():
    _run("cpo")


def case_orpo():
    _run("orpo")


def case_simpo():
    _run("simpo")


def case_rm():
    _run("rm")
