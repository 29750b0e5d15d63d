"""DPO (LoRA, DEFAULT targets) on a tiny Qwen2-VL through the Trainer, at TP=2, PP=2 and CP=2,
on the image colour task of test_vision_train_e2e.py (one 2-rank gloo launch): held-out reward
accuracy rises above 0.9, and CP=2 reproduces the TP=2 run's first steps."""
from __future__ import annotations

import pytest

from tests.dist_utils import dist_cases, run_dist_module
from tests.e2e.test_vision_train_e2e import make_colour_task

WORKER = "tests.distributed.workers.qwen_vl_train_worker"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from mcore_align.checkpoint import convert_hf_to_mcore
    from mcore_align.models.tiny_vision import make_tiny_qwen2_vl

    root = tmp_path_factory.mktemp("qwen_vl_train")
    make_tiny_qwen2_vl(root / "hf", "2")
    convert_hf_to_mcore(root / "hf", root / "mc", dtype="fp32")
    (root / "data").mkdir()
    env = {"MA_TEST_CKPT": str(root / "mc"), "MA_TEST_WORK": str(root), "MA_TEST_DATA": make_colour_task(root / "data")}
    return run_dist_module(WORKER, nproc=2, env=env)


@pytest.mark.parametrize("case", dist_cases(WORKER))
def test_case(results, case):
    results.check(case)
