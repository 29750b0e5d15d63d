"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): family data and the HF vision module.

LLaVA-NeXT ("anyres") cuts an image into tiles of the CLIP resolution on the best-fitting
grid of ``image_grid_pinpoints`` plus one resized base image, runs every tile through
the tower, unpads the tile grid to the image's aspect ratio and appends the learned
``image_newline`` vector after every row of it. An image's token count therefore depends
on its size (the processor's ``image_sizes`` ``[N, 2]``, height and width, rides along
with ``pixel_values`` ``[N, tiles, 3, H, W]``).

The vision module holds transformers' own ``CLIPVisionModel``, ``LlavaNextMultiModalProjector``
and the ``image_newline`` parameter, under ``LlavaNextModel``'s child names; its features
come from transformers' ``LlavaNextModel.get_image_features`` bound to it, which tiles,
projects and packs (``pack_image_features``: unpadding + ``image_newline``) exactly as
``LlavaNextModel.forward`` does.

Names and HF key styles are LLaVA's (``models/llava.py``: the same adapter); the one extra
tensor is ``image_newline`` (disk: ``image_newline`` in the legacy styles, which the hub's
llava-v1.6 repos use, ``model.image_newline`` in transformers' module style), megatron name
``vision.image_newline``.

``freeze_aligner`` covers the projector **and** ``image_newline``: both map into the
language model's embedding space and are trained together in LLaVA-NeXT's stage 1. ms-swift
lists only ``multi_modal_projector`` as the aligner of its ``llava_hf`` architecture, so
there ``image_newline`` is in neither the tower nor the aligner and stays trainable under
full fine-tuning with the vision side frozen; here it follows the aligner's switch.
"""
from __future__ import annotations

import torch

from mcore_align.models.llava import _STYLES, LlavaAdapter, text_config_of
from mcore_align.models.vision import VisionFamily, register_vision_family


def _next_config(c: dict):
    from transformers import LlavaNextConfig

    return LlavaNextConfig.from_dict(c)


class LlavaNextVision(torch.nn.Module):
    """transformers' CLIP tower + LLaVA-NeXT projector + ``image_newline``, with
    LlavaNextModel's feature code (anyres tiling, unpadding, row separators)."""

    vit_children = ("vision_tower",)
    aligner_children = ("multi_modal_projector", "image_newline")

    def __init__(self, hf_config: dict):
        super().__init__()
        from transformers import AutoModel
        from transformers.models.llava_next.modeling_llava_next import LlavaNextMultiModalProjector

        self.config = _next_config(hf_config)
        if self.config.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"config.json: vision_feature_select_strategy="
                             f"{self.config.vision_feature_select_strategy!r} is not supported")
        self.vision_tower = AutoModel.from_config(self.config.vision_config)
        self.multi_modal_projector = LlavaNextMultiModalProjector(self.config)
        # [H_text]; the value comes from the checkpoint
        self.image_newline = torch.nn.Parameter(torch.zeros(self.config.text_config.hidden_size))

    def pack_image_features(self, *args, **kwargs):
        """``get_image_features`` calls ``self.pack_image_features``: transformers' own."""
        from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

        return LlavaNextModel.pack_image_features(self, *args, **kwargs)

    def image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """``pixel_values`` ``[N_img, tiles, 3, H, W]`` (tiles zero-padded to the largest count,
        as the processor pads them; the real count follows from ``image_sizes``), ``image_sizes``
        ``[N_img, 2]`` (original height, width) -> per image features ``[n_i, H_text]``:
        base tile tokens, then the unpadded grid row by row, each row ended by ``image_newline``."""
        from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

        out = LlavaNextModel.get_image_features(
            self, pixel_values=pixel_values.to(self.multi_modal_projector.linear_1.weight.dtype),
            image_sizes=image_sizes, vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy, return_dict=True)
        return list(out.pooler_output)


register_vision_family(VisionFamily(
    name="llava_next",
    architectures=("LlavaNextForConditionalGeneration",),
    text_config=text_config_of(_next_config),
    image_token_id=lambda c: _next_config(c).image_token_id,
    build=LlavaNextVision,
    adapter=LlavaAdapter,
    key_styles=lambda: tuple(_STYLES),
))
