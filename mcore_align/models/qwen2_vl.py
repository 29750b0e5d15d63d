"""Qwen2-VL and Qwen2.5-VL: family data, the HF vision module, M-RoPE positions, the adapter.

Vision side: transformers' own ``model.visual`` (``Qwen2VisionTransformerPretrainedModel`` /
``Qwen2_5_VisionTransformerPretrainedModel``, the patch merger included), built from the
config with ``_from_config`` exactly as ``Qwen2VLModel.__init__`` does. Features come from
transformers' ``get_image_features`` bound to the holder module: ``pixel_values`` (flattened
patches of every image, concatenated on dim 0) + ``image_grid_thw`` ``[N_img, 3]`` -> one
``[t*h*w / merge**2, H_text]`` tensor per image. ``freeze_vit`` freezes ``visual.patch_embed``
and ``visual.blocks``, ``freeze_aligner`` freezes ``visual.merger``.

Language model: the provider's ``GPTModel`` (Qwen2 text family) with megatron's
``position_embedding_type="mrope"``; ``mrope_section`` comes from the text config's
``rope_parameters`` (old hub configs: ``rope_scaling``). The 3-D positions are transformers'
own ``get_rope_index`` run on each packed sequence alone (``models/vision.py::mrope_position_ids``).

Data: transformers' Qwen2-VL *processor* cannot be built here (its video processor needs
torchvision), so :class:`QwenVLProcessor` uses the image processor alone plus the documented
token count (``Qwen2VLProcessor.replace_image_token``: ``prod(image_grid_thw) / merge_size**2``
``<|image_pad|>`` tokens); each ``<image>`` placeholder becomes what the chat template emits for
an image part (``<|vision_start|><|image_pad|><|vision_end|>``) with the pad repeated.

HF tensor names:

============  =============================  ===============  =========
style         language model                 vision           lm_head
============  =============================  ===============  =========
transformers  model.language_model.*         model.visual.*   lm_head.*
legacy        model.*                        visual.*         lm_head.*
============  =============================  ===============  =========

``legacy`` is the hub layout and what transformers 5.2x ``save_pretrained`` writes;
``transformers`` is the module layout.
"""
from __future__ import annotations

from pathlib import Path

import torch

from mcore_align.data.images import VisionProcessor
from mcore_align.models.llava import LlavaAdapter
from mcore_align.models.vision import VisionFamily, register_vision_family

_STYLES: dict[str, tuple[tuple[str, str], ...]] = {
    "transformers": (),
    "legacy": (("model.language_model.", "model."), ("model.visual.", "visual.")),
}


def _classes(version: str):
    """(config class, model class whose get_image_features / get_rope_index we use, vision class)."""
    if version == "2":
        from transformers import Qwen2VLConfig
        from transformers.models.qwen2_vl.modeling_qwen2_vl import (
            Qwen2VisionTransformerPretrainedModel,
            Qwen2VLModel,
        )

        return Qwen2VLConfig, Qwen2VLModel, Qwen2VisionTransformerPretrainedModel
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
        Qwen2_5_VLModel,
    )

    return Qwen2_5_VLConfig, Qwen2_5_VLModel, Qwen2_5_VisionTransformerPretrainedModel


def _config(c: dict, version: str):
    return _classes(version)[0].from_dict(c)


def _text_config(c: dict, version: str) -> dict:
    """The language model as a plain Qwen2 config (transformers' defaults filled in; the tied
    embeddings flag lives at the top level of VL configs). ``rope_parameters`` keeps
    ``mrope_section``, which ``spec_from_hf_config`` reads."""
    cfg = _config(c, version)
    text = cfg.text_config.to_dict()
    text.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"],
                tie_word_embeddings=bool(cfg.tie_word_embeddings))
    if not (text.get("rope_parameters") or {}).get("mrope_section"):
        raise ValueError("config.json: a Qwen2-VL config needs rope_parameters.mrope_section (or rope_scaling)")
    return text


