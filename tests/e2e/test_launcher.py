"""`bash examples/dpo_mcore.sh` end to end on CPU: the script forwards Slurm's SIGUSR1 (and
SIGTERM) through torchrun to the ranks, which finish the step and checkpoint; the script
exits 0 although torchrun exits 1 after any signal; the relaunch resumes.
(tests/unit/test_launcher_script.py covers the script's logic with a stand-in torchrun.)"""
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


def _run_until_step(proc, save, after: int) -> None:
    deadline = time.time() + 240
    while not [s for s in _steps(save) if s > after] and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, f"launcher ended before training:\n{proc.communicate()[0][-4000:]}"
    assert [s for s in _steps(save) if s > after], f"no training step after {after} within 240 s"


def _stop(proc, save, sig) -> tuple[int, str]:
    """Signal the launcher script (as srun/Slurm does); expect a clean checkpoint and exit 0."""
    os.kill(proc.pid, sig)
    out = proc.communicate(timeout=240)[0]
    stopped_at = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert "will checkpoint after this step" in out and "stopping at step" in out, out[-4000:]
    assert max(_steps(save)) == stopped_at, out[-4000:]
    name = signal.Signals(sig).name
    assert f"stopped by {name} with a complete checkpoint at iteration {stopped_at}" in out, out[-4000:]
    assert proc.returncode == 0, out[-4000:]
    return stopped_at, out


def test_signals_through_torchrun_checkpoint_exit_0_and_relaunch_resumes(tmp_path):
    from mcore_align.models.tiny import make_tiny_model

    hf = make_tiny_model(tmp_path / "hf", "qwen2", num_layers=2, hidden_size=64, vocab_size=512)
    subprocess.run([sys.executable, "tools/convert_hf_to_mcore.py", "--hf", str(hf), "--out", str(tmp_path / "mc")],
                   cwd=ROOT, check=True, capture_output=True)
    recs = sorted(json.loads(DATA.read_text()), key=lambda r: len(json.dumps(r)))[:16]
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(recs))
    save = tmp_path / "run"

    # Slurm's time-limit warning: SIGUSR1.
    proc = _launch(tmp_path / "mc", save, data, tmp_path / "cache", "train_iters=200", "save_interval=null")
    _run_until_step(proc, save, 0)
    stopped_at, _ = _stop(proc, save, signal.SIGUSR1)
    assert 1 <= stopped_at < 200

    # The relaunch resumes at the next step; then a SIGTERM (scancel, preemption) stops it cleanly.
    relaunch = _launch(tmp_path / "mc", save, data, tmp_path / "cache", "train_iters=200", "save_interval=null")
    _run_until_step(relaunch, save, stopped_at)
    second, out = _stop(relaunch, save, signal.SIGTERM)
    assert "resumed from" in out, out[-4000:]
    steps = _steps(save)
    assert steps[:stopped_at] == list(range(1, stopped_at + 1)) and steps[stopped_at:] == list(range(stopped_at + 1, second + 1)), steps
