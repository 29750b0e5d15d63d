"""InternVL in transformers' format (tiny, written by transformers alone): HF -> megatron -> HF
bitwise, and placeholder expansion through the processor stand-in checked against the
documented InternVL layout, built by hand: ``<img>`` + ``<IMG_CONTEXT>`` x (4 x tiles) + ``</img>``."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mcore_align.checkpoint import convert_hf_to_mcore, convert_mcore_to_hf, read_model_spec
from mcore_align.models.tiny_vision import INTERNVL_TOKENS, make_tiny_internvl
from tests.unit.test_vision_conversion import _restyle


@pytest.fixture(scope="module")
def ivl(tmp_path_factory):
    return make_tiny_internvl(tmp_path_factory.mktemp("internvl") / "hf")


@pytest.mark.parametrize("style", ["legacy", "transformers"])
def test_round_trip_is_bitwise(ivl, tmp_path, style):
    src = ivl
    if style != "legacy":
        _restyle(ivl, tmp_path / "hf", style)
        src = tmp_path / "hf"
    convert_hf_to_mcore(src, tmp_path / "mc", dtype="fp32")
    spec = read_model_spec(tmp_path / "mc")
    assert spec.family == "qwen2" and spec.vision.family == "internvl" and spec.vision.hf_key_style == style
    assert spec.vision.image_token_id == 510
    convert_mcore_to_hf(tmp_path / "mc", tmp_path / "back")
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    assert any(".lambda_1" in k for k in a) and any("multi_modal_projector.layer_norm" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_processor_cannot_be_built_without_torchvision_so_the_standin_is_used(ivl):
    """If this starts failing, transformers (or torchvision) changed: AutoProcessor may then work."""
    from transformers import AutoProcessor

    from mcore_align.models.internvl import InternVLImageProcessing
    from mcore_align.models.vision import vision_processor

    pytest.importorskip("PIL")
    try:
        import torchvision  # noqa: F401
        pytest.skip("torchvision is installed here")
    except ImportError:
        pass
    with pytest.raises(Exception):
        AutoProcessor.from_pretrained(str(ivl))
    vp = vision_processor(ivl)
    assert isinstance(vp.proc, InternVLImageProcessing)
    assert (vp.image_token, vp.image_start, vp.image_end) == ("<IMG_CONTEXT>", "<img>", "</img>")


def test_mllm_demo_expands_like_the_documented_internvl_layout(shared_data, ivl):
    from mcore_align.data.formats import detect_format, iter_dataset, normalize
    from mcore_align.data.images import prepare_vision_example
    from mcore_align.models.vision import vision_processor
    from mcore_align.data.tokenization import RecordTokenizer

    vp = vision_processor(ivl)
    tok = vp.proc.tokenizer
    path = shared_data / "mllm_demo.json"
    n = 0
    for loc, raw in iter_dataset(str(path), seed=0):
        ex = normalize(raw, detect_format(raw, loc), loc)
        v = prepare_vision_example(ex, loc, path.parent, vp)
        imgs = [Image.open(path.parent / p).convert("RGB") for p in ex.images]
        # independent: GotOcr2 tiles (crop_to_patches, as InternVLProcessor passes) and the layout by hand
        tiles = [int(vp.proc.image_processor(images=[im], crop_to_patches=True, return_tensors="pt")["num_patches"][0])
                 for im in imgs]
        assert v.tokens_per_image == [4 * t for t in tiles] and all(t > 1 for t in tiles)
        assert v.image_inputs["num_patches"].tolist() == tiles
        assert v.image_inputs["pixel_values"].shape == (sum(tiles), 3, 32, 32)
        rt = RecordTokenizer(tok, "sft", 4096, "delete", False)
        resp = rt.responses(v.example, "x", loc)
        ids = rt.tokenize([[rt.templater.render(v.example, r, loc) for r in resp]])[0].tokens[0]
        it = iter(tiles)
        text = rt.templater.render(ex, rt.responses(ex, "x", loc)[0], loc).text
        parts = text.split("<image>")
        by_hand = parts[0] + "".join(INTERNVL_TOKENS["start_image_token"]
                                     + INTERNVL_TOKENS["context_image_token"] * (4 * next(it))
                                     + INTERNVL_TOKENS["end_image_token"] + p for p in parts[1:])
        np.testing.assert_array_equal(ids, tok(by_hand, add_special_tokens=False)["input_ids"])
        assert int((ids == 508).sum()) == int((ids == 509).sum()) == len(ex.images)  # <img>, </img>
        n += 1
    assert n == 6
