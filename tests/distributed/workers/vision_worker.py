"""2-rank cases: one converted tiny LLaVA-1.5 / LLaVA-NeXT / InternVL matches transformers' logits
on a real image.

Checkpoints are made and converted once by ``tests/distributed/test_vision_dist.py`` into
$MCA_VISION_ROOT/<family>/{hf,mc} (``llama``, ``qwen2``: LLaVA-1.5; ``next``: LLaVA-NeXT over
the tiny Llama, anyres tiles; ``internvl``: InternVL, transformers' format, over the tiny
Qwen2), plus ``small.png`` (a demo photo shrunk to 40 x 30, so LLaVA-NeXT tiles it into 3
tiles where the demo photos take 5); every case reshards on load. fp32; tolerance 1e-4
relative to the logit scale (as for the text families).
"""
import dataclasses
import inspect
import os
from pathlib import Path

import torch
import torch.distributed as dist

from mcore_align.checkpoint.verify import compare_logits
from mcore_align.checkpoint.verify_vision import hf_vlm_logits, processor_inputs, verify_vision_checkpoint
from mcore_align.parallel import ParallelConfig, initialize

ROOT = Path(os.environ.get("MCA_VISION_ROOT", "/nonexistent"))
IMAGES = Path(os.environ.get("MCORE_ALIGN_DATA", "/nonexistent")) / "mllm_demo_data"
TOL = 1e-4


def _check(fam: str, tp: int = 1, pp: int = 1, images=("1.jpg",), prompt="<image>Who are they?") -> None:
    rt = initialize(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), device="cpu")
    res = verify_vision_checkpoint(ROOT / fam / "hf", ROOT / fam / "mc", rt, [IMAGES / i for i in images], prompt)
    assert res.ok(TOL), f"{fam} tp={tp} pp={pp}: {res}"
    assert res.mean_kl < 1e-8, res


def case_image_matters():
    """The comparison can fail: another image moves HF's logits far beyond the tolerance."""
    hf = ROOT / "llama" / "hf"
    a = hf_vlm_logits(hf, processor_inputs(hf, [IMAGES / "1.jpg"], "<image>Who are they?"))
    b = hf_vlm_logits(hf, processor_inputs(hf, [IMAGES / "2.jpg"], "<image>Who are they?"))
    res = compare_logits(a, b)
    assert res.rel_diff > 100 * TOL, res


def case_llama_tp1_pp1():
    _check("llama")


def case_llama_tp2():
    _check("llama", tp=2)


def case_llama_pp2():
    _check("llama", pp=2)


def case_qwen2_tp2_two_images():
    _check("qwen2", tp=2, images=("1.jpg", "3.jpg"), prompt="<image>Compare<image> them.")


def case_qwen2_pp2():
    _check("qwen2", pp=2)


# -- a packed chosen/rejected pair with one image: log-probs and gradients vs transformers ------
BETA = 0.5
ATOL = 2e-5


# family dir -> (HF vision parameters frozen like freeze_vit, the trainable aligner's HF prefix)
_LLAVA_LIKE = (("model.vision_tower.",), "model.multi_modal_projector.")
FROZEN = {"llama": _LLAVA_LIKE, "qwen2": _LLAVA_LIKE, "next": _LLAVA_LIKE, "internvl": _LLAVA_LIKE,
          "qwen2_vl": (("model.visual.patch_embed.", "model.visual.blocks."), "model.visual.merger."),
          "qwen2_5_vl": (("model.visual.patch_embed.", "model.visual.blocks."), "model.visual.merger.")}


def _pair(fam="llama", images=(IMAGES / "2.jpg",), prompt="<image>Who is he?"):
    """One ms-swift record through the data side: expanded, templated, tokenized (chosen, rejected)."""
    from mcore_align.data.formats import Example
    from mcore_align.data.images import prepare_vision_example
    from mcore_align.data.tokenization import RecordTokenizer
    from mcore_align.models.vision import vision_processor

    proc = vision_processor(ROOT / fam / "hf")
    ex = Example([{"role": "user", "content": prompt}], "He is a football player.", "A small cat.",
                 images=[str(i) for i in images])
    v = prepare_vision_example(ex, "pair", None, proc)
    rt = RecordTokenizer(proc.proc.tokenizer, "paired", 4096, "delete", False)
    rec = rt.tokenize([[rt.templater.render(v.example, r, "pair") for r in (ex.chosen, ex.rejected)]])[0]
    return [torch.as_tensor(t, dtype=torch.long) for t in rec.tokens], [torch.as_tensor(g) for g in rec.targets], v


