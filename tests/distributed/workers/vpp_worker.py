"""Interleaved 1F1B (virtual pipeline) training on 4 gloo ranks (PP=4): the same DPO steps as
plain 1F1B at PP=4 on an 8-layer model (one layer per virtual stage)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from mcore_align.config import build_config
from mcore_align.trainer.trainer import Trainer

CKPT = os.environ.get("MA_TEST_CKPT", "")
WORK = Path(os.environ.get("MA_TEST_WORK", "/tmp/ma_vpp_worker"))
DATA = os.environ.get("MA_TEST_DATA", "")


def _cfg(*overrides: str):
    raw = {
        "model": {"load": CKPT},
        # 640 tokens per micro-batch: one pair each, several micro-batches per step.
        "data": {"dataset": [DATA], "max_length": 320, "truncation_strategy": "right",
                 "max_tokens_per_micro_batch": 640, "cache_dir": str(WORK / "cache")},
        "optim": {"learning_rate": 1e-3, "lr_decay_style": "constant", "clip_grad": 1.0},
        "train": {"global_batch_size": 8, "train_iters": 3, "device": "cpu", "progress_bar": False,
                  "save": None, "plot": False, "seed": 7},
        "algo": {"rlhf_type": "dpo", "beta": 0.1, "rpo_alpha": None},
    }
    # 8 of the ~30 usable records held out: one whole eval batch, run through the same schedules.
    # (8 pairs of <= 640 tokens: 8 micro-batches per step, twice PP.)
    return build_config(raw, ("pipeline_model_parallel_size=4", "val_fraction=0.27", "eval_interval=3", *overrides))


def case_interleaved_equals_1f1b():
    runs = {}
    for name, extra in (("1f1b", ()), ("vpp", ("virtual_pipeline_model_parallel_size=2",))):
        tr = Trainer(_cfg(*extra))
        if name == "vpp":
            assert len(tr.policy) == 2, "two model chunks per rank"
            state = tr.data.train.state_dict()
            n = len(next(tr.data.train).micro_batches)
            assert n >= 8 and n % 4 == 0, n  # megatron's interleaved schedule needs a multiple of PP
            tr.data.train.load_state_dict(state)
        res = tr.train()
        runs[name] = ([h["loss"] for h in res["history"]], [h["grad_norm"] for h in res["history"]], res["eval"])
    torch.testing.assert_close(torch.tensor(runs["vpp"][0]), torch.tensor(runs["1f1b"][0]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(runs["vpp"][1]), torch.tensor(runs["1f1b"][1]), rtol=1e-4, atol=1e-6)
    ev_vpp, ev_1f1b = runs["vpp"][2], runs["1f1b"][2]
    assert ev_vpp and set(ev_vpp) == set(ev_1f1b), (ev_vpp, ev_1f1b)
    for k in ev_vpp:
        assert abs(ev_vpp[k] - ev_1f1b[k]) <= 1e-5 * max(1.0, abs(ev_1f1b[k])), (k, ev_vpp, ev_1f1b)


def case_what_cpu_mode_cannot_train_is_refused():
    import pytest

    from mcore_align.parallel.runtime import ParallelConfig, initialize

    base = {"model": {"load": CKPT}, "data": {"dataset": [DATA], "cache_dir": str(WORK / "cache")},
            "train": {"device": "cpu"}}
    for overrides, message in (
        (("pipeline_model_parallel_size=2", "virtual_pipeline_model_parallel_size=2", "tensor_model_parallel_size=2"),
         "virtual_pipeline_model_parallel_size with pipeline_model_parallel_size=2"),
        (("bf16=true",), "bf16 / model.fp16 training needs CUDA"),
        (("fp16=true",), "bf16 / model.fp16 training needs CUDA"),
        (("use_distributed_optimizer=true",), "use_distributed_optimizer needs CUDA"),
    ):
        with pytest.raises(ValueError, match=message):
            Trainer(build_config(base, overrides))
    initialize(ParallelConfig(), device="cpu")
