"""Converted checkpoints at TP=2 / PP=2 / PP=2xVPP=2 (2 gloo ranks, one torchrun launch),
and export of a checkpoint re-saved at TP=2."""
import pytest
import torch
from safetensors.torch import load_file

from mcore_align.checkpoint import convert_hf_to_mcore, convert_mcore_to_hf
from mcore_align.models.tiny import make_tiny_model
from tests.dist_utils import dist_cases, run_dist_module

WORKER = "tests.distributed.workers.conversion_worker"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("conversion_dist")
    for name, family, kw in [
        ("qwen2", "qwen2", {}),
        ("qwen3", "qwen3", {}),
        ("llama", "llama", {"num_layers": 4}),
        ("qwen2_tied", "qwen2", {"tie_word_embeddings": True}),
        # Mistral with its own rope theta and norm eps (a provider that ignored them would fail).
        ("mistral", "mistral", {"rope_theta": 1e6, "rms_norm_eps": 1e-5}),
    ]:
        # std 0.1 (tiny.py also perturbs norms and biases): at 0.02 all logits are nearly equal
        # and q/k/RoPE mistakes hide under the 1e-4 tolerance.
        make_tiny_model(root / name / "hf", family, init_std=0.1, **kw)
        convert_hf_to_mcore(root / name / "hf", root / name / "mc", dtype="fp32")
    return root


@pytest.fixture(scope="module")
def results(root):
    return run_dist_module(WORKER, nproc=2, env={"MCA_CONVERSION_ROOT": str(root)})


@pytest.mark.parametrize("case", dist_cases(WORKER))
def test_case(results, case):
    results.check(case)


def test_export_of_tp2_resave_equals_original(results, root, tmp_path):
    results.check("case_resave_at_tp2")
    convert_mcore_to_hf(root / "resaved_tp2", tmp_path / "back")
    a, b = load_file(root / "qwen3" / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
