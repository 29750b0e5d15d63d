"""Every seed objective through the one trainer, on 2 gloo ranks (TP=2 and PP=2).

The pytest side (tests/e2e/test_algorithms_e2e.py) converts a tiny HF model, writes small
subsets of the real data and the RM task, and afterwards checks the step-1 losses against
`transformers` and the RM exports against the scores dumped here.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from mcore_align.config import build_config
from mcore_align.trainer.trainer import Trainer

CKPT = os.environ.get("MA_TEST_CKPT", "")
WORK = Path(os.environ.get("MA_TEST_WORK", "/tmp/ma_algorithms_worker"))
DATA = {k: os.environ.get(f"MA_TEST_DATA_{k.upper()}", "") for k in ("paired", "kto", "sft", "task")}

# Objective -> (data, hyperparameters of examples/configs/<algo>.yaml that matter here).
ALGOS = {
    "sft": ("sft", {}),
    "dpo": ("paired", {"beta": 0.1, "rpo_alpha": 1.0}),
    "kto": ("kto", {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0}),
    "cpo": ("paired", {"beta": 0.1, "cpo_alpha": 1.0}),
    "orpo": ("paired", {"beta": 0.1}),
    "simpo": ("paired", {"beta": 2.0, "simpo_gamma": 1.0, "cpo_alpha": 1.0}),
    "rm": ("paired", {}),
}
LAYOUTS = {"tp2": ["tensor_model_parallel_size=2"], "pp2": ["pipeline_model_parallel_size=2"]}


def _cfg(algo: str, save: str | None, *overrides: str, data: str | None = None):
    kind, params = ALGOS[algo]
    raw = {
        "model": {"load": CKPT},
        "data": {"dataset": [data or DATA[kind]], "max_length": 320, "truncation_strategy": "right",
                 "max_tokens_per_micro_batch": 1280, "cache_dir": str(WORK / "cache")},
        "optim": {"learning_rate": 1e-3, "lr_decay_style": "constant", "clip_grad": 1.0},
        "train": {"global_batch_size": 8, "train_iters": 8, "device": "cpu", "progress_bar": False,
                  "save": save, "plot": False, "seed": 7},
        "algo": {"rlhf_type": algo, "params": params},
    }
    return build_config(raw, overrides)


def _save_dir(name: str) -> str:
    path = WORK / name
    if dist.get_rank() == 0 and path.exists():
        import shutil

        shutil.rmtree(path)
    dist.barrier()
    return str(path)


def _mean(h, key, sl):
    return sum(x[key] for x in h[sl]) / len(h[sl])


def _dump_first_batch(tr: Trainer, name: str) -> None:
    """The step-1 global batch (this DP rank holds all of it at DP=1) for the HF check."""
    state = tr.data.train.state_dict()
    gb = next(tr.data.train)
    tr.data.train.load_state_dict(state)
    if dist.get_rank() != 0:
        return
    from mcore_align.models.heads import value_head_weight

    head = value_head_weight([m.module for m in tr.policy])
    torch.save({"micro_batches": [asdict(mb) for mb in gb.micro_batches], "counts": gb.counts_dict(),
                "value_head": head.detach().clone() if head is not None else None},
               WORK / f"{name}_batch.pt")


# CPO's reward is the raw sequence log-prob sum (hundreds of nats here): its per-batch loss
# swings with which pairs are drawn, so it sees the whole subset every step.
EXTRA = {"cpo": ["global_batch_size=15"]}  # the 15 records the pipeline keeps


def _train(algo: str, layout: str, save: bool = False) -> dict:
    name = f"{algo}_{layout}"
    tr = Trainer(_cfg(algo, _save_dir(name) if save else None, *LAYOUTS[layout], *EXTRA.get(algo, [])))
    # No reference model is built for reference-free objectives (and no reference pass runs).
    assert (tr.reference is not None) == tr.objective.needs_reference, (algo, tr.reference)
    if layout == "tp2":
        _dump_first_batch(tr, name)
    if not tr.objective.needs_reference:
        def no_reference(*a, **k):
            raise AssertionError(f"{algo}: reference pass on a reference-free objective")

        tr.stepper.reference_sums = no_reference
    h = tr.train()["history"]
    if dist.get_rank() == 0:
        (WORK / f"{name}_history.json").write_text(json.dumps(h))
    assert all(math.isfinite(x["loss"]) and math.isfinite(x["grad_norm"]) for x in h), h
    first, last = h[0]["loss"], _mean(h, "loss", slice(-3, None))
    assert last < first - 0.05 * max(1.0, abs(first)), f"{name}: loss did not fall: {[round(x['loss'], 4) for x in h]}"
    return {"history": h, "trainer": tr}


def _check_paired_accuracy(name, h):
    a0, a1 = _mean(h, "rewards/accuracies", slice(0, 3)), _mean(h, "rewards/accuracies", slice(-3, None))
    assert a1 > a0 + 0.15 or a1 >= 0.95, f"{name}: accuracy did not rise: {[x['rewards/accuracies'] for x in h]}"


def _paired_case(algo: str, layout: str):
    h = _train(algo, layout, save=algo == "rm" and layout == "tp2")["history"]
    if algo == "cpo":
        # Raw-sum rewards: most pairs start separated by length alone (accuracy ~0.7); the hard
        # ones (long chosen) need more than 8 steps, so the improving metric is the margin.
        m0, m1 = h[0]["rewards/margins"], _mean(h, "rewards/margins", slice(-3, None))
        assert m1 > m0 + 1.0, [x["rewards/margins"] for x in h]
        assert h[-1]["rewards/accuracies"] >= h[0]["rewards/accuracies"], [x["rewards/accuracies"] for x in h]
    else:
        _check_paired_accuracy(f"{algo}_{layout}", h)


def case_reference_objectives_first_step_with_another_reference():
    """DPO and KTO with model.ref_load = a different model: at step 1 the preference terms are
    not trivial (policy != reference); the pytest side recomputes them from transformers."""
    for algo in ("dpo", "kto"):
        name = f"{algo}_otherref"
        tr = Trainer(_cfg(algo, None, "train_iters=1", "tensor_model_parallel_size=2",
                          f"model.ref_load={os.environ['MA_TEST_REF_CKPT']}"))
        _dump_first_batch(tr, name)
        h = tr.train()["history"]
        if dist.get_rank() == 0:
            (WORK / f"{name}_history.json").write_text(json.dumps(h))


def case_sft_tp2():
    h = _train("sft", "tp2")["history"]
    assert h[-1]["nll_loss"] < h[0]["nll_loss"] - 0.3, [x["nll_loss"] for x in h]


def case_sft_pp2():
    h = _train("sft", "pp2")["history"]
    assert h[-1]["nll_loss"] < h[0]["nll_loss"] - 0.3, [x["nll_loss"] for x in h]


def _kto_case(layout: str):
    h = _train("kto", layout)["history"]
    # Desirable rewards rise above undesirable ones (rewards are 0 at step 1: policy == reference).
    m0 = h[0]["rewards/chosen"] - h[0]["rewards/rejected"]
    m1 = _mean(h, "rewards/chosen", slice(-3, None)) - _mean(h, "rewards/rejected", slice(-3, None))
    assert abs(m0) < 1e-5 and m1 > 0.05, [(x["rewards/chosen"], x["rewards/rejected"], x["kl"]) for x in h]
    assert h[0]["kl"] == 0.0 and all(x["kl"] >= 0 for x in h)


def case_kto_tp2():
    _kto_case("tp2")


def case_kto_pp2():
    _kto_case("pp2")


def case_dpo_tp2():
    _paired_case("dpo", "tp2")


def case_dpo_pp2():
    _paired_case("dpo", "pp2")


def case_cpo_tp2():
    _paired_case("cpo", "tp2")


def case_cpo_pp2():
    _paired_case("cpo", "pp2")


def case_orpo_tp2():
    _paired_case("orpo", "tp2")


def case_orpo_pp2():
    _paired_case("orpo", "pp2")


def case_simpo_tp2():
    _paired_case("simpo", "tp2")


def case_simpo_pp2():
    _paired_case("simpo", "pp2")


def case_rm_tp2():
    _paired_case("rm", "tp2")


def case_rm_pp2():
    _paired_case("rm", "pp2")


def case_rm_resume_loads_head():
    """Resuming an RM run loads the trained head (not a fresh one)."""
    from mcore_align.models.heads import value_head_weight

    tr = Trainer(_cfg("rm", str(WORK / "rm_tp2"), "tensor_model_parallel_size=2", "train_iters=8"))
    assert tr.step == 8
    w = value_head_weight([m.module for m in tr.policy]).detach()
    fresh = torch.load(WORK / "rm_tp2_batch.pt")["value_head"]
    assert (w - fresh).abs().max() > 1e-3, "resumed head equals the fresh initialisation"
    # And the trained head is replicated: identical on both TP ranks.
    other = w.clone()
    dist.broadcast(other, src=0)
    torch.testing.assert_close(w, other, rtol=0, atol=0)


def case_rm_learns_held_out_task():
    """RM on the demo's learnable preference task: held-out accuracy rises clearly (DP=2).
    Then the Megatron scores of held-out pairs at TP=2 and PP=2 are dumped for the export check."""
    save = _save_dir("rm_task")
    tr = Trainer(_cfg("rm", save, "train_iters=16", "learning_rate=5e-4", "eval_interval=16", "eval_iters=4",
                      "val_fraction=0.25", "global_batch_size=16", data=DATA["task"]))
    res = tr.train()
    if dist.get_rank() == 0:
        (WORK / "rm_task_history.json").write_text(json.dumps(res["history"]))
    evals = [json.loads(x) for x in (Path(save) / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if "eval/rewards/accuracies" in e]
    a0, a1 = evals[0]["eval/rewards/accuracies"], evals[-1]["eval/rewards/accuracies"]
    assert a1 >= 0.9 and a1 > a0 + 0.2, (a0, a1)
    from mcore_align.parallel.runtime import ParallelConfig, initialize
    from mcore_align.score import score_megatron

    for layout, par in {"tp2": ParallelConfig(tensor_model_parallel_size=2),
                        "pp2": ParallelConfig(pipeline_model_parallel_size=2)}.items():
        rt = initialize(par, device="cpu", seed=1)
        scores = score_megatron(save, [os.environ["MA_TEST_HELDOUT"]], rt, paired=True, max_length=320,
                                cache_dir=str(WORK / "cache"))
        if dist.get_rank() == 0:
            (WORK / f"rm_scores_{layout}.json").write_text(json.dumps(scores))


def case_rm_sequence_parallel_matches_tp2():
    """With sequence parallelism the head sees S/TP positions per rank; its grads are summed
    over TP by finalize_model_grads (param.sequence_parallel). Same trajectory as plain TP=2."""
    tr = Trainer(_cfg("rm", None, "tensor_model_parallel_size=2", "sequence_parallel=true", "train_iters=4"))
    sp = tr.train()["history"]
    ref = json.loads((WORK / "rm_tp2_history.json").read_text())[:4]
    # The pre-clip grad norm too: a head gradient not summed over TP (or summed twice) would
    # hardly show in the losses after clipping, but it changes the norm.
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor([x[key] for x in sp], dtype=torch.float64),
                                   torch.tensor([x[key] for x in ref], dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
