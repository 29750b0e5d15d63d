"""4-rank MoE cases: TP=2 x EP=2 (ETP=1 and ETP=2, SP) from the same EP=1 checkpoints as
moe_worker, and DPO at DP=4 x EP=2 (expert-data-parallel 2)."""
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


def case_deepseek_v3_tp2_ep2():  # MLA over TP=2 (SP), experts over EP=2, routing bias + groups
    check("deepseek_v3", tensor_model_parallel_size=2, sequence_parallel=True,
          expert_model_parallel_size=2, expert_tensor_parallel_size=1)
