"""Checkpoint bookkeeping without a training run: the latest marker, incomplete
checkpoints (trainer load, weight loading, export and its CLI), the in-memory sidecar
and the resume-time LR schedule. Trainer runs are in tests/e2e/test_checkpoint_e2e.py.
"""
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mcore_align.checkpoint import CheckpointError, convert_hf_to_mcore, convert_mcore_to_hf
from mcore_align.checkpoint.layout import check_complete, resolve_checkpoint_dir
from mcore_align.models.tiny import make_tiny_model
from mcore_align.trainer import checkpointing
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    hf = make_tiny_model(root / "hf", "llama")
    convert_hf_to_mcore(hf, root / "mc", dtype="fp32")
    return root / "mc"


@pytest.fixture
def ckpt(converted, tmp_path):
    dst = tmp_path / "mc"
    shutil.copytree(converted, dst)
    return dst


def _largest_shard(path: Path) -> Path:
    return max(path.glob("*.distcp"), key=lambda f: f.stat().st_size)


# -- the latest marker ---------------------------------------------------------------------
def test_corrupt_marker_names_the_file(tmp_path):
    (tmp_path / "iter_0000002").mkdir()
    (tmp_path / checkpointing.LATEST).write_text("2\x00\x00garbage")
    with pytest.raises(CheckpointError, match=f"{checkpointing.LATEST}.*corrupt marker"):
        checkpointing.latest_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="corrupt marker"):  # the exporter's lookup too
        resolve_checkpoint_dir(tmp_path)


def test_iter_dirs_without_marker_are_refused(tmp_path):
    # A save directory with checkpoints but no marker: starting from step 0 would overwrite them.
    (tmp_path / "iter_0000004").mkdir()
    (tmp_path / "iter_0000004" / "metadata.json").write_text("{}")
    (tmp_path / "iter_0000006").mkdir()  # a torn save
    expected = r"iter_0000004, iter_0000006 but no latest.*Complete ones: \['iter_0000004'\]"
    with pytest.raises(CheckpointError, match=expected):
        checkpointing.latest_checkpoint(tmp_path)


def test_empty_or_new_save_dir_starts_fresh(tmp_path):
    assert checkpointing.latest_checkpoint(tmp_path) is None
    assert checkpointing.latest_checkpoint(tmp_path / "absent") is None
    (tmp_path / "metrics.jsonl").write_text("")  # other files are not checkpoints
    assert checkpointing.latest_checkpoint(tmp_path) is None


def test_marker_target_with_truncated_shard_is_incomplete(ckpt, tmp_path):
    save = tmp_path / "save"
    save.mkdir()
    shutil.copytree(ckpt, save / "iter_0000003")
    (save / checkpointing.LATEST).write_text("3")
    assert checkpointing.latest_checkpoint(save) == save / "iter_0000003"
    shard = _largest_shard(save / "iter_0000003")
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{shard.name}: 100 bytes.*incomplete"):
        checkpointing.latest_checkpoint(save)


