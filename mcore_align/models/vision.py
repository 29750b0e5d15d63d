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
    ``image_features(**image_inputs) -> list of [n_i, H]`` (one feature tensor per image, in
    order; counts may differ between images) and the submodule-name lists ``vit_children`` /
    ``aligner_children`` (dotted names allowed)."""
    adapter: Callable
    """``adapter(spec, text_adapter, vision_param_names)``: the family's weight adapter."""
    key_styles: Callable[[], tuple[str, ...]]
    """Names of the HF tensor-naming styles the adapter can read and write."""
    rope_index: Callable[[dict], Callable] | None = None
    """Multimodal RoPE families (Qwen2-VL): top-level HF config -> ``f(ids_1S, image_mask_1S,
    grid_thw) -> [3, 1, S]`` positions of ONE sequence (transformers' ``get_rope_index``);
    see :func:`mrope_position_ids`. None: 1-D positions."""
    processor: Callable | None = None
    """Data side: checkpoint dir -> the family's ``data.images.VisionProcessor``-like object;
    None: ``VisionProcessor.from_pretrained`` (transformers' ``AutoProcessor``)."""


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
    import mcore_align.models.qwen2_vl  # noqa: F401 - registers "qwen2_vl", "qwen2_5_vl"
    import mcore_align.models.llava_next  # noqa: F401 - registers "llava_next"
    import mcore_align.models.internvl  # noqa: F401 - registers "internvl"


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
    """Give the first-stage chunk its vision module as ``model.vision``; give every chunk of an
    M-RoPE family its position function as ``model.mrope_index`` (positions are needed on
    every pipeline stage; it holds no parameters)."""
    if spec.vision is None:
        return
    _ensure_registered()
    fam = VISION_FAMILIES[spec.vision.family]
    if fam.rope_index is not None:
        model.mrope_index = fam.rope_index(spec.hf_config)
        model.mrope_image_token_id = spec.vision.image_token_id
    if not model.pre_process:
        return
    vision = fam.build(spec.hf_config).to(opts.params_dtype)
    vision.image_token_id = spec.vision.image_token_id
    for names, frozen in ((vision.vit_children, opts.freeze_vit), (vision.aligner_children, opts.freeze_aligner)):
        for child in names:
            for p in vision_child_params(vision, child):
                p.requires_grad_(not frozen)
    for child in vision.vit_children:  # the optimizer's vit_lr param group selects them by this tag
        for p in vision_child_params(vision, child):
            setattr(p, VISION_TOWER_ATTR, True)
    model.vision = vision


def vision_child(vision, name: str):
    """A vision part by its (dotted) child name: a submodule (``visual.blocks``) or a bare
    parameter (LLaVA-NeXT's ``image_newline``)."""
    try:
        return vision.get_submodule(name)
    except AttributeError:
        return vision.get_parameter(name)


def vision_child_params(vision, name: str) -> list:
    part = vision_child(vision, name)
    return [part] if isinstance(part, torch.nn.Parameter) else list(part.parameters())


def has_vision(model) -> bool:
    return getattr(model, "vision", None) is not None


def is_multimodal(model) -> bool:
    """The chunk needs :func:`multimodal_forward` (vision module here, or M-RoPE positions)."""
    return has_vision(model) or getattr(model, "mrope_index", None) is not None


def vision_processor(path, spec_vision_family: str | None = None):
    """The data side's processor of a checkpoint dir (its family's, or ``AutoProcessor``'s)."""
    from mcore_align.data.images import VisionProcessor

    if spec_vision_family is None:
        from mcore_align.models.spec import read_hf_config

        fam = vision_family_of(read_hf_config(path))
    else:
        _ensure_registered()
        fam = VISION_FAMILIES[spec_vision_family]
    if fam is not None and fam.processor is not None:
        return fam.processor(path)
    return VisionProcessor.from_pretrained(path)


