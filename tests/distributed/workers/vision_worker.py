"""2-rank cases: one converted tiny LLaVA-1.5 matches transformers' logits on a real image.

Checkpoints are made and converted once by ``tests/distributed/test_vision_dist.py`` into
$MCA_VISION_ROOT/<family>/{hf,mc}; every case reshards on load. fp32; tolerance 1e-4
relative to the logit scale (as for the text families).
"""
import os
from pathlib import Path

import torch

from mcore_align.checkpoint.verify import compare_logits
from mcore_align.checkpoint.verify_vision import hf_vlm_logits, processor_inputs, verify_vision_checkpoint
from mcore_align.parallel import ParallelConfig, initialize

ROOT = Path(os.environ.get("MCA_VISION_ROOT", "/nonexistent"))
IMAGES = Path(os.environ.get("MCORE_ALIGN_DATA", "/nonexistent")) / "mllm_demo_data"
TOL = 1e-4


def _check(fam: str, tp: int = 1, pp: int = 1, images=("1.jpg",), prompt="<image>Who are they?") -> None:
    rt = initialize(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), device="cpu")
    res = verify_vision_checkpoint(ROOT / fam / "hf", ROOT / fam / "mc", rt, [IMAGES / i for i in images], prompt)
    assert res.ok(TOL), f"{fam} tp={tp} pp={pp}: {res}"
    assert res.mean_kl < 1e-8, res


def case_image_matters():
    """The comparison can fail: another image moves HF's logits far beyond the tolerance."""
    hf = ROOT / "llama" / "hf"
    a = hf_vlm_logits(hf, processor_inputs(hf, [IMAGES / "1.jpg"], "<image>Who are they?"))
    b = hf_vlm_logits(hf, processor_inputs(hf, [IMAGES / "2.jpg"], "<image>Who are they?"))
    res = compare_logits(a, b)
    assert res.rel_diff > 100 * TOL, res


def case_llama_tp1_pp1():
    _check("llama")


def case_llama_tp2():
    _check("llama", tp=2)


def case_llama_pp2():
    _check("llama", pp=2)


def case_qwen2_tp2_two_images():
    _check("qwen2", tp=2, images=("1.jpg", "3.jpg"), prompt="<image>Compare<image> them.")


def case_qwen2_pp2():
    _check("qwen2", pp=2)
