"""Trainer end to end on 2 gloo ranks: every case builds a `Trainer` with its own layout.

The pytest side (tests/e2e/test_trainer_e2e.py) converts a tiny HF model once and
passes paths through the environment; exports and HF comparisons happen there.
"""
from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from mcore_align.config import build_config
from mcore_align.trainer import checkpointing
from mcore_align.trainer.trainer import TooManyNonFinite, Trainer

CKPT = os.environ.get("MA_TEST_CKPT", "")
WORK = Path(os.environ.get("MA_TEST_WORK", "/tmp/ma_trainer_worker"))
DATA = os.environ.get("MA_TEST_DATA", "")
TOKENS = Path(os.environ.get("MA_TEST_TOKENS", "/nonexistent"))


def _cfg(save: str | None, *overrides: str):
    raw = {
        "model": {"load": CKPT},
        "data": {"dataset": [DATA], "max_length": 320, "truncation_strategy": "right", "max_tokens_per_micro_batch": 1280,
                 "cache_dir": str(WORK / "cache")},
        "optim": {"learning_rate": 1e-3, "lr_decay_style": "constant", "clip_grad": 1.0},
        "train": {"global_batch_size": 8, "train_iters": 10, "device": "cpu", "progress_bar": False,
                  "save": save, "plot": False, "seed": 7},
        "algo": {"rlhf_type": "dpo", "beta": 0.1, "rpo_alpha": None},
    }
    return build_config(raw, overrides)


def _save_dir(name: str) -> str:
    path = WORK / name
    if dist.get_rank() == 0 and path.exists():
        import shutil

        shutil.rmtree(path)
    dist.barrier()
    return str(path)


def _losses(result) -> list[float]:
    return [h["loss"] for h in result["history"]]


def _train_and_check_learning(name: str, *layout: str, dump_logits: bool = True) -> None:
    save = _save_dir(name)
    tr = Trainer(_cfg(save, *layout))
    res = tr.train()
    h = res["history"]
    first_loss, last_loss = h[0]["loss"], sum(x["loss"] for x in h[-3:]) / 3
    first_acc = sum(x["rewards/accuracies"] for x in h[:3]) / 3
    last_acc = sum(x["rewards/accuracies"] for x in h[-3:]) / 3
    assert last_loss < first_loss - 0.1, f"{name}: loss did not fall: {[round(x['loss'], 4) for x in h]}"
    assert last_acc > first_acc + 0.2, f"{name}: reward accuracy did not rise: {[x['rewards/accuracies'] for x in h]}"
    assert all(math.isfinite(x["grad_norm"]) for x in h)
    if dist.get_rank() == 0:
        (WORK / f"{name}_losses.json").write_text(json.dumps(_losses(res)))
        (WORK / f"{name}_grad_norms.json").write_text(json.dumps([x["grad_norm"] for x in h]))
    if not dump_logits:
        return
    # Logits of the trained model on fixed tokens, for the HF comparison on the pytest side.
    from mcore_align.checkpoint.verify import megatron_logits

    tokens = torch.load(TOKENS)
    logits = megatron_logits([m.module for m in tr.policy], tokens, tr.rt)
    if logits is not None and tr.rt.pgs.tp.rank() == 0 and tr.rt.dp_rank == 0:  # the last stage holds them
        torch.save({"tokens": tokens, "logits": logits, "save": save}, WORK / f"{name}_logits.pt")


def case_dpo_tp2_learns():
    _train_and_check_learning("tp2", "tensor_model_parallel_size=2")


def case_dpo_pp2_learns():
    _train_and_check_learning("pp2", "pipeline_model_parallel_size=2")


def case_dpo_dp2_learns():
    _train_and_check_learning("dp2")


def case_resume_at_another_layout():
    """The TP=2 run's checkpoint resumes at PP=2 (weights, optimizer state, data position)."""
    import shutil

    src, dst = WORK / "tp2", WORK / "tp2_to_pp2"
    if dist.get_rank() == 0:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
    dist.barrier()
    tr = Trainer(_cfg(str(dst), "pipeline_model_parallel_size=2", "train_iters=12"))
    assert tr.step == 10, tr.step
    # The resumed model is the trained one: its loss on the next batch is far below ln 2.
    res = tr.train()
    assert res["step"] == 12 and all(math.isfinite(h["loss"]) for h in res["history"])
    assert res["history"][0]["loss"] < 0.6, res["history"]


def case_dpo_cp2_learns():
    # Context parallelism: every sequence split in 2*CP chunks over the two ranks.
    _train_and_check_learning("cp2", "context_parallel_size=2", dump_logits=False)


