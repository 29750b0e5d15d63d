"""2-rank MoE cases: one converted checkpoint (EP=1) loads at EP=2, TP=2+SP and PP=2 and
matches transformers; bad layouts fail with their message.

The checkpoints are converted once by tests/distributed/test_moe_dist.py into
$MCA_MOE_ROOT/<name>/{hf,mc}. fp32; tolerance 1e-4 relative to the logit scale.
"""
import os
from pathlib import Path

import torch.distributed as dist

from mcore_align.checkpoint import read_model_spec
from mcore_align.checkpoint.verify import verify_checkpoint
from mcore_align.models.provider import ModelOptions, build_model
from mcore_align.parallel import ParallelConfig, initialize

ROOT = Path(os.environ.get("MCA_MOE_ROOT", "/nonexistent"))
TOL = 1e-4


def check(name: str, **layout) -> None:
    rt = initialize(ParallelConfig(**layout), device="cpu")
    res = verify_checkpoint(ROOT / name / "hf", ROOT / name / "mc", rt, seq_len=24, batch=2)
    assert res.ok(TOL), f"{name} {layout}: {res}"


def raises(fn, message: str) -> None:
    try:
        fn()
    except ValueError as e:
        assert message in str(e), f"expected {message!r} in {e!r}"
    else:
        raise AssertionError(f"no ValueError with {message!r}")


def case_qwen3_moe_ep2():
    check("qwen3_moe", expert_model_parallel_size=2)
    # Each rank really holds half of the 4 experts (global indices 2r, 2r+1).
    rt = initialize(ParallelConfig(expert_model_parallel_size=2), device="cpu")
    (model,) = build_model(read_model_spec(ROOT / "qwen3_moe" / "mc"), rt,
                           opts=ModelOptions(core_attention="megatron"))
    experts = model.decoder.layers[0].mlp.experts
    assert len(experts.local_experts) == 2 and experts.ep_group.size() == 2, experts


def case_qwen3_moe_nonorm_ep2():  # the other router convention, layer 0 dense
    check("qwen3_moe_nonorm", expert_model_parallel_size=2)


def case_mixtral_ep2():
    check("mixtral", expert_model_parallel_size=2)


def case_qwen2_moe_ep2():  # shared expert + sigmoid gate
    check("qwen2_moe", expert_model_parallel_size=2)


def case_qwen3_moe_tp2_sp():
    check("qwen3_moe", tensor_model_parallel_size=2, sequence_parallel=True)


def case_qwen2_moe_tp2_sp():
    check("qwen2_moe", tensor_model_parallel_size=2, sequence_parallel=True)


def case_qwen2_moe_pp2():  # stage 0 holds the dense layer, stage 1 the MoE layer
    check("qwen2_moe", pipeline_model_parallel_size=2)


# DeepSeek (multi-head latent attention with the packed core attention, sigmoid routing with
# expert bias and group-limited top-k, shared expert, layer 0 dense), same EP=1 checkpoints.
def case_deepseek_v3_ep2():
    check("deepseek_v3", expert_model_parallel_size=2)


def case_deepseek_v3_tp2_sp():  # q_a/kv_a down projections column-parallel, gathered over TP
    check("deepseek_v3", tensor_model_parallel_size=2, sequence_parallel=True)


def case_deepseek_v3_yarn_tp2_sp():  # no q compression (linear_q_proj), YaRN, rotate-half rope
    check("deepseek_v3_yarn", tensor_model_parallel_size=2, sequence_parallel=True)


def case_deepseek_v2_ep2():  # softmax, group_limited_greedy
    check("deepseek_v2", expert_model_parallel_size=2)


def case_deepseek_v3_pp2():  # stage 0: the dense first layer, stage 1: the MoE layer
    check("deepseek_v3", pipeline_model_parallel_size=2)


def case_tp2_without_sp_is_refused():
    rt = initialize(ParallelConfig(tensor_model_parallel_size=2), device="cpu")
    spec = read_model_spec(ROOT / "qwen3_moe" / "mc")
    raises(lambda: build_model(spec, rt, opts=ModelOptions(core_attention="megatron")),
           "MoE at tensor_model_parallel_size=2 needs sequence_parallel=True")


def case_expert_layout_must_divide_the_world():
    # ETP defaults to TP=2: ETP x EP x PP = 4 does not divide a world of 2.
    raises(lambda: initialize(ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True,
                                             expert_model_parallel_size=2), device="cpu"),
           "world size 2 is not divisible by expert_tensor_parallel_size x expert_model_parallel_size x "
           "pipeline_model_parallel_size = 4")


