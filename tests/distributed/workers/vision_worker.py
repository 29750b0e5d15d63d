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


def _pair(fam="llama", images=(IMAGES / "2.jpg",), prompt="<image>Who is he?"):
    """One ms-swift record through the data side: expanded, templated, tokenized (chosen, rejected)."""
    from mcore_align.data.formats import Example
    from mcore_align.data.images import VisionProcessor, prepare_vision_example
    from mcore_align.data.tokenization import RecordTokenizer

    proc = VisionProcessor.from_pretrained(ROOT / fam / "hf")
    ex = Example([{"role": "user", "content": prompt}], "He is a football player.", "A small cat.",
                 images=[str(i) for i in images])
    v = prepare_vision_example(ex, "pair", None, proc)
    rt = RecordTokenizer(proc.proc.tokenizer, "paired", 4096, "delete", False)
    rec = rt.tokenize([[rt.templater.render(v.example, r, "pair") for r in (ex.chosen, ex.rejected)]])[0]
    return [torch.as_tensor(t, dtype=torch.long) for t in rec.tokens], [torch.as_tensor(g) for g in rec.targets], v


def _hf_reference(seqs, tgts, image_inputs, fam="llama"):
    """transformers' LLaVA / LLaVA-NeXT, each sequence alone, on the processor's own image
    tensors: per-sequence sums, DPO-style loss, gradients of the LM and the aligner (projector,
    LLaVA-NeXT's image_newline; vision tower frozen, as freeze_vit does)."""
    from transformers import AutoModelForImageTextToText

    m = AutoModelForImageTextToText.from_pretrained(str(ROOT / fam / "hf"), dtype=torch.float32)
    m.model.vision_tower.requires_grad_(False)
    accepted = inspect.signature(m.forward).parameters  # InternVL's forward takes pixel_values only
    image_inputs = {k: v for k, v in image_inputs.items() if k in accepted}
    sums = []
    for tok, tgt in zip(seqs, tgts):
        logits = m(input_ids=tok[None], **image_inputs).logits[0].float()
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
    from mcore_align.data.images import ImageEncoder, VisionProcessor
    from mcore_align.models.adapter import adapter_for
    from mcore_align.models.provider import ModelOptions, build_model
    from mcore_align.models.vision import multimodal_forward
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
    ref_sums, ref_grads = _hf_reference(seqs, tgts, v.image_inputs, fam)

    rt = initialize(ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp,
                                   context_parallel_size=cp), device="cpu")
    spec = read_model_spec(ROOT / fam / "mc")
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
    images = micro_batch_images([v.image_paths, v.image_paths],
                                ImageEncoder(VisionProcessor.from_pretrained(ROOT / fam / "hf")))
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
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert n.startswith("vision.vision_tower."), n
            assert p.grad is None, n
            continue
        g = p.grad.detach().clone()
        if sp and getattr(p, "sequence_parallel", False):  # replicated norms: partial sums over TP
            dist.all_reduce(g, group=rt.pgs.tp)
        if cp > 1:  # each CP rank back-propagates through its own tokens: dL/dparam is the sum
            dist.all_reduce(g, group=rt.pgs.cp)
        torch.testing.assert_close(g, want[n], atol=ATOL, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
        checked += 1
    assert any(n.startswith("vision.multi_modal_projector.") for n in want_full) and checked == len(want_full)
    return want_full


def case_packed_pair_logprobs_and_grads_tp1():
    _packed_pair_case(1)


def case_packed_pair_logprobs_and_grads_tp2():
    _packed_pair_case(2)


def case_packed_pair_logprobs_and_grads_tp2_sp():
    _packed_pair_case(2, sp=True)


def case_packed_pair_logprobs_and_grads_cp2():
    _packed_pair_case(1, cp=2)


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