def case_layouts_give_same_losses():
    """Same global batches, same maths: only fp32 summation order differs. The pre-clip grad
    norm is compared too: with Adam and clipping a 2x gradient error from a DP or CP reduction
    barely moves the losses, but it doubles the norm (tests/e2e/test_grad_norm_e2e.py checks
    every objective against an unsharded run)."""
    for key in ("losses", "grad_norms"):
        runs = {n: torch.tensor(json.loads((WORK / f"{n}_{key}.json").read_text()), dtype=torch.float64)
                for n in ("tp2", "pp2", "dp2", "cp2")}
        for n in ("pp2", "dp2", "cp2"):
            # rtol 1e-5 over the first 3 steps (measured <= 3.4e-6); over 10 steps the trajectories
            # drift apart slowly through Adam (measured <= 3.8e-5, CP on the shared data): 3e-4.
            torch.testing.assert_close(runs[n][:3], runs["tp2"][:3], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{n} {key}: {m}")
            torch.testing.assert_close(runs[n], runs["tp2"], rtol=3e-4, atol=1e-6, msg=lambda m: f"{n} {key}: {m}")


def case_resume_is_exact():
    save_a = _save_dir("resume_a")
    full = _losses(Trainer(_cfg(save_a, "train_iters=4", "tensor_model_parallel_size=2")).train())
    save_b = _save_dir("resume_b")
    first = Trainer(_cfg(save_b, "train_iters=4", "exit_after_steps=2", "tensor_model_parallel_size=2")).train()
    assert first["stopped"] and first["step"] == 2
    second = Trainer(_cfg(save_b, "train_iters=4", "tensor_model_parallel_size=2"))
    assert second.step == 2, second.step
    rest = _losses(second.train())
    torch.testing.assert_close(torch.tensor(_losses(first) + rest), torch.tensor(full), rtol=0, atol=1e-6)


def case_outputs_metrics_plot_and_pruning():
    """What the user sees: metrics.jsonl with the required keys (train and eval/), the PNG plot,
    TensorBoard scalars, the data report, and save_total_limit pruning with the latest marker
    on the last save."""
    save = _save_dir("outputs")
    Trainer(_cfg(save, "train_iters=6", "save_interval=2", "save_total_limit=2", "plot=true", "tensorboard=true",
                 "val_fraction=0.25", "eval_interval=3", "eval_iters=1")).train()
    if dist.get_rank() != 0:
        return
    root = Path(save)
    assert sorted(p.name for p in root.glob("iter_*")) == ["iter_0000004", "iter_0000006"]
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    rows = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    need = {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "rewards/chosen", "rewards/rejected",
            "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"}
    assert all(need <= set(r) for r in train), [sorted(need - set(r)) for r in train]
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6], rows
    assert {"eval/rewards/accuracies", "eval/rewards/margins", "eval/logps/chosen"} <= set(evals[0])
    assert (root / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((root / "data_report.json").read_text())
    assert report["train_records"] + report["eval_records"] == report["records_kept"] > 0
    # TensorBoard: the same scalars, read back with tensorboard's own reader.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(root / "tensorboard"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"loss", "rewards/accuracies", "eval/rewards/accuracies"} <= tags, sorted(tags)
    assert [e.step for e in ea.Scalars("loss")] == [1, 2, 3, 4, 5, 6]
    assert abs(ea.Scalars("loss")[0].value - train[0]["loss"]) < 1e-6


def case_sigterm_checkpoints_and_resumes():
    save = _save_dir("sigterm")
    tr = Trainer(_cfg(save, "train_iters=4"))
    orig = tr.stepper.train_step

    def step_then_signal(*a, **k):
        out = orig(*a, **k)
        if dist.get_rank() == 1 and tr.step == 0:  # only one rank is signalled, like a partial preemption
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    tr.stepper.train_step = step_then_signal
    res = tr.train()
    assert res["stopped"] and res["step"] == 1, res["step"]
    assert checkpointing.latest_checkpoint(save).name == "iter_0000001"
    again = Trainer(_cfg(save, "train_iters=4"))
    assert again.step == 1
    assert again.train()["step"] == 4


def case_crash_mid_save_keeps_previous():
    from megatron.core import dist_checkpointing

    save = _save_dir("crash")
    Trainer(_cfg(save, "train_iters=2")).train()  # complete checkpoint at step 2
    tr = Trainer(_cfg(save, "train_iters=4"))
    real_save = dist_checkpointing.save

    def crashing_save(state, ckpt_dir, *a, **k):
        # Half a checkpoint on disk (a torn shard file, no metadata), then the failure.
        (Path(ckpt_dir) / f"__{dist.get_rank()}_0.distcp").write_bytes(b"\x00" * 1000)
        raise OSError("disk full (simulated)")

    dist_checkpointing.save = crashing_save
    try:
        tr.train()
        raise AssertionError("save should have failed")
    except OSError:
        pass
    finally:
        dist_checkpointing.save = real_save
    dist.barrier()
    assert (Path(save) / "iter_0000004").exists()  # the torn save is there...
    assert checkpointing.latest_checkpoint(save).name == "iter_0000002"  # ...but not "latest"
    resumed = Trainer(_cfg(save, "train_iters=4"))
    assert resumed.step == 2
    resumed.train()  # saving step 4 again replaces the torn directory
    assert checkpointing.latest_checkpoint(save).name == "iter_0000004"
    assert Trainer(_cfg(save, "train_iters=4")).step == 4


def case_precompute_equals_co_resident():
    # DP=2, then PP=2 with an eval split (eval also uses the precomputed reference sums,
    # and non-last stages hold no sums).
    for extra in ((), ("pipeline_model_parallel_size=2", "val_fraction=0.2", "eval_interval=2")):
        ra = Trainer(_cfg(None, "train_iters=3", "ref_model=co_resident", *extra)).train()
        rb = Trainer(_cfg(None, "train_iters=3", "ref_model=precompute", *extra)).train()
        torch.testing.assert_close(torch.tensor(_losses(ra)), torch.tensor(_losses(rb)), rtol=0, atol=1e-6)
    assert rb["eval"] and set(ra["eval"]) == set(rb["eval"]), (ra.get("eval"), rb.get("eval"))
    for k in ra["eval"]:
        assert abs(ra["eval"][k] - rb["eval"][k]) < 1e-6, (k, ra["eval"], rb["eval"])


def case_fused_logprobs_equal_logits_path():
    # The fused head (hidden states out, output-layer matmul inside the log-prob kernel) and the
    # logits path give the same training run: TP=2 with sequence parallelism, and PP=2.
    for layout in (("tensor_model_parallel_size=2", "sequence_parallel=true"), ("pipeline_model_parallel_size=2",)):
        runs = {}
        for fused in ("true", "false"):
            res = Trainer(_cfg(None, "train_iters=3", f"fused_logprobs={fused}", *layout)).train()
            runs[fused] = ([h["loss"] for h in res["history"]], [h["grad_norm"] for h in res["history"]])
        torch.testing.assert_close(torch.tensor(runs["true"][0]), torch.tensor(runs["false"][0]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(runs["true"][1]), torch.tensor(runs["false"][1]), rtol=1e-4, atol=1e-6)


def case_step0_policy_equals_reference():
    # At step 0 the policy is the reference: DPO rewards are ~0 whatever the split.
    for mb_tokens in ("640", "2560"):
        tr = Trainer(_cfg(None, "train_iters=1", f"max_tokens_per_micro_batch={mb_tokens}"))
        gb = next(tr.data.train)
        m = tr.stepper.eval_step(gb)
        assert abs(m["rewards/chosen"]) < 1e-5 and abs(m["rewards/rejected"]) < 1e-5, m


def case_nan_steps_are_skipped_then_stop():
    tr = Trainer(_cfg(None, "train_iters=6", "max_consecutive_nan=2"))
    obj = tr.stepper.objective

    class NanObjective(type(obj)):  # the same declarations, a NaN loss
        def __call__(self, stats, counts):
            loss, metrics = super().__call__(stats, counts)
            return loss * float("nan"), metrics

    tr.stepper.objective = NanObjective(obj.cfg)
    try:
        tr.train()
        raise AssertionError("expected TooManyNonFinite")
    except TooManyNonFinite as e:
        assert "2 consecutive steps" in str(e)


def case_evaluate_tool():
    """mcore_align.evaluate: policy == reference gives zero rewards and loss ln 2; the trained
    TP=2 policy is preferred-consistent on its own training pairs."""
    from mcore_align.evaluate import evaluate

    common = ["tensor_model_parallel_size=2", "max_length=320", "truncation_strategy=right",
              "max_tokens_per_micro_batch=1280", "global_batch_size=8", "device=cpu",
              f"data.cache_dir={WORK / 'cache'}", "rpo_alpha=null"]
    same = evaluate(CKPT, CKPT, [DATA], common)
    assert abs(same["rewards/margins"]) < 1e-5 and abs(same["loss"] - math.log(2)) < 1e-5, same
    trained = evaluate(str(WORK / "tp2"), CKPT, [DATA], common)
    assert trained["rewards/accuracies"] > 0.7 and trained["rewards/margins"] > 0.1, trained
