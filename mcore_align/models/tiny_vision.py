"""Tiny random-init LLaVA-1.5 and LLaVA-NeXT checkpoints, written by transformers alone, offline.

``make_tiny_llava`` writes what a hub LLaVA-1.5 directory holds: ``config.json``
(``LlavaForConditionalGeneration``), safetensors, the tokenizer with an ``<image>``
special token, ``preprocessor_config.json`` (a CLIP image processor) and
``processor_config.json`` (``LlavaProcessor``: patch size, feature selection), so
``AutoProcessor.from_pretrained(dir)`` expands ``<image>`` into image tokens.

Sizes: CLIP vision tower 2 layers / hidden 32 / 32x32 images / patch 8 -> 16 patches
(+1 class token, dropped by ``vision_feature_select_strategy="default"``), so every
image is 16 ``<image>`` tokens; the text model is the project's tiny Llama or Qwen2.
"""
from __future__ import annotations

from pathlib import Path

import torch

from mcore_align.models.tiny import TINY_FAMILIES
from mcore_align.models.tiny_tokenizer import build_tiny_tokenizer

IMAGE_TOKEN = "<image>"


def make_tiny_llava(
    out_dir: str | Path,
    text_family: str = "llama",
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    ffn_hidden_size: int = 160,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 512,
    vision_layers: int = 3,
    vision_hidden: int = 32,
    image_size: int = 32,
    patch_size: int = 8,
    seed: int = 0,
) -> Path:
    """Write a random-init LLaVA-1.5 checkpoint + processor to ``out_dir``; returns the path.

    ``vocab_size`` counts the ``<image>`` token, which is the last id (``vocab_size - 1``).
    ``vision_layers``: CLIP encoder layers; LLaVA reads the hidden states of the
    second-to-last one (``vision_feature_layer=-2``), so the last layer is unused, as in
    the real LLaVA-1.5.
    """
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    out = Path(out_dir)
    tok, text_cfg, vision_cfg = _tiny_parts(out, text_family, num_layers, hidden_size, ffn_hidden_size, num_heads,
                                            num_kv_heads, vocab_size, vision_layers, vision_hidden, image_size,
                                            patch_size)
    cfg = LlavaConfig(
        vision_config=vision_cfg, text_config=text_cfg, image_token_index=vocab_size - 1,
        image_seq_length=(image_size // patch_size) ** 2, projector_hidden_act="gelu",
        vision_feature_select_strategy="default", vision_feature_layer=-2,
        architectures=["LlavaForConditionalGeneration"],
    )
    _save_random(LlavaForConditionalGeneration, cfg, out, seed)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
    )
    LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    ).save_pretrained(out)
    return out


NEXT_GRID_PINPOINTS = ((32, 64), (64, 32), (64, 64), (32, 96), (96, 32))
"""Tiny anyres grid (in pixels, [height, width]; tiles are 32 x 32): the demo photos
(``mllm_demo_data/*.jpg``, 300 wide, 166-199 high) fit 64 x 64 best -> 4 tiles + the base
image; a 40 x 30 image fits 32 x 64 -> 2 tiles + the base image."""


def make_tiny_llava_next(
    out_dir: str | Path,
    text_family: str = "llama",
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    ffn_hidden_size: int = 160,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 512,
    vision_layers: int = 3,
    vision_hidden: int = 32,
    image_size: int = 32,
    patch_size: int = 8,
    grid_pinpoints=NEXT_GRID_PINPOINTS,
    seed: int = 0,
) -> Path:
    """Write a random-init LLaVA-NeXT (``LlavaNextForConditionalGeneration``) checkpoint +
    ``LlavaNextProcessor`` files to ``out_dir``; returns the path.

    Same tiny CLIP tower and language model as :func:`make_tiny_llava`, with anyres tiling:
    ``image_grid_pinpoints`` (default :data:`NEXT_GRID_PINPOINTS`) makes the real demo images
    several 32 x 32 tiles; an image becomes 16 base tokens + its unpadded tile grid with one
    ``image_newline`` per grid row, so the token count depends on the image's size
    (``mllm_demo_data/1.jpg``: 16 + 4 rows x (8 + 1) = 52).
    """
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    out = Path(out_dir)
    tok, text_cfg, vision_cfg = _tiny_parts(out, text_family, num_layers, hidden_size, ffn_hidden_size, num_heads,
                                            num_kv_heads, vocab_size, vision_layers, vision_hidden, image_size,
                                            patch_size)
    pinpoints = [list(p) for p in grid_pinpoints]
    cfg = LlavaNextConfig(
        vision_config=vision_cfg, text_config=text_cfg, image_token_index=vocab_size - 1,
        image_grid_pinpoints=pinpoints, image_seq_length=(image_size // patch_size) ** 2,
        projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-2,
        architectures=["LlavaNextForConditionalGeneration"],
    )
    _save_random(LlavaNextForConditionalGeneration, cfg, out, seed)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    ).save_pretrained(out)
    return out


