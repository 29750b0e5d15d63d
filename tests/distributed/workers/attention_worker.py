"""Cases for tests/distributed/test_attention_dist.py (2 ranks, one torchrun launch).

Every case builds a single-rank reference first (TP=1, CP=1: no collectives in its forward,
so both ranks compute it alone), keeps its outputs and gradients, then re-initialises
megatron with the layout under test, loads the same weights (sharded for TP) and compares.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mcore_align.models.provider import ModelOptions, build_model
from mcore_align.models.spec import ModelSpec
from mcore_align.ops.attention import PackedCoreAttention
from mcore_align.ops.context_parallel import (
    gather_packed_from_cp,
    packed_position_ids,
    packed_seq_params,
    split_packed_for_cp,
)
from mcore_align.ops.segments import allreduce_segment_sums, segment_sums
from mcore_align.parallel import ParallelConfig, initialize
from tests.dist_utils import SkipCase

SPEC = ModelSpec(
    family="qwen2", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
    num_query_groups=2, head_dim=16, vocab_size=128, max_position_embeddings=256,
    rope_theta=10000.0, qkv_bias=True,
)
# Lengths 8, 4, 12, 0 (empty padding segment), 16, 4: multiples of 2*CP for CP=2.
CU = torch.tensor([0, 8, 12, 24, 24, 40, 44], dtype=torch.int32)
PAIRS = [(0, 1), (2, 4), (5, 1)]  # (chosen, rejected) sequence indices of a DPO-style loss
BETA = 0.5
ATOL = 2e-5


def _skip(reason: str):
    # torchrun runs tests.dist_utils as __main__, whose `except SkipCase` names __main__.SkipCase.
    return getattr(sys.modules.get("__main__"), "SkipCase", SkipCase)(reason)


def _need_world(n: int) -> None:
    if dist.get_world_size() != n:
        raise _skip(f"needs {n} ranks, this launch has {dist.get_world_size()}")


def teardown_case():
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def _batch():
    g = torch.Generator().manual_seed(7)
    t = int(CU[-1])
    tokens = torch.randint(0, SPEC.vocab_size, (t,), generator=g)
    # Next-token labels inside each sequence; the last token of a sequence predicts nothing.
    labels = torch.roll(tokens, -1)
    loss_mask = torch.ones(t)
    loss_mask[(CU[1:] - 1).clamp(min=0).long()] = 0
    return tokens, labels, loss_mask, packed_position_ids(CU)


def _randomize(model) -> dict:
    """Deterministic O(0.1) weights (the 0.02 init makes every logit ~equal) -> full state dict."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.1 * noise)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def _shard(model, full: dict, tp_rank: int, tp_size: int) -> dict:
    """This TP rank's slice of every tensor-parallel parameter (megatron's split rules)."""
    out = {}
    for name, p in model.named_parameters():
        t = full[name]
        if getattr(p, "tensor_model_parallel", False) and tp_size > 1:
            dim = p.partition_dim
            if name.endswith("linear_fc1.weight"):  # [gate; up]: each half is split separately
                gate, up = t.chunk(2, dim=0)
                t = torch.cat([gate.chunk(tp_size, dim)[tp_rank], up.chunk(tp_size, dim)[tp_rank]], dim=0)
            else:
                t = t.chunk(tp_size, dim)[tp_rank]
        assert t.shape == p.shape, (name, t.shape, p.shape)
        out[name] = t
    return out


def _logprobs_T(logits_1TV, labels_T):
    return torch.log_softmax(logits_1TV[0].float(), -1).gather(-1, labels_T[:, None])[:, 0]


def _dpo_loss(sums_N):
    c = torch.stack([sums_N[i] for i, _ in PAIRS])
    r = torch.stack([sums_N[j] for _, j in PAIRS])
    return -F.logsigmoid(BETA * (c - r)).mean()


