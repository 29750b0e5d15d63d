"""LLaVA-1.5 (tiny, written by transformers alone): HF -> megatron -> HF with the vision weights.

Bitwise round trips in every HF naming style, strict key sets naming the offending vision
tensor, the vision module on the first stage with freeze_vit / freeze_aligner, and the
placeholder/feature count check of the embedding merge.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mcore_align.checkpoint import CheckpointError, convert_hf_to_mcore, convert_mcore_to_hf, read_model_spec
from mcore_align.models.llava import _STYLES
from mcore_align.models.tiny_vision import make_tiny_llava


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    return {fam: make_tiny_llava(root / fam, fam) for fam in ("llama", "qwen2")}


def _restyle(src: Path, dst: Path, style: str) -> None:
    """Copy ``src`` (written by this transformers: style "legacy") renaming tensors to ``style``."""
    shutil.copytree(src, dst)
    t = load_file(src / "model.safetensors")
    to_canon = {v: k for k, v in _STYLES["legacy"]}
    out = {}
    for name, x in t.items():
        canon = next((to_canon[p] + name[len(p):] for p in to_canon if name.startswith(p)), name)
        disk = next((d + canon[len(c):] for c, d in _STYLES[style] if canon.startswith(c)), canon)
        out[disk] = x
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("fam", ["llama", "qwen2"])
def test_round_trip_is_bitwise_with_vision_weights(llava, tmp_path, fam):
    hf = llava[fam]
    convert_hf_to_mcore(hf, tmp_path / "mc", dtype="fp32")
    spec = read_model_spec(tmp_path / "mc")
    assert spec.family == fam and spec.vision.family == "llava" and spec.vision.hf_key_style == "legacy"
    assert spec.vision.image_token_id == 511 and spec.vocab_size == 512
    convert_mcore_to_hf(tmp_path / "mc", tmp_path / "back")
    a, b = load_file(hf / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    assert any(k.startswith("vision_tower.") for k in a) and any(k.startswith("multi_modal_projector.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == ["LlavaForConditionalGeneration"]
    assert (tmp_path / "back" / "processor_config.json").read_bytes() == (hf / "processor_config.json").read_bytes()


@pytest.mark.parametrize("style", ["transformers", "legacy_clip"])
def test_other_hf_naming_styles_round_trip(llava, tmp_path, style):
    _restyle(llava["llama"], tmp_path / "hf", style)
    convert_hf_to_mcore(tmp_path / "hf", tmp_path / "mc", dtype="fp32")
    assert read_model_spec(tmp_path / "mc").vision.hf_key_style == style
    convert_mcore_to_hf(tmp_path / "mc", tmp_path / "back")
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_missing_and_unexpected_vision_tensors_are_named(llava, tmp_path):
    shutil.copytree(llava["llama"], tmp_path / "hf")
    t = load_file(tmp_path / "hf" / "model.safetensors")
    del t["vision_tower.encoder.layers.1.mlp.fc2.bias"]
    t["vision_tower.extra.weight"] = torch.zeros(2)
    save_file(t, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensors: \['vision_tower.encoder.layers.1.mlp.fc2.bias'\]"
                       r".*unexpected tensors .*'vision_tower.extra.weight'"):
        convert_hf_to_mcore(tmp_path / "hf", tmp_path / "mc")


def test_wrong_projector_shape_is_named(llava, tmp_path):
    shutil.copytree(llava["llama"], tmp_path / "hf")
    t = load_file(tmp_path / "hf" / "model.safetensors")
    t["multi_modal_projector.linear_2.weight"] = torch.zeros(64, 63)
    save_file(t, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'multi_modal_projector.linear_2.weight' has shape \[64, 63\], "
                       r"expected \[64, 64\]"):
        convert_hf_to_mcore(tmp_path / "hf", tmp_path / "mc")


def test_unsupported_vision_architecture_is_refused(llava, tmp_path):
    from mcore_align.models.families import spec_from_hf_config
    from mcore_align.models.spec import read_hf_config

    c = read_hf_config(llava["llama"])
    c["architectures"] = ["Idefics3ForConditionalGeneration"]
    with pytest.raises(ValueError, match="Idefics3ForConditionalGeneration.*not supported.*llava"):
        spec_from_hf_config(c)


def _build(spec, **opts):
    from mcore_align.checkpoint.layout import init_single_process
    from mcore_align.models.provider import ModelOptions, build_model

    rt = init_single_process()
    (model,) = build_model(spec, rt, opts=ModelOptions(core_attention="megatron", **opts))
    return model


def test_vision_module_on_first_stage_and_frozen_by_default(llava):
    from mcore_align.models.families import spec_from_hf_config
    from mcore_align.models.spec import read_hf_config

    spec = spec_from_hf_config(read_hf_config(llava["llama"]))
    model = _build(spec)
    vision = {n: p for n, p in model.named_parameters() if n.startswith("vision.")}
    assert any(n.startswith("vision.vision_tower.") for n in vision)
    assert any(n.startswith("vision.multi_modal_projector.") for n in vision)
    assert not any(p.requires_grad for p in vision.values())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("vision."))
    model = _build(spec, freeze_vit=False)
    for n, p in model.named_parameters():
        if n.startswith("vision."):
            assert p.requires_grad == n.startswith("vision.vision_tower."), n


def test_placeholder_feature_count_mismatch_is_an_error(llava):
    from mcore_align.models.families import spec_from_hf_config
    from mcore_align.models.spec import read_hf_config
    from mcore_align.models.vision import vision_decoder_input

    spec = spec_from_hf_config(read_hf_config(llava["llama"]))
    model = _build(spec)
    ids = torch.tensor([[1, 2] + [511] * 15 + [3]])  # one image needs 16 placeholders
    with pytest.raises(ValueError, match="15 image tokens in input_ids, 16 features from 1 image"):
        vision_decoder_input(model, ids, {"pixel_values": torch.zeros(1, 3, 32, 32)})
    ids = torch.tensor([[1, 2] + [511] * 16 + [3]])
    assert vision_decoder_input(model, ids, {"pixel_values": torch.zeros(1, 3, 32, 32)}).shape == (19, 1, 64)
