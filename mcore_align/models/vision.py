"""Vision-language models: an HF vision side on the first pipeline stage + the provider's GPTModel.

Design (see docs/vision.md and /work/shared/notes/vision-language-on-megatron.md):

* The language model is the provider's ``GPTModel``, unchanged: TP/PP/CP, SP, packed
  attention, fused log-probs, LoRA and checkpointing work as for text models.
* The vision tower and projector are transformers' own modules (for LLaVA-1.5:
  ``CLIPVisionModel`` + ``LlavaMultiModalProjector``), attached to the first-stage chunk
  as ``model.vision`` (so they are saved, loaded, converted and exported with it; other
  stages hold none). They are replicated across TP ranks: every TP rank computes the
  same features from the same pixels and receives the same gradient.
* :func:`vision_decoder_input` embeds the (processor-expanded) token ids, writes the
  image features at the image placeholder positions and returns megatron's
  ``decoder_input`` ``[S, B, H]``; the CP selection and the SP split happen after the
  merge, so an image span never has to be cut before its features exist.
* A vision family is data (:class:`VisionFamily`) plus one weight adapter, registered
  once (``models/llava.py``); shared code never names a family.

``freeze_vit`` / ``freeze_aligner`` (``ModelOptions``, both default True) set
``requires_grad=False`` on the vision tower / projector, so DDP and the optimizer never
see them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from mcore_align.models.spec import ModelSpec, VisionSpec


@dataclass(frozen=True)
class VisionFamily:
    name: str
    architectures: tuple[str, ...]
    """HF ``architectures`` entries (``LlavaForConditionalGeneration``) that select it."""
    text_config: Callable[[dict], dict]
    """Top-level HF config -> the language model's full HF config (defaults filled in)."""
    image_token_id: Callable[[dict], int]
    build: Callable[[dict], torch.nn.Module]
    """Top-level HF config -> the vision module (fp32, random init). It must provide
    ``image_features(pixel_values, **image_inputs) -> [num_image_tokens, H]`` (features of
    every image, in order) and the child-name lists ``vit_children`` / ``aligner_children``."""
    adapter: Callable
    """``adapter(spec, text_adapter, vision_param_names)``: the family's weight adapter."""
    key_styles: Callable[[], tuple[str, ...]]
    """Names of the HF tensor-naming styles the adapter can read and write."""


VISION_FAMILIES: dict[str, VisionFamily] = {}
VISION_TOWER_ATTR = "is_vision_tower_param"
"""Attribute set on the vision tower's parameters (not the projector's): ``model.vit_lr``
gives them their own optimizer param group through megatron's ``ParamKey(attr=...)``."""


def register_vision_family(f: VisionFamily) -> VisionFamily:
    assert f.name not in VISION_FAMILIES, f"vision family {f.name} registered twice"
    VISION_FAMILIES[f.name] = f
    return f


def _ensure_registered() -> None:
    import mcore_align.models.llava  # noqa: F401 - registers "llava"


def vision_family_of(hf_config: dict) -> VisionFamily | None:
    """The vision family of a top-level HF config, or None for a text-only config."""
    _ensure_registered()
    archs = hf_config.get("architectures") or []
    for f in VISION_FAMILIES.values():
        if any(a in f.architectures for a in archs):
            return f
    if "vision_config" in hf_config or "text_config" in hf_config:
        raise ValueError(f"config.json: vision-language architecture {archs!r} is not supported; supported: "
                         + ", ".join(f"{f.name} ({'/'.join(f.architectures)})" for f in VISION_FAMILIES.values()))
    return None


def vision_spec_from_hf_config(c: dict, fam: VisionFamily) -> ModelSpec:
    """ModelSpec of the language model, with ``vision`` set and the whole config kept."""
    from mcore_align.models.families import spec_from_hf_config

    text = spec_from_hf_config(fam.text_config(c))
    return dataclasses.replace(text, hf_config=c,
                               vision=VisionSpec(family=fam.name, image_token_id=int(fam.image_token_id(c))))


