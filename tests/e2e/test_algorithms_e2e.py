"""Every seed objective (sft, dpo, kto, cpo, orpo, simpo, rm) through the one trainer.

One 2-rank torchrun launch runs tests/distributed/workers/algorithms_worker.py: each
objective trains at TP=2 and at PP=2 on small subsets of the real data (loss falls, the
objective's own metric improves), the RM also on a learnable task with held-out pairs.
Here: the step-1 loss of every objective is recomputed from `transformers` forward passes
of the same HF model on the same tokenised batch, with each formula written out below
(not calling mcore_align.algorithms); and the RM's HF exports score like Megatron.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import ROOT, shared_data_dir
from tests.dist_utils import dist_cases, run_dist_module

WORKER = "tests.distributed.workers.algorithms_worker"
DATA = shared_data_dir()
pytestmark = pytest.mark.skipif(not (DATA / "dpo_en_demo.json").exists(), reason=f"shared data not found at {DATA}")


def _shortest(name: str, n: int = 16) -> list:
    recs = json.loads((DATA / name).read_text())
    recs.sort(key=lambda r: len(json.dumps(r)))
    return recs[:n]


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
    """Per sequence of the dumped global batch: role, pair index, KTO label, float64 sum of
    log-probs over loss tokens and their count (or, with a value head, the reward)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(work / hf_dir, dtype=torch.float64).eval()
    rows = []
    for mb in batch["micro_batches"]:
        tok, lab, mask = (mb[k].reshape(-1) for k in ("tokens", "labels", "loss_mask"))
        cu, lens = mb["cu_seqlens"].tolist(), mb["seq_lengths"].tolist()
        for i, n in enumerate(lens):
            a = cu[i]
            ids = tok[a:a + n][None]
            with torch.no_grad():
                if value_head is not None:  # reward: value head on the final hidden state of the last token
                    h = model.model(ids).last_hidden_state[0, n - 1]
                    s, c = float(h @ value_head[0].double()), 1.0
                else:
                    logp = F.log_softmax(model(ids).logits[0].double(), -1)
                    tgt, m = lab[a:a + n], mask[a:a + n].bool()
                    lp = logp.gather(-1, tgt[:, None])[:, 0]
                    s, c = float(lp[m].sum()), float(m.sum())
            rows.append({"role": int(mb["seq_role"][i]), "pair": int(mb["pair_index"][i]),
                         "label": bool(mb["kto_label"][i]), "sum": s, "count": c})
    return rows


def _pairs(rows):
    by = {}
    for r in rows:
        by.setdefault(r["pair"], {})[r["role"]] = r
    keys = sorted(by)
    t = lambda role, f: torch.tensor([by[k][role][f] for k in keys], dtype=torch.float64)  # noqa: E731
    return t(0, "sum"), t(1, "sum"), t(0, "count"), t(1, "count")


def _expected_loss(algo, rows, ref_rows=None):
    """The objective from float64 per-sequence stats; ``ref_rows``: the reference model's
    stats of the same sequences (None: the reference is the policy, as at step 1)."""
    ls = F.logsigmoid
    ref_rows = ref_rows or rows
    if algo == "sft":
        return -sum(r["sum"] for r in rows) / sum(r["count"] for r in rows)
    if algo == "kto":  # beta 0.1, weights 1 (KTO paper Eq. 8, TRL's kto_loss)
        beta = 0.1
        pol = torch.tensor([r["sum"] for r in rows if r["role"] == 2], dtype=torch.float64)
        ref = torch.tensor([r["sum"] for r in ref_rows if r["role"] == 2], dtype=torch.float64)
        kl_pol = torch.tensor([r["sum"] for r in rows if r["role"] == 3], dtype=torch.float64)
        kl_ref = torch.tensor([r["sum"] for r in ref_rows if r["role"] == 3], dtype=torch.float64)
        assert len(kl_pol) == len(pol)
        z0 = max(0.0, float((kl_pol - kl_ref).mean()))  # detached reference point, clamped at 0
        lab = torch.tensor([r["label"] for r in rows if r["role"] == 2])
        logr = pol - ref
        per = torch.where(lab, 1 - torch.sigmoid(beta * (logr - z0)), 1 - torch.sigmoid(beta * (z0 - logr)))
        return float(per.mean())
    pc, pr, nc, nr = _pairs(rows)
    if algo == "rm":
        return float(-ls(pc - pr).mean())
    nll = float(-pc.sum() / nc.sum())  # token-mean NLL of the chosen responses
    if algo == "dpo":  # beta 0.1, rpo_alpha 1.0
        rc, rr, _, _ = _pairs(ref_rows)
        return float(-ls(0.1 * ((pc - rc) - (pr - rr))).mean()) + 1.0 * nll
    if algo == "cpo":  # beta 0.1, cpo_alpha 1.0
        return float(-ls(0.1 * (pc - pr)).mean()) + 1.0 * nll
    ac, ar = pc / nc, pr / nr
    if algo == "orpo":  # beta 0.1
        log_odds = (ac - ar) - (torch.log1p(-torch.exp(ac)) - torch.log1p(-torch.exp(ar)))
        return nll - 0.1 * float(ls(log_odds).mean())
    if algo == "simpo":  # beta 2.0, gamma 1.0, cpo_alpha 1.0
        return float(-ls(2.0 * (ac - ar) - 1.0).mean()) + 1.0 * nll
    raise AssertionError(algo)


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