INTERNVL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                   "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
"""InternVL's image tokens (tokenizer attributes that ``InternVLProcessor`` reads)."""


def make_tiny_internvl(out_dir: str | Path, *, vocab_size: int = 512, seed: int = 0) -> Path:
    """Write a random-init InternVL (``InternVLForConditionalGeneration``, transformers' format)
    with the tiny Qwen2 language model to ``out_dir``; returns the path.

    InternViT 2 layers / hidden 32 / 32 x 32 tiles / patch 8 -> 16 patches -> pixel shuffle
    (``downsample_ratio`` 0.5) -> ``image_seq_length`` 4 tokens per tile; the image processor
    (``GotOcr2ImageProcessorPil``, ``preprocessor_config.json``) cuts up to 4 tiles + a
    thumbnail. The tokenizer holds ``<img>``, ``</img>``, ``<IMG_CONTEXT>`` (the image token,
    ``vocab_size - 2``) and ``<video>`` as the last ids. ``InternVLProcessor`` itself cannot be
    built here (it needs torchvision for its video processor), so its ``processor_config.json``
    is written by hand.
    """
    import json

    from transformers import (
        AutoConfig,
        AutoTokenizer,
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
    )
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    arch, model_type, tok_style, extra = TINY_FAMILIES["qwen2"]
    out = Path(out_dir)
    tok = build_tiny_tokenizer(out, style=tok_style, vocab_size=vocab_size - len(INTERNVL_TOKENS))
    tok.add_special_tokens({"additional_special_tokens": list(INTERNVL_TOKENS.values())})
    tok.save_pretrained(out)
    # reloaded with the named tokens, so tokenizer_config.json maps them (tok.context_image_token, ...)
    tok = AutoTokenizer.from_pretrained(out, extra_special_tokens=dict(INTERNVL_TOKENS))
    image_token_id = tok.convert_tokens_to_ids(INTERNVL_TOKENS["context_image_token"])
    assert image_token_id == vocab_size - 2 and len(tok) == vocab_size, (image_token_id, len(tok))
    tok.save_pretrained(out)
    text_cfg = AutoConfig.for_model(
        model_type, architectures=[arch], vocab_size=vocab_size, hidden_size=64, intermediate_size=160,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **extra,
    )
    vision_cfg = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      image_size=[32, 32], patch_size=[8, 8])
    cfg = InternVLConfig(vision_config=vision_cfg, text_config=text_cfg, image_token_id=image_token_id,
                         image_seq_length=4, downsample_ratio=0.5, vision_feature_layer=-1,
                         vision_feature_select_strategy="default", tie_word_embeddings=False,
                         architectures=["InternVLForConditionalGeneration"])
    _save_random(InternVLForConditionalGeneration, cfg, out, seed)
    GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1,
                             max_patches=4).save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "InternVLProcessor",
                                                           "image_seq_length": 4}, indent=2) + "\n")
    return out


