"""Training on one CUDA GPU: mixed precision, the distributed optimizer with overlapped grad
reduction, the reference modes and resume, each against an independent run.

UNVERIFIED until a session with a GPU runs tools/gpu_check.sh (written without one).
The independent references: the same run in fp32 (for bf16/fp16), the CPU execution
mode in a separate process (plain optimizer, no overlap, gloo), co-resident reference
(for precompute), and one uninterrupted run (for resume).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from tests.cuda.conftest import ROOT, history, raw_config, train

pytestmark = pytest.mark.cuda  # also set by tests/cuda/conftest.py, with the CPU skip


def _finite(xs):
    return all(math.isfinite(x) for x in xs)


def test_bf16_dpo_matches_fp32(work):
    # A small learning rate keeps both trajectories close: what is compared is the step's
    # numerics, not how bf16 rounding of the updates compounds.
    fp32 = train(work, "learning_rate=1e-4")
    bf16 = train(work, "learning_rate=1e-4", "bf16=true")
    assert _finite(history(bf16, "loss")) and _finite(history(bf16, "grad_norm"))
    # bf16 has 8 bits of mantissa: ~0.4% per rounding; a tiny model's loss near ln 2 and its
    # grad norm agree to a few percent over 4 steps (fp32 main weights in the optimizer).
    for a, b in zip(history(fp32, "loss"), history(bf16, "loss")):
        assert abs(a - b) < 0.02, (history(fp32, "loss"), history(bf16, "loss"))
    for a, b in zip(history(fp32, "grad_norm"), history(bf16, "grad_norm")):
        assert abs(a - b) <= 0.1 * abs(a), (history(fp32, "grad_norm"), history(bf16, "grad_norm"))


def test_fp16_with_loss_scaling(work):
    fp32 = train(work)
    # Early steps may overflow at the initial 2^16 scale and be skipped while the scaler backs off.
    fp16 = train(work, "fp16=true", "max_consecutive_nan=10")
    scales = history(fp16, "loss_scale")
    assert scales[0] > 1.0 and all(s >= 1.0 for s in scales), scales  # dynamic scaler active
    kept = [i for i, h in enumerate(fp16["history"]) if not h["skipped"]]
    assert kept, "every fp16 step was skipped for overflow"
    # The first step sees the same weights in both runs: losses agree to fp16 rounding.
    assert abs(history(fp16, "loss")[0] - history(fp32, "loss")[0]) < 0.01
    assert _finite([history(fp16, "loss")[i] for i in kept])


def test_distributed_optimizer_and_overlap_match_cpu_plain_optimizer(work, tmp_path):
    """CUDA: megatron DDP with overlap_grad_reduce (always on for CUDA) and the distributed
    optimizer. Reference: the CPU execution mode (no overlap, plain optimizer) in a fresh
    process. fp32 with TF32 off (torch's default for matmul) agrees to summation order."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cuda = train(work, "use_distributed_optimizer=true")
    cuda_plain = train(work)
    save = tmp_path / "cpu_ref"
    raw = raw_config(work, str(save), device="cpu")
    script = ("import json,sys; from mcore_align.config import build_config; "
              "from mcore_align.trainer.trainer import Trainer; "
              "r=Trainer(build_config(json.loads(sys.argv[1]))).train(); "
              "print('LOSSES', json.dumps([h['loss'] for h in r['history']]))")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(raw)], cwd=ROOT, capture_output=True, text=True,
                          env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cpu = json.loads(proc.stdout.split("LOSSES", 1)[1].strip().splitlines()[0])
    torch.testing.assert_close(torch.tensor(history(cuda, "loss")), torch.tensor(history(cuda_plain, "loss")),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(history(cuda, "loss")), torch.tensor(cpu), rtol=0, atol=2e-4)


def test_precompute_matches_co_resident(work):
    co = train(work)
    pre = train(work, "ref_model=precompute")
    torch.testing.assert_close(torch.tensor(history(pre, "loss")), torch.tensor(history(co, "loss")),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(history(pre, "rewards/margins")),
                               torch.tensor(history(co, "rewards/margins")), rtol=0, atol=1e-5)


def test_checkpoint_resume_on_cuda(work, tmp_path):
    full = history(train(work, save=str(tmp_path / "a")), "loss")
    first = train(work, "exit_after_steps=2", save=str(tmp_path / "b"))
    assert first["stopped"] and first["step"] == 2
    rest = train(work, save=str(tmp_path / "b"))
    assert rest["trainer"].step == 4
    # Embedding backward uses atomics on CUDA: summation order may differ by rounding only.
    torch.testing.assert_close(torch.tensor(history(first, "loss") + history(rest, "loss")), torch.tensor(full),
                               rtol=0, atol=1e-5)


def test_bf16_distributed_optimizer_resume(work, tmp_path):
    """The sharded optimizer state (distributed optimizer, bf16 + fp32 main params) round-trips."""
    full = history(train(work, "bf16=true", "use_distributed_optimizer=true", save=str(tmp_path / "a")), "loss")
    train(work, "bf16=true", "use_distributed_optimizer=true", "exit_after_steps=2", save=str(tmp_path / "b"))
    rest = train(work, "bf16=true", "use_distributed_optimizer=true", save=str(tmp_path / "b"))
    # bf16 forward: resumed steps agree with the uninterrupted run to bf16 rounding.
    torch.testing.assert_close(torch.tensor(history(rest, "loss")), torch.tensor(full[2:]), rtol=0, atol=5e-3)