def _reference():
    """TP=1, CP=1 on the full packed batch; sums computed with explicit per-sequence loops."""
    rt = initialize(ParallelConfig(), device="cpu")
    (model,) = build_model(SPEC, rt, opts=ModelOptions(core_attention="packed"))
    full = _randomize(model)
    tokens, labels, loss_mask, pos = _batch()
    logits = model(tokens[None], pos[None], None, packed_seq_params=packed_seq_params(CU))
    lp_T = _logprobs_T(logits, labels) * loss_mask
    sums = torch.stack([lp_T[a:b].sum() for a, b in zip(CU[:-1].tolist(), CU[1:].tolist())])
    loss = _dpo_loss(sums)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return dict(full=full, logits=logits.detach(), sums=sums.detach(), loss=loss.detach(), grads=grads)


def case_cp2_matches_cp1_logits_sums_loss_grads():
    _need_world(2)
    ref = _reference()
    teardown_case()
    rt = initialize(ParallelConfig(context_parallel_size=2), device="cpu")
    cp = rt.pgs.cp
    assert cp.size() == 2
    (model,) = build_model(SPEC, rt, opts=ModelOptions(core_attention="packed"))
    assert isinstance(model.decoder.layers[0].self_attention.core_attention, PackedCoreAttention)
    model.load_state_dict(ref["full"], strict=False)

    tokens, labels, loss_mask, pos = _batch()
    tok_l, lab_l, mask_l, pos_l, cu_l = split_packed_for_cp(
        tokens, labels, loss_mask, pos, cu_seqlens=CU, cp_rank=cp.rank(), cp_size=cp.size()
    )
    # GLOBAL cu_seqlens in PackedSeqParams; local tokens.
    logits_l = model(tok_l[None], pos_l[None], None, packed_seq_params=packed_seq_params(CU, cp_group=cp))
    assert logits_l.shape == (1, int(CU[-1]) // 2, SPEC.vocab_size)
    torch.testing.assert_close(gather_packed_from_cp(logits_l.detach(), CU, cp, dim=1), ref["logits"], atol=ATOL, rtol=1e-5)

    part, counts = segment_sums(_logprobs_T(logits_l, lab_l), mask_l, cu_l)
    sums, _ = allreduce_segment_sums(part, counts, cp)
    torch.testing.assert_close(sums.detach(), ref["sums"], atol=ATOL, rtol=1e-5)
    loss = _dpo_loss(sums)
    torch.testing.assert_close(loss.detach(), ref["loss"], atol=ATOL, rtol=1e-5)
    loss.backward()
    for n, p in model.named_parameters():
        g = p.grad.detach().clone()
        dist.all_reduce(g, group=cp)  # sum over CP ranks = dL/dparam (see allreduce_segment_sums)
        torch.testing.assert_close(g, ref["grads"][n], atol=ATOL, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


def _tp_case(sequence_parallel: bool):
    _need_world(2)
    ref = _reference()
    teardown_case()
    rt = initialize(ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=sequence_parallel), device="cpu")
    tp = rt.pgs.tp
    try:
        (model,) = build_model(SPEC, rt, opts=ModelOptions(core_attention="packed"))
    except AssertionError as e:
        # Not an attention limitation: without Apex the local spec's norm (megatron's
        # WrappedTorchNorm) asserts sequence_parallel is off. Runs once the provider has an
        # SP-aware RMSNorm.
        if sequence_parallel and "sequence parallel not supported by torch LayerNorm" in str(e):
            raise _skip(f"provider's local spec cannot build sequence_parallel without Apex: {e}") from e
        raise
    core = model.decoder.layers[0].self_attention.core_attention
    assert isinstance(core, PackedCoreAttention) and core.num_heads_per_partition == 2
    model.load_state_dict(_shard(model, ref["full"], tp.rank(), tp.size()), strict=False)
    tokens, labels, loss_mask, pos = _batch()
    logits = model(tokens[None], pos[None], None, packed_seq_params=packed_seq_params(CU))  # [1, T, V/TP]
    parts = [torch.empty_like(logits) for _ in range(tp.size())]
    dist.all_gather(parts, logits.detach().contiguous(), group=tp)
    torch.testing.assert_close(torch.cat(parts, dim=-1), ref["logits"], atol=ATOL, rtol=1e-5)
    # Backward runs, and the replicated norm weights get the reference gradient once
    # summed over TP (megatron all-reduces these over TP with sequence parallelism).
    from mcore_align.ops.logprobs import vocab_parallel_logprobs

    lp_T = vocab_parallel_logprobs(logits[0], labels, tp) * loss_mask
    sums = torch.stack([lp_T[a:b].sum() for a, b in zip(CU[:-1].tolist(), CU[1:].tolist())])
    _dpo_loss(sums).backward()
    # Every parameter: TP-split ones equal their shard of the reference gradient; replicated
    # ones (norms) too, once summed over TP with sequence parallelism (as megatron's
    # finalize_model_grads does for params marked sequence_parallel).
    want = _shard(model, ref["grads"], tp.rank(), tp.size())
    for n, p in model.named_parameters():
        g = p.grad.detach().clone()
        if sequence_parallel and getattr(p, "sequence_parallel", False):
            dist.all_reduce(g, group=tp)
        torch.testing.assert_close(g, want[n], atol=ATOL, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


def case_tp2_packed_matches_tp1():
    _tp_case(sequence_parallel=False)


def case_tp2_sequence_parallel_packed_matches_tp1():
    _tp_case(sequence_parallel=True)


def case_tp2_cp2_matches_reference():
    """TP=2 x CP=2 (4 ranks; skipped in the 2-rank launch)."""
    _need_world(4)
    ref = _reference()
    teardown_case()
    rt = initialize(ParallelConfig(tensor_model_parallel_size=2, context_parallel_size=2), device="cpu")
    tp, cp = rt.pgs.tp, rt.pgs.cp
    (model,) = build_model(SPEC, rt, opts=ModelOptions(core_attention="packed"))
    model.load_state_dict(_shard(model, ref["full"], tp.rank(), tp.size()), strict=False)
    tokens, labels, loss_mask, pos = _batch()
    tok_l, lab_l, mask_l, pos_l, cu_l = split_packed_for_cp(
        tokens, labels, loss_mask, pos, cu_seqlens=CU, cp_rank=cp.rank(), cp_size=cp.size())
    logits_l = model(tok_l[None], pos_l[None], None, packed_seq_params=packed_seq_params(CU, cp_group=cp))
    parts = [torch.empty_like(logits_l) for _ in range(tp.size())]
    dist.all_gather(parts, logits_l.detach().contiguous(), group=tp)
    full = gather_packed_from_cp(torch.cat(parts, dim=-1), CU, cp, dim=1)
    torch.testing.assert_close(full, ref["logits"], atol=ATOL, rtol=1e-5)
    # Log-prob sums (vocab over TP, tokens over CP), the DPO loss and every gradient.
    from mcore_align.ops.logprobs import vocab_parallel_logprobs

    part, counts = segment_sums(vocab_parallel_logprobs(logits_l[0], lab_l, tp), mask_l, cu_l)
    sums, _ = allreduce_segment_sums(part, counts, cp)
    torch.testing.assert_close(sums.detach(), ref["sums"], atol=ATOL, rtol=1e-5)
    loss = _dpo_loss(sums)
    torch.testing.assert_close(loss.detach(), ref["loss"], atol=ATOL, rtol=1e-5)
    loss.backward()
    want = _shard(model, ref["grads"], tp.rank(), tp.size())
    for n, p in model.named_parameters():
        g = p.grad.detach().clone()
        dist.all_reduce(g, group=cp)  # CP ranks hold partial gradients of the same loss
        torch.testing.assert_close(g, want[n], atol=ATOL, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
