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
    """``input_ids`` ``[1, S]`` and the image tensors (the image processor's: ``pixel_values``,
    and the family's other image inputs such as LLaVA-NeXT's ``image_sizes`` or InternVL's
    ``num_patches``) for one user turn holding ``<image>``(s), rendered with the chat template
    and expanded by the checkpoint's own processor (``data.images.VisionProcessor``)."""
    from PIL import Image

    from mcore_align.data.images import PLACEHOLDER, VisionProcessor

    vp = VisionProcessor.from_pretrained(processor_dir)
    proc = vp.proc
    turn = {"role": "user", "content": prompt.replace(PLACEHOLDER, vp.image_token)}
    text = proc.tokenizer.apply_chat_template([turn], tokenize=False, add_generation_prompt=True)
    images = [Image.open(p).convert("RGB") for p in image_paths]
    out = proc(text=[text], images=images, return_tensors="pt", add_special_tokens=False)
    return {"input_ids": out["input_ids"], **proc.image_processor(images=images, return_tensors="pt")}


def image_tensors(inputs: dict) -> dict:
    """The image part of :func:`processor_inputs` (everything but ``input_ids``)."""
    return {k: v for k, v in inputs.items() if k != "input_ids"}


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
    with torch.no_grad():
        # the image tensors the HF forward takes (InternVL's takes pixel_values only: its
        # processor drops num_patches)
        accepted = inspect.signature(model.forward).parameters
        images = {k: v.to(dtype) if v.is_floating_point() else v for k, v in image_tensors(inputs).items()
                  if k in accepted}
        return model(input_ids=inputs["input_ids"], **images).logits.float()


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
    logits = megatron_vlm_logits(chunks, inputs["input_ids"], image_tensors(inputs), runtime)
    holders = [None] * dist.get_world_size()
    dist.all_gather_object(holders, logits is not None)
    reporter = holders.index(True)
    result = [None]
    if dist.get_rank() == reporter:
        result[0] = compare_logits(hf_vlm_logits(hf_dir, inputs, dtype), logits)
    dist.broadcast_object_list(result, src=reporter)
    return result[0]