def _tiny_parts(out: Path, text_family, num_layers, hidden_size, ffn_hidden_size, num_heads, num_kv_heads,
                vocab_size, vision_layers, vision_hidden, image_size, patch_size):
    """The tokenizer (with ``<image>`` as the last id, ``vocab_size - 1``), the text config
    and the CLIP vision config shared by the tiny LLaVA checkpoints."""
    from transformers import AutoConfig, CLIPVisionConfig

    if text_family not in ("llama", "qwen2"):
        raise ValueError(f"tiny LLaVA text family must be llama or qwen2, got {text_family!r}")
    arch, model_type, tok_style, extra = TINY_FAMILIES[text_family]
    tok = build_tiny_tokenizer(out, style=tok_style, vocab_size=vocab_size - 1)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_token_id == vocab_size - 1 and len(tok) == vocab_size, (image_token_id, len(tok))
    text_cfg = AutoConfig.for_model(
        model_type, architectures=[arch], vocab_size=vocab_size, hidden_size=hidden_size,
        intermediate_size=ffn_hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, max_position_embeddings=4096, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **extra,
    )
    vision_cfg = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
        num_attention_heads=4, image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden,
    )
    return tok, text_cfg, vision_cfg


def _save_random(model_cls, cfg, out: Path, seed: int) -> None:
    torch.manual_seed(seed)
    model = model_cls(cfg).float()
    with torch.no_grad():  # norms at 1 +- noise and random biases, so every weight matters
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
    model.save_pretrained(out)
    model.generation_config.save_pretrained(out)


# ---- Qwen2-VL / Qwen2.5-VL --------------------------------------------------------------------
QWEN_VL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

# Qwen2-VL-7B-Instruct's chat template (an image part -> <|vision_start|><|image_pad|><|vision_end|>).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_qwen2_vl(
    out_dir: str | Path,
    version: str = "2",
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    ffn_hidden_size: int = 160,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 512,
    vision_depth: int = 2,
    vision_hidden: int = 32,
    patch_size: int = 8,
    max_pixels: int = 64 * 64,
    seed: int = 0,
) -> Path:
    """Write a random-init Qwen2-VL (``version="2"``) or Qwen2.5-VL (``"2.5"``) checkpoint.

    The last four ids are ``<|vision_start|> <|vision_end|> <|image_pad|> <|video_pad|>``;
    M-RoPE sections ``[2, 3, 3]`` (head_dim 16 -> 8 rotary pairs), so temporal, height and
    width positions all matter. Images: patch 8, merge 2, at most ``max_pixels`` (64x64 ->
    at most 16 image tokens; the demo images become grids (1, 4, 10) and (1, 6, 8), i.e. 10
    and 12 tokens). Qwen2.5-VL: window attention in block 0 (window 32 px), full in block 1.
    ``preprocessor_config.json`` holds the ``Qwen2VLImageProcessorPil`` settings.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig
    from transformers import Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if version not in ("2", "2.5"):
        raise ValueError(f"tiny Qwen-VL version must be '2' or '2.5', got {version!r}")
    out = Path(out_dir)
    tok = build_tiny_tokenizer(out, style="chatml", vocab_size=vocab_size - len(QWEN_VL_TOKENS))
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_VL_TOKENS)})
    ids = tok.convert_tokens_to_ids(list(QWEN_VL_TOKENS))
    assert ids == list(range(vocab_size - 4, vocab_size)) and len(tok) == vocab_size, (ids, len(tok))
    tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    tok.save_pretrained(out)
    text = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=ffn_hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    common = dict(text_config=text, image_token_id=ids[2], video_token_id=ids[3], vision_start_token_id=ids[0],
                  vision_end_token_id=ids[1], tie_word_embeddings=False)
    if version == "2":
        vision = dict(depth=vision_depth, embed_dim=vision_hidden, hidden_size=hidden_size, num_heads=4,
                      patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2)
        cfg = Qwen2VLConfig(vision_config=vision, architectures=["Qwen2VLForConditionalGeneration"], **common)
        cls = Qwen2VLForConditionalGeneration
    else:
        vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                      num_heads=4, out_hidden_size=hidden_size, patch_size=patch_size, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=4 * patch_size, fullatt_block_indexes=[vision_depth - 1],
                      tokens_per_second=2)
        cfg = Qwen2_5_VLConfig(vision_config=vision, architectures=["Qwen2_5_VLForConditionalGeneration"], **common)
        cls = Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = cls(cfg).float()
    with torch.no_grad():  # norms at 1 +- noise and random biases, so every weight matters
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight") or name.endswith("ln_q.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
    model.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=2, temporal_patch_size=2,
                             min_pixels=16 * 16, max_pixels=max_pixels).save_pretrained(out)
    return out
