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


def case_dpo_moe_cp2_matches_dp2():
    """Context parallelism with MoE: CP=2 (DP=1; each rank routes its two chunks of every
    sequence) gives the losses and grad norms of the DP=2 run over 6 steps (same global batch)."""
    import json
    import math

    from tests.dist_utils import SkipCase

    if not (ROOT / "dpo_dp2.json").exists():
        raise SkipCase("the DP=2 DPO run left no history")
    cp = _train_dpo("cp2", "context_parallel_size=2")
    dp = json.loads((ROOT / "dpo_dp2.json").read_text())
    for a, b in zip(dp, cp, strict=True):
        for key in ("loss", "grad_norm"):
            assert math.isfinite(b[key]) and abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (key, dp, cp)


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


# -- Every objective on MoE: EP=2 equals EP=1 ---------------------------------------------------
# name -> (rlhf_type, data file written by the pytest side, algo params, extra overrides)
OBJECTIVES = {
    "kto": ("kto", "kto_subset.json", {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0}, ()),
    "cpo": ("cpo", "dpo_subset.json", {"beta": 0.1, "cpo_alpha": 1.0}, ()),
    "orpo": ("orpo", "dpo_subset.json", {"beta": 0.1}, ()),
    "simpo": ("simpo", "dpo_subset.json", {"beta": 2.0, "simpo_gamma": 1.0, "cpo_alpha": 1.0}, ()),
    "sft": ("sft", "sft_subset.json", {}, ()),
    # reference variants: precomputed before training; LoRA (attention), reference = the base
    "dpo_precompute": ("dpo", "dpo_subset.json", {"beta": 0.1, "rpo_alpha": None}, ("ref_model=precompute",)),
    # (LoRA dropout off: its masks come from a per-rank RNG whose seed depends on the layout)
    "dpo_lora": ("dpo", "dpo_subset.json", {"beta": 0.1, "rpo_alpha": None},
                 ("train_type=lora", "lora_dropout=0", "learning_rate=1e-2")),
}


def _train_objective(name: str, *layout: str, steps: int = 3) -> list[dict]:
    from mcore_align.config import build_config
    from mcore_align.trainer.trainer import Trainer
    from tests.dist_utils import SkipCase

    algo, data, params, extra = OBJECTIVES[name]
    if not (ROOT / data).exists():
        raise SkipCase(f"shared data for {name} not found")
    raw = {
        "model": {"load": str(ROOT / "qwen3_moe" / "mc")},
        "data": {"dataset": [str(ROOT / data)], "max_length": 192, "truncation_strategy": "right",
                 "max_tokens_per_micro_batch": 768, "cache_dir": str(ROOT / "cache")},
        "optim": {"learning_rate": 1e-3, "lr_decay_style": "constant", "clip_grad": 1.0},
        "train": {"global_batch_size": 8, "train_iters": steps, "device": "cpu", "progress_bar": False,
                  "plot": False, "seed": 7},
        "algo": {"rlhf_type": algo, "params": params},
    }
    return Trainer(build_config(raw, [*extra, *layout])).train()["history"]


def case_every_objective_moe_ep2_equals_ep1():
    """KTO, CPO, ORPO, SimPO, SFT, DPO with a precomputed reference and DPO-LoRA (reference =
    the base model with adapters off) on the tiny Qwen3-MoE: DP=2 x EP=2 gives the losses and
    pre-clip grad norms of DP=2 (EP=1) over 3 steps (1e-4), and training moves the loss."""
    import math

    for name in OBJECTIVES:
        ep1 = _train_objective(name)
        ep2 = _train_objective(name, "expert_model_parallel_size=2")
        for a, b in zip(ep1, ep2, strict=True):
            for key in ("loss", "grad_norm"):
                assert math.isfinite(b[key]) and abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), \
                    (name, key, [x[key] for x in ep1], [x[key] for x in ep2])
        assert ep2[-1]["loss"] != ep2[0]["loss"], (name, ep2)


