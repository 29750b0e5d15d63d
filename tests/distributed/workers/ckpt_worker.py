"""Checkpoint / resume through the real trainer on 2 gloo ranks.

Each case is a regression test of a checkpointing rule (mcore_align/trainer/checkpointing.py):
resumed runs equal uninterrupted ones step by step (losses and grad norms, also at PP=2 with
DPO bco_pair's running mean), a finished run's relaunch keeps its checkpoint, pruned runs keep
every checkpoint self-contained, a longer relaunch rebuilds the LR schedule, and broken save
directories are refused with the path. The pytest side (tests/e2e/test_checkpoint_e2e.py)
converts the tiny model and exports the checkpoints written here.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from mcore_align.checkpoint import CheckpointError
from mcore_align.config import build_config
from mcore_align.trainer import checkpointing
from mcore_align.trainer.trainer import Trainer

CKPT = os.environ.get("MA_TEST_CKPT", "")
WORK = Path(os.environ.get("MA_TEST_WORK", "/tmp/ma_ckpt_worker"))
DATA = os.environ.get("MA_TEST_DATA", "")


def _cfg(save: str | None, *overrides: str):
    raw = {
        "model": {"load": CKPT},
        "data": {"dataset": [DATA], "max_length": 320, "truncation_strategy": "right",
                 "max_tokens_per_micro_batch": 1280, "cache_dir": str(WORK / "cache")},
        "optim": {"learning_rate": 1e-3, "lr_decay_style": "constant", "clip_grad": 1.0},
        "train": {"global_batch_size": 8, "train_iters": 4, "device": "cpu", "progress_bar": False,
                  "save": save, "plot": False, "seed": 7},
        "algo": {"rlhf_type": "dpo", "beta": 0.1, "rpo_alpha": None},
    }
    return build_config(raw, overrides)


def _save_dir(name: str) -> str:
    path = WORK / name
    if dist.get_rank() == 0 and path.exists():
        shutil.rmtree(path)
    dist.barrier()
    return str(path)


def _copy(src: str, name: str) -> str:
    dst = WORK / name
    if dist.get_rank() == 0:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
    dist.barrier()
    return str(dst)


def _col(result, key: str) -> list[float]:
    return [h[key] for h in result["history"]]


@contextmanager
def _warnings_of(logger_name: str):
    """Collect the WARNING records of one logger (this rank)."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger, handler = logging.getLogger(logger_name), Keep(logging.WARNING)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _resume_equals_uninterrupted(name: str, *overrides: str) -> None:
    """4 steps in one launch vs 2 + 2 in two launches: the same losses, grad norms and LRs."""
    full = Trainer(_cfg(_save_dir(f"{name}_full"), *overrides)).train()
    save = _save_dir(f"{name}_split")
    first = Trainer(_cfg(save, "exit_after_steps=2", *overrides)).train()
    assert first["stopped"] and first["step"] == 2, first["step"]
    second = Trainer(_cfg(save, *overrides))
    assert second.step == 2, second.step
    rest = second.train()
    for key in ("loss", "grad_norm"):
        got, want = torch.tensor(_col(first, key) + _col(rest, key)), torch.tensor(_col(full, key))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name} {key}: {m}")
    assert _col(first, "lr") + _col(rest, "lr") == _col(full, "lr"), (_col(first, "lr"), _col(rest, "lr"))


def case_resume_equals_uninterrupted_dp2():
    # Linear decay with one warmup step: the schedule, Adam moments, data position and RNG all resume.
    _resume_equals_uninterrupted("resume_dp2", "lr_decay_style=linear", "warmup_ratio=0.25")


def case_bco_pair_resume_equals_uninterrupted_pp2():
    """bco_pair's running reward mean lives on the last pipeline stage; the checkpoint must carry
    it (rank 0, which writes the common state, is a first stage). A larger LR makes the rewards,
    hence the mean, large enough to matter."""
    _resume_equals_uninterrupted("bco_pp2", "pipeline_model_parallel_size=2", "loss_type=bco_pair",
                                 "learning_rate=1e-2", "beta=0.5")


def case_finished_run_relaunch_keeps_checkpoint():
    save = _save_dir("finished")
    Trainer(_cfg(save, "train_iters=2")).train()  # no save_interval: one save, at the end
    _copy(save, "two_steps")  # untouched by the relaunch below: the source of the cases after this one
    it = Path(save) / "iter_0000002"
    before = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in it.iterdir()}
    again = Trainer(_cfg(save, "train_iters=2"))
    assert again.step == 2, again.step
    res = again.train()
    assert res["step"] == 2 and res["history"] == [], res
    dist.barrier()
    after = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in it.iterdir()}
    assert after == before, f"the finished checkpoint was rewritten: {before} -> {after}"
    assert (it / "model_spec.json").is_file() and (it / "tokenizer" / "tokenizer.json").is_file()
    assert Trainer(_cfg(save, "train_iters=2")).step == 2  # still resumable
    if dist.get_rank() == 0:
        (WORK / "finished_save.txt").write_text(save)  # exported on the pytest side


