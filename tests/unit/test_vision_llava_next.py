"""LLaVA-NeXT (tiny, written by transformers alone; anyres tiles on the real demo photos):
HF -> megatron -> HF bitwise with image_newline, strict keys, image_newline frozen with the
aligner, placeholder expansion equal to LlavaNextProcessor's, and micro-batch collation of
images with different tile counts equal to the processor's own batch."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from mcore_align.checkpoint import CheckpointError, convert_hf_to_mcore, convert_mcore_to_hf, read_model_spec
from mcore_align.models.tiny_vision import make_tiny_llava_next
from tests.unit.test_vision_conversion import _build, _restyle


@pytest.fixture(scope="module")
def next_hf(tmp_path_factory):
    return make_tiny_llava_next(tmp_path_factory.mktemp("llava_next") / "hf", "llama")


@pytest.fixture(scope="module")
def proc(next_hf):
    from mcore_align.data.images import VisionProcessor

    return VisionProcessor.from_pretrained(next_hf)


def test_round_trip_is_bitwise_with_image_newline(next_hf, tmp_path):
    convert_hf_to_mcore(next_hf, tmp_path / "mc", dtype="fp32")
    spec = read_model_spec(tmp_path / "mc")
    assert spec.family == "llama" and spec.vision.family == "llava_next" and spec.vision.hf_key_style == "legacy"
    convert_mcore_to_hf(tmp_path / "mc", tmp_path / "back")
    a, b = load_file(next_hf / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    assert "image_newline" in a and any(k.startswith("multi_modal_projector.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    import json

    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaNextForConditionalGeneration"]
    assert cfg["image_grid_pinpoints"] == json.loads((next_hf / "config.json").read_text())["image_grid_pinpoints"]
    processor_file = (tmp_path / "back" / "processor_config.json").read_bytes()
    assert processor_file == (next_hf / "processor_config.json").read_bytes()


@pytest.mark.parametrize("style,newline", [("transformers", "model.image_newline"), ("legacy_clip", "image_newline")])
def test_other_hf_naming_styles_round_trip(next_hf, tmp_path, style, newline):
    _restyle(next_hf, tmp_path / "hf", style)
    assert newline in load_file(tmp_path / "hf" / "model.safetensors")
    convert_hf_to_mcore(tmp_path / "hf", tmp_path / "mc", dtype="fp32")
    assert read_model_spec(tmp_path / "mc").vision.hf_key_style == style
    convert_mcore_to_hf(tmp_path / "mc", tmp_path / "back")
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_missing_image_newline_is_named(next_hf, tmp_path):
    shutil.copytree(next_hf, tmp_path / "hf")
    t = load_file(tmp_path / "hf" / "model.safetensors")
    del t["image_newline"]
    save_file(t, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensors: \['image_newline'\]"):
        convert_hf_to_mcore(tmp_path / "hf", tmp_path / "mc")


def test_image_newline_is_frozen_with_the_aligner(next_hf):
    from mcore_align.models.families import spec_from_hf_config
    from mcore_align.models.spec import read_hf_config

    spec = spec_from_hf_config(read_hf_config(next_hf))
    vision = dict(_build(spec).vision.named_parameters())
    assert "image_newline" in vision and not any(p.requires_grad for p in vision.values())
    vision = dict(_build(spec, freeze_aligner=False).vision.named_parameters())
    for n, p in vision.items():
        assert p.requires_grad == (n == "image_newline" or n.startswith("multi_modal_projector.")), n


def test_mllm_demo_expands_like_llava_next_processor(shared_data, proc):
    """Every mllm_demo.json record: token counts depend on the image size (anyres), the ids equal
    LlavaNextProcessor's own expansion of the unexpanded rendered text, and pixel values /
    image sizes equal the processor's."""
    from mcore_align.data.formats import detect_format, iter_dataset, normalize
    from mcore_align.data.images import prepare_vision_example
    from mcore_align.data.tokenization import RecordTokenizer

    path = shared_data / "mllm_demo.json"
    counts = set()
    n = 0
    for loc, raw in iter_dataset(str(path), seed=0):
        ex = normalize(raw, detect_format(raw, loc), loc)
        v = prepare_vision_example(ex, loc, path.parent, proc)
        counts.update(v.tokens_per_image)
        rt = RecordTokenizer(proc.proc.tokenizer, "sft", 4096, "delete", False)
        resp = rt.responses(v.example, "x", loc)
        tok = rt.tokenize([[rt.templater.render(v.example, r, loc) for r in resp]])[0].tokens[0]
        text = rt.templater.render(ex, rt.responses(ex, "x", loc)[0], loc).text
        imgs = [Image.open(path.parent / p).convert("RGB") for p in ex.images]
        ref = proc.proc(text=[text], images=imgs, return_tensors="np", add_special_tokens=False)
        np.testing.assert_array_equal(tok, ref["input_ids"][0])
        assert int((tok == proc.image_token_id).sum()) == sum(v.tokens_per_image)
        np.testing.assert_array_equal(v.image_inputs["image_sizes"].numpy(), ref["image_sizes"])
        np.testing.assert_allclose(v.image_inputs["pixel_values"].numpy(), ref["pixel_values"], rtol=0, atol=1e-6)
        n += 1
    assert n == 6
    assert len(counts) > 1, counts  # image tokens depend on the image size (52 for 300x168, 70 for 300x199)


def test_micro_batch_pads_tile_counts_like_the_processor(shared_data, proc, tmp_path):
    """Images encoded one by one (as the loader does) and collated into one micro-batch equal
    the processor's batch of both: 5 and 3 tiles -> [2, 5, 3, 32, 32], the second zero-padded."""
    from mcore_align.data.batch import micro_batch_images
    from mcore_align.data.images import ImageEncoder

    big = shared_data / "mllm_demo_data" / "2.jpg"
    small = tmp_path / "small.png"
    Image.open(shared_data / "mllm_demo_data" / "1.jpg").convert("RGB").resize((40, 30)).save(small)
    mb = micro_batch_images([[str(big)], [str(small)], [str(big)]], ImageEncoder(proc))
    ref = proc.proc.image_processor(images=[Image.open(p).convert("RGB") for p in (big, small)], return_tensors="pt")
    assert mb["pixel_values"].shape == (2, 5, 3, 32, 32) and mb["image_index"].tolist() == [0, 1, 0]
    torch.testing.assert_close(mb["pixel_values"], ref["pixel_values"], rtol=0, atol=0)
    assert torch.equal(mb["image_sizes"], ref["image_sizes"])
    assert not mb["pixel_values"][1, 3:].any()  # the padding tiles
