"""Identical models give identical numbers on every x86 CPU (see workers/numerics_worker.py).

MKL_ENABLE_INSTRUCTIONS=AVX2 and ATEN_CPU_CAPABILITY=avx2 make an AVX-512 machine (Intel, or
AMD Zen 4) run the kernels of an AVX2-only one (older AMD EPYC), where the bug showed.
"""
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.dist_utils import dist_cases, run_dist_module

WORKER = "tests.distributed.workers.numerics_worker"
AVX2 = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from mcore_align.demo import make_task
    from mcore_align.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("numerics")
    hf = make_tiny_model(root / "hf", "qwen2", num_layers=2, hidden_size=64, vocab_size=512)
    subprocess.run([sys.executable, "tools/convert_hf_to_mcore.py", "--hf", str(hf), "--out", str(root / "mcore")],
                   cwd=ROOT, check=True, capture_output=True)
    make_task(root / "task.jsonl", 24, seed=0)
    return root


@pytest.fixture(scope="module")
def results(work):
    # The cases run at 1 and 2 threads per rank themselves (torch.set_num_threads).
    env = {**AVX2, "MA_TEST_CKPT": str(work / "mcore"), "MA_TEST_DATA_TASK": str(work / "task.jsonl"),
           "MA_TEST_WORK": str(work / "w")}
    return run_dist_module(WORKER, nproc=2, env=env)


@pytest.mark.parametrize("case", dist_cases(WORKER))
def test_numerics_case(results, case):
    results.check(case)
