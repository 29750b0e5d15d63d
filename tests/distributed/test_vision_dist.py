"""Tiny LLaVA-1.5, LLaVA-NeXT, InternVL, Qwen2-VL and Qwen2.5-VL converted once, logits equal transformers' at (TP, PP) = (1,1),
(2,1), (1,2) on real images (2 gloo ranks, one torchrun launch)."""
import pytest

from mcore_align.checkpoint import convert_hf_to_mcore
from mcore_align.models.tiny_vision import make_tiny_internvl, make_tiny_llava, make_tiny_llava_next, make_tiny_qwen2_vl
from tests.dist_utils import dist_cases, run_dist_module

WORKER = "tests.distributed.workers.vision_worker"


@pytest.fixture(scope="module")
def results(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("vision_dist")
    for fam in ("llama", "qwen2"):
        make_tiny_llava(root / fam / "hf", fam)
        convert_hf_to_mcore(root / fam / "hf", root / fam / "mc", dtype="fp32")
    for fam, version in (("qwen2_vl", "2"), ("qwen2_5_vl", "2.5")):  # M-RoPE families
        make_tiny_qwen2_vl(root / fam / "hf", version)
        convert_hf_to_mcore(root / fam / "hf", root / fam / "mc", dtype="fp32")
    make_tiny_llava_next(root / "next" / "hf", "llama")
    convert_hf_to_mcore(root / "next" / "hf", root / "next" / "mc", dtype="fp32")
    make_tiny_internvl(root / "internvl" / "hf")
    convert_hf_to_mcore(root / "internvl" / "hf", root / "internvl" / "mc", dtype="fp32")
    from PIL import Image  # a smaller real image: LLaVA-NeXT picks another grid (3 tiles, not 5)

    Image.open(shared_data / "mllm_demo_data" / "1.jpg").convert("RGB").resize((40, 30)).save(root / "small.png")
    return run_dist_module(WORKER, nproc=2, env={"MCA_VISION_ROOT": str(root), "MCORE_ALIGN_DATA": str(shared_data)})


@pytest.mark.parametrize("case", dist_cases(WORKER))
def test_case(results, case):
    results.check(case)
