"""Checkpoint / resume regressions through the real loop (2 ranks), then export.

One 2-rank torchrun launch runs every case of tests/distributed/workers/ckpt_worker.py;
the exports of the checkpoints it leaves (a relaunched finished run, a pruned resumed
run) run here with tools/convert_mcore_to_hf.py and are loaded by `transformers`.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, shared_data_dir
from tests.dist_utils import dist_cases, run_dist_module

WORKER = "tests.distributed.workers.ckpt_worker"
DATA = shared_data_dir() / "dpo_en_demo.json"
pytestmark = pytest.mark.skipif(not DATA.exists(), reason=f"shared preference data not found at {DATA}")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from mcore_align.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("ckpt_e2e")
    hf = make_tiny_model(root / "hf", "qwen2", num_layers=2, hidden_size=64, vocab_size=512)
    subprocess.run([sys.executable, "tools/convert_hf_to_mcore.py", "--hf", str(hf), "--out", str(root / "mcore")],
                   cwd=ROOT, check=True, capture_output=True)
    recs = json.loads(DATA.read_text())
    recs.sort(key=lambda r: len(json.dumps(r)))
    (root / "subset.json").write_text(json.dumps(recs[:16]))
    return root


@pytest.fixture(scope="module")
def results(work):
    env = {"MA_TEST_CKPT": str(work / "mcore"), "MA_TEST_WORK": str(work), "MA_TEST_DATA": str(work / "subset.json")}
    return run_dist_module(WORKER, nproc=2, env=env)


@pytest.mark.parametrize("case", dist_cases(WORKER))
def test_checkpoint_case(results, case):
    results.check(case)


@pytest.mark.parametrize("case,marker", [("case_finished_run_relaunch_keeps_checkpoint", "finished_save.txt"),
                                         ("case_pruned_resume_keeps_checkpoints_self_contained", "pruned_save.txt")])
def test_final_checkpoint_exports(results, work, case, marker):
    """The latest checkpoint of the save directory exports to an HF model with the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    results.check(case)
    save = Path((work / marker).read_text())
    out = work / f"{marker}_hf"
    p = subprocess.run([sys.executable, "tools/convert_mcore_to_hf.py", "--ckpt", str(save), "--out", str(out),
                        "--overwrite"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-4000:]
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32)
    tok, tok0 = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(work / "hf")
    assert tok("hello world").input_ids == tok0("hello world").input_ids
    # The exported weights are the trained ones (training moved them away from the base).
    w, w0 = hf.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight
    assert w.shape == w0.shape and (w - w0).abs().max() > 1e-6