# -- The auxiliary load-balancing loss over the global batch (models/moe_aux.py) ---------------
def _aux_step1(*overrides: str) -> tuple[dict, int]:
    """Step 1 of DPO with moe_aux_loss_coeff=1 on 8 different pairs of the demo task (their
    expert loads differ, so the loss of the global batch is not the mean of per-micro-batch
    losses). Returns the step-1 row and the number of micro-batches of this rank."""
    from mcore_align.config import build_config
    from mcore_align.trainer.trainer import Trainer

    raw = {
        "model": {"load": str(ROOT / "qwen3_moe" / "mc"), "moe_aux_loss_coeff": 1.0},
        "data": {"dataset": [str(ROOT / "task.jsonl")], "max_length": 64, "max_tokens_per_micro_batch": 1024,
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
    """The same 8 pairs at DP=2 in 1, 2 and 4 micro-batches per rank, at DP=2 x EP=2, at
    TP=2 + SP and CP=2 (sequences padded to a multiple of 2 / 4, padding masked), and in padded
    mode (rows padded to the longest): the same loss, pre-clip grad norm and global aux loss
    (rtol 1e-5). Before models/moe_aux.py (per-micro-batch expert loads) the grad norms of 1 and
    4 micro-batches differed."""
    import json

    runs = {
        "dp2_1mb": _aux_step1(),
        "dp2_2mb": _aux_step1("max_tokens_per_micro_batch=256"),
        "dp2_4mb": _aux_step1("max_tokens_per_micro_batch=128"),
        "ep2_4mb": _aux_step1("max_tokens_per_micro_batch=128", "expert_model_parallel_size=2"),
        "tp2_sp": _aux_step1("tensor_model_parallel_size=2", "sequence_parallel=true"),
        "cp2": _aux_step1("context_parallel_size=2"),
        "padded": _aux_step1("packing=false", "max_tokens_per_micro_batch=256"),
    }
    n = {k: v[1] for k, v in runs.items()}
    assert n["dp2_1mb"] == 1 and n["dp2_2mb"] == 2 and n["dp2_4mb"] == 4 and n["ep2_4mb"] == 4, n
    one = runs["dp2_1mb"][0]
    if dist.get_rank() == 0:  # the 4-rank PP=2 x EP=2 case compares with it
        (ROOT / "aux_dp2.json").write_text(json.dumps(one))
    for name, (row, _) in runs.items():
        for key in ("loss", "grad_norm", "moe/aux_loss"):
            assert abs(row[key] - one[key]) <= 1e-5 * abs(one[key]), (name, key, row[key], one[key])
    off, _ = _aux_step1("moe_aux_loss_coeff=0")
    assert "moe/aux_loss" not in off
    # The aux loss does act: without it the (pre-clip) grad norm differs.
    assert abs(off["grad_norm"] - one["grad_norm"]) > 1e-3 * one["grad_norm"], (off["grad_norm"], one["grad_norm"])


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


# -- LoRA on the expert linears ------------------------------------------------------------
# Every linear adapted (lora_target_modules=ALL: attention, routed experts, shared expert);
# dropout off so layouts compare exactly.
LORA = ("train_type=lora", "lora_rank=4", "lora_alpha=8", "lora_dropout=0.0", "lora_target_modules=ALL",
        "learning_rate=1e-2")


def case_lora_experts_b0_is_base_and_layouts_agree():
    """B = 0 gives the base model bit for bit at EP=2; random adapters (the same full factors
    at every layout, experts by global index) give the same logits at DP=2 (EP=1), EP=2 and
    TP=2 + SP (experts split over ETP=2), for Qwen3-MoE and Qwen2-MoE (shared expert)."""
    import dataclasses

    import torch

    from mcore_align.checkpoint import load_model_weights
    from mcore_align.checkpoint.verify import megatron_logits
    from mcore_align.models.lora import PRESETS, LoRAConfig, adapters_disabled, apply_lora
    from tests.distributed.workers.lora_worker import _set_full_adapters

    from mcore_align.plan import Layout, stage_params

    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    cfg = LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=PRESETS["ALL"])
    layouts = {"ep1": {}, "ep2": dict(expert_model_parallel_size=2),
               "tp2_sp": dict(tensor_model_parallel_size=2, sequence_parallel=True)}
    plans = {"ep1": Layout(dp=2), "ep2": Layout(dp=2, ep=2), "tp2_sp": Layout(tp=2, sequence_parallel=True)}
    for name in ("qwen3_moe", "qwen2_moe"):
        got = {}
        for key, layout in layouts.items():
            rt = initialize(ParallelConfig(**layout), device="cpu", seed=1)
            chunks = build_model(read_model_spec(ROOT / name / "mc"), rt,
                                 opts=ModelOptions(core_attention="megatron", transformer_impl="local"))
            load_model_weights(chunks, ROOT / name / "mc")
            adapted = apply_lora(chunks, cfg, seed=0)
            assert any(".experts.local_experts." in n for n in adapted), adapted
            # The memory planner counts the adapters this rank holds (experts / EP, split by ETP).
            n_adapter = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
            lay = dataclasses.replace(plans[key], lora_rank=4, lora_targets=cfg.targets)
            assert n_adapter == stage_params(read_model_spec(ROOT / name / "mc"), lay, 0)[1], (name, key, n_adapter)
            with adapters_disabled(chunks):
                base = megatron_logits(chunks, tokens, rt)
            assert torch.equal(megatron_logits(chunks, tokens, rt), base)  # B = 0
            _set_full_adapters(chunks)
            got[key] = megatron_logits(chunks, tokens, rt)
            assert (got[key] - base).abs().max() > 1e-2
        for key in ("ep2", "tp2_sp"):
            torch.testing.assert_close(got[key], got["ep1"], rtol=1e-5, atol=1e-5, msg=f"{name} {key}")


def _train_lora(name: str, *layout: str, save: str | None = None) -> list[dict]:
    """LoRA DPO (4 steps) on the tiny Qwen3-MoE; checks that only adapters train and, at EP > 1,
    that expert adapters sit in megatron's expert-parallel buffers and expert optimizer."""
    import json
    import shutil

    import torch

    from mcore_align.config import build_config
    from mcore_align.trainer.trainer import Trainer
    from tests.dist_utils import SkipCase

    data = ROOT / "dpo_subset.json"
    if not data.exists():
        raise SkipCase("shared preference data (dpo_en_demo.json) not found")
    if save is not None and dist.get_rank() == 0:
        shutil.rmtree(save, ignore_errors=True)
    dist.barrier()
    raw = {
        "model": {"load": str(ROOT / "qwen3_moe" / "mc")},
        "data": {"dataset": [str(data)], "max_length": 320, "truncation_strategy": "right",
                 "max_tokens_per_micro_batch": 1280, "cache_dir": str(ROOT / "cache")},
        "optim": {"learning_rate": 1e-3, "lr_decay_style": "constant", "clip_grad": 1.0},
        "train": {"global_batch_size": 8, "train_iters": 4, "device": "cpu", "progress_bar": False,
                  "save": save, "plot": False, "seed": 7},
        "algo": {"rlhf_type": "dpo", "beta": 0.1, "rpo_alpha": None},
    }
    tr = Trainer(build_config(raw, [*LORA, *layout]))
    named = [(n, p) for m in tr.policy for n, p in m.module.named_parameters()]
    adapters = {n: p for n, p in named if p.requires_grad}
    assert adapters and all(".lora." in n for n in adapters), sorted(adapters)
    experts = {n: p for n, p in adapters.items() if ".experts.local_experts." in n}
    assert experts and len(experts) < len(adapters), sorted(adapters)
    ep = tr.rt.pgs.ep.size()
    # Megatron DDP and the optimizer see the adapters only (no grads or Adam state for the base);
    # expert adapters at EP > 1 are reduced over the expert-data-parallel group, like expert weights.
    numel = lambda bufs: sum(b.numel_unpadded for m in tr.policy for b in getattr(m, bufs))  # noqa: E731
    assert numel("buffers") + numel("expert_parallel_buffers") == sum(p.numel() for p in adapters.values())
    want_expert = sum(p.numel() for p in experts.values()) if ep > 1 else 0
    assert numel("expert_parallel_buffers") == want_expert, (numel("expert_parallel_buffers"), want_expert)
    assert all(p.allreduce is (ep == 1) for p in experts.values())
    opt_params = [p for g in tr.optimizer.param_groups for p in g["params"]]
    assert len(opt_params) == len(adapters)
    frozen = {n: p.detach().clone() for n, p in named if not p.requires_grad}
    history = tr.train()["history"]
    assert all(torch.equal(p, frozen[n]) for n, p in named if not p.requires_grad), "a base weight changed"
    assert all(p.abs().max() > 0 for n, p in experts.items() if n.endswith(".B")), "an expert adapter B did not train"
    if dist.get_rank() == 0:
        (ROOT / f"lora_{name}.json").write_text(json.dumps(history))
    if save is not None:
        from mcore_align.checkpoint.verify import megatron_logits

        tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
        logits = megatron_logits([m.module for m in tr.policy], tokens, tr.rt)
        if dist.get_rank() == 0:
            torch.save({"tokens": tokens, "logits": logits, "save": save}, ROOT / f"lora_{name}_logits.pt")
    return history


def _same_history(ref: list[dict], got: list[dict]) -> None:
    import math

    assert len(ref) == len(got) == 4, (ref, got)
    for a, b in zip(ref, got):
        for key in ("loss", "grad_norm"):
            assert math.isfinite(b[key]) and abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (key, ref, got)


def case_lora_dpo_moe_dp2():
    h = _train_lora("dp2")
    assert h[-1]["loss"] < h[0]["loss"] - 0.05, [x["loss"] for x in h]


def case_lora_dpo_moe_ep2_matches_dp2():
    """Expert adapters at EP=2 (each rank adapts its 2 experts; their gradients reduced over
    the expert-DP group): the same losses and pre-clip grad norms as DP=2. Saved for the
    export test on the pytest side."""
    import json

    got = _train_lora("ep2", "expert_model_parallel_size=2", save=str(ROOT / "lora_ep2_save"))
    _same_history(json.loads((ROOT / "lora_dp2.json").read_text()), got)


def case_lora_dpo_moe_tp2_sp_etp2_matches_dp2():
    """Expert adapters split over ETP=2 (TP=2 + SP): the replicated factor's gradient is
    all-reduced over the expert-TP group; same losses and grad norms as DP=2."""
    import json

    got = _train_lora("tp2_sp", "tensor_model_parallel_size=2", "sequence_parallel=true")
    _same_history(json.loads((ROOT / "lora_dp2.json").read_text()), got)


def case_lora_ep2_checkpoint_loads_at_dp2_and_tp2_sp():
    """The LoRA checkpoint saved at EP=2 (expert adapters stored by global expert index) loads
    at EP=1 (DP=2) and at TP=2 + SP (experts split over ETP=2): the trained model's logits."""
    import torch

    from mcore_align.checkpoint.lora_export import load_lora_model
    from mcore_align.checkpoint.verify import megatron_logits
    from tests.dist_utils import SkipCase

    if not (ROOT / "lora_ep2_logits.pt").exists():
        raise SkipCase("the LoRA EP=2 run left no checkpoint")
    saved = torch.load(ROOT / "lora_ep2_logits.pt")
    for layout in ({}, dict(tensor_model_parallel_size=2, sequence_parallel=True)):
        rt = initialize(ParallelConfig(**layout), device="cpu")
        chunks = build_model(read_model_spec(ROOT / "qwen3_moe" / "mc"), rt,
                             opts=ModelOptions(core_attention="megatron", transformer_impl="local"))
        load_lora_model(chunks, saved["save"])
        logits = megatron_logits(chunks, saved["tokens"], rt)
        err = (logits - saved["logits"]).abs().max() / saved["logits"].abs().max()
        assert err < 1e-5, (layout, err.item())
