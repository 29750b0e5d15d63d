"""LoRA DPO end to end (TP=2, PP=2, TP=2+SP), resume, and merged / PEFT export vs `transformers`.

One 2-rank torchrun launch runs every case of tests/distributed/workers/lora_worker.py;
the exports and the `transformers` / `peft` comparisons run here.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, shared_data_dir
from tests.dist_utils import dist_cases, run_dist_module

WORKER = "tests.distributed.workers.lora_worker"
DATA = shared_data_dir() / "dpo_en_demo.json"
pytestmark = pytest.mark.skipif(not DATA.exists(), reason=f"shared preference data not found at {DATA}")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from mcore_align.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("lora_e2e")
    hf = make_tiny_model(root / "hf", "qwen2", num_layers=2, hidden_size=64, vocab_size=512)
    subprocess.run([sys.executable, "tools/convert_hf_to_mcore.py", "--hf", str(hf), "--out", str(root / "mcore")],
                   cwd=ROOT, check=True, capture_output=True)
    torch.manual_seed(0)
    torch.save(torch.randint(0, 512, (2, 24)), root / "tokens.pt")
    recs = json.loads(DATA.read_text())
    recs.sort(key=lambda r: len(json.dumps(r)))
    (root / "subset.json").write_text(json.dumps(recs[:16]))
    return root


@pytest.fixture(scope="module")
def results(work):
    env = {"MA_TEST_CKPT": str(work / "mcore"), "MA_TEST_WORK": str(work), "MA_TEST_DATA": str(work / "subset.json"),
           "MA_TEST_TOKENS": str(work / "tokens.pt")}
    return run_dist_module(WORKER, nproc=2, env=env)


@pytest.mark.parametrize("case", dist_cases(WORKER))
def test_lora_case(results, case):
    results.check(case)


def _export(saved: str, out, mode: str) -> None:
    proc = subprocess.run([sys.executable, "tools/convert_mcore_to_hf.py", "--ckpt", saved, "--out", str(out),
                           "--lora", mode], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.parametrize("run", ["tp2", "pp2"])
def test_merged_and_peft_exports_match_megatron(results, work, run):
    """Merged HF weights and base + PEFT adapters both compute the trained Megatron model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    results.check(f"case_lora_dpo_{run}_learns")
    saved = torch.load(work / f"{run}_logits.pt")
    tokens, expected = saved["tokens"], saved["logits"]
    scale = expected.abs().max()

    _export(saved["save"], work / f"{run}_merged", "merged")
    merged = AutoModelForCausalLM.from_pretrained(work / f"{run}_merged", dtype=torch.float32).eval()
    _export(saved["save"], work / f"{run}_peft", "peft")
    cfg = json.loads((work / f"{run}_peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and set(cfg["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    base = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(tokens).logits
    peft = PeftModel.from_pretrained(base, work / f"{run}_peft").eval()
    with torch.no_grad():
        got_merged = merged(tokens).logits
        got_peft = peft(tokens).logits
    assert (got_merged - expected).abs().max() / scale < 1e-4
    assert (got_peft - expected).abs().max() / scale < 1e-4
    # Training moved the adapters: the base model's logits differ.
    assert (base_logits - expected).abs().max() / scale > 1e-3