# -- DPO through the real trainer (tiny Qwen3-MoE) ---------------------------------------------
# DP=2 (EP=1) and DP=2 x EP=2 (each rank holds 2 of the 4 experts) must give the same losses and
# grad norms: same data, same order, only where the experts live differs.
def _train_dpo(name: str, *layout: str, save: str | None = None, model: str = "qwen3_moe",
               trainer_out: list | None = None) -> list[dict]:
    import json

    from mcore_align.config import build_config
    from mcore_align.trainer.trainer import Trainer
    from tests.dist_utils import SkipCase

    data = ROOT / "dpo_subset.json"
    if not data.exists():
        raise SkipCase("shared preference data (dpo_en_demo.json) not found")
    raw = {
        "model": {"load": str(ROOT / model / "mc")},
        "data": {"dataset": [str(data)], "max_length": 320, "truncation_strategy": "right",
                 "max_tokens_per_micro_batch": 1280, "cache_dir": str(ROOT / "cache")},
        "optim": {"learning_rate": 1e-3, "lr_decay_style": "constant", "clip_grad": 1.0},
        "train": {"global_batch_size": 8, "train_iters": 6, "device": "cpu", "progress_bar": False,
                  "save": save, "plot": False, "seed": 7},
        "algo": {"rlhf_type": "dpo", "beta": 0.1, "rpo_alpha": None},
    }
    tr = Trainer(build_config(raw, layout))
    history = tr.train()["history"]
    if trainer_out is not None:
        trainer_out.append(tr)
    if dist.get_rank() == 0:
        (ROOT / f"dpo_{name}.json").write_text(json.dumps(history))
    if save is not None:  # logits of the trained model, for the export check on the pytest side
        import torch

        from mcore_align.checkpoint.verify import megatron_logits

        tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
        logits = megatron_logits([m.module for m in tr.policy], tokens, tr.rt)
        if dist.get_rank() == 0:
            torch.save({"tokens": tokens, "logits": logits}, ROOT / f"dpo_{name}_logits.pt")
    return history


def case_dpo_moe_dp2():
    _train_dpo("dp2")


def case_dpo_moe_ep2_matches_dp2():
    import json
    import math

    # Saved at EP=2: tests/distributed/test_moe_dist.py exports it (experts by global index).
    ep = _train_dpo("ep2", "expert_model_parallel_size=2", save=str(ROOT / "dpo_ep2_save"))
    dp = json.loads((ROOT / "dpo_dp2.json").read_text())
    assert len(ep) == len(dp) == 6
    for a, b in zip(dp, ep):
        # moe/load_imbalance: the routers' tokens per expert summed over ranks; EP moves experts,
        # not tokens, so it equals DP=2's (a count taken per rank and not summed would not).
        for key in ("loss", "grad_norm", "moe/load_imbalance", "moe/load_imbalance_max"):
            assert math.isfinite(b[key]) and abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (key, dp, ep)
    assert ep[-1]["loss"] < ep[0]["loss"] - 0.1, [x["loss"] for x in ep]
    # 4 experts, top-2: 1 (balanced) <= max load / mean load <= 2 (every token on the same 2).
    assert all(1.0 <= x["moe/load_imbalance"] <= x["moe/load_imbalance_max"] <= 2.0 for x in ep), ep
    rows = [json.loads(x) for x in (ROOT / "dpo_ep2_save" / "metrics.jsonl").read_text().splitlines()]
    assert [r["moe/load_imbalance"] for r in rows if "loss" in r] == [x["moe/load_imbalance"] for x in ep], rows


def case_dpo_deepseek_v3_ep2_matches_dp2():
    """DPO on the tiny DeepSeek-V3 (packed THD batches through MLA's packed core attention):
    DP=2 and DP=2 x EP=2 give the same losses and pre-clip grad norms over 3 steps, and the
    routing bias stays the checkpoint's (transformers never updates e_score_correction_bias;
    megatron's update runs with rate 0)."""
    import math

    from safetensors.torch import load_file

    runs = {}
    for name, layout in (("dsv3_dp2", ()), ("dsv3_ep2", ("expert_model_parallel_size=2",))):
        trainers: list = []
        runs[name] = _train_dpo(name, *layout, "train_iters=3", model="deepseek_v3", trainer_out=trainers)
        hf = load_file(ROOT / "deepseek_v3" / "hf" / "model.safetensors")
        bias = hf["model.layers.1.mlp.gate.e_score_correction_bias"]
        router = trainers[0].policy[0].module.decoder.layers[1].mlp.router
        assert router.expert_bias.dtype == bias.dtype and (router.expert_bias == bias).all(), name
    dp, ep = runs["dsv3_dp2"], runs["dsv3_ep2"]
    assert len(dp) == len(ep) == 3
    for a, b in zip(dp, ep):
        for key in ("loss", "grad_norm"):
            assert math.isfinite(b[key]) and abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (key, dp, ep)
    assert all(x["grad_norm"] > 0 for x in dp), dp


