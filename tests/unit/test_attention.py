"""Packed (THD) core attention and the context-parallel split, single process.

References are written here independently of the module: explicit softmax(Q K^T) per
sequence in float64, and the HF transformers model run on each sequence alone.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from mcore_align.ops.attention import PackedAttentionKernels, PackedCoreAttention
from mcore_align.ops.context_parallel import (
    cp_local_token_index,
    packed_position_ids,
    packed_seq_params,
    split_packed_for_cp,
)

# Mixed lengths: a length-1 sequence and an empty padding segment included.
CU = torch.tensor([0, 5, 6, 6, 13, 16], dtype=torch.int32)
HEADS, GROUPS, HD = 4, 2, 8


def reference_attention(q_TND, k_TGD, v_TGD, cu):
    """Each sequence alone: softmax(q k^T / sqrt(d) + causal) v, GQA by repeating kv heads."""
    rep = q_TND.shape[1] // k_TGD.shape[1]
    out = torch.zeros_like(q_TND)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        q = q_TND[a:b].transpose(0, 1)  # [N, L, D]
        k = k_TGD[a:b].repeat_interleave(rep, dim=1).transpose(0, 1)
        v = v_TGD[a:b].repeat_interleave(rep, dim=1).transpose(0, 1)
        scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
        future = torch.ones(b - a, b - a, dtype=torch.bool).triu(1)
        probs = scores.masked_fill(future, float("-inf")).softmax(-1)
        out[a:b] = (probs @ v).transpose(0, 1)
    return out


def _qkv(t, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda n: torch.randn(t, n, HD, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return mk(HEADS), mk(GROUPS), mk(GROUPS)


def _module(cp_size=1):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    cfg = TransformerConfig(
        num_layers=1, hidden_size=HEADS * HD, num_attention_heads=HEADS, num_query_groups=GROUPS,
        kv_channels=HD, attention_dropout=0.0, hidden_dropout=0.0, use_cpu_initialization=True,
    )
    pgs = SimpleNamespace(tp=None, cp=None)  # single process: no groups
    return PackedCoreAttention(cfg, 1, AttnMaskType.causal, "self", pg_collection=pgs)


@pytest.mark.parametrize("batch_dim", [False, True])
def test_packed_attention_matches_per_sequence_reference(batch_dim):
    t = int(CU[-1])
    q, k, v = _qkv(t)
    attn = _module()
    args = (q, k, v) if not batch_dim else (q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1))
    out = attn(*args, None, packed_seq_params=packed_seq_params(CU))
    assert out.shape == ((t, HEADS * HD) if not batch_dim else (t, 1, HEADS * HD))
    ref = reference_attention(q, k, v, CU).reshape(t, -1)
    torch.testing.assert_close(out.reshape(t, -1), ref)

    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out.reshape(t, -1), (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, msg=lambda m, n=name: f"grad {n}: {m}")


def test_packed_attention_float32_and_cross_sequence_isolation():
    """Changing one sequence's keys must not change any other sequence's output."""
    t = int(CU[-1])
    q, k, v = (x.detach().float() for x in _qkv(t))
    attn = _module()
    psp = packed_seq_params(CU)
    out = attn(q, k, v, None, packed_seq_params=psp)
    torch.testing.assert_close(out, reference_attention(q, k, v, CU).reshape(t, -1), rtol=1e-5, atol=1e-6)
    k2 = k.clone()
    k2[6:13] += torch.randn(7, GROUPS, HD)  # the third (non-empty) sequence
    out2 = attn(q, k2, v, None, packed_seq_params=psp)
    torch.testing.assert_close(out2[:6], out[:6], rtol=0, atol=0)
    torch.testing.assert_close(out2[13:], out[13:], rtol=0, atol=0)
    assert (out2[7:13] - out[7:13]).abs().max() > 1e-3  # (token 6 attends only to itself)


def test_padded_batch_causal_and_attention_mask():
    s, b = 6, 2
    g = torch.Generator().manual_seed(1)
    q = torch.randn(s, b, HEADS, HD, generator=g, dtype=torch.float64)
    k = torch.randn(s, b, GROUPS, HD, generator=g, dtype=torch.float64)
    v = torch.randn(s, b, GROUPS, HD, generator=g, dtype=torch.float64)
    attn = _module()
    out = attn(q, k, v, None)
    for row in range(b):
        ref = reference_attention(q[:, row], k[:, row], v[:, row], torch.tensor([0, s])).reshape(s, -1)
        torch.testing.assert_close(out[:, row], ref)
    # megatron mask convention: True = masked. Left-pad row 1 by 2 tokens.
    mask = torch.zeros(b, 1, s, s, dtype=torch.bool)
    mask[1, :, :, :2] = True
    out_m = attn(q, k, v, mask)
    torch.testing.assert_close(out_m[:, 0], out[:, 0])
    ref1 = reference_attention(q[2:, 1], k[2:, 1], v[2:, 1], torch.tensor([0, s - 2])).reshape(s - 2, -1)
    torch.testing.assert_close(out_m[2:, 1], ref1)


# Eager flex on CPU warns that it is unfused; that is the point here (mask logic only).
_EAGER_FLEX = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.mark.parametrize("cp_size", [1, 2])
def test_block_mask_from_ranges_equals_create_block_mask(cp_size):
    """The tile-level BlockMask (no [T/CP, T] element mask) has exactly the partial and full
    tiles that torch's create_block_mask finds by evaluating every pair; several blocks,
    documents crossing block edges, a length-2 document and a ragged last block."""
    from torch.nn.attention.flex_attention import create_block_mask

    lens = [4, 260, 132, 36, 256, 1024]  # multiples of 2 * CP (CP layout); the last gives full tiles
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    for r in range(cp_size):
        doc_q, pos_q, doc_k, pos_k = PackedAttentionKernels.document_ids_positions(cu, r, cp_size)

        def document_causal(b, h, qi, ki):
            return (doc_q[qi] == doc_k[ki]) & (pos_k[ki] <= pos_q[qi])

        want = create_block_mask(document_causal, None, None, doc_q.numel(), doc_k.numel(), device="cpu")
        got = PackedAttentionKernels.block_mask(cu, r, cp_size, "cpu")
        assert torch.equal(got.to_dense(), want.to_dense())
        for num, idx in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
            n_got, n_want = getattr(got, num), getattr(want, num)
            assert torch.equal(n_got, n_want), num
            for qb in range(n_got.shape[-1]):
                k = int(n_got[0, 0, qb])
                assert sorted(getattr(got, idx)[0, 0, qb, :k].tolist()) == sorted(getattr(want, idx)[0, 0, qb, :k].tolist())
        assert int(got.full_kv_num_blocks.sum()) > 0 and int(got.kv_num_blocks.sum()) > 0  # both kinds occur


@_EAGER_FLEX
def test_flex_backend_mask_eager_on_cpu():
    """The FlexAttention document-causal BlockMask (forward only: no flex backward on CPU)."""
    t = int(CU[-1])
    q, k, v = (x.detach().float() for x in _qkv(t))
    bm = PackedAttentionKernels.block_mask(CU, 0, 1, "cpu")
    out = PackedAttentionKernels.flex(q, k, v, bm, scale=1 / math.sqrt(HD), compiled=False)
    torch.testing.assert_close(out, reference_attention(q, k, v, CU), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- CP layout


def test_split_packed_for_cp_worked_example():
    cu = torch.tensor([0, 8, 12])
    toks = torch.arange(12)
    pos = packed_position_ids(cu)
    assert pos.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]
    t0, p0, cu0 = split_packed_for_cp(toks, pos, cu_seqlens=cu, cp_rank=0, cp_size=2)
    t1, p1, cu1 = split_packed_for_cp(toks[None], pos[None], cu_seqlens=cu, cp_rank=1, cp_size=2)
    assert t0.tolist() == [0, 1, 6, 7, 8, 11] and p0.tolist() == [0, 1, 6, 7, 0, 3]
    assert t1.tolist() == [[2, 3, 4, 5, 9, 10]] and p1.tolist() == [[2, 3, 4, 5, 1, 2]]
    assert cu0.tolist() == cu1.tolist() == [0, 4, 6]
    with pytest.raises(ValueError, match="multiple of 4"):
        split_packed_for_cp(toks, cu_seqlens=torch.tensor([0, 6, 12]), cp_rank=0, cp_size=2)


@pytest.mark.parametrize("cp_size", [2, 4])
def test_cp_indices_partition_tokens(cp_size):
    cu = torch.tensor([0, 8 * cp_size, 8 * cp_size, 10 * cp_size, 16 * cp_size])
    idx = torch.cat([cp_local_token_index(cu, r, cp_size) for r in range(cp_size)])
    assert sorted(idx.tolist()) == list(range(int(cu[-1])))


@_EAGER_FLEX
@pytest.mark.parametrize("cp_size", [2, 3])
def test_cp_kernel_with_global_kv_equals_full(cp_size):
    """Each CP rank's queries over the gathered K/V reproduce the CP=1 rows they hold."""
    cu = torch.tensor([0, 2 * cp_size, 2 * cp_size, 8 * cp_size, 10 * cp_size])
    t = int(cu[-1])
    q, k, v = (x.detach() for x in _qkv(t, seed=3))
    full = reference_attention(q, k, v, cu)
    scale = 1 / math.sqrt(HD)
    for r in range(cp_size):
        idx = cp_local_token_index(cu, r, cp_size)
        got = PackedAttentionKernels.sdpa(q[idx], k, v, cu, scale=scale, dropout_p=0.0, cp_rank=r, cp_size=cp_size)
        torch.testing.assert_close(got, full[idx])
        bm = PackedAttentionKernels.block_mask(cu, r, cp_size, "cpu")
        got_flex = PackedAttentionKernels.flex(q[idx].float(), k.float(), v.float(), bm, scale=scale, compiled=False)
        torch.testing.assert_close(got_flex, full[idx].float(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- full model


@pytest.fixture(scope="module")
def runtime():
    from mcore_align.parallel import ParallelConfig, initialize

    return initialize(ParallelConfig(), device="cpu")


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_gpt_model_packed_thd_matches_hf_per_sequence(runtime, tmp_path, family):
    """megatron GPTModel + PackedCoreAttention on a packed batch == HF on each sequence alone."""
    from transformers import AutoModelForCausalLM

    from mcore_align.models.adapter import adapter_for
    from mcore_align.models.families import spec_from_hf_config
    from mcore_align.models.provider import ModelOptions, build_model
    from mcore_align.models.spec import read_hf_config
    from mcore_align.models.tiny import make_tiny_model

    path = make_tiny_model(tmp_path / family, family, init_std=0.1)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    spec = spec_from_hf_config(read_hf_config(path))
    (model,) = build_model(spec, runtime, role="reference", opts=ModelOptions(core_attention="packed"))
    assert isinstance(model.decoder.layers[0].self_attention.core_attention, PackedCoreAttention)
    ad = adapter_for(spec)
    sd = hf.state_dict()
    missing, unexpected = model.load_state_dict({n: ad.to_mcore(n, sd.__getitem__) for n in ad.mcore_names()}, strict=False)
    assert not unexpected and all(m.endswith("_extra_state") for m in missing)

    cu = torch.tensor([0, 7, 8, 8, 29, 40], dtype=torch.int32)  # lengths 7, 1, 0, 21, 11
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, spec.vocab_size, (1, int(cu[-1])), generator=g)
    with torch.no_grad():
        logits = model(tokens, packed_position_ids(cu)[None], None, packed_seq_params=packed_seq_params(cu))
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            if b == a:
                continue
            ref = hf(tokens[:, a:b]).logits
            torch.testing.assert_close(logits[:, a:b], ref, rtol=1e-5, atol=1e-5)
