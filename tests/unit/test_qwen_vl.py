"""Qwen2-VL / Qwen2.5-VL (tiny, written by transformers alone): conversion, M-RoPE positions, data.

* HF -> megatron -> HF bitwise round trip in both HF naming styles, strict key sets;
* the vision module (transformers' ``visual``) on the first stage, freeze_vit / freeze_aligner;
* per-sequence M-RoPE positions of a packed row equal transformers' ``get_rope_index`` on each
  sequence alone (an independent call on an HF model instance);
* placeholder expansion on the real demo images equals the chat template's image part expanded
  with ``Qwen2VLProcessor.replace_image_token`` (transformers' own code).
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mcore_align.checkpoint import CheckpointError, convert_hf_to_mcore, convert_mcore_to_hf, read_model_spec
from mcore_align.models.qwen2_vl import _STYLES
from mcore_align.models.tiny_vision import make_tiny_qwen2_vl

VERSIONS = {"2": ("qwen2_vl", "Qwen2VLForConditionalGeneration"),
            "2.5": ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration")}
IMAGE_TOKEN = 510


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwenvl")
    return {v: make_tiny_qwen2_vl(root / v.replace(".", "_"), v) for v in VERSIONS}


@pytest.mark.parametrize("version", list(VERSIONS))
def test_round_trip_is_bitwise(qwen, tmp_path, version):
    hf = qwen[version]
    convert_hf_to_mcore(hf, tmp_path / "mc", dtype="fp32")
    spec = read_model_spec(tmp_path / "mc")
    assert spec.family == "qwen2" and spec.vision.family == VERSIONS[version][0]
    assert spec.vision.hf_key_style == "legacy" and spec.vision.image_token_id == IMAGE_TOKEN
    assert spec.mrope_section == (2, 3, 3) and spec.qkv_bias
    convert_mcore_to_hf(tmp_path / "mc", tmp_path / "back")
    a, b = load_file(hf / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    assert any(k.startswith("visual.merger.") for k in a) and any(k.startswith("visual.blocks.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["architectures"] == [VERSIONS[version][1]]
    for f in ("preprocessor_config.json", "chat_template.jinja", "tokenizer.json"):
        assert (tmp_path / "back" / f).read_bytes() == (hf / f).read_bytes(), f
    from transformers import AutoModelForImageTextToText

    assert type(AutoModelForImageTextToText.from_pretrained(str(tmp_path / "back"))).__name__ == VERSIONS[version][1]


def test_module_layout_round_trips(qwen, tmp_path):
    """transformers' module names (``model.language_model.*``, ``model.visual.*``) read and written back."""
    shutil.copytree(qwen["2"], tmp_path / "hf")
    t = load_file(tmp_path / "hf" / "model.safetensors")
    to_module = {disk: canon for canon, disk in _STYLES["legacy"]}
    out = {}
    for name, x in t.items():
        out[next((to_module[p] + name[len(p):] for p in to_module if name.startswith(p)), name)] = x
    assert any(k.startswith("model.language_model.") for k in out) and any(k.startswith("model.visual.") for k in out)
    save_file(out, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    convert_hf_to_mcore(tmp_path / "hf", tmp_path / "mc", dtype="fp32")
    assert read_model_spec(tmp_path / "mc").vision.hf_key_style == "transformers"
    convert_mcore_to_hf(tmp_path / "mc", tmp_path / "back")
    b = load_file(tmp_path / "back" / "model.safetensors")
    assert out.keys() == b.keys() and all(torch.equal(out[k], b[k]) for k in out)


def test_missing_and_unexpected_vision_tensors_are_named(qwen, tmp_path):
    shutil.copytree(qwen["2.5"], tmp_path / "hf")
    t = load_file(tmp_path / "hf" / "model.safetensors")
    del t["visual.merger.ln_q.weight"]
    t["visual.extra.weight"] = torch.zeros(2)
    save_file(t, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensors: \['visual.merger.ln_q.weight'\]"
                       r".*unexpected tensors .*'visual.extra.weight'"):
        convert_hf_to_mcore(tmp_path / "hf", tmp_path / "mc")


def _build(spec, **opts):
    from mcore_align.checkpoint.layout import init_single_process
    from mcore_align.models.provider import ModelOptions, build_model

    rt = init_single_process()
    (model,) = build_model(spec, rt, opts=ModelOptions(core_attention="megatron", **opts))
    return model


@pytest.mark.parametrize("version", list(VERSIONS))
def test_vision_module_frozen_by_default_and_merger_as_aligner(qwen, version):
    from mcore_align.models.families import spec_from_hf_config
    from mcore_align.models.spec import read_hf_config

    spec = spec_from_hf_config(read_hf_config(qwen[version]))
    model = _build(spec)
    assert model.position_embedding_type == "mrope" and model.mrope_index is not None
    vision = {n: p for n, p in model.named_parameters() if n.startswith("vision.")}
    assert vision and not any(p.requires_grad for p in vision.values())
    model = _build(spec, freeze_aligner=False)
    for n, p in model.named_parameters():
        if n.startswith("vision."):
            assert p.requires_grad == n.startswith("vision.visual.merger."), n
    model = _build(spec, freeze_vit=False)
    for n, p in model.named_parameters():
        if n.startswith("vision."):
            assert p.requires_grad == (not n.startswith("vision.visual.merger.")), n


def _hf_rope_index(hf_dir, ids_1S, grid):
    """transformers' own get_rope_index on an HF model instance (one sequence)."""
    from transformers import AutoModelForImageTextToText

    m = AutoModelForImageTextToText.from_pretrained(str(hf_dir))
    pos, _ = m.model.get_rope_index(ids_1S, mm_token_type_ids=(ids_1S == IMAGE_TOKEN).int(), image_grid_thw=grid)
    return pos


@pytest.mark.parametrize("version", list(VERSIONS))
def test_packed_positions_restart_per_sequence(qwen, version):
    """A packed row [chosen | rejected | padding]: each sequence's positions equal
    transformers' on that sequence alone; image runs take their grids in order (image_index)."""
    from mcore_align.models.families import spec_from_hf_config
    from mcore_align.models.spec import read_hf_config
    from mcore_align.models.vision import VISION_FAMILIES, mrope_position_ids

    c = read_hf_config(qwen[version])
    rope = VISION_FAMILIES[VERSIONS[version][0]].rope_index(c)
    assert spec_from_hf_config(c).vision.image_token_id == IMAGE_TOKEN
    img_a, img_b = [508] + [IMAGE_TOKEN] * 10 + [509], [508] + [IMAGE_TOKEN] * 12 + [509]
    s1 = torch.tensor([1, 2, 3] + img_a + [4, 5] + img_b + [6, 7])       # images a then b
    s2 = torch.tensor([1, 2, 3] + img_a + [4, 5] + img_b + [8, 9, 10])   # the same prompt
    s3 = torch.tensor([11, 12] + img_b + [13])                           # image b again
    pad = torch.zeros(3, dtype=torch.long)
    row = torch.cat([s1, s2, s3, pad])[None]
    cu = torch.tensor([0, len(s1), len(s1) + len(s2), len(s1) + len(s2) + len(s3), row.shape[1]])
    grids = torch.tensor([[1, 4, 10], [1, 6, 8]])
    images = {"image_grid_thw": grids, "image_index": torch.tensor([0, 1, 0, 1, 1])}
    pos = mrope_position_ids(rope, IMAGE_TOKEN, row, images, cu)
    assert pos.shape == (3, 1, row.shape[1])
    for (a, b), seq, g in zip(zip(cu[:-2].tolist(), cu[1:-1].tolist()), (s1, s2, s3),
                              (grids, grids, grids[1:])):
        want = _hf_rope_index(qwen[version], seq[None], g)
        torch.testing.assert_close(pos[:, :, a:b], want, rtol=0, atol=0)
    torch.testing.assert_close(pos[:, 0, -3:], torch.arange(3).expand(3, 3), rtol=0, atol=0)
    # The 3-D positions are not the 1-D ones: image tokens share t, vary in h / w.
    assert not torch.equal(pos[1, 0, : len(s1)], pos[2, 0, : len(s1)])
    with pytest.raises(ValueError, match="2 image_grid_thw rows but 1 image token runs"):
        mrope_position_ids(rope, IMAGE_TOKEN, s3[None], {"image_grid_thw": grids.flip(0)}, None)


@pytest.fixture(scope="module")
def proc(qwen):
    from mcore_align.models.vision import vision_processor

    return vision_processor(qwen["2"])


def _reference_ids(proc, messages, images):
    """transformers' Qwen2-VL path: chat template with image parts, then each <|image_pad|>
    expanded by ``Qwen2VLProcessor.replace_image_token`` (the processor itself cannot be built
    here: its video processor needs torchvision)."""
    from types import SimpleNamespace

    from transformers import Qwen2VLProcessor

    tok, ip = proc.proc.tokenizer, proc.proc.image_processor
    text = tok.apply_chat_template(messages, tokenize=False)
    inputs = ip(images=images, return_tensors="pt")
    holder = SimpleNamespace(image_processor=ip, image_token="<|image_pad|>")
    parts = text.split("<|image_pad|>")
    assert len(parts) == len(images) + 1
    text = parts[0] + "".join(Qwen2VLProcessor.replace_image_token(holder, inputs, i) + p
                              for i, p in enumerate(parts[1:]))
    return tok(text, add_special_tokens=False)["input_ids"], inputs


def _parts(content: str) -> list:
    """``"<image>Who?"`` -> template content parts ``[{"type": "image"}, {"type": "text", ...}]``."""
    out = []
    for i, piece in enumerate(content.split("<image>")):
        if i:
            out.append({"type": "image"})
        if piece:
            out.append({"type": "text", "text": piece})
    return out


def test_mllm_demo_expands_like_transformers(shared_data, proc):
    """Every record of mllm_demo.json (real images of different sizes): token ids through the
    data side equal the chat template's image parts expanded by transformers' Qwen2-VL code,
    and the image tensors equal the image processor's."""
    from PIL import Image

    from mcore_align.data.formats import detect_format, iter_dataset, normalize
    from mcore_align.data.images import prepare_vision_example
    from mcore_align.data.tokenization import RecordTokenizer

    path = shared_data / "mllm_demo.json"
    n, counts_seen = 0, set()
    for loc, raw in iter_dataset(str(path), seed=0):
        ex = normalize(raw, detect_format(raw, loc), loc)
        v = prepare_vision_example(ex, loc, path.parent, proc)
        counts_seen.update(v.tokens_per_image)
        rt = RecordTokenizer(proc.proc.tokenizer, "sft", 4096, "delete", False)
        resp = rt.responses(v.example, "x", loc)
        rec = rt.tokenize([[rt.templater.render(v.example, r, loc) for r in resp]])[0]
        tok = rec.tokens[0]
        msgs = [{"role": m["role"], "content": _parts(m["content"])} for m in ex.prompt]
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": resp[0]}]})
        imgs = [Image.open(path.parent / p).convert("RGB") for p in ex.images]
        ref_ids, ref = _reference_ids(proc, msgs, imgs)
        assert list(tok) == ref_ids, loc
        torch.testing.assert_close(v.image_inputs["pixel_values"], ref["pixel_values"], rtol=0, atol=0)
        assert torch.equal(v.image_inputs["image_grid_thw"], ref["image_grid_thw"])
        assert not rec.targets[0][tok == IMAGE_TOKEN].any()
        n += 1
    assert n == 6 and len(counts_seen) > 1, counts_seen  # images of different token counts


def test_cached_image_records_keep_per_image_grids(proc, shared_data):
    """Micro-batch collation: flattened patches concatenated, one grid row per distinct image."""
    from mcore_align.data.batch import micro_batch_images
    from mcore_align.data.images import ImageEncoder

    d = shared_data / "mllm_demo_data"
    enc = ImageEncoder(proc)
    mb = micro_batch_images([[str(d / "1.jpg")], [str(d / "1.jpg")], [str(d / "2.jpg")]], enc)
    assert mb["image_grid_thw"].tolist() == [[1, 4, 10], [1, 6, 8]]
    assert mb["pixel_values"].shape == (40 + 48, 384) and mb["image_index"].tolist() == [0, 0, 1]


HUB_QWEN2_VL_7B = {  # config.json of Qwen/Qwen2-VL-7B-Instruct (flat text fields, rope_scaling "mrope")
    "architectures": ["Qwen2VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 32768,
    "max_window_layers": 28, "model_type": "qwen2_vl", "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 152064,
}


def test_hub_config_maps_to_spec():
    """The hub's flat Qwen2-VL config (pre-5.x layout): text fields, theta and M-RoPE sections found."""
    from mcore_align.models.adapter import adapter_for
    from mcore_align.models.families import spec_from_hf_config

    spec = spec_from_hf_config(HUB_QWEN2_VL_7B)
    assert (spec.family, spec.vision.family, spec.vision.image_token_id) == ("qwen2", "qwen2_vl", 151655)
    assert (spec.num_layers, spec.hidden_size, spec.head_dim, spec.num_query_groups) == (28, 3584, 128, 4)
    assert spec.rope_theta == 1e6 and spec.mrope_section == (16, 24, 24) and spec.qkv_bias
    assert sum(spec.mrope_section) == spec.head_dim // 2
    from dataclasses import replace

    spec = replace(spec, vision=replace(spec.vision, hf_key_style="legacy"))
    names = adapter_for(spec).hf_names()  # hub layout: model.layers.*, visual.*, lm_head.weight
    assert "visual.blocks.31.attn.qkv.weight" in names and "visual.merger.mlp.2.weight" in names
    assert "model.layers.27.self_attn.q_proj.bias" in names and "lm_head.weight" in names