def vision_param_names(spec: ModelSpec) -> list[str]:
    """Parameter names of the vision module (built on the meta device: no memory)."""
    with torch.device("meta"):
        mod = VISION_FAMILIES[spec.vision.family].build(spec.hf_config)
    return [n for n, _ in mod.named_parameters()]


def vision_adapter(spec: ModelSpec, text_adapter):
    """The family's adapter around the language model's adapter (``adapter.adapter_for``)."""
    _ensure_registered()
    fam = VISION_FAMILIES[spec.vision.family]
    return fam.adapter(spec, text_adapter, vision_param_names(spec))


def bind_checkpoint_names(spec: ModelSpec, hf_names: set[str]) -> ModelSpec:
    """Record which HF naming style ``hf_names`` use (text-only specs pass through).

    The style with the most matching tensor names wins; the converter's strict key check
    then reports anything that still does not match, by name."""
    if spec.vision is None:
        return spec
    from mcore_align.models.adapter import adapter_for

    fam = VISION_FAMILIES[spec.vision.family]
    best, best_hits = None, -1
    for style in fam.key_styles():
        cand = dataclasses.replace(spec, vision=dataclasses.replace(spec.vision, hf_key_style=style))
        hits = len(set(adapter_for(cand).hf_names()) & hf_names)
        if hits > best_hits:
            best, best_hits = cand, hits
    return best


def attach_vision(model, spec: ModelSpec, opts) -> None:
    """Give the first-stage chunk its vision module as ``model.vision`` (no-op elsewhere)."""
    if spec.vision is None or not model.pre_process:
        return
    _ensure_registered()
    fam = VISION_FAMILIES[spec.vision.family]
    vision = fam.build(spec.hf_config).to(opts.params_dtype)
    vision.image_token_id = spec.vision.image_token_id
    for names, frozen in ((vision.vit_children, opts.freeze_vit), (vision.aligner_children, opts.freeze_aligner)):
        for child in names:
            for p in getattr(vision, child).parameters():
                p.requires_grad_(not frozen)
    for child in vision.vit_children:  # the optimizer's vit_lr param group selects them by this tag
        for p in getattr(vision, child).parameters():
            setattr(p, VISION_TOWER_ATTR, True)
    model.vision = vision


def has_vision(model) -> bool:
    return getattr(model, "vision", None) is not None