class QwenVLVision(torch.nn.Module):
    """transformers' Qwen2(.5)-VL vision transformer + merger as ``visual``, with the model's feature code."""

    vit_children = ("visual.patch_embed", "visual.blocks")
    aligner_children = ("visual.merger",)

    def __init__(self, hf_config: dict, version: str):
        super().__init__()
        _, self._model_cls, vision_cls = _classes(version)
        self.config = _config(hf_config, version)
        self.visual = vision_cls._from_config(self.config.vision_config)

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Patches of every image ``[sum_i t_i*h_i*w_i, C*T*P*P]`` + ``image_grid_thw`` ``[N_img, 3]``
        -> one ``[t_i*h_i*w_i / merge**2, H_text]`` feature tensor per image."""
        out = self._model_cls.get_image_features(self, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                                                 return_dict=True)
        return list(out.pooler_output)


class QwenVLRopeIndex:
    """transformers' ``get_rope_index`` for ONE sequence (no parameters: lives on every PP stage)."""

    def __init__(self, hf_config: dict, version: str):
        _, self._model_cls, _ = _classes(version)
        self.config = _config(hf_config, version)
        self.get_vision_position_ids = self._model_cls.get_vision_position_ids.__get__(self)

    def __call__(self, ids_1S: torch.Tensor, image_mask_1S: torch.Tensor, grid_thw: torch.Tensor | None):
        pos, _ = self._model_cls.get_rope_index(self, ids_1S, mm_token_type_ids=image_mask_1S.int(),
                                                image_grid_thw=grid_thw)
        return pos  # [3, 1, S]


class QwenVLAdapter(LlavaAdapter):
    """Qwen2 language model under ``model.language_model.``, vision tensors under ``model.visual.``."""

    styles = _STYLES


class QwenVLProcessor(VisionProcessor):
    """The data side's processor for Qwen2(.5)-VL: tokenizer + ``Qwen2VLImageProcessor``, with
    ``<image>`` -> ``<|vision_start|>`` + ``<|image_pad|>`` x n + ``<|vision_end|>``."""

    def __init__(self, tokenizer, image_processor):  # noqa: D107 - no transformers processor to wrap
        from types import SimpleNamespace

        self.proc = SimpleNamespace(tokenizer=tokenizer, image_processor=image_processor)
        self.image_token = "<|image_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.vision_start, self.vision_end = "<|vision_start|>", "<|vision_end|>"
        for t in (self.image_token, self.vision_start, self.vision_end):
            if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id):
                raise ValueError(f"tokenizer has no {t} token (needed by Qwen2-VL image placeholders)")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "QwenVLProcessor":
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return cls(AutoTokenizer.from_pretrained(str(path)), Qwen2VLImageProcessorPil.from_pretrained(str(path)))

    def image_text(self, n_tokens: int) -> str:
        """What one image becomes in the text (the chat template's image part, pad expanded)."""
        return self.vision_start + self.image_token * n_tokens + self.vision_end

    def encode_images(self, images: list) -> tuple[dict, list[int]]:
        """``({"pixel_values": [sum patches, D], "image_grid_thw": [N, 3]}, tokens per image)``;
        tokens = ``prod(grid_thw) // merge_size**2`` (``Qwen2VLProcessor.replace_image_token``)."""
        if not images:
            return {}, []
        ip = self.proc.image_processor
        tensors = dict(ip(images=images, return_tensors="pt"))
        counts = [int(g.prod()) // ip.merge_size ** 2 for g in tensors["image_grid_thw"]]
        return tensors, counts

    def model_inputs(self, text: str, images: list) -> tuple[dict, dict]:
        """``<image>`` in rendered ``text`` -> ``image_text`` (as ``Qwen2VLProcessor`` expands the
        template's image part), tokenized; plus ``mm_token_type_ids`` (1 at image tokens), which
        transformers' processor returns and the HF model needs for its M-RoPE."""
        tensors, counts = self.encode_images(images)
        it = iter(counts)
        parts = text.split("<image>")
        text = parts[0] + "".join(self.image_text(next(it)) + p for p in parts[1:])
        ids = self.proc.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return {"input_ids": ids, "mm_token_type_ids": (ids == self.image_token_id).int()}, tensors


for _version, _name, _arch in (("2", "qwen2_vl", "Qwen2VLForConditionalGeneration"),
                               ("2.5", "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration")):
    register_vision_family(VisionFamily(
        name=_name,
        architectures=(_arch,),
        text_config=lambda c, v=_version: _text_config(c, v),
        image_token_id=lambda c, v=_version: _config(c, v).image_token_id,
        build=lambda c, v=_version: QwenVLVision(c, v),
        adapter=QwenVLAdapter,
        key_styles=lambda: tuple(_STYLES),
        rope_index=lambda c, v=_version: QwenVLRopeIndex(c, v),
        processor=QwenVLProcessor.from_pretrained,
    ))
