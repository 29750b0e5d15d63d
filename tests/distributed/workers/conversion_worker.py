"""2-rank cases: one converted checkpoint loads at every layout and matches transformers.

The checkpoints are converted once by the pytest side (``tests/distributed/
test_conversion_dist.py``) into $MCA_CONVERSION_ROOT/<name>/{hf,mc}; every case
reshards on load. fp32; tolerance 1e-4 relative to the logit scale.
"""
import os
from pathlib import Path

import torch
import torch.distributed as dist

from mcore_align.checkpoint import load_model_weights, read_model_spec, write_checkpoint_extras
from mcore_align.checkpoint.verify import verify_checkpoint
from mcore_align.models.provider import ModelOptions, build_model
from mcore_align.parallel import ParallelConfig, initialize

ROOT = Path(os.environ.get("MCA_CONVERSION_ROOT", "/nonexistent"))
TOL = 1e-4


def _check(name: str, tp: int = 1, pp: int = 1, vpp: int | None = None) -> None:
    rt = initialize(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                   virtual_pipeline_model_parallel_size=vpp), device="cpu")
    res = verify_checkpoint(ROOT / name / "hf", ROOT / name / "mc", rt, seq_len=24, batch=2)
    assert res.ok(TOL), f"{name} tp={tp} pp={pp} vpp={vpp}: {res}"
    assert res.mean_kl < 1e-8, res


def case_qwen2_tp2():
    _check("qwen2", tp=2)


def case_qwen3_tp2():
    _check("qwen3", tp=2)


def case_llama_tp2():
    _check("llama", tp=2)


def case_qwen3_tp1_dp2():
    _check("qwen3", tp=1)


def case_qwen3_pp2():
    _check("qwen3", pp=2)


def case_llama_pp2_vpp2():
    _check("llama", pp=2, vpp=2)  # 4 layers: one per virtual stage


def case_mistral_at_each_layout():
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        _check("mistral", tp=tp, pp=pp)


def case_tied_pp2():
    _check("qwen2_tied", pp=2)  # output layer on the last stage comes from the embedding


def case_resave_at_tp2():
    """Load at TP=2, save as a trainer would ({"model": ...} in iter_*), for export."""
    from megatron.core import dist_checkpointing

    rt = initialize(ParallelConfig(tensor_model_parallel_size=2), device="cpu")
    spec = read_model_spec(ROOT / "qwen3" / "mc")
    (model,) = build_model(spec, rt, opts=ModelOptions(core_attention="megatron"))
    load_model_weights([model], ROOT / "qwen3" / "mc")
    save = ROOT / "resaved_tp2"
    it = save / "iter_0000003"
    if rt.rank == 0:
        it.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict(), "iteration": 3}, str(it))
    if rt.rank == 0:
        (save / "latest_checkpointed_iteration.txt").write_text("3")
        write_checkpoint_extras(save, spec, torch.float32, ROOT / "qwen3" / "mc")
    dist.barrier()