def _hf_reference(seqs, tgts, image_inputs, fam="llama", image_token=None):
    """transformers' model, each sequence alone, on the processor's own image tensors:
    per-sequence sums, DPO-style loss, gradients of the LM and the aligner (projector / merger,
    LLaVA-NeXT's image_newline; vision tower frozen, as freeze_vit does)."""
    from transformers import AutoModelForImageTextToText

    m = AutoModelForImageTextToText.from_pretrained(str(ROOT / fam / "hf"), dtype=torch.float32)
    frozen, _ = FROZEN[fam]
    for n, p in m.named_parameters():
        p.requires_grad_(not n.startswith(frozen))
    accepted = inspect.signature(m.forward).parameters  # InternVL's forward takes pixel_values only
    image_inputs = {k: v for k, v in image_inputs.items() if k in accepted}
    sums = []
    for tok, tgt in zip(seqs, tgts):
        kw = dict(image_inputs)
        if "mm_token_type_ids" in accepted:  # Qwen2-VL's processor returns them (its M-RoPE needs them)
            kw["mm_token_type_ids"] = (tok == image_token).int()[None]
        logits = m(input_ids=tok[None], **kw).logits[0].float()
        lp = torch.log_softmax(logits[:-1], -1).gather(-1, tok[1:, None])[:, 0]
        sums.append((lp * tgt[1:].float()).sum())
    sums = torch.stack(sums)
    loss = -torch.nn.functional.logsigmoid(BETA * (sums[0] - sums[1]))
    loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    return sums.detach(), grads


