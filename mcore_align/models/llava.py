"""LLaVA-1.5 (``LlavaForConditionalGeneration``): family data, the HF vision module, the adapter.

The vision module holds transformers' own ``CLIPVisionModel`` (built with
``AutoModel.from_config(vision_config)``, exactly as ``LlavaModel.__init__`` does) and
``LlavaMultiModalProjector``; its features come from transformers'
``LlavaModel.get_image_features`` bound to it, so ``vision_feature_layer`` (-2 for
LLaVA-1.5) and ``vision_feature_select_strategy`` ("default": drop the class token)
mean exactly what they mean in transformers.

Megatron parameter names: the language model's (``embedding.*``, ``decoder.*``,
``output_layer.*``) plus ``vision.<name in the HF vision module>``, e.g.
``vision.vision_tower.encoder.layers.0.mlp.fc1.weight``,
``vision.multi_modal_projector.linear_1.weight``.

HF tensor names differ between transformers versions and hub repos; the styles below map
transformers' module names (``model.language_model.layers.0...``) to what is on disk:

================  =======================  ==========================  ==========================
style             language model           vision tower                projector / lm_head
================  =======================  ==========================  ==========================
transformers      model.language_model.*   model.vision_tower.*        model.multi_modal_projector.*, lm_head.*
legacy            language_model.model.*   vision_tower.*              multi_modal_projector.*, language_model.lm_head.*
legacy_clip       language_model.model.*   vision_tower.vision_model.* multi_modal_projector.*, language_model.lm_head.*
================  =======================  ==========================  ==========================

``legacy`` is what transformers 5.2x ``save_pretrained`` writes; ``legacy_clip`` is the
llava-hf hub layout (older CLIP modules had a ``vision_model`` level); ``transformers`` is
the module layout, written by some 5.x versions. Conversion records the style it read
and export writes the same one, so a round trip reproduces the input files.
"""
from __future__ import annotations

from typing import Callable

import torch

from mcore_align.models.adapter import Rule
from mcore_align.models.spec import ModelSpec
from mcore_align.models.vision import VisionFamily, register_vision_family

# canonical (module-name) prefix -> on-disk prefix, per style; first match wins.
_STYLES: dict[str, tuple[tuple[str, str], ...]] = {
    "transformers": (),
    "legacy": (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
               ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
               ("model.image_newline", "image_newline")),
    "legacy_clip": (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                    ("model.vision_tower.", "vision_tower.vision_model."),
                    ("model.multi_modal_projector.", "multi_modal_projector."),
                    ("model.image_newline", "image_newline")),
}
"""``image_newline``: LLaVA-NeXT's row separator (``models/llava_next.py``), a top-level tensor."""


def _llava_config(c: dict):
    from transformers import LlavaConfig

    return LlavaConfig.from_dict(c)


def text_config_of(config: Callable[[dict], object]) -> Callable[[dict], dict]:
    """``VisionFamily.text_config`` for a LLaVA-style config: the language model's config
    with transformers' defaults filled in (hub LLaVA configs carry only the non-default
    text fields). ``config``: top-level dict -> the transformers config object."""

    def text_config(c: dict) -> dict:
        text = config(c).text_config.to_dict()
        if not text.get("architectures"):
            text.pop("architectures", None)  # selected by model_type then
        return text

    return text_config


class LlavaVision(torch.nn.Module):
    """transformers' CLIP vision tower + LLaVA projector, with LlavaModel's feature code."""

    vit_children = ("vision_tower",)
    aligner_children = ("multi_modal_projector",)

    def __init__(self, hf_config: dict):
        super().__init__()
        from transformers import AutoModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        self.config = _llava_config(hf_config)
        if self.config.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"config.json: vision_feature_select_strategy="
                             f"{self.config.vision_feature_select_strategy!r} is not supported")
        self.vision_tower = AutoModel.from_config(self.config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(self.config)

    def image_features(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """``pixel_values`` ``[N_img, 3, H, W]`` -> one ``[tokens_per_image, H_text]`` tensor per image."""
        from transformers.models.llava.modeling_llava import LlavaModel

        out = LlavaModel.get_image_features(
            self, pixel_values=pixel_values.to(self.multi_modal_projector.linear_1.weight.dtype),
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy, return_dict=True)
        return list(out.pooler_output)


class LlavaAdapter:
    """Language-model adapter with LLaVA's prefixes, plus one identity rule per vision tensor
    (LLaVA-1.5 and LLaVA-NeXT: the vision module's parameter names are LlavaModel's children)."""

    styles = _STYLES
    """canonical (module-name) prefix -> on-disk prefix, per style (other families reuse the class)."""

    def __init__(self, spec: ModelSpec, text_adapter, vision_names: list[str]):
        self.spec = spec
        self.text = text_adapter
        style = spec.vision.hf_key_style
        if style not in self.styles:
            raise ValueError(f"{spec.vision.family} HF key style {style!r} unknown; known: {sorted(self.styles)}")
        self._prefixes = self.styles[style]
        one = lambda m, h: Rule(m, (h,), lambda x: x, lambda x: (x,))  # noqa: E731
        rules = []
        for r in text_adapter.rules.values():
            rules.append(Rule(r.mcore, tuple(self._disk(self._lm(h)) for h in r.hf), r.fuse, r.split))
        for n in vision_names:  # vision_tower.* / multi_modal_projector.* under LlavaModel ("model.")
            rules.append(one("vision." + n, self._disk("model." + n)))
        self.rules = {r.mcore: r for r in rules}

    @staticmethod
    def _lm(h: str) -> str:
        """Causal-LM name -> LLaVA module name: ``model.layers.0...`` -> ``model.language_model.layers.0...``."""
        return "model.language_model." + h[len("model."):] if h.startswith("model.") else h

    def _disk(self, canonical: str) -> str:
        for src, dst in self._prefixes:
            if canonical.startswith(src):
                return dst + canonical[len(src):]
        return canonical

    def mcore_names(self) -> list[str]:
        return list(self.rules)

    def hf_names(self) -> list[str]:
        return [h for r in self.rules.values() for h in r.hf]

    def hf_optional(self) -> set[str]:
        return {self._disk(self._lm(h)) for h in self.text.hf_optional()}

    def hf_ignored_prefixes(self) -> tuple[str, ...]:
        return tuple(self._disk(self._lm(p)) for p in self.text.hf_ignored_prefixes())

    def virtual_hf_tensors(self, stored_shapes) -> dict:
        """No LLaVA checkpoint stores fused tensors (MoE language models are not supported here)."""
        return {}

    def to_mcore(self, name, get_hf):
        r = self.rules[name]
        return r.fuse(*(get_hf(h) for h in r.hf))

    def to_hf(self, name, tensor):
        r = self.rules[name]
        return dict(zip(r.hf, r.split(tensor)))


register_vision_family(VisionFamily(
    name="llava",
    architectures=("LlavaForConditionalGeneration",),
    text_config=text_config_of(_llava_config),
    image_token_id=lambda c: _llava_config(c).image_token_id,
    build=LlavaVision,
    adapter=LlavaAdapter,
    key_styles=lambda: tuple(_STYLES),
))
