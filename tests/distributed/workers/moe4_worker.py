"""4-rank MoE cases: TP=2 x EP=2 (ETP=1 and ETP=2, SP) from the same EP=1 checkpoints as
moe_worker, DPO at DP=4 x EP=2 (expert-data-parallel 2) and at PP=2 x EP=2, and the aux loss
at PP=2 x EP=2."""
from tests.distributed.workers.moe_worker import check


def case_qwen3_moe_tp2_ep2():
    check("qwen3_moe", tensor_model_parallel_size=2, sequence_parallel=True,
          expert_model_parallel_size=2, expert_tensor_parallel_size=1)


def case_mixtral_tp2_etp2_ep2():  # experts tensor-parallel too (fc1/fc2 split over ETP=2)
    check("mixtral", tensor_model_parallel_size=2, sequence_parallel=True,
          expert_model_parallel_size=2, expert_tensor_parallel_size=2)


def case_qwen2_moe_tp2_ep2():
    check("qwen2_moe", tensor_model_parallel_size=2, sequence_parallel=True,
          expert_model_parallel_size=2, expert_tensor_parallel_size=1)


def case_dpo_moe_ep2_dp4_matches_dp2():
    """4 ranks, EP=2: expert-data-parallel size 2, so DDP must all-reduce expert gradients over
    the expert-DP group (dense ones over all 4). Same global batch and order as the 2-rank
    DP=2 run of moe_worker (which ran first): same losses and grad norms."""
    import json
    import math

    from tests.distributed.workers.moe_worker import ROOT, _train_dpo

    if not (ROOT / "dpo_dp2.json").exists():
        from tests.dist_utils import SkipCase

        raise SkipCase("the 2-rank DP=2 DPO run left no history")
    ep = _train_dpo("ep2_dp4", "expert_model_parallel_size=2")
    dp = json.loads((ROOT / "dpo_dp2.json").read_text())
    for a, b in zip(dp, ep, strict=True):
        for key in ("loss", "grad_norm", "moe/load_imbalance"):
            assert math.isfinite(b[key]) and abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (key, dp, ep)


def case_dpo_moe_tp2_etp2_ep2_matches_dp2():
    """Training through the uneven expert-TP collectives (ETP=2 with EP=2, TP=2 + SP): the
    same losses and grad norms as the 2-rank DP=2 run (the same global batch; TP changes
    only the order of float sums)."""
    import json
    import math

    from tests.distributed.workers.moe_worker import ROOT, _train_dpo

    if not (ROOT / "dpo_dp2.json").exists():
        from tests.dist_utils import SkipCase

        raise SkipCase("the 2-rank DP=2 DPO run left no history")
    ep = _train_dpo("tp2_etp2_ep2", "tensor_model_parallel_size=2", "sequence_parallel=true",
                    "expert_model_parallel_size=2", "expert_tensor_parallel_size=2")
    dp = json.loads((ROOT / "dpo_dp2.json").read_text())
    for a, b in zip(dp, ep, strict=True):
        for key in ("loss", "grad_norm"):
            assert math.isfinite(b[key]) and abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (key, dp, ep)
        # SP pads each sequence to a multiple of TP and the experts process (and the metric
        # counts) those few padding positions too: close, not equal.
        assert abs(a["moe/load_imbalance"] - b["moe/load_imbalance"]) <= 1e-2, (dp, ep)


def case_lora_dpo_moe_tp2_ep2_etp1_matches_dp2():
    """Expert adapters at TP=2 + SP x EP=2 with ETP=1: each rank's expert adapters are whole
    (not duplicates over the dense TP group, which megatron's grad norm would otherwise count
    on TP rank 0 only); same losses and pre-clip grad norms as the 2-rank LoRA DP=2 run."""
    import json

    from tests.distributed.workers.moe_worker import ROOT, _same_history, _train_lora

    if not (ROOT / "lora_dp2.json").exists():
        from tests.dist_utils import SkipCase

        raise SkipCase("the 2-rank LoRA DP=2 run left no history")
    got = _train_lora("tp2_ep2_etp1", "tensor_model_parallel_size=2", "sequence_parallel=true",
                      "expert_model_parallel_size=2", "expert_tensor_parallel_size=1")
    _same_history(json.loads((ROOT / "lora_dp2.json").read_text()), got)


