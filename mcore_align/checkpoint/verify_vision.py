"""Prove a converted vision-language checkpoint computes transformers' logits on a real image.

Same method as ``verify.py`` (megatron's own forward-only schedule, vocab-parallel logits
gathered over TP on the last stage), with the first stage merging the image features
into the embeddings (``models.vision.multimodal_forward``).
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch

from mcore_align.checkpoint.verify import LogitComparison, compare_logits


def processor_inputs(processor_dir: str | Path, image_paths: list[str | Path], prompt: str) -> dict:
    """The HF model's inputs for one user turn holding ``<image>``(s), rendered with the chat
    template and expanded by the checkpoint's processor (the family's, ``models.vision.vision_processor``):
    ``input_ids`` ``[1, S]``, the image tensors (``pixel_values``, ...) and whatever else the HF
    forward needs (Qwen2-VL: ``mm_token_type_ids``). ``image_keys`` lists the image tensors."""
    from PIL import Image

    from mcore_align.models.vision import vision_processor

    proc = vision_processor(processor_dir)
    text = proc.proc.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                   add_generation_prompt=True)
    images = [Image.open(p).convert("RGB") for p in image_paths]
    ids_and_extra, tensors = proc.model_inputs(text, images)
    return {**ids_and_extra, **tensors, "image_keys": tuple(tensors)}


def image_inputs_of(inputs: dict) -> dict:
    """The image tensors of :func:`processor_inputs`' result (what ``multimodal_forward`` takes)."""
    return {k: inputs[k] for k in inputs["image_keys"]}


def megatron_vlm_logits(chunks, tokens_1S: torch.Tensor, image_inputs: dict, runtime) -> torch.Tensor | None:
    """Full-vocab logits ``[1, S, V]`` (fp32) on last-stage ranks; None elsewhere. Collective."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mcore_align.models.heads import lm_logits
    from mcore_align.models.vision import multimodal_forward

    s = tokens_1S.shape[1]
    position_ids_1S = torch.arange(s)[None]

    def forward_step(data_iterator, model):
        next(data_iterator)
        out = multimodal_forward(model, tokens_1S, position_ids_1S, None, image_inputs=image_inputs)
        return out, lambda output, non_loss_data=True: lm_logits(model, output)

    assert len(chunks) == 1, "virtual pipeline stages are not wired for vision models"
    with torch.no_grad():
        store = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([None]), model=chunks[0],
            num_microbatches=1, seq_length=s, micro_batch_size=1, forward_only=True,
            collect_non_loss_data=True,
        )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    logits_local = torch.cat(store, dim=0).float()
    tp = runtime.pgs.tp
    parts = [torch.empty_like(logits_local) for _ in range(tp.size())]
    torch.distributed.all_gather(parts, logits_local.contiguous(), group=tp)
    return torch.cat(parts, dim=-1)


def hf_vlm_logits(hf_dir: str | Path, inputs: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(hf_dir), dtype=dtype).eval()
    # the inputs the HF forward takes (InternVL's takes pixel_values, not num_patches)
    accepted = inspect.signature(model.forward).parameters
    kw = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items() if k in accepted}
    with torch.no_grad():
        return model(**kw).logits.float()


def verify_vision_checkpoint(hf_dir: str | Path, ckpt_dir: str | Path, runtime, image_paths: list, prompt: str,
                             dtype: torch.dtype = torch.float32) -> LogitComparison:
    """Build at ``runtime``'s layout, load ``ckpt_dir``, compare with HF on ``prompt`` + images.
    Collective; every rank gets the same result."""
    import torch.distributed as dist

    from mcore_align.checkpoint.layout import read_model_spec
    from mcore_align.checkpoint.loading import load_model_weights
    from mcore_align.models.provider import ModelOptions, build_model

    spec = read_model_spec(ckpt_dir)
    chunks = build_model(spec, runtime, role="reference",
                         opts=ModelOptions(params_dtype=dtype, core_attention="megatron"))
    load_model_weights(chunks, ckpt_dir)
    inputs = processor_inputs(hf_dir, image_paths, prompt)
    logits = megatron_vlm_logits(chunks, inputs["input_ids"], image_inputs_of(inputs), runtime)
    holders = [None] * dist.get_world_size()
    dist.all_gather_object(holders, logits is not None)
    reporter = holders.index(True)
    result = [None]
    if dist.get_rank() == reporter:
        result[0] = compare_logits(hf_vlm_logits(hf_dir, inputs, dtype), logits)
    dist.broadcast_object_list(result, src=reporter)
    return result[0]
