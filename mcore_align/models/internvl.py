"""InternVL in transformers' format (``InternVLForConditionalGeneration``): family data, the
HF vision module and a processor stand-in (``InternVLProcessor`` needs torchvision).

InternVL's image processor (``GotOcr2ImageProcessor``) cuts an image into ``num_patches``
tiles (``crop_to_patches``: a grid of up to ``max_patches`` tiles plus a thumbnail); each
tile becomes ``image_seq_length`` tokens after the tower's pixel shuffle
(``downsample_ratio``) and the projector. The processor returns ``pixel_values``
``[sum of tiles, 3, H, W]`` and ``num_patches`` ``[N_img]``, both kept in the micro-batch;
the text of image i is ``<img>`` + ``<IMG_CONTEXT>`` x (image_seq_length x num_patches[i])
+ ``</img>`` (``InternVLProcessor``), and the features go to the ``<IMG_CONTEXT>`` tokens.

The vision module holds transformers' own ``InternVLVisionModel`` and
``InternVLMultiModalProjector`` under ``InternVLModel``'s child names; features come from
transformers' ``InternVLModel.get_image_features`` bound to it. HF tensor names follow
LLaVA's layout (``models/llava.py``: the same adapter and key styles).
"""
from __future__ import annotations

import torch

from mcore_align.models.llava import _STYLES, LlavaAdapter, text_config_of
from mcore_align.models.vision import VisionFamily, register_vision_family


def _internvl_config(c: dict):
    from transformers import InternVLConfig

    return InternVLConfig.from_dict(c)


class InternVLVision(torch.nn.Module):
    """transformers' InternViT + InternVL projector, with InternVLModel's feature code."""

    vit_children = ("vision_tower",)
    aligner_children = ("multi_modal_projector",)

    def __init__(self, hf_config: dict):
        super().__init__()
        from transformers import AutoModel
        from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector

        self.config = _internvl_config(hf_config)
        if self.config.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"config.json: vision_feature_select_strategy="
                             f"{self.config.vision_feature_select_strategy!r} is not supported")
        self.vision_tower = AutoModel.from_config(self.config.vision_config)
        self.multi_modal_projector = InternVLMultiModalProjector(self.config)

    @property
    def dtype(self) -> torch.dtype:
        """``get_image_features`` casts the pixels to ``self.dtype`` (a PreTrainedModel property)."""
        return self.multi_modal_projector.linear_1.weight.dtype

    def pixel_shuffle(self, *args, **kwargs):
        """``get_image_features`` calls ``self.pixel_shuffle``: transformers' own."""
        from transformers.models.internvl.modeling_internvl import InternVLModel

        return InternVLModel.pixel_shuffle(self, *args, **kwargs)

    def image_features(self, pixel_values: torch.Tensor, num_patches: torch.Tensor) -> list[torch.Tensor]:
        """``pixel_values`` ``[sum(num_patches), 3, H, W]`` (tiles of every image, in order),
        ``num_patches`` ``[N_img]`` -> per image features ``[num_patches[i] * image_seq_length, H_text]``."""
        from transformers.models.internvl.modeling_internvl import InternVLModel

        out = InternVLModel.get_image_features(
            self, pixel_values=pixel_values, vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy, return_dict=True)
        tiles_TKH = out.pooler_output  # [sum tiles, image_seq_length, H_text]
        per_image = torch.split(tiles_TKH, [int(n) for n in num_patches.tolist()], dim=0)
        return [f.reshape(-1, f.shape[-1]) for f in per_image]


class InternVLImageProcessing:
    """Stand-in for ``InternVLProcessor`` where it cannot be built (it always loads a video
    processor, which needs torchvision; this machine's CPU torch has none).

    The checkpoint's image processor (``AutoImageProcessor``: ``GotOcr2ImageProcessor``, PIL
    backend) with ``InternVLProcessor``'s image defaults (``crop_to_patches=True``), and
    transformers' own ``InternVLProcessor.replace_image_token`` bound to this object for the
    text: the i-th ``<IMG_CONTEXT>`` becomes ``<img>`` + ``<IMG_CONTEXT>`` x
    (``image_seq_length`` x ``num_patches[i]``) + ``</img>``. Provides what ``data/images.py``
    uses: ``tokenizer``, ``image_processor``, ``image_token``, ``start_image_token``,
    ``end_image_token``, ``image_seq_length`` and ``__call__(text=, images=, ...)`` (which, like
    the real processor, returns ``input_ids`` and ``pixel_values`` only).
    """

    def __init__(self, path):
        import json
        from pathlib import Path

        from transformers import AutoImageProcessor, AutoTokenizer, InternVLProcessor

        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.image_processor = AutoImageProcessor.from_pretrained(str(path))
        for k, v in InternVLProcessor.images_kwargs.items():  # what the processor passes by default
            setattr(self.image_processor, k, v)
        cfg = json.loads((Path(path) / "processor_config.json").read_text())
        self.image_seq_length = int(cfg.get("image_seq_length", 256))
        self.image_token = self.tokenizer.context_image_token
        self.start_image_token = self.tokenizer.start_image_token
        self.end_image_token = self.tokenizer.end_image_token

    def replace_image_token(self, image_inputs: dict, image_idx: int) -> str:
        from transformers import InternVLProcessor

        return InternVLProcessor.replace_image_token(self, image_inputs, image_idx)

    def __call__(self, text: list[str], images: list, return_tensors: str = "pt", **tok_kwargs) -> dict:
        pix = dict(self.image_processor(images=images, return_tensors="pt"))  # pixel_values, num_patches
        idx = iter(range(len(images)))
        texts = []
        for t in text:
            parts = t.split(self.image_token)
            texts.append(parts[0] + "".join(self.replace_image_token(pix, next(idx)) + p for p in parts[1:]))
        assert next(idx, None) is None, "one image token per image"
        pix.pop("num_patches")  # as InternVLProcessor does: the model takes pixel_values only
        out = dict(self.tokenizer(texts, return_tensors=return_tensors, **tok_kwargs))
        out.update({k: (v.numpy() if return_tensors == "np" else v) for k, v in pix.items()})
        return out


def _vision_processor(proc):
    from mcore_align.data.images import VisionProcessor

    return VisionProcessor(proc)


register_vision_family(VisionFamily(
    name="internvl",
    architectures=("InternVLForConditionalGeneration",),
    text_config=text_config_of(_internvl_config),
    image_token_id=lambda c: _internvl_config(c).image_token_id,
    build=InternVLVision,
    adapter=LlavaAdapter,
    key_styles=lambda: tuple(_STYLES),
    processor=lambda path: _vision_processor(InternVLImageProcessing(path)),
))
