"""tools/gpu_check.sh --dry-run on CPU: every step of the GPU check runs (no install), the
CUDA tests are collected and skipped with their reason, and both benchmarks produce their
tables in a tiny CPU configuration. Catches a broken script before a GPU session spends
its device time on it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run", "--python", sys.executable], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "DRY RUN" in summary and "install: skipped" in (tmp_path / "gpu_check.log").read_text()
    # The CUDA tests were collected (7 of them) and skipped with the reason, none failed.
    assert "7 skipped" in summary and "failed" not in summary.lower(), summary
    assert "needs a CUDA device" in summary
    # Both benchmarks ran and printed their tables.
    assert "bench_train (exit 0)" in summary and "| fp32 | tiny | cpu |" in summary, summary
    assert "bench_logprobs (exit 0)" in summary and "fused_linear_logprobs" in summary, summary
    assert {"bench_train.json", "cuda_tests.xml", "summary.md"} <= {p.name for p in Path(tmp_path).iterdir()}
