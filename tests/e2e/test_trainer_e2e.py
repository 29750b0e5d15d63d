"""DPO end to end through the real loop (TP=2, PP=2, DP=2), resume, faults, export.

One 2-rank torchrun launch runs every case of tests/distributed/workers/trainer_worker.py;
the exports and the `transformers` comparisons run here.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, e2e_records
from tests.dist_utils import dist_cases, run_dist_module

WORKER = "tests.distributed.workers.trainer_worker"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from mcore_align.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("trainer_e2e")
    hf = make_tiny_model(root / "hf", "qwen2", num_layers=2, hidden_size=64, vocab_size=512)
    subprocess.run([sys.executable, "tools/convert_hf_to_mcore.py", "--hf", str(hf), "--out", str(root / "mcore")],
                   cwd=ROOT, check=True, capture_output=True)
    torch.manual_seed(0)
    torch.save(torch.randint(0, 512, (2, 24)), root / "tokens.pt")
    # 16 real pairs, the shortest, so that a few epochs fit in a few steps (learning is visible);
    # generated pairs of the same format without the shared data.
    (root / "subset.json").write_text(json.dumps(e2e_records("dpo_en_demo.json", 16)[0]))
    return root


@pytest.fixture(scope="module")
def results(work):
    env = {"MA_TEST_CKPT": str(work / "mcore"), "MA_TEST_WORK": str(work), "MA_TEST_DATA": str(work / "subset.json"),
           "MA_TEST_TOKENS": str(work / "tokens.pt")}
    return run_dist_module(WORKER, nproc=2, env=env)


@pytest.mark.parametrize("case", dist_cases(WORKER))
def test_trainer_case(results, case):
    results.check(case)


@pytest.mark.parametrize("run", ["tp2", "pp2", "dp2"])
def test_exported_model_matches_trained_megatron_model(results, work, run):
    """The HF export of the final checkpoint computes the trained Megatron model's logits."""
    from transformers import AutoModelForCausalLM

    results.check(f"case_dpo_{run}_learns")
    saved = torch.load(work / f"{run}_logits.pt")
    out = work / f"{run}_hf"
    subprocess.run([sys.executable, "tools/convert_mcore_to_hf.py", "--ckpt", saved["save"], "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(saved["tokens"]).logits
    scale = ref.abs().max()
    assert (saved["logits"] - ref).abs().max() / scale < 1e-4
    # And training moved the weights: the base model's logits differ.
    base = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (base(saved["tokens"]).logits - ref).abs().max() / scale > 1e-3