# -- DPO and RM learn at EP=2 (the demo's learnable preference task, held-out topics) ----------
def _train_task(algo: str, params: dict, *extra: str) -> list[dict]:
    """``algo`` at EP=2 on the demo task (mcore_align/demo.py make_task, written by the pytest
    side: 160 training pairs, 24 held-out pairs on topics never trained on); returns the eval
    rows of metrics.jsonl (step 0 first: before any update)."""
    import json
    import shutil

    from mcore_align.config import build_config
    from mcore_align.trainer.trainer import Trainer

    save = ROOT / f"task_{algo}_ep2"
    if dist.get_rank() == 0 and save.exists():
        shutil.rmtree(save)
    dist.barrier()
    raw = {
        "model": {"load": str(ROOT / "qwen3_moe" / "mc")},
        "data": {"dataset": [str(ROOT / "task.jsonl")], "val_dataset": [str(ROOT / "heldout.jsonl")],
                 "max_length": 64, "max_tokens_per_micro_batch": 512, "cache_dir": str(ROOT / "cache")},
        "optim": {"learning_rate": 2e-3, "lr_decay_style": "constant", "clip_grad": 1.0},
        "train": {"global_batch_size": 16, "train_iters": 12, "eval_interval": 12, "eval_iters": 2,
                  "device": "cpu", "progress_bar": False, "save": str(save), "save_interval": 1000,
                  "plot": False, "seed": 7},
        "algo": {"rlhf_type": algo, **params},
    }
    Trainer(build_config(raw, ["expert_model_parallel_size=2", *extra])).train()
    rows = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval/rewards/accuracies" in r]


def _assert_learned(algo: str, evals: list[dict]) -> None:
    a0, a1 = evals[0]["eval/rewards/accuracies"], evals[-1]["eval/rewards/accuracies"]
    assert len(evals) >= 2 and evals[-1]["step"] > evals[0]["step"], evals
    assert a1 >= 0.9 and a1 > a0 + 0.2, (algo, [(e["step"], e["eval/rewards/accuracies"]) for e in evals])


def case_dpo_moe_ep2_learns_held_out_task():
    # At step 0 policy == reference: every reward is 0, a tie, not accurate (accuracy 0).
    _assert_learned("dpo", _train_task("dpo", {"beta": 0.1, "rpo_alpha": None}))


def case_rm_moe_ep2_learns_held_out_task():
    # The value head on top of the MoE trunk (the head is dense, replicated over EP).
    _assert_learned("rm", _train_task("rm", {}, "learning_rate=5e-4"))


# -- Resume at another expert layout --------------------------------------------------------
def case_resume_ep2_checkpoint_at_dp2_and_at_tp2_sp():
    """3 DPO steps at EP=2 with a save, then continued to step 6 at EP=1 (DP=2) and, from a
    copy of the same checkpoint, at TP=2 + SP. The weights reload at the other expert layout
    (experts by global index): step 4's loss and grad norm equal those of the uninterrupted
    DP=2 run (case_dpo_moe_dp2), which only holds if all weights are the step-3 ones. The
    optimizer state does not: megatron chains a separate expert optimizer at EP > 1 and not at
    EP = 1 (different tensor keys and param groups), so Adam restarts, which is logged."""
    import json
    import logging
    import math
    import shutil

    from tests.dist_utils import SkipCase

    if not (ROOT / "dpo_dp2.json").exists():
        raise SkipCase("the DP=2 DPO run left no history")
    dirs = {k: ROOT / f"resume_{k}" for k in ("ep2", "dp2", "tp2_sp")}
    if dist.get_rank() == 0:
        for d in dirs.values():
            shutil.rmtree(d, ignore_errors=True)
    dist.barrier()
    first = _train_dpo("resume_first", "expert_model_parallel_size=2", "train_iters=3", save=str(dirs["ep2"]))
    if dist.get_rank() == 0:
        for k in ("dp2", "tp2_sp"):
            shutil.copytree(dirs["ep2"], dirs[k])
    dist.barrier()
    ref = json.loads((ROOT / "dpo_dp2.json").read_text())

    def close(a, b, key):
        return math.isfinite(a[key]) and abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(b[key]))

    for a, b in zip(first, ref[:3], strict=True):
        assert close(a, b, "loss") and close(a, b, "grad_norm"), (first, ref)
    layouts = {"dp2": [], "tp2_sp": ["tensor_model_parallel_size=2", "sequence_parallel=true"]}
    for k, layout in layouts.items():
        warnings: list[str] = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = lambda rec: warnings.append(rec.getMessage())
        logger = logging.getLogger("mcore_align.trainer.checkpointing")
        logger.addHandler(handler)
        try:
            h = _train_dpo(f"resume_{k}", *layout, "train_iters=6", save=str(dirs[k]))
        finally:
            logger.removeHandler(handler)
        assert [x["consumed_samples"] for x in h] == [32, 40, 48], (k, h)  # steps 4-6
        assert close(h[0], ref[3], "loss") and close(h[0], ref[3], "grad_norm"), (k, h[0], ref[3])
        assert all(math.isfinite(x["loss"]) for x in h), h
        if dist.get_rank() == 0:
            assert any("optimizer state is NOT restored" in w for w in warnings), (k, warnings)