def mrope_position_ids(rope_index, image_token_id: int, ids_BS: torch.Tensor, image_inputs: dict | None,
                       cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """3-D M-RoPE positions ``[3, B, S]`` of the WHOLE rows, each packed sequence on its own.

    ``rope_index`` (the family's, transformers' ``get_rope_index``) runs on every sequence
    alone: with ``cu_seqlens`` (packed THD, ``B == 1``) each segment ``[cu[i], cu[i+1])``
    restarts at position 0, exactly as if it were a batch of its own (a chosen/rejected pair
    gets two identical prompt position runs); without, each row is one sequence. Image runs
    take their ``image_grid_thw`` in order: ``image_inputs["image_grid_thw"][image_index]``.

    Example (merge 2, one image of grid (1, 4, 6) = 6 tokens, text ``a b`` before, ``c`` after):
    t positions ``0 1 | 2 2 2 2 2 2 | 5``, h ``0 1 | 2 2 2 3 3 3 | 5``, w ``0 1 | 2 3 4 2 3 4 | 5``.
    """
    B, S = ids_BS.shape
    grids = None
    if image_inputs and "image_grid_thw" in image_inputs:
        grids = image_inputs["image_grid_thw"]
        if image_inputs.get("image_index") is not None:
            grids = grids.index_select(0, image_inputs["image_index"].to(grids.device))
    if cu_seqlens is None:
        segments = [(b, 0, S) for b in range(B)]
    else:
        assert B == 1, "packed rows are [1, T]"
        cu = cu_seqlens.tolist()
        segments = [(0, a, b) for a, b in zip(cu[:-1], cu[1:]) if b > a]
    out = torch.zeros(3, B, S, dtype=torch.long, device=ids_BS.device)
    used = 0
    for b, s0, s1 in segments:
        seq = ids_BS[b, s0:s1]
        mask = seq == image_token_id
        runs = int((mask & ~torch.cat([mask.new_zeros(1), mask[:-1]])).sum())
        g = None
        if runs:
            if grids is None or used + runs > len(grids):
                raise ValueError(f"image token runs in input_ids exceed the {0 if grids is None else len(grids)} "
                                 "image_grid_thw rows given")
            g = grids[used:used + runs]
            used += runs
        out[:, b, s0:s1] = rope_index(seq[None], mask[None], g)[:, 0].to(out.device)
    if grids is not None and used != len(grids):
        raise ValueError(f"{len(grids)} image_grid_thw rows but {used} image token runs in input_ids")
    return out


def vision_decoder_input(model, input_ids_BS: torch.Tensor, image_inputs: dict,
                         cp_index_S: torch.Tensor | None = None) -> torch.Tensor:
    """Token embeddings with image features at the placeholders: megatron's ``decoder_input``.

    Args:
        model: the first-stage ``GPTModel`` chunk with ``model.vision`` (:func:`attach_vision`).
        input_ids_BS: the WHOLE (not CP-split) token ids ``[B, S]``, image placeholders already
            expanded by the processor (one id per image feature).
        image_inputs: the processor's image tensors (``pixel_values`` ``[N_img, ...]``, and e.g.
            ``image_sizes`` ``[N_img, 2]``), images in the order their placeholders appear in
            ``input_ids_BS`` (row-major); optional ``image_index`` ``[N_runs]``: the image of each
            placeholder run, when runs repeat images.
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
    feats = model.vision.image_features(**image_inputs)  # one [n_i, H] per distinct image
    n_img = len(feats)
    if index is not None:
        # Each distinct image went through the tower once; image_index [N_runs] gives the image
        # of every placeholder run (a pair's two sequences repeat their prompt's image; the
        # gradient of a repeated image sums both uses).
        feats = [feats[i] for i in index.tolist()]
    feats_NH = torch.cat(feats)
    mask_BS = input_ids_BS == model.vision.image_token_id
    n_tok, n_feat = int(mask_BS.sum()), int(feats_NH.shape[0])
    if n_tok != n_feat:
        raise ValueError(f"image placeholders and image features disagree: {n_tok} image tokens in input_ids, "
                         f"{n_feat} features from {n_img} image(s); expand "
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
    rope_index = getattr(inner, "mrope_index", None)
    if rope_index is not None:
        # M-RoPE: [3, B, S] positions of the WHOLE rows (under CP too: megatron's THD rotary path
        # then picks each CP rank's chunks of every sequence, see provider.whole_row_mrope_class).
        ids = input_ids_BS if full_input_ids_BS is None else full_input_ids_BS
        psp = kwargs.get("packed_seq_params")
        cu = None
        if psp is not None:
            cu = psp.cu_seqlens_q_padded if psp.cu_seqlens_q_padded is not None else psp.cu_seqlens_q
        if cu is None and inner.config.context_parallel_size > 1:
            raise ValueError("M-RoPE with context parallelism needs packed (THD) micro-batches")
        if cu is not None and int(cu[-1]) != ids.shape[1]:
            raise ValueError(f"M-RoPE positions need the whole packed row: {ids.shape[1]} tokens given, "
                             f"cu_seqlens ends at {int(cu[-1])} (pass full_input_ids_BS under CP)")
        position_ids = mrope_position_ids(rope_index, inner.mrope_image_token_id, ids, image_inputs, cu)
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
