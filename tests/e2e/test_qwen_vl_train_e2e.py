"""DPO (LoRA, DEFAULT targets) on a tiny Qwen2-VL through the Trainer, at TP=2, PP=2 and CP=2,
on the image colour task of test_vision_train_e2e.py (one 2-rank gloo launch): held-out reward
accuracy rises above 0.9, and CP=2 reproduces the TP=2 run's first steps. Qwen2.5-VL in the same
launch: DPO-LoRA at TP=2 and a full RM at PP=2 whose HF export scores like the Megatron model."""
from __future__ import annotations

import pytest

from tests.dist_utils import dist_cases, run_dist_module
from tests.e2e.test_vision_train_e2e import check_rm_export, make_colour_task

WORKER = "tests.distributed.workers.qwen_vl_train_worker"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from mcore_align.checkpoint import convert_hf_to_mcore
    from mcore_align.models.tiny_vision import make_tiny_qwen2_vl

    root = tmp_path_factory.mktemp("qwen_vl_train")
    make_tiny_qwen2_vl(root / "hf", "2")
    convert_hf_to_mcore(root / "hf", root / "mc", dtype="fp32")
    make_tiny_qwen2_vl(root / "hf25", "2.5")
    convert_hf_to_mcore(root / "hf25", root / "mc25", dtype="fp32")
    (root / "data").mkdir()
    return root


@pytest.fixture(scope="module")
def results(work):
    env = {"MA_TEST_CKPT": str(work / "mc"), "MA_TEST_WORK": str(work), "MA_TEST_DATA": make_colour_task(work / "data"),
           "MA_TEST_QWEN25_CKPT": str(work / "mc25")}
    return run_dist_module(WORKER, nproc=2, env=env)


@pytest.mark.parametrize("case", dist_cases(WORKER))
def test_case(results, case):
    results.check(case)


def test_qwen2_5_vl_rm_export_loads_in_transformers_and_scores_like_megatron(results, work):
    """The PP=2 Qwen2.5-VL reward model exported to HF: transformers' backbone (its own M-RoPE
    positions) x value_head.safetensors gives the Megatron scores (1e-4)."""
    check_rm_export(results, work, "qwen2_5_vl_rm_pp2", "Qwen2_5_VLForConditionalGeneration")