def case_lora_on_experts_refused_when_etp_is_not_tp():
    """TP=1, ETP=2, EP=2: the replicated expert-adapter factor would be counted twice by
    megatron's grad norm (which de-duplicates by the dense TP group): refused by name."""
    from mcore_align.checkpoint import read_model_spec
    from mcore_align.models.lora import PRESETS, LoRAConfig, apply_lora
    from mcore_align.models.provider import ModelOptions, build_model
    from mcore_align.parallel import ParallelConfig, initialize
    from tests.distributed.workers.moe_worker import ROOT

    rt = initialize(ParallelConfig(expert_model_parallel_size=2, expert_tensor_parallel_size=2), device="cpu")
    chunks = build_model(read_model_spec(ROOT / "qwen3_moe" / "mc"), rt,
                         opts=ModelOptions(core_attention="megatron", transformer_impl="local"))
    try:
        apply_lora(chunks, LoRAConfig(targets=PRESETS["ALL"]), seed=0)
    except NotImplementedError as e:
        assert "needs expert_tensor_parallel_size equal to 1 or to tensor_model_parallel_size (got ETP=2, TP=1)" \
            in str(e), e
    else:
        raise AssertionError("LoRA on experts at ETP=2, TP=1 was not refused")


def case_dpo_moe_pp2_ep2_matches_dp2():
    """PP=2 x EP=2 (DP=2 per stage, each stage's MoE layer split over EP=2): the losses and
    grad norms of the 2-rank DP=2 run over 6 steps (same global batch)."""
    import json
    import math

    from tests.distributed.workers.moe_worker import ROOT, _train_dpo

    if not (ROOT / "dpo_dp2.json").exists():
        from tests.dist_utils import SkipCase

        raise SkipCase("the 2-rank DP=2 DPO run left no history")
    pp = _train_dpo("pp2_ep2", "pipeline_model_parallel_size=2", "expert_model_parallel_size=2")
    dp = json.loads((ROOT / "dpo_dp2.json").read_text())
    for a, b in zip(dp, pp, strict=True):
        for key in ("loss", "grad_norm", "moe/load_imbalance"):
            assert math.isfinite(b[key]) and abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (key, dp, pp)


def case_moe_aux_loss_at_pp2_ep2_and_pp2_tp2_sp_matches_dp2():
    """The global-batch aux loss through the pipeline schedule (counting pass on both stages,
    each stage's routers fill their own layers): step 1 at PP=2 x EP=2 with 4 micro-batches and
    at PP=2 x TP=2 + SP (padding; the second stage gets its SP slice of the padding mask from
    the step) equals the 2-rank DP=2 run with 1 (moe_worker's aux case)."""
    import json

    from tests.distributed.workers.moe_worker import ROOT, _aux_step1

    if not (ROOT / "aux_dp2.json").exists():
        from tests.dist_utils import SkipCase

        raise SkipCase("the 2-rank aux case left no reference row")
    one = json.loads((ROOT / "aux_dp2.json").read_text())
    row, n_mb = _aux_step1("max_tokens_per_micro_batch=128", "pipeline_model_parallel_size=2",
                           "expert_model_parallel_size=2")
    assert n_mb == 4, n_mb
    sp, _ = _aux_step1("pipeline_model_parallel_size=2", "tensor_model_parallel_size=2", "sequence_parallel=true")
    for name, r in (("pp2_ep2", row), ("pp2_tp2_sp", sp)):
        for key in ("loss", "grad_norm", "moe/aux_loss"):
            assert abs(r[key] - one[key]) <= 1e-5 * abs(one[key]), (name, key, r[key], one[key])


def case_deepseek_v3_tp2_ep2():  # MLA over TP=2 (SP), experts over EP=2, routing bias + groups
    check("deepseek_v3", tensor_model_parallel_size=2, sequence_parallel=True,
          expert_model_parallel_size=2, expert_tensor_parallel_size=1)