def _packed_pair_case(tp: int, sp: bool = False, cp: int = 1, fam: str = "llama", images=(IMAGES / "2.jpg",),
                      prompt="<image>Who is he?"):
    from megatron.core import parallel_state

    from mcore_align.checkpoint import load_model_weights, read_model_spec
    from mcore_align.data.batch import micro_batch_images
    from mcore_align.data.images import ImageEncoder
    from mcore_align.models.adapter import adapter_for
    from mcore_align.models.provider import ModelOptions, build_model
    from mcore_align.models.vision import multimodal_forward, vision_processor
    from mcore_align.ops.context_parallel import (
        cp_local_token_index,
        packed_position_ids,
        packed_seq_params,
        split_packed_for_cp,
    )
    from mcore_align.ops.logprobs import vocab_parallel_logprobs
    from mcore_align.ops.segments import allreduce_segment_sums, segment_sums
    from tests.distributed.workers.attention_worker import _shard

    seqs, tgts, v = _pair(fam, images, prompt)
    spec = read_model_spec(ROOT / fam / "mc")
    ref_sums, ref_grads = _hf_reference(seqs, tgts, v.image_inputs, fam, spec.vision.image_token_id)

    rt = initialize(ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp,
                                   context_parallel_size=cp), device="cpu")
    (model,) = build_model(spec, rt, opts=ModelOptions(core_attention="packed", freeze_aligner=False))
    load_model_weights([model], ROOT / fam / "mc")
    # Pack [chosen | rejected], each padded at its end to a multiple of m = 2*CP (CP's chunking)
    # and the whole row to a multiple of TP (SP): e.g. lengths 40, 37, CP=1, TP=2 ->
    # cu_seqlens [0, 40, 77, 78] (a 1-token padding segment); CP=2 -> [0, 40, 80] (3 pad tokens
    # inside the rejected sequence, masked; causal attention keeps them out of earlier tokens).
    m = 2 * cp if cp > 1 else 1
    seg_tok, seg_mask = [], []
    for tok, tgt in zip(seqs, tgts):
        pad = (-len(tok)) % m
        seg_tok.append(torch.cat([tok, torch.zeros(pad, dtype=torch.long)]))
        seg_mask.append(torch.cat([tgt[1:], tgt.new_zeros(1 + pad)]))  # position t scores token t+1
    lens = [len(t) for t in seg_tok]
    total = sum(lens)
    row_pad = (-total) % tp
    tokens = torch.cat(seg_tok + [torch.zeros(row_pad, dtype=torch.long)])
    mask = torch.cat(seg_mask + [torch.zeros(row_pad, dtype=torch.uint8)])
    cu = torch.tensor([0, lens[0], total] + ([total + row_pad] if row_pad else []), dtype=torch.int32)
    labels = torch.roll(tokens, -1)
    pos = packed_position_ids(cu)
    # as the trainer's loader collates: each distinct image encoded alone and stored once
    # (differing LLaVA-NeXT tile counts zero-padded), image_index repeats them for the rejected
    images = micro_batch_images([v.image_paths, v.image_paths], ImageEncoder(vision_processor(ROOT / fam / "hf")))
    cp_group = rt.pgs.cp if cp > 1 else None
    if cp > 1:  # local tokens to the model, the whole row to the merge (split after it)
        idx = cp_local_token_index(cu, rt.pgs.cp.rank(), cp)
        tok_l, lab_l, mask_l, pos_l, cu_l = split_packed_for_cp(tokens, labels, mask, pos, cu_seqlens=cu,
                                                                cp_rank=rt.pgs.cp.rank(), cp_size=cp)
        logits = multimodal_forward(model, tok_l[None], pos_l[None], None, image_inputs=images,
                                    full_input_ids_BS=tokens[None], cp_index_S=idx,
                                    packed_seq_params=packed_seq_params(cu, cp_group=cp_group))
    else:
        lab_l, mask_l, cu_l = labels, mask, cu
        logits = multimodal_forward(model, tokens[None], pos[None], None, image_inputs=images,
                                    packed_seq_params=packed_seq_params(cu))  # [1, T, V/TP]
    lp_T = vocab_parallel_logprobs(logits[0], lab_l, rt.pgs.tp)
    sums, _ = allreduce_segment_sums(*segment_sums(lp_T, mask_l, cu_l), cp_group)
    torch.testing.assert_close(sums[:2].detach(), ref_sums, atol=ATOL, rtol=1e-5)
    loss = -torch.nn.functional.logsigmoid(BETA * (sums[0] - sums[1]))
    loss.backward()

    # HF gradients -> megatron layout (module-style names) -> this TP rank's shard.
    canon = adapter_for(dataclasses.replace(spec, vision=dataclasses.replace(spec.vision, hf_key_style="transformers")))
    want_full = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            want_full[n] = canon.to_mcore(n, lambda h: ref_grads[h])
    want = _shard(model, {n: want_full.get(n, p.detach()) for n, p in model.named_parameters()},
                  parallel_state.get_tensor_model_parallel_rank(), tp)
    checked = 0
    frozen, aligner = FROZEN[fam]
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert n.startswith(tuple("vision." + f[len("model."):] for f in frozen)), n
            assert p.grad is None, n
            continue
        g = p.grad.detach().clone()
        if sp and getattr(p, "sequence_parallel", False):  # replicated norms: partial sums over TP
            dist.all_reduce(g, group=rt.pgs.tp)
        if cp > 1:  # each CP rank back-propagates through its own tokens: dL/dparam is the sum
            dist.all_reduce(g, group=rt.pgs.cp)
        torch.testing.assert_close(g, want[n], atol=ATOL, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
        checked += 1
    assert any(n.startswith("vision." + aligner[len("model."):]) for n in want_full) and checked == len(want_full)
    return want_full


def case_packed_pair_logprobs_and_grads_tp1():
    _packed_pair_case(1)


def case_packed_pair_logprobs_and_grads_tp2():
    _packed_pair_case(2)


def case_packed_pair_logprobs_and_grads_tp2_sp():
    _packed_pair_case(2, sp=True)


def case_packed_pair_logprobs_and_grads_cp2():
    _packed_pair_case(1, cp=2)


# -- Qwen2-VL / Qwen2.5-VL: M-RoPE --------------------------------------------------------------
TWO = dict(images=("1.jpg", "2.jpg"), prompt="<image>Compare<image> them.")  # 10 and 12 image tokens


def case_qwen2_vl_tp1_pp1():
    _check("qwen2_vl", **TWO)


def case_qwen2_vl_tp2():
    _check("qwen2_vl", tp=2, **TWO)


def case_qwen2_vl_pp2():
    _check("qwen2_vl", pp=2, **TWO)


def case_qwen2_5_vl_tp1_pp1():
    _check("qwen2_5_vl", **TWO)


def case_qwen2_5_vl_tp2():
    _check("qwen2_5_vl", tp=2, **TWO)


def case_qwen2_5_vl_pp2():
    _check("qwen2_5_vl", pp=2, **TWO)


def case_qwen2_vl_positions_matter():
    """Control: the same converted model with plain 1-D positions (what a text model would use)
    misses transformers' logits by far more than the tolerance, so the cases above test M-RoPE."""
    from mcore_align.checkpoint.layout import read_model_spec
    from mcore_align.checkpoint.loading import load_model_weights
    from mcore_align.checkpoint.verify_vision import (
        hf_vlm_logits,
        image_inputs_of,
        megatron_vlm_logits,
        processor_inputs,
    )
    from mcore_align.models.provider import ModelOptions, build_model

    rt = initialize(ParallelConfig(), device="cpu")
    hf, mc = ROOT / "qwen2_vl" / "hf", ROOT / "qwen2_vl" / "mc"
    chunks = build_model(read_model_spec(mc), rt, role="reference", opts=ModelOptions(core_attention="megatron"))
    load_model_weights(chunks, mc)
    inputs = processor_inputs(hf, [IMAGES / i for i in TWO["images"]], TWO["prompt"])
    ref = hf_vlm_logits(hf, inputs)
    assert compare_logits(ref, megatron_vlm_logits(chunks, inputs["input_ids"], image_inputs_of(inputs), rt)).ok(TOL)
    chunks[0].mrope_index = lambda ids, mask, grid: torch.arange(ids.shape[1]).expand(3, 1, -1)
    res = compare_logits(ref, megatron_vlm_logits(chunks, inputs["input_ids"], image_inputs_of(inputs), rt))
    assert res.rel_diff > 10 * TOL, res  # observed 3.5e-3 (tiny random model)


def case_qwen2_vl_packed_pair_logprobs_and_grads_tp2():
    _packed_pair_case(2, fam="qwen2_vl")


def case_qwen2_vl_packed_pair_logprobs_and_grads_cp2():
    _packed_pair_case(1, cp=2, fam="qwen2_vl")


def case_qwen2_5_vl_packed_pair_logprobs_and_grads_tp2():
    _packed_pair_case(2, fam="qwen2_5_vl")


def case_qwen2_5_vl_packed_pair_logprobs_and_grads_cp2():
    _packed_pair_case(1, cp=2, fam="qwen2_5_vl")


def case_qwen2_vl_packed_pair_logprobs_and_grads_tp2_sp():
    _packed_pair_case(2, sp=True, fam="qwen2_vl")


# -- LLaVA-NeXT: anyres tiles, unpadding, image_newline --------------------------------------
def case_next_tp1_pp1():
    _check("next", images=("2.jpg",))  # 300 x 199: 5 tiles, 70 image tokens


def case_next_tp2():
    _check("next", tp=2, images=("2.jpg",))


def case_next_pp2():
    _check("next", pp=2, images=("2.jpg",))


def case_next_tp2_two_images_of_different_sizes():
    """2.jpg (5 tiles, 70 tokens) and a 40 x 30 image (3 tiles, 44 tokens) in one prompt."""
    _check("next", tp=2, images=("2.jpg", ROOT / "small.png"), prompt="<image>Compare<image> them.")


def case_next_image_newline_matters():
    """Control: the logits comparison sees image_newline (HF with it zeroed moves far beyond the
    tolerance); unpadding is checked by the token count (without it the features outnumber
    the processor's placeholders, an error in vision_decoder_input)."""
    from transformers import AutoModelForImageTextToText

    hf = ROOT / "next" / "hf"
    inputs = processor_inputs(hf, [IMAGES / "2.jpg"], "<image>Who are they?")
    a = hf_vlm_logits(hf, inputs)
    m = AutoModelForImageTextToText.from_pretrained(str(hf), dtype=torch.float32).eval()
    with torch.no_grad():
        m.model.image_newline.zero_()
        b = m(**inputs).logits.float()
    assert compare_logits(a, b).rel_diff > 100 * TOL


def case_next_packed_pair_two_images_grads_tp2():
    """A pair whose prompt holds two images of different sizes (5 and 3 tiles, padded in the
    micro-batch); image_newline and the projector train and match HF autograd."""
    want = _packed_pair_case(2, fam="next", images=(IMAGES / "2.jpg", ROOT / "small.png"),
                             prompt="<image>Which<image> is bigger?")
    assert "vision.image_newline" in want


def case_next_packed_pair_grads_cp2():
    _packed_pair_case(1, cp=2, fam="next")


def case_next_packed_pair_grads_tp2_sp():
    _packed_pair_case(2, sp=True, fam="next")


# -- InternVL (transformers' format; processor stand-in: InternVLProcessor needs torchvision) --
def case_internvl_tp1_pp1():
    _check("internvl", images=("2.jpg",))  # 3 tiles x 4 tokens between <img> and </img>


def case_internvl_tp2_two_images_of_different_sizes():
    _check("internvl", tp=2, images=("1.jpg", ROOT / "small.png"), prompt="<image>Compare<image> them.")


def case_internvl_pp2():
    _check("internvl", pp=2, images=("2.jpg",))


def case_internvl_packed_pair_grads_tp2():
    _packed_pair_case(2, fam="internvl", images=(IMAGES / "2.jpg", ROOT / "small.png"),
                      prompt="<image>Which<image> is bigger?")