# -- The auxiliary load-balancing loss: a token-weighted mean, whatever the split -------------
def _aux_step1(*overrides: str) -> tuple[dict, int]:
    """Step 1 of DPO with moe_aux_loss_coeff on a data set of 8 copies of one pair: every
    micro-batch (any number of copies) has the same expert loads and router probabilities, so
    megatron's per-micro-batch aux loss has the same value in each, and the token-weighted mean
    must not depend on the batch size, the micro-batch split or the layout. Returns the step-1
    row and the number of micro-batches of this rank."""
    import json

    from mcore_align.config import build_config
    from mcore_align.trainer.trainer import Trainer

    data = ROOT / "aux_pairs.jsonl"
    if dist.get_rank() == 0:
        pair = (ROOT / "task.jsonl").read_text().splitlines()[0]
        data.write_text((pair + "\n") * 8)
    dist.barrier()
    raw = {
        "model": {"load": str(ROOT / "qwen3_moe" / "mc"), "moe_aux_loss_coeff": 0.1},
        "data": {"dataset": [str(data)], "max_length": 64, "max_tokens_per_micro_batch": 128,
                 "cache_dir": str(ROOT / "cache")},
        "optim": {"learning_rate": 1e-3, "lr_decay_style": "constant", "clip_grad": 1.0},
        "train": {"global_batch_size": 8, "train_iters": 1, "device": "cpu", "progress_bar": False,
                  "plot": False, "seed": 7},
        "algo": {"rlhf_type": "dpo", "beta": 0.1, "rpo_alpha": None},
    }
    tr = Trainer(build_config(raw, overrides))
    state = tr.data.train.state_dict()
    n_mb = len(next(tr.data.train).micro_batches)
    tr.data.train.load_state_dict(state)
    return tr.train()["history"][0], n_mb


def case_moe_aux_loss_independent_of_split_and_layout():
    one, n_one = _aux_step1("global_batch_size=2", "max_tokens_per_micro_batch=1024")  # 1 pair/rank
    split, n_split = _aux_step1()  # 4 pairs per rank in >= 2 micro-batches
    ep, n_ep = _aux_step1("expert_model_parallel_size=2")
    off, _ = _aux_step1("global_batch_size=2", "max_tokens_per_micro_batch=1024", "moe_aux_loss_coeff=0")
    assert n_one == 1 and n_split >= 2 and n_ep == n_split, (n_one, n_split, n_ep)
    for other in (split, ep):
        for key in ("loss", "grad_norm"):
            assert abs(other[key] - one[key]) <= 1e-5 * abs(one[key]), (key, one[key], split[key], ep[key])
    # The aux loss does act: without it the (pre-clip) grad norm differs.
    assert abs(off["grad_norm"] - one["grad_norm"]) > 1e-3 * one["grad_norm"], (off["grad_norm"], one["grad_norm"])


def case_moe_aux_loss_refused_with_sequence_parallelism():
    # SP pads sequences to a multiple of TP; megatron's router would count the padding.
    try:
        _aux_step1("tensor_model_parallel_size=2", "sequence_parallel=true")
    except ValueError as e:
        assert "moe_aux_loss_coeff=0.1 needs packed sequences" in str(e), e
    else:
        raise AssertionError("moe_aux_loss_coeff with sequence parallelism was not refused")


def case_planner_parameters_per_rank_equal_the_built_models():
    """mcore_align.plan's MoE accounting (experts / EP / ETP, the rest / TP) against the
    parameters megatron builds on each rank."""
    from mcore_align.plan import Layout, stage_params

    layouts = {"ep2": (dict(expert_model_parallel_size=2), Layout(dp=2, ep=2)),
               "tp2_sp": (dict(tensor_model_parallel_size=2, sequence_parallel=True),
                          Layout(tp=2, sequence_parallel=True))}
    for name in ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3"):
        spec = read_model_spec(ROOT / name / "mc")
        for par, lay in layouts.values():
            rt = initialize(ParallelConfig(**par), device="cpu")
            (model,) = build_model(spec, rt, opts=ModelOptions(core_attention="megatron"))
            built = sum(p.numel() for p in model.parameters())
            assert built == stage_params(spec, lay, 0)[0], (name, par, built, stage_params(spec, lay, 0))
