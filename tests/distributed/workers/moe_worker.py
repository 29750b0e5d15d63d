"""2-rank MoE cases: one converted checkpoint (EP=1) loads at EP=2, TP=2+SP and PP=2 and
matches transformers; bad layouts fail with their message.

The checkpoints are converted once by tests/distributed/test_moe_dist.py into
$MCA_MOE_ROOT/<name>/{hf,mc}. fp32; tolerance 1e-4 relative to the logit scale.
"""
import os
from pathlib import Path

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