def case_pruned_resume_keeps_checkpoints_self_contained():
    """save_total_limit=1 deletes the checkpoint a run resumed from; the later ones must still
    hold model_spec.json and tokenizer/ (exported on the pytest side)."""
    save = _save_dir("pruned")
    Trainer(_cfg(save, "save_interval=1", "save_total_limit=1", "exit_after_steps=1")).train()
    Trainer(_cfg(save, "save_interval=1", "save_total_limit=1")).train()  # resumes from iter_1, saves 2, 3, 4
    dist.barrier()
    root = Path(save)
    assert sorted(p.name for p in root.glob("iter_*")) == ["iter_0000004"]
    assert checkpointing.latest_checkpoint(save) == root / "iter_0000004"
    assert (root / "iter_0000004" / "model_spec.json").is_file()
    assert (root / "iter_0000004" / "tokenizer" / "tokenizer.json").is_file()
    if dist.get_rank() == 0:
        (WORK / "pruned_save.txt").write_text(save)


def case_longer_relaunch_rebuilds_lr_schedule():
    """Saved at the end of a 2-step linear decay (lr 0), relaunched with train_iters=4: steps 3
    and 4 follow a 4-step schedule (not lr 0), and the change is logged."""
    save = _save_dir("longer")
    short = Trainer(_cfg(save, "train_iters=2", "lr_decay_style=linear")).train()
    assert _col(short, "lr")[-1] == 0.0
    with _warnings_of(checkpointing.__name__) as warned:
        longer = Trainer(_cfg(save, "train_iters=4", "lr_decay_style=linear"))
    assert longer.step == 2
    res = longer.train()
    # megatron linear decay, no warmup: lr after step k = 1e-3 * (1 - k / 4); "lr" is logged after the step.
    want = torch.tensor([1e-3 * (1 - k / 4) for k in (3, 4)], dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(_col(res, "lr"), dtype=torch.float64), want, rtol=1e-9, atol=0)
    if dist.get_rank() == 0:
        assert any("LR schedule rebuilt" in w and "lr_decay_steps 2 -> 4" in w for w in warned), warned


def case_rng_not_restored_at_another_world_size_is_logged():
    from megatron.core import dist_checkpointing

    save = _copy(str(WORK / "two_steps"), "other_world")
    real = dist_checkpointing.load_common_state_dict

    def saved_by_four(path):  # as if the checkpoint had been written by 4 ranks
        return {**real(path), "world_size": 4}

    dist_checkpointing.load_common_state_dict = saved_by_four
    try:
        with _warnings_of(checkpointing.__name__) as warned:
            tr = Trainer(_cfg(save, "train_iters=2"))
    finally:
        dist_checkpointing.load_common_state_dict = real
    assert tr.step == 2
    if dist.get_rank() == 0:
        assert any("saved by 4 ranks" in w and "RNG states are not restored" in w for w in warned), warned


def case_truncated_shard_is_named():
    save = Path(_copy(str(WORK / "two_steps"), "truncated"))
    shard = max((save / "iter_0000002").glob("*.distcp"), key=lambda f: f.stat().st_size)
    dist.barrier()
    if dist.get_rank() == 0:
        shard.write_bytes(shard.read_bytes()[:1000])
    dist.barrier()
    try:
        Trainer(_cfg(str(save), "train_iters=2"))
        raise AssertionError("a truncated checkpoint was loaded")
    except CheckpointError as e:
        assert shard.name in str(e) and "incomplete" in str(e), e


def case_iter_dirs_without_marker_are_not_overwritten():
    save = Path(_copy(str(WORK / "two_steps"), "no_marker"))
    if dist.get_rank() == 0:
        (save / checkpointing.LATEST).unlink()
    dist.barrier()
    metrics = (save / "metrics.jsonl").read_text()
    try:
        Trainer(_cfg(str(save), "train_iters=2")).train()
        raise AssertionError("started over a save directory with checkpoints and no marker")
    except CheckpointError as e:
        assert "iter_0000002" in str(e) and "no latest_checkpointed_iteration.txt" in str(e), e
    assert (save / "metrics.jsonl").read_text() == metrics
    rows = [json.loads(line) for line in metrics.splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
