"""`examples/dpo_mcore.sh` with a stand-in PYTHON (a shell script: no torch, no ranks), so the
launcher's own logic is tested in seconds: the GPU probe runs with the job's interpreter and
a failing probe is an error, and after a signal the script exits 0 exactly when a checkpoint
completed after it. tests/e2e/test_launcher.py runs the real torchrun."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

FAKE = r"""#!/usr/bin/env bash
# Stand-in interpreter: `-c ...` is the GPU probe, `-m torch.distributed.run ...` is torchrun.
if [ "$1" = -c ]; then
  if [ -n "${FAKE_PROBE_ERROR:-}" ]; then echo "$FAKE_PROBE_ERROR" >&2; exit 1; fi
  echo "${FAKE_GPUS:-0}"; exit 0
fi
echo "fake torchrun: $*"
save=; for a in "$@"; do case "$a" in train.save=*) save=${a#*=} ;; esac; done
on_sig() {  # like torchrun: forward, let the ranks checkpoint (or not), then exit 1
  echo "fake torchrun got SIG$1"
  if [ -n "${FAKE_CHECKPOINT:-}" ]; then mkdir -p "$save"; echo "$FAKE_CHECKPOINT" > "$save/latest_checkpointed_iteration.txt"; fi
  exit 1
}
trap 'on_sig TERM' TERM; trap 'on_sig USR1' USR1
[ -z "${FAKE_EXIT:-}" ] || exit "$FAKE_EXIT"
touch "$FAKE_READY"
while :; do sleep 0.05; done
"""


@pytest.fixture
def fake(tmp_path):
    py = tmp_path / "python"
    py.write_text(FAKE)
    py.chmod(0o755)
    return py


def _env(tmp_path, fake, **kw):
    env = {k: v for k, v in os.environ.items() if k not in ("DEVICE", "NPROC_PER_NODE", "TP", "DRY_RUN")}
    env.update(PYTHON=str(fake), MODEL=str(tmp_path / "model"), SAVE=str(tmp_path / "save"),
               DATASET="d.jsonl", FAKE_READY=str(tmp_path / "ready"), **kw)
    return env


def _run(tmp_path, fake, **kw):
    return subprocess.run(["bash", "examples/dpo_mcore.sh", "beta=0.2"], cwd=ROOT, env=_env(tmp_path, fake, **kw),
                          capture_output=True, text=True, timeout=60)


def test_probe_uses_the_jobs_interpreter_and_its_gpu_count(tmp_path, fake):
    out = _run(tmp_path, fake, FAKE_GPUS="4", DRY_RUN="1")
    assert out.returncode == 0, out.stderr
    cmd = out.stdout
    assert f"{fake} -m torch.distributed.run" in cmd
    assert "--nproc-per-node 4" in cmd and "train.device=cuda" in cmd and "tensor_model_parallel_size=1" in cmd
    assert "beta=0.2" in cmd and "--shutdown-timeout 240" in cmd
    out = _run(tmp_path, fake, FAKE_GPUS="0", DRY_RUN="1")
    assert "--nproc-per-node 2" in out.stdout and "train.device=cpu" in out.stdout, out.stderr
    # DEVICE=cuda with a count given: no probe needed, even with a broken interpreter.
    out = _run(tmp_path, fake, DEVICE="cuda", NPROC_PER_NODE="8", FAKE_PROBE_ERROR="boom", DRY_RUN="1")
    assert out.returncode == 0 and "--nproc-per-node 8" in out.stdout, out.stderr


def test_a_failing_probe_is_an_error_not_cpu(tmp_path, fake):
    out = _run(tmp_path, fake, FAKE_PROBE_ERROR="ModuleNotFoundError: No module named 'torch'", DRY_RUN="1")
    assert out.returncode != 0 and "torch.distributed.run" not in out.stdout
    assert "ModuleNotFoundError: No module named 'torch'" in out.stderr  # the probe's own error, shown
    assert f"probing the GPUs with PYTHON={fake} failed" in out.stderr
    out = _run(tmp_path, fake, FAKE_GPUS="0", DEVICE="cuda", DRY_RUN="1")
    assert out.returncode != 0 and "DEVICE=cuda but" in out.stderr


def _launch_and_signal(tmp_path, fake, sig, script="examples/dpo_mcore.sh", **kw):
    env = _env(tmp_path, fake, **kw)
    proc = subprocess.Popen(["bash", script], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 30
    while not (tmp_path / "ready").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "ready").exists(), proc.communicate(timeout=5)[0]
    os.kill(proc.pid, sig)  # the launcher script itself, as srun/Slurm would
    out = proc.communicate(timeout=30)[0]
    (tmp_path / "ready").unlink()
    return proc.returncode, out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_exit_status_follows_the_checkpoint(tmp_path, fake, sig):
    name = signal.Signals(sig).name
    rc, out = _launch_and_signal(tmp_path, fake, sig, FAKE_CHECKPOINT="7")
    assert f"fake torchrun got {name}" in out, out  # forwarded
    assert rc == 0 and f"stopped by {name} with a complete checkpoint at iteration 7" in out, out
    # The same signal, no new checkpoint (the latest is still 7): torchrun's failure stands.
    rc, out = _launch_and_signal(tmp_path, fake, sig)
    assert rc == 1 and f"stopped by {name} but no checkpoint completed after it" in out, out


def test_exit_status_without_a_signal_is_torchruns(tmp_path, fake):
    out = _run(tmp_path, fake, FAKE_EXIT="3")
    assert out.returncode == 3, out.stderr


SRUN = r"""#!/usr/bin/env bash
# srun stand-in: one task on "node 0"; forwards USR1/TERM to it as srun does.
while [[ "$1" == --* ]]; do shift; done
SLURM_NODEID=0 "$@" &
child=$!
trap 'kill -USR1 $child' USR1; trap 'kill -TERM $child' TERM
while :; do rc=0; wait $child || rc=$?; if [ $rc -gt 128 ] && kill -0 $child 2>/dev/null; then continue; fi; break; done
exit $rc
"""
SCONTROL = r"""#!/usr/bin/env bash
case "$1" in show) echo localhost ;; requeue) echo "requeue $2" >> "$FAKE_SCONTROL_LOG" ;; esac
"""


def _slurm_env(tmp_path, **kw):
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    return dict(PATH=f"{stubs}:{os.environ['PATH']}", SLURM_JOB_NODELIST="n1", SLURM_NNODES="1",
                SLURM_JOB_ID="42", FAKE_SCONTROL_LOG=str(tmp_path / "scontrol.log"), **kw)


def test_sbatch_forwards_usr1_and_term_and_requeues_after_usr1_only(tmp_path, fake):
    """The whole chain with stand-ins for srun, scontrol and torchrun: USR1 (the time-limit
    warning) and TERM (scancel, preemption) reach torchrun; the step exits 0 after a
    checkpoint; only USR1 requeues. SHUTDOWN_TIMEOUT fits inside the 300 s warning."""
    log = tmp_path / "scontrol.log"
    rc, out = _launch_and_signal(tmp_path, fake, signal.SIGUSR1, script="examples/slurm/dpo.sbatch",
                                 FAKE_CHECKPOINT="5", **_slurm_env(tmp_path))
    assert "--shutdown-timeout 240" in out and "fake torchrun got SIGUSR1" in out, out
    assert rc == 0 and log.read_text() == "requeue 42\n", out
    log.unlink()
    rc, out = _launch_and_signal(tmp_path, fake, signal.SIGTERM, script="examples/slurm/dpo.sbatch",
                                 FAKE_CHECKPOINT="6", **_slurm_env(tmp_path))
    assert "fake torchrun got SIGTERM" in out and rc == 0 and not log.exists(), out
    # A shutdown window that does not fit in the warning is refused up front.
    out = subprocess.run(["bash", "examples/slurm/dpo.sbatch"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env=_env(tmp_path, fake, SHUTDOWN_TIMEOUT="290", **_slurm_env(tmp_path)))
    assert out.returncode == 1 and "exceeds the 300 s warning" in out.stderr, out.stderr
