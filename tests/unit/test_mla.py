"""DeepSeek-V2/V3 (multi-head latent attention, sigmoid / group-limited routing): the config
mapping and what it refuses, the packed core attention with separate K and V head sizes
(float64 reference), packed THD sequences against transformers run on each sequence alone,
and controls showing that the parity checks fail when the rope interleave, the routing bias
or the group-limited top-k is wrong.

Round trips, world-1 logits and gradients against transformers' autograd of the tiny DeepSeek
models are in tests/unit/test_moe.py (``MODELS``); EP=2 and TP=2+SP in
tests/distributed/test_moe_dist.py.
"""
from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from mcore_align.checkpoint import convert_hf_to_mcore, read_model_spec
from mcore_align.models.families import spec_from_hf_config
from mcore_align.models.spec import read_hf_config
from mcore_align.models.tiny import make_tiny_model
from mcore_align.ops.attention import PackedAttentionKernels, PackedCoreAttention
from tests.unit.test_moe import MODELS

TOL = 1e-4  # relative to the logit scale (fp32), as in test_moe.py
CU = torch.tensor([0, 5, 6, 6, 13, 16], dtype=torch.int32)  # lengths 5, 1, 0 (padding), 7, 3
HEADS, DK, DV = 4, 24, 12  # MLA: K head = nope 16 + rope 8, V head 12


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("mla")
    for name in ("deepseek_v3", "deepseek_v3_yarn"):
        family, overrides = MODELS[name]
        make_tiny_model(root / name / "hf", family, hf_overrides=overrides)
        convert_hf_to_mcore(root / name / "hf", root / name / "mc", dtype="fp32")
    return root


# -- core attention with K head size != V head size ---------------------------------------------
def reference_attention(q_TND, k_TND, v_TNE, cu, scale):
    """Each sequence alone, float64: softmax(q k^T * scale + causal) v."""
    out = q_TND.new_zeros(*q_TND.shape[:2], v_TNE.shape[-1])
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if a == b:
            continue
        scores = torch.einsum("qnd,knd->nqk", q_TND[a:b], k_TND[a:b]) * scale
        future = torch.ones(b - a, b - a, dtype=torch.bool).triu(1)
        out[a:b] = torch.einsum("nqk,kne->qne", scores.masked_fill(future, float("-inf")).softmax(-1), v_TNE[a:b])
    return out


def _qkv(t, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, HEADS, DK, generator=g, dtype=torch.float64),
            torch.randn(t, HEADS, DK, generator=g, dtype=torch.float64),
            torch.randn(t, HEADS, DV, generator=g, dtype=torch.float64))


def test_packed_kernels_with_separate_v_head_size():
    q, k, v = _qkv(int(CU[-1]))
    scale = 0.3
    ref = reference_attention(q, k, v, CU, scale)
    got = PackedAttentionKernels.sdpa(q, k, v, CU, scale=scale, dropout_p=0.0, cp_rank=0, cp_size=1)
    assert got.shape == (16, HEADS, DV)
    torch.testing.assert_close(got, ref)
    # FlexAttention takes a value head size other than the q/k one (eager here; compiled on CUDA).
    bm = PackedAttentionKernels.block_mask(CU, 0, 1, "cpu")
    flex = PackedAttentionKernels.flex(q.float(), k.float(), v.float(), bm, scale=scale, compiled=False)
    torch.testing.assert_close(flex, ref.float(), rtol=1e-5, atol=1e-6)


