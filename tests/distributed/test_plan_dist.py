"""Memory planner vs the measured bytes of built models and optimizers (2 gloo ranks, one launch).

What is measured exactly on CPU: parameters, DDP grad buffers and optimizer state of the real
megatron objects after one step (fp32, the CPU mode's dtype). Activations and logits are
not compared here (process RSS on CPU is not a per-tensor measure); the CUDA check
(tools/gpu_check.sh) is where those can be measured.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, shared_data_dir
from tests.dist_utils import dist_cases, run_dist_module

WORKER = "tests.distributed.workers.plan_worker"
DATA = shared_data_dir() / "dpo_en_demo.json"
pytestmark = pytest.mark.skipif(not DATA.exists(), reason=f"shared preference data not found at {DATA}")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from mcore_align.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("plan")
    hf = make_tiny_model(root / "hf", "qwen2", num_layers=4, hidden_size=64, vocab_size=512)
    subprocess.run([sys.executable, "tools/convert_hf_to_mcore.py", "--hf", str(hf), "--out", str(root / "mcore")],
                   cwd=ROOT, check=True, capture_output=True)
    recs = sorted(json.loads(DATA.read_text()), key=lambda r: len(json.dumps(r)))[:8]
    (root / "subset.json").write_text(json.dumps(recs))
    env = {"MA_TEST_CKPT": str(root / "mcore"), "MA_TEST_WORK": str(root), "MA_TEST_DATA": str(root / "subset.json")}
    return run_dist_module(WORKER, nproc=2, env=env)


@pytest.mark.parametrize("case", dist_cases(WORKER))
def test_plan_case(results, case):
    results.check(case)
