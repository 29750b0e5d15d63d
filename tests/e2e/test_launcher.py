"""`bash examples/dpo_mcore.sh` end to end on CPU: the torchrun launcher forwards Slurm's
SIGUSR1 to the ranks, which finish the step, checkpoint and exit 0; the relaunch resumes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, shared_data_dir

DATA = shared_data_dir() / "dpo_en_demo.json"
pytestmark = pytest.mark.skipif(not DATA.exists(), reason=f"shared preference data not found at {DATA}")


def _launch(model, save, data, cache, *overrides):
    env = {**os.environ, "MODEL": str(model), "SAVE": str(save), "DATASET": str(data), "TP": "2",
           "PYTHON": sys.executable, "MASTER_PORT": str(_free_port()), "SHUTDOWN_TIMEOUT": "120"}
    args = ["max_length=320", "truncation_strategy=right", "max_tokens_per_micro_batch=1280", "global_batch_size=8",
            "val_fraction=0", "progress_bar=false", "plot=false", "learning_rate=1e-4",
            f"data.cache_dir={cache}", *overrides]
    return subprocess.Popen(["bash", "examples/dpo_mcore.sh", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steps(save) -> list[int]:
    path = save / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line]


def test_sigusr1_through_torchrun_checkpoints_and_relaunch_resumes(tmp_path):
    from mcore_align.models.tiny import make_tiny_model

    hf = make_tiny_model(tmp_path / "hf", "qwen2", num_layers=2, hidden_size=64, vocab_size=512)
    subprocess.run([sys.executable, "tools/convert_hf_to_mcore.py", "--hf", str(hf), "--out", str(tmp_path / "mc")],
                   cwd=ROOT, check=True, capture_output=True)
    recs = sorted(json.loads(DATA.read_text()), key=lambda r: len(json.dumps(r)))[:16]
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(recs))
    save = tmp_path / "run"

    proc = _launch(tmp_path / "mc", save, data, tmp_path / "cache", "train_iters=200", "save_interval=null")
    deadline = time.time() + 240
    while not _steps(save) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, f"launcher ended before training:\n{proc.communicate()[0][-4000:]}"
    assert _steps(save), "no training step within 240 s"
    os.kill(proc.pid, signal.SIGUSR1)  # the launcher is torchrun itself (exec)
    out = proc.communicate(timeout=240)[0]
    stopped_at = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert 1 <= stopped_at < 200, out[-4000:]
    assert "will checkpoint after this step" in out and "stopping at step" in out, out[-4000:]
    assert max(_steps(save)) == stopped_at

    relaunch = _launch(tmp_path / "mc", save, data, tmp_path / "cache", f"train_iters={stopped_at + 2}", "save_interval=null")
    out = relaunch.communicate(timeout=300)[0]
    assert relaunch.returncode == 0, out[-4000:]
    assert "resumed from" in out, out[-4000:]
    steps = _steps(save)
    assert steps[-2:] == [stopped_at + 1, stopped_at + 2], steps