def test_packed_core_attention_module_takes_k_and_v_channels():
    """The constructor arguments MLA passes (k_channels, v_channels, softmax_scale); packed
    [t, n, h] -> [t, n*DV] and padded [s, b, n, h] -> [s, b, n*DV]."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=HEADS, kv_channels=16,
                            attention_dropout=0.0, hidden_dropout=0.0, use_cpu_initialization=True)
    mod = PackedCoreAttention(cfg, 1, AttnMaskType.causal, "self", softmax_scale=0.3, k_channels=DK, v_channels=DV,
                              pg_collection=SimpleNamespace(tp=None, cp=None))
    assert (mod.head_dim, mod.v_head_dim) == (DK, DV)
    q, k, v = _qkv(int(CU[-1]), seed=1)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=CU, cu_seqlens_kv=CU, max_seqlen_q=7, max_seqlen_kv=7)
    out = mod(q, k, v, None, packed_seq_params=psp)
    torch.testing.assert_close(out, reference_attention(q, k, v, CU, 0.3).reshape(16, HEADS * DV))
    s = 7  # padded: one causal sequence of 7 in a batch of 1
    out = mod(q[:s, None], k[:s, None], v[:s, None], None)
    ref = reference_attention(q[:s], k[:s], v[:s], torch.tensor([0, s]), 0.3)
    torch.testing.assert_close(out, ref.reshape(s, 1, HEADS * DV))


# -- HF config -> ModelSpec / TransformerConfig ------------------------------------------------
def test_config_mapping(converted):
    from mcore_align.models.provider import ModelOptions, transformer_config
    from mcore_align.parallel import ParallelConfig

    spec = spec_from_hf_config(read_hf_config(converted / "deepseek_v3" / "hf"))
    assert spec.family == "deepseek_v3" and spec.moe_layer_pattern == (0, 1)  # first_k_dense_replace=1
    assert (spec.moe_router_score_function, spec.moe_router_expert_bias) == ("sigmoid", True)
    assert (spec.moe_router_num_groups, spec.moe_router_group_topk, spec.moe_router_topk) == (4, 2, 4)
    assert spec.moe_router_topk_scaling_factor == 2.5 and spec.moe_shared_expert_intermediate_size == 32
    assert not spec.moe_shared_expert_gate
    m = spec.mla
    assert (m.q_lora_rank, m.kv_lora_rank, m.qk_head_dim, m.qk_pos_emb_head_dim, m.v_head_dim) == (32, 24, 16, 8, 12)
    assert m.rope_interleave and m.yarn is None
    cfg = transformer_config(spec, ParallelConfig(), ModelOptions(), cpu=True)
    assert type(cfg).__name__ == "MLATransformerConfig" and cfg.rope_type == "rope"
    assert (cfg.moe_router_score_function, cfg.moe_router_enable_expert_bias) == ("sigmoid", True)
    # transformers never updates e_score_correction_bias; megatron's update adds sign * rate.
    assert cfg.moe_router_bias_update_rate == 0.0

    y = spec_from_hf_config(read_hf_config(converted / "deepseek_v3_yarn" / "hf"))
    assert y.mla.q_lora_rank is None and not y.mla.rope_interleave
    assert (y.mla.yarn.factor, y.mla.yarn.mscale, y.mla.yarn.mscale_all_dim) == (4.0, 1.0, 1.0)
    ycfg = transformer_config(y, ParallelConfig(), ModelOptions(), cpu=True)
    assert (ycfg.rope_type, ycfg.rotary_scaling_factor, ycfg.original_max_position_embeddings) == ("yarn", 4.0, 16)
    # Only mscale set (no mscale_all_dim): HF scales cos/sin by m(f) and not the softmax == megatron (1, 0).
    c = read_hf_config(converted / "deepseek_v3_yarn" / "hf")
    c["rope_parameters"] = {**c["rope_parameters"], "mscale_all_dim": None}
    assert (spec_from_hf_config(c).mla.yarn.mscale, spec_from_hf_config(c).mla.yarn.mscale_all_dim) == (1.0, 0.0)

    v2 = {**read_hf_config(converted / "deepseek_v3" / "hf"), "architectures": ["DeepseekV2ForCausalLM"],
          "model_type": "deepseek_v2", "topk_method": "greedy", "num_experts_per_tok": 2}
    s2 = spec_from_hf_config(v2)
    assert (s2.moe_router_score_function, s2.moe_router_pre_softmax) == ("softmax", True)
    assert s2.moe_router_num_groups is None
    assert not s2.moe_router_expert_bias and s2.mla.rope_interleave


V3_BAD = [
    ({"norm_topk_prob": False}, "norm_topk_prob=false with sigmoid routing is not supported"),
    ({"topk_group": 1}, r"group-limited routing with num_experts_per_tok=4, topk_group=1: transformers scores a "
                        r"group by its top 2"),
    ({"n_group": 3}, "n_group=3 must divide n_routed_experts=8"),
    ({"topk_method": "greedy"}, "topk_method='greedy' is not supported for deepseek_v3"),
    ({"attention_bias": True}, "attention_bias=True is not supported for deepseek_v3"),
    ({"num_key_value_heads": 2}, "num_key_value_heads=2 must equal num_attention_heads=4"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
     "rope type 'linear' is not supported for multi-head latent attention"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                          "mscale_all_dim": 1.0, "rope_theta": 1e4}},
     "rope mscale_all_dim=1.0 without mscale has no megatron equivalent"),
    ({"first_k_dense_replace": 3}, r"first_k_dense_replace=3 outside \[0, num_hidden_layers=2\]"),
    ({"kv_lora_rank": 0}, "kv_lora_rank=0 must be a positive integer"),
    ({"quantization_config": {"quant_method": "fp8", "fmt": "e4m3"}},
     "quantization_config \\(quant_method='fp8'\\) is not supported; dequantise the checkpoint to bf16 first"),
]


@pytest.mark.parametrize("over, message", V3_BAD)
def test_unsupported_deepseek_v3_config_is_refused(converted, over, message):
    with pytest.raises(ValueError, match=message):
        spec_from_hf_config({**read_hf_config(converted / "deepseek_v3" / "hf"), **over})


@pytest.mark.parametrize("over, message", [
    ({"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 1},
     "transformers scores a group by its top 1 expert"),
    ({"topk_method": "noaux_tc"}, "topk_method='noaux_tc' is not supported for deepseek_v2"),
])
def test_unsupported_deepseek_v2_config_is_refused(converted, over, message):
    v2 = {**read_hf_config(converted / "deepseek_v3" / "hf"), "architectures": ["DeepseekV2ForCausalLM"],
          "model_type": "deepseek_v2", "num_experts_per_tok": 2}
    with pytest.raises(ValueError, match=message):
        spec_from_hf_config({**v2, **over})


def test_mla_layout_and_transformer_engine_are_checked(converted):
    from mcore_align.models.mla import check_mla_layout
    from mcore_align.models.provider import ModelOptions, select_transformer_impl
    from mcore_align.parallel import ParallelConfig

    spec = read_model_spec(converted / "deepseek_v3" / "mc")
    with pytest.raises(ValueError, match="tensor_model_parallel_size=3 must divide q_lora_rank=32"):
        check_mla_layout(spec, ParallelConfig(tensor_model_parallel_size=3, sequence_parallel=True))
    with pytest.raises(ValueError, match="transformer_engine is not supported for multi-head latent attention"):
        select_transformer_impl(ModelOptions(transformer_impl="transformer_engine"), cpu=False, mla=True)
    assert select_transformer_impl(ModelOptions(), cpu=False, mla=True)[0] is False


def test_mla_without_transformer_engine_sees_no_te():
    """Without TE megatron's ``te`` is a MagicMock, so MLA's own HAVE_TE was True and building
    MLASelfAttention raised TypeError (isinstance against a mock); the bridge copies the real flag."""
    from megatron.core.extensions import transformer_engine as te_ext
    from megatron.core.transformer import multi_latent_attention

    from mcore_align.models.mla import mla_layer_spec

    mla_layer_spec()
    assert multi_latent_attention.HAVE_TE == te_ext.HAVE_TE


# -- packed sequences -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v3_yarn"])
def test_packed_thd_matches_hf_per_sequence(converted, name):
    """Sequences packed in one THD row (lengths 7, 1, 0, 21, 11) through the converted megatron
    model == transformers on each sequence alone (rope positions restart per sequence)."""
    from transformers import AutoModelForCausalLM

    from mcore_align.checkpoint import load_model_weights
    from mcore_align.checkpoint.layout import init_single_process
    from mcore_align.models.provider import ModelOptions, build_model
    from mcore_align.ops.context_parallel import packed_position_ids, packed_seq_params

    mc = converted / name / "mc"
    spec = read_model_spec(mc)
    (model,) = build_model(spec, init_single_process(), role="reference", opts=ModelOptions(core_attention="packed"))
    assert isinstance(model.decoder.layers[0].self_attention.core_attention, PackedCoreAttention)
    load_model_weights([model], mc)
    hf = AutoModelForCausalLM.from_pretrained(converted / name / "hf", dtype=torch.float32).eval()
    cu = torch.tensor([0, 7, 8, 8, 29, 40], dtype=torch.int32)
    tokens = torch.randint(0, spec.vocab_size, (1, int(cu[-1])), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(tokens, packed_position_ids(cu)[None], None, packed_seq_params=packed_seq_params(cu))
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            if b == a:
                continue
            ref = hf(tokens[:, a:b]).logits
            rel = ((logits[:, a:b] - ref).abs().max() / ref.abs().max()).item()
            assert rel < TOL, (name, a, b, rel)


# -- controls: the parity checks fail when a piece is wrong ------------------------------------------
def _verify(hf_dir, mc_dir):
    from mcore_align.checkpoint.layout import init_single_process
    from mcore_align.checkpoint.verify import verify_checkpoint

    return verify_checkpoint(hf_dir, mc_dir, init_single_process(), seq_len=24, batch=2)


def test_controls_rope_interleave_routing_bias_and_group_topk(converted, tmp_path):
    """The converted tiny DeepSeek-V3 matches transformers (test_moe.py); each change below
    makes the same comparison miss the tolerance by more than 10x:
    (a) transformers with ``rope_interleave: false`` against weights converted for the
        interleaved rope (what an adapter ignoring the flag would produce);
    (b) transformers with e_score_correction_bias = 0 (what dropping the bias would compute);
    (c) megatron without group-limited routing (model_spec.json num_groups / group_topk None)."""
    hf, mc = converted / "deepseek_v3" / "hf", converted / "deepseek_v3" / "mc"
    assert _verify(hf, mc).ok(TOL)

    rope = tmp_path / "hf_rotate_half"
    shutil.copytree(hf, rope)
    cfg = json.loads((rope / "config.json").read_text())
    cfg["rope_interleave"] = False
    (rope / "config.json").write_text(json.dumps(cfg))
    res = _verify(rope, mc)
    assert res.rel_diff > 10 * TOL, res

    nobias = tmp_path / "hf_no_bias"
    shutil.copytree(hf, nobias)
    t = load_file(nobias / "model.safetensors")
    biases = [k for k in t if k.endswith("e_score_correction_bias")]
    assert biases and all(t[k].abs().max() > 0 for k in biases)
    save_file({k: torch.zeros_like(v) if k in biases else v for k, v in t.items()}, nobias / "model.safetensors",
              metadata={"format": "pt"})
    res = _verify(nobias, mc)
    assert res.rel_diff > 10 * TOL, res

    nogroup = tmp_path / "mc_no_group"
    shutil.copytree(mc, nogroup)
    doc = json.loads((nogroup / "model_spec.json").read_text())
    assert (doc["model_spec"]["moe_router_num_groups"], doc["model_spec"]["moe_router_group_topk"]) == (4, 2)
    doc["model_spec"]["moe_router_num_groups"] = doc["model_spec"]["moe_router_group_topk"] = None
    (nogroup / "model_spec.json").write_text(json.dumps(doc))
    res = _verify(hf, nogroup)
    assert res.rel_diff > 10 * TOL and math.isfinite(res.rel_diff), res


def test_multi_token_prediction_layer_is_skipped_like_transformers(converted, tmp_path):
    """DeepSeek-V3 checkpoints carry num_nextn_predict_layers MTP layers after the last decoder
    layer; transformers does not load them, conversion skips them (logged) and export leaves
    them out. Without num_nextn_predict_layers they are unexpected tensors."""
    from mcore_align.checkpoint import convert_mcore_to_hf
    from mcore_align.checkpoint.hf_files import CheckpointError

    hf = tmp_path / "hf"
    shutil.copytree(converted / "deepseek_v3" / "hf", hf)
    t = load_file(hf / "model.safetensors")
    mtp = {"model.layers.2.eh_proj.weight": torch.randn(64, 128), "model.layers.2.enorm.weight": torch.ones(64)}
    save_file({**t, **mtp}, hf / "model.safetensors", metadata={"format": "pt"})
    assert read_hf_config(hf)["num_nextn_predict_layers"] == 1
    convert_hf_to_mcore(hf, tmp_path / "mc", dtype="fp32")
    convert_mcore_to_hf(tmp_path / "mc", tmp_path / "back")
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert back.keys() == t.keys() and all(torch.equal(back[k], t[k]) for k in t)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 0
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(not used by the model\): "
                                              r"\['model.layers.2.eh_proj.weight', 'model.layers.2.enorm.weight'\]"):
        convert_hf_to_mcore(hf, tmp_path / "mc2", dtype="fp32")
