"""Fixtures shared by the unit tests of the vision data path."""
import pytest


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """A tiny LLaVA-1.5 (Qwen2 LM) converted once: its megatron checkpoint dir (``tokenizer/``
    holds the processor files)."""
    from mcore_align.checkpoint import convert_hf_to_mcore
    from mcore_align.models.tiny_vision import make_tiny_llava

    root = tmp_path_factory.mktemp("vckpt")
    make_tiny_llava(root / "hf", "qwen2")
    convert_hf_to_mcore(root / "hf", root / "mc", dtype="fp32")
    return root / "mc"


@pytest.fixture(scope="session")
def tok(ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ckpt / "tokenizer"))