def vision_decoder_input(model, input_ids_BS: torch.Tensor, image_inputs: dict,
                         cp_index_S: torch.Tensor | None = None) -> torch.Tensor:
    """Token embeddings with image features at the placeholders: megatron's ``decoder_input``.

    Args:
        model: the first-stage ``GPTModel`` chunk with ``model.vision`` (:func:`attach_vision`).
        input_ids_BS: the WHOLE (not CP-split) token ids ``[B, S]``, image placeholders already
            expanded by the processor (one id per image feature).
        image_inputs: the processor's image tensors (``pixel_values`` ``[N_img, 3, H, W]``, ...),
            images in the order their placeholders appear in ``input_ids_BS`` (row-major).
        cp_index_S: with context parallelism, this CP rank's token positions
            (``ops.context_parallel.cp_local_token_index``); applied after the merge.

    Returns ``[S_local, B, H]`` (``S_local = S / CP / TP`` with sequence parallelism): what
    ``LanguageModelEmbedding`` would return for the same tokens, image features included.

    TP / SP: the word embedding is vocab-parallel. Without SP it all-reduces and returns the
    full ``[B, S, H]`` on each TP rank. With SP it reduce-scatters to ``[S/TP, B, H]``; we
    all-gather that back (backward: keep own slice), merge on the full sequence, then split
    again (backward: all-gather), so the gradient reaching the features is the full one,
    identical on every TP rank.
    """
    from megatron.core import tensor_parallel

    emb = model.embedding
    we = emb.word_embeddings
    x = we(input_ids_BS)
    if we.reduce_scatter_embeddings:  # SP: [S/TP, B, H] -> [S, B, H] -> [B, S, H]
        x = tensor_parallel.gather_from_sequence_parallel_region(
            x, tensor_parallel_output_grad=False, group=we.tp_group).transpose(0, 1)
    x_BSH = x
    image_inputs = dict(image_inputs)
    index = image_inputs.pop("image_index", None)
    feats_NH = model.vision.image_features(**image_inputs)
    if index is not None:
        # Each distinct image went through the tower once; image_index [N_runs] gives the image
        # of every placeholder run (a pair's two sequences repeat their prompt's image). Images
        # of one micro-batch have the same token count here (LLaVA-1.5: fixed resolution).
        n_img = int(next(iter(image_inputs.values())).shape[0])
        feats_NH = feats_NH.reshape(n_img, -1, feats_NH.shape[-1]).index_select(
            0, index.to(feats_NH.device)).reshape(-1, feats_NH.shape[-1])
    mask_BS = input_ids_BS == model.vision.image_token_id
    n_tok, n_feat = int(mask_BS.sum()), int(feats_NH.shape[0])
    if n_tok != n_feat:
        raise ValueError(f"image placeholders and image features disagree: {n_tok} image tokens in input_ids, "
                         f"{n_feat} features from {len(next(iter(image_inputs.values())))} image(s); expand "
                         "placeholders with the model's processor")
    # masked_scatter fills the masked positions in row-major (b, s) order: image i's
    # features go to its placeholders, like transformers' LlavaModel.forward.
    x_BSH = x_BSH.masked_scatter(mask_BS[..., None], feats_NH.to(x_BSH.dtype))
    if cp_index_S is not None:
        x_BSH = x_BSH.index_select(1, cp_index_S)
    x_SBH = x_BSH.transpose(0, 1).contiguous()
    if model.config.sequence_parallel:
        x_SBH = tensor_parallel.scatter_to_sequence_parallel_region(x_SBH, group=we.tp_group)
    return x_SBH


def multimodal_forward(model, input_ids_BS: torch.Tensor, position_ids: torch.Tensor, attention_mask=None, *,
                       image_inputs: dict | None = None, full_input_ids_BS: torch.Tensor | None = None,
                       cp_index_S: torch.Tensor | None = None, **kwargs):
    """``model(...)`` with the image features merged on the first stage; a drop-in for the
    trainer's ``model(input_ids=..., position_ids=..., attention_mask=..., **kwargs)``.

    ``input_ids_BS``: this rank's tokens (CP-local under CP); ``full_input_ids_BS``: the whole
    sequence, needed under CP (default: ``input_ids_BS``). Other stages, and batches without
    images, run the plain text forward.
    """
    decoder_input = None
    inner = unwrap(model)
    if image_inputs and has_vision(inner):
        ids = input_ids_BS if full_input_ids_BS is None else full_input_ids_BS
        decoder_input = vision_decoder_input(inner, ids, image_inputs, cp_index_S)
    elif has_vision(inner) and torch.is_grad_enabled():
        trainable = [p for p in inner.vision.parameters() if p.requires_grad]
        if trainable:
            # A text-only micro-batch on a model whose vision side trains: every trainable vision
            # parameter still gets a (zero) gradient, so DDP's per-bucket gradient hooks all fire
            # and the DP reduction stays in step (ms-swift runs a zero-weighted dummy image).
            decoder_input = inner.embedding(input_ids=input_ids_BS, position_ids=position_ids)
            decoder_input = decoder_input + 0.0 * sum(p.sum() for p in trainable).to(decoder_input.dtype)
    return model(input_ids_BS, position_ids, attention_mask, decoder_input=decoder_input, **kwargs)


def unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers (they hold it as ``.module``)."""
    while not hasattr(model, "embedding") and hasattr(model, "module"):
        model = model.module
    return model
