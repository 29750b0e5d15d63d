"""The memory planner's weights / grads / optimizer bytes against the built model and optimizer.

Each case builds a real Trainer (2 gloo ranks, TP=2 or PP=2), takes one optimizer step (Adam
creates its state lazily, at the first step) and sums the bytes of the tensors that exist:
the policy's parameters, the reference model's parameters, megatron DDP's grad buffers and
every tensor in the optimizer's state. The planner (mcore_align/plan.py) predicts the same
from the ModelSpec and the layout alone; they must agree within 10% on every rank's stage.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from mcore_align.config import build_config
from mcore_align.plan import Layout, plan
from mcore_align.trainer.trainer import Trainer

CKPT = os.environ.get("MA_TEST_CKPT", "")
WORK = Path(os.environ.get("MA_TEST_WORK", "/tmp/ma_plan_worker"))
DATA = os.environ.get("MA_TEST_DATA", "")


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _optimizer_tensors(opt):
    """Every tensor of megatron's optimizer state (Adam moments; fp32 main params in mixed precision)."""
    for o in getattr(opt, "chained_optimizers", [opt]):
        for state in o.optimizer.state.values():
            yield from (v for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
        for group in getattr(o, "fp32_from_float16_groups", None) or getattr(o, "shard_fp32_from_float16_groups", None) or []:
            yield from group


def _measure(tr: Trainer) -> dict[str, int]:
    from mcore_align.trainer.reference import FrozenModel

    ref = tr.reference.chunks if isinstance(tr.reference, FrozenModel) else []
    return {
        "weights": _bytes(p for m in tr.policy for p in m.module.parameters()),
        "grads": _bytes(b.grad_data for m in tr.policy for b in list(m.buffers) + list(m.expert_parallel_buffers)),
        "optimizer": _bytes(_optimizer_tensors(tr.optimizer)),
        "reference": _bytes(p for c in ref for p in c.parameters()),
    }


def _check(name: str, *overrides: str, lora_rank: int | None = None, reference: str = "co_resident") -> None:
    raw = {"model": {"load": CKPT},
           "data": {"dataset": [DATA], "max_length": 320, "max_tokens_per_micro_batch": 1280,
                    "cache_dir": str(WORK / "cache")},
           "optim": {"learning_rate": 1e-4, "lr_decay_style": "constant"},
           "train": {"global_batch_size": 4, "train_iters": 1, "device": "cpu", "progress_bar": False,
                     "plot": False, "seed": 3},
           "algo": {"rlhf_type": "dpo", "rpo_alpha": None}}
    cfg = build_config(raw, overrides)
    tr = Trainer(cfg)
    tr.train()
    got = _measure(tr)
    par = cfg.parallel
    lay = Layout(tp=par.tensor_model_parallel_size, pp=par.pipeline_model_parallel_size, dp=tr.rt.dp_size,
                 dtype="fp32", reference=reference, lora_rank=lora_rank,
                 lora_targets=cfg.model.lora_config().targets if lora_rank else ("linear_qkv",))
    stage = plan(tr.spec, lay).stages[tr.rt.pgs.pp.rank()]
    want = {"weights": stage.weights, "grads": stage.grads, "optimizer": stage.optimizer,
            "reference": stage.reference if reference == "co_resident" else 0.0}
    if os.environ.get("MA_PLAN_DEBUG"):
        print("PLAN", name, dist.get_rank(), got, want, flush=True)
    assert got["optimizer"] > 0 and got["grads"] > 0, (name, got)  # the step ran: state exists
    for k in want:
        assert abs(got[k] - want[k]) <= 0.10 * max(want[k], 1), (name, dist.get_rank(), k, got, want)
    total_got = got["weights"] + got["grads"] + got["optimizer"]
    total_want = want["weights"] + want["grads"] + want["optimizer"]
    assert abs(total_got - total_want) <= 0.10 * total_want, (name, got, want)


def case_dpo_full_tp2():
    _check("full_tp2", "tensor_model_parallel_size=2")


def case_dpo_full_pp2():
    _check("full_pp2", "pipeline_model_parallel_size=2")


def case_dpo_lora_tp2():
    _check("lora_tp2", "tensor_model_parallel_size=2", "train_type=lora", "lora_rank=4",
           "lora_target_modules=ALL", lora_rank=4)


def case_dpo_lora_pp2():
    _check("lora_pp2", "pipeline_model_parallel_size=2", "train_type=lora", "lora_rank=4", lora_rank=4)


def case_dpo_precompute_tp2():
    _check("pre_tp2", "tensor_model_parallel_size=2", "ref_model=precompute", reference="precompute")


def case_dpo_precompute_pp2():
    _check("pre_pp2", "pipeline_model_parallel_size=2", "ref_model=precompute", reference="precompute")