# -- incomplete checkpoints: loading and export ------------------------------------------------
@pytest.mark.parametrize("damage", ["truncate", "remove"])
def test_export_of_incomplete_checkpoint_names_the_file(ckpt, tmp_path, damage):
    shard = _largest_shard(ckpt)
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:
        shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}.*incomplete"):
        check_complete(ckpt)
    with pytest.raises(CheckpointError, match=f"{shard.name}.*incomplete"):
        convert_mcore_to_hf(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_weight_loading_of_incomplete_checkpoint_names_the_file(ckpt):
    from mcore_align.checkpoint import load_model_weights, read_model_spec
    from mcore_align.checkpoint.layout import init_single_process
    from mcore_align.models.provider import ModelOptions, build_model

    runtime = init_single_process()
    (model,) = build_model(read_model_spec(ckpt), runtime, opts=ModelOptions(core_attention="megatron"))
    shard = _largest_shard(ckpt)
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(CheckpointError, match=f"{shard.name}.*incomplete"):
        load_model_weights([model], ckpt)


def test_missing_index_is_incomplete(ckpt):
    (ckpt / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"\.metadata: missing.*incomplete"):
        check_complete(ckpt)
    (ckpt / ".metadata").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(CheckpointError, match=r"\.metadata: unreadable.*incomplete or corrupt"):
        check_complete(ckpt)


def test_missing_common_state_is_incomplete(ckpt):
    """The non-sharded state lives in common.pt (megatron-core <= 0.16) or, from 0.17, as a
    "common_state" item of the torch_dist index; a checkpoint with neither is incomplete."""
    if (ckpt / "common.pt").exists():
        check_complete(ckpt)
        (ckpt / "common.pt").unlink()
        with pytest.raises(CheckpointError, match=r"common\.pt: missing.*incomplete"):
            check_complete(ckpt)
    else:  # 0.17+: the index holds it, and the check accepts the folder as it is
        from torch.distributed.checkpoint import FileSystemReader

        keys = FileSystemReader(str(ckpt)).read_metadata().storage_data
        assert any(k.fqn.startswith("common_state") for k in keys)
        check_complete(ckpt)


def test_export_cli_reports_incomplete_checkpoint(ckpt, tmp_path):
    shard = _largest_shard(ckpt)
    shard.write_bytes(shard.read_bytes()[:100])
    p = subprocess.run([sys.executable, "tools/convert_mcore_to_hf.py", "--ckpt", str(ckpt),
                        "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "error:" in p.stderr and shard.name in p.stderr and "incomplete" in p.stderr, p.stderr[-3000:]
    assert "Traceback" not in p.stderr


# -- the sidecar (model_spec.json + tokenizer/) -------------------------------------------------
def test_sidecar_is_held_in_memory_and_required(ckpt, tmp_path):
    side = checkpointing.Sidecar.read(ckpt)
    assert "model_spec.json" in side.files and "tokenizer/tokenizer.json" in side.files
    shutil.rmtree(ckpt / "tokenizer")  # the source disappears (pruning): the copy does not need it
    (tmp_path / "iter").mkdir()
    side.write(tmp_path / "iter")
    assert (tmp_path / "iter" / "tokenizer" / "tokenizer.json").stat().st_size > 0
    assert (tmp_path / "iter" / "model_spec.json").read_bytes() == (ckpt / "model_spec.json").read_bytes()
    with pytest.raises(CheckpointError, match="no tokenizer here or in the parent"):
        checkpointing.Sidecar.read(ckpt)


# -- LR schedule on resume ------------------------------------------------------------------------
class _Opt:
    def __init__(self):
        self.param_groups = [{}]


def _scheduler(train_iters: int, monkeypatch):
    """build_optimizer's scheduler, on a stand-in optimizer (the scheduler only sets
    param_groups' lr and weight_decay)."""
    import megatron.core.optimizer as mo

    from mcore_align.config import build_config
    from mcore_align.trainer.setup import build_optimizer

    cfg = build_config({"model": {"load": "unused"}, "data": {"dataset": ["unused"]},
                        "optim": {"learning_rate": 1e-3, "min_lr": 0.0, "lr_decay_style": "linear",
                                  "warmup_ratio": 0.0},
                        "train": {"device": "cpu"}, "algo": {"rlhf_type": "dpo"}})
    monkeypatch.setattr(mo, "get_megatron_optimizer", lambda *a, **k: _Opt())
    return build_optimizer([], type("R", (), {"pgs": None})(), cfg, train_iters)[1]


def test_longer_run_rebuilds_the_lr_schedule(caplog, monkeypatch):
    old = _scheduler(4, monkeypatch)
    for _ in range(4):
        old.step(1)
    assert old.optimizer.param_groups[0]["lr"] == 0.0  # linear decay to min_lr=0 at step 4
    new = _scheduler(8, monkeypatch)
    rt = type("R", (), {"rank": 0})()
    with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
        checkpointing._load_scheduler(new, old.state_dict(), "iter_0000004", rt)
    # A fresh 8-step linear schedule at step 4: 1e-3 * (1 - 4/8).
    assert new.num_steps == 4
    assert new.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4, rel=1e-12)
    assert "LR schedule rebuilt" in caplog.text and "lr_decay_steps 4 -> 8" in caplog.text
    # Same config: nothing changes, nothing is logged.
    caplog.clear()
    again = _scheduler(8, monkeypatch)
    with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
        checkpointing._load_scheduler(again, new.state_dict(), "iter_0000004", rt)
    assert again.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4, rel=1e-12) and not caplog.text
