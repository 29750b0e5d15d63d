"""Every seed objective (sft, dpo, kto, cpo, orpo, simpo, rm) through the one trainer.

One 2-rank torchrun launch runs tests/distributed/workers/algorithms_worker.py: each
objective trains at TP=2 and at PP=2 on small subsets of the real data (loss falls, the
objective's own metric improves), the RM also on a learnable task with held-out pairs.
Here: the step-1 loss of every objective is recomputed from `transformers` forward passes
of the same HF model on the same tokenised batch, with each formula written out in
tests/e2e/hf_reference.py (not calling mcore_align.algorithms); and the RM's HF exports
score like Megatron. Without ../shared/data the records are generated (tests/conftest.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, e2e_records
from tests.dist_utils import dist_cases, run_dist_module
from tests.e2e.hf_reference import expected_loss, load_hf64, sequence_stats

WORKER = "tests.distributed.workers.algorithms_worker"


def _shortest(name: str, n: int = 16) -> list:
    """The shortest shared records, or generated ones of the same format (no ../shared)."""
    return e2e_records(name, n)[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from mcore_align.demo import make_task
    from mcore_align.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("algorithms_e2e")
    hf = make_tiny_model(root / "hf", "qwen2", num_layers=2, hidden_size=64, vocab_size=512)
    subprocess.run([sys.executable, "tools/convert_hf_to_mcore.py", "--hf", str(hf), "--out", str(root / "mcore")],
                   cwd=ROOT, check=True, capture_output=True)
    # Another random model of the same architecture: a reference that differs from the policy.
    ref = make_tiny_model(root / "hf_ref", "qwen2", num_layers=2, hidden_size=64, vocab_size=512, seed=1)
    subprocess.run([sys.executable, "tools/convert_hf_to_mcore.py", "--hf", str(ref), "--out", str(root / "mcore_ref")],
                   cwd=ROOT, check=True, capture_output=True)
    (root / "paired.json").write_text(json.dumps(_shortest("dpo_en_demo.json")))
    kto = _shortest("kto_en_demo.json")
    assert {r["label"] for r in kto} == {True, False}
    (root / "kto.json").write_text(json.dumps(kto))
    (root / "sft.json").write_text(json.dumps(_shortest("alpaca_en_demo.json")))
    make_task(root / "task.jsonl", 160, seed=0)
    make_task(root / "heldout.jsonl", 24, seed=99)
    return root


@pytest.fixture(scope="module")
def results(work):
    env = {"MA_TEST_CKPT": str(work / "mcore"), "MA_TEST_REF_CKPT": str(work / "mcore_ref"), "MA_TEST_WORK": str(work),
           "MA_TEST_DATA_PAIRED": str(work / "paired.json"), "MA_TEST_DATA_KTO": str(work / "kto.json"),
           "MA_TEST_DATA_SFT": str(work / "sft.json"), "MA_TEST_DATA_TASK": str(work / "task.jsonl"),
           "MA_TEST_HELDOUT": str(work / "heldout.jsonl")}
    return run_dist_module(WORKER, nproc=2, env=env)


@pytest.mark.parametrize("case", dist_cases(WORKER))
def test_algorithm_case(results, case):
    results.check(case)


# ---- step-1 loss from transformers -------------------------------------------------------
def _hf_sequence_stats(work, batch, value_head=None, hf_dir: str = "hf"):
    """Per-sequence float64 stats of the dumped global batch (see tests/e2e/hf_reference.py)."""
    return sequence_stats(load_hf64(work / hf_dir), batch, value_head=value_head)


def _expected_loss(algo, rows, ref_rows=None) -> float:
    return float(expected_loss(algo, rows, ref_rows))


@pytest.mark.parametrize("algo", ["sft", "dpo", "kto", "cpo", "orpo", "simpo", "rm"])
def test_first_step_loss_matches_transformers(results, work, algo):
    results.check(f"case_{algo}_tp2")
    batch = torch.load(work / f"{algo}_tp2_batch.pt")
    rows = _hf_sequence_stats(work, batch, value_head=batch["value_head"] if algo == "rm" else None)
    counts = batch["counts"]
    scored = [r for r in rows if r["role"] != 3]
    assert counts["num_sequences"] == len(scored)
    if algo != "rm":
        assert counts["num_tokens"] == sum(r["count"] for r in scored)
    expected = _expected_loss(algo, rows)
    logged = json.loads((work / f"{algo}_tp2_history.json").read_text())[0]["loss"]
    assert abs(logged - expected) <= 2e-5 * max(1.0, abs(expected)), (algo, logged, expected)


@pytest.mark.parametrize("algo", ["sft", "dpo", "kto", "cpo", "orpo", "simpo", "rm"])
def test_tp2_and_pp2_runs_agree(results, work, algo):
    """The two layouts train on the same global batches with the same maths: every step's loss
    and pre-clip grad norm agree up to fp32 summation order (tests/e2e/test_grad_norm_e2e.py
    also compares every layout with an unsharded run)."""
    results.check(f"case_{algo}_tp2")
    results.check(f"case_{algo}_pp2")
    runs = {lay: json.loads((work / f"{algo}_{lay}_history.json").read_text()) for lay in ("tp2", "pp2")}
    for key in ("loss", "grad_norm"):
        tp2, pp2 = (torch.tensor([x[key] for x in runs[lay]], dtype=torch.float64) for lay in ("tp2", "pp2"))
        # rtol 1e-5 over the first 3 steps (measured <= 2e-6); the two trajectories then drift
        # apart slowly through Adam (8.4e-6 by step 6 for DPO), so 1e-4 over all 8 steps.
        torch.testing.assert_close(pp2[:3], tp2[:3], rtol=1e-5, atol=1e-6, msg=lambda m: f"{algo} {key}: {m}")
        torch.testing.assert_close(pp2, tp2, rtol=1e-4, atol=1e-6, msg=lambda m: f"{algo} {key}: {m}")


@pytest.mark.parametrize("algo", ["dpo", "kto"])
def test_first_step_loss_with_another_reference_matches_transformers(results, work, algo):
    """model.ref_load: the reference is a different model, so the preference terms are live."""
    results.check("case_reference_objectives_first_step_with_another_reference")
    batch = torch.load(work / f"{algo}_otherref_batch.pt")
    rows = _hf_sequence_stats(work, batch)
    ref_rows = _hf_sequence_stats(work, batch, hf_dir="hf_ref")
    expected = _expected_loss(algo, rows, ref_rows)
    trivial = _expected_loss(algo, rows)  # what a reference == policy bug would log
    assert abs(expected - trivial) > 1e-3, (expected, trivial)
    logged = json.loads((work / f"{algo}_otherref_history.json").read_text())[0]["loss"]
    assert abs(logged - expected) <= 2e-5 * max(1.0, abs(expected)), (algo, logged, expected)


# ---- reward model export ---------------------------------------------------------------------
def test_rm_exports_score_like_megatron(results, work):
    """backbone + value_head.safetensors, and AutoModelForSequenceClassification, give the
    Megatron model's scores (dumped at TP=2 and PP=2) on held-out pairs."""
    from mcore_align.score import score_hf

    results.check("case_rm_learns_held_out_task")
    outs = {}
    for name, extra in (("backbone", []), ("seqcls", ["--sequence-classification"])):
        out = work / f"rm_hf_{name}"
        subprocess.run([sys.executable, "tools/convert_mcore_to_hf.py", "--ckpt", str(work / "rm_task"),
                        "--out", str(out), "--overwrite", *extra], cwd=ROOT, check=True, capture_output=True)
        outs[name] = out
    assert (outs["backbone"] / "value_head.safetensors").exists()
    cfg = json.loads((outs["seqcls"] / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForSequenceClassification"] and cfg["num_labels"] == 1
    assert cfg["pad_token_id"] is not None
    megatron = {k: torch.tensor(json.loads((work / f"rm_scores_{k}.json").read_text()), dtype=torch.float64)
                for k in ("tp2", "pp2")}
    torch.testing.assert_close(megatron["tp2"], megatron["pp2"], rtol=0, atol=1e-4)
    for name, out in outs.items():
        hf = torch.tensor(score_hf(out, [str(work / "heldout.jsonl")], paired=True, max_length=320,
                                   cache_dir=str(work / "cache")), dtype=torch.float64)
        torch.testing.assert_close(hf, megatron["tp2"], rtol=0, atol=1e-4, msg=name)
    # The RM separates held-out pairs it never trained on.
    acc = float((megatron["tp2"][:, 0] > megatron["tp2"][:, 1]).double().mean())
    assert acc >= 0.9, acc
    # The scoring CLI, on the HF export and (under torchrun, TP=2) on the Megatron checkpoint.
    env = {**os.environ, "MCORE_ALIGN_CACHE": str(work / "cli_cache"), "OMP_NUM_THREADS": "1"}
    common = ["--dataset", str(work / "heldout.jsonl"), "--pairs", "--max-length", "320"]
    runs = {"hf": [sys.executable, "-m", "mcore_align.score", "--hf", str(outs["seqcls"]), *common],
            "megatron": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "-m", "mcore_align.score",
                         "--ckpt", str(work / "rm_task"), "--tp", "2", "--device", "cpu", *common]}
    for name, cmd in runs.items():
        out = work / f"cli_scores_{name}.jsonl"
        proc = subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        got = torch.tensor([[r["chosen"], r["rejected"]] for r in rows], dtype=torch.float64)
        torch.testing.assert_close(got, megatron["tp2"], rtol=0, atol=1e-4, msg=name)
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        assert summary["records"] == len(rows) and abs(summary["accuracy"] - acc) < 1e-9, summary
