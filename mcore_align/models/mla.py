"""Multi-head latent attention (DeepSeek-V2/V3): HF config -> MlaSpec, megatron config and
layer spec, and the attention part of the weight adapter.

megatron's ``MLASelfAttention`` (local spec) computes, per token (n heads, dn = qk_head_dim,
dr = qk_pos_emb_head_dim, dv = v_head_dim)::

    q   = linear_q_up_proj(q_layernorm(linear_q_down_proj(x)))   [n, dn + dr]   (or linear_q_proj(x))
    c   = linear_kv_down_proj(x)                                  [kv_lora_rank + dr]
    kv  = linear_kv_up_proj(kv_layernorm(c[:kv_lora_rank]))       [n, dn + dv]
    k   = [kv[:, :dn], rope(c[kv_lora_rank:]) for every head]     [n, dn + dr]
    out = linear_proj(attention(q with rope on its last dr, k, kv[:, dn:]))

which is HF's ``DeepseekV3Attention`` / ``DeepseekV2Attention`` tensor for tensor:

    megatron                                  HF (model.layers.{i}.self_attn.)
    linear_q_down_proj.weight [q_lora, H]     q_a_proj.weight
    q_layernorm.weight        [q_lora]        q_a_layernorm.weight
    linear_q_up_proj.weight   [n(dn+dr), q_lora]  q_b_proj.weight
    linear_q_proj.weight      [n(dn+dr), H]   q_proj.weight            (q_lora_rank None)
    linear_kv_down_proj.weight [kv_lora+dr, H] kv_a_proj_with_mqa.weight
    kv_layernorm.weight       [kv_lora]       kv_a_layernorm.weight
    linear_kv_up_proj.weight  [n(dn+dv), kv_lora] kv_b_proj.weight
    linear_proj.weight        [H, n dv]       o_proj.weight

Rope: megatron's MLA rope (``apply_rotary_pos_emb`` with ``multi_latent_attention``) first
de-interleaves the dr rope dims, ``t' = cat(t[0::2], t[1::2])``, then rotates halves: that is
HF's interleaved rope (DeepSeek-V2's complex rope; V3's ``rope_interleave: true``), so those
weights are copied as they are (the rope output's dim order differs from V2's, identically for
q and k, so the scores are the same). V3 with ``rope_interleave: false`` rotates halves of
the HF order directly; we store the rope rows interleaved (``t[0::2] = h[:dr/2]``,
``t[1::2] = h[dr/2:]``) so megatron's de-interleave gives back HF's order. Bitwise both ways.

YaRN (``rope_type: yarn``): HF scales cos/sin by ``attention_factor`` =
``m(f, mscale) / m(f, mscale_all_dim)`` when both are set, else ``m(f)``, and the softmax by
``m(f, mscale_all_dim)^2`` when ``mscale_all_dim`` is set (m(f, s) = 0.1 s ln f + 1);
megatron's ``YarnRotaryEmbedding`` scales cos/sin by ``m(f, mscale) / m(f, mscale_all_dim)``
and MLA's softmax by ``m(f, mscale_all_dim)^2``. Both unset -> megatron (1, 0): the same
numbers. Only ``mscale_all_dim`` set (no ``mscale``) has no megatron equivalent: refused.

The q/kv latent norms are HF ``DeepseekV3RMSNorm(rank)`` with the class default eps 1e-6 (not
``rms_norm_eps``); megatron would build them with ``layernorm_epsilon``: :class:`LatentRMSNorm`.

Core attention: megatron's local ``DotProductAttention`` has one head size for q, k and v, so
MLA always uses the project's :class:`mcore_align.ops.attention.PackedCoreAttention` (padded
and packed THD batches; K head size dn + dr, V head size dv), also when the padded-only
"megatron" core attention is asked for.
"""
from __future__ import annotations

import re

import torch

from mcore_align.models.adapter import ADAPTERS, Rule, _identity
from mcore_align.models.moe import MoEAdapter
from mcore_align.models.norm import TorchRMSNorm
from mcore_align.models.spec import MlaSpec, ModelSpec, YarnScaling

HF_LATENT_NORM_EPS = 1e-6
"""eps of HF DeepSeek's q_a_layernorm / kv_a_layernorm (the RMSNorm class default)."""


# -- HF config -> MlaSpec --------------------------------------------------------------------
def _positive_int(c: dict, key: str) -> int:
    v = c.get(key)
    if not isinstance(v, int) or v <= 0:
        raise ValueError(f"config.json: {key}={v!r} must be a positive integer (multi-head latent attention)")
    return v


def _yarn_mscale(factor: float, m: float) -> float:
    import math

    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def mla_rope(c: dict) -> tuple[float, YarnScaling | None]:
    """(rope_theta, yarn scaling or None) of a DeepSeek config, refusing what megatron's MLA
    rope cannot reproduce."""
    params = dict(c.get("rope_parameters") or {})
    scaling = c.get("rope_scaling") or params
    theta = float(params.get("rope_theta", c.get("rope_theta", 10000.0)))
    rtype = (scaling or {}).get("rope_type", (scaling or {}).get("type")) or "default"
    if float((scaling or {}).get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("config.json: partial_rotary_factor != 1 is not supported for multi-head latent attention")
    if rtype == "default":
        return theta, None
    if rtype != "yarn":
        raise ValueError(f"config.json: rope type {rtype!r} is not supported for multi-head latent attention "
                         "(supported: default, yarn)")
    orig = int(scaling["original_max_position_embeddings"])
    factor = scaling.get("factor")
    factor = float(factor) if factor is not None else float(c["max_position_embeddings"]) / orig  # as HF
    if scaling.get("attention_factor") is not None:
        raise ValueError("config.json: rope attention_factor is not supported (megatron derives it from mscale, "
                         "mscale_all_dim)")
    if scaling.get("truncate", True) is False:
        raise ValueError("config.json: rope truncate=false is not supported (megatron rounds the YaRN "
                         "correction range)")
    m, mad = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if m and mad:
        mscale, mscale_all_dim = float(m), float(mad)
    elif not mad:  # HF: cos/sin * m(f), softmax unscaled == megatron (1, 0)
        mscale, mscale_all_dim = 1.0, 0.0
    else:
        raise ValueError(f"config.json: rope mscale_all_dim={mad} without mscale has no megatron equivalent "
                         "(set mscale too)")
    return theta, YarnScaling(
        factor=factor, original_max_position_embeddings=orig,
        beta_fast=float(scaling.get("beta_fast") or 32), beta_slow=float(scaling.get("beta_slow") or 1),
        mscale=mscale, mscale_all_dim=mscale_all_dim)


def mla_spec(c: dict, *, rope_interleave: bool) -> MlaSpec:
    quant = (c.get("quantization_config") or {}).get("quant_method")
    if quant:  # DeepSeek-V3/R1 on the Hub: FP8 weights + weight_scale_inv tensors
        raise ValueError(f"config.json: quantization_config (quant_method={quant!r}) is not supported; "
                         "dequantise the checkpoint to bf16 first")
    if c.get("attention_bias"):
        raise ValueError(f"config.json: attention_bias=True is not supported for {c.get('model_type')} "
                         "(biases on q_a_proj / kv_a_proj_with_mqa / o_proj)")
    heads = int(c["num_attention_heads"])
    kv_heads = c.get("num_key_value_heads") or heads
    if kv_heads != heads:  # HF would repeat the per-head keys; MLA has one key per head
        raise ValueError(f"config.json: num_key_value_heads={kv_heads} must equal num_attention_heads={heads} "
                         "for multi-head latent attention")
    q_lora = c.get("q_lora_rank")
    _, yarn = mla_rope(c)
    return MlaSpec(
        q_lora_rank=None if q_lora is None else _positive_int(c, "q_lora_rank"),
        kv_lora_rank=_positive_int(c, "kv_lora_rank"),
        qk_head_dim=_positive_int(c, "qk_nope_head_dim"),
        qk_pos_emb_head_dim=_positive_int(c, "qk_rope_head_dim"),
        v_head_dim=_positive_int(c, "v_head_dim"),
        rope_interleave=rope_interleave,
        yarn=yarn,
    )


def deepseek_v3_mla(c: dict) -> MlaSpec:
    return mla_spec(c, rope_interleave=bool(c.get("rope_interleave", True)))


def deepseek_v2_mla(c: dict) -> MlaSpec:
    # DeepSeek-V2's HF rope is always the complex (interleaved-pair) form.
    return mla_spec(c, rope_interleave=True)


# -- megatron config, layer spec, layout checks --------------------------------------------------
def mla_config_kwargs(spec: ModelSpec) -> dict:
    """MLATransformerConfig fields ({} without MLA)."""
    m = spec.mla
    if m is None:
        return {}
    y = m.yarn
    return dict(
        multi_latent_attention=True,
        q_lora_rank=m.q_lora_rank,
        kv_lora_rank=m.kv_lora_rank,
        qk_head_dim=m.qk_head_dim,
        qk_pos_emb_head_dim=m.qk_pos_emb_head_dim,
        v_head_dim=m.v_head_dim,
        rotary_base=spec.rope_theta,
        rope_type="yarn" if y else "rope",
        # rope: MLA's softmax scale is m(rotary_scaling_factor, mscale_all_dim)^2 / sqrt(d) even
        # for plain rope, so mscale_all_dim=0 keeps it 1 / sqrt(d).
        rotary_scaling_factor=y.factor if y else 1.0,
        original_max_position_embeddings=y.original_max_position_embeddings if y else spec.max_position_embeddings,
        beta_fast=y.beta_fast if y else 32.0,
        beta_slow=y.beta_slow if y else 1.0,
        mscale=y.mscale if y else 1.0,
        mscale_all_dim=y.mscale_all_dim if y else 0.0,
    )


class LatentRMSNorm(TorchRMSNorm):
    """q_layernorm / kv_layernorm of MLA with HF's eps (1e-6) whatever ``layernorm_epsilon`` is."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(config, hidden_size, eps=HF_LATENT_NORM_EPS)


def mla_layer_spec():
    """megatron's local MLA layer spec with torch RMSNorms (sequence-parallel aware) and the
    project's packed core attention (separate K and V head sizes)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from mcore_align.ops.attention import PackedCoreAttention
    from mcore_align.parallel.cpu_mode import bridge_mla_without_te

    bridge_mla_without_te()
    ls = get_gpt_layer_local_spec(multi_latent_attention=True, qk_layernorm=True, normalization="RMSNorm")
    ls.submodules.input_layernorm = TorchRMSNorm
    ls.submodules.pre_mlp_layernorm = TorchRMSNorm
    att = ls.submodules.self_attention.submodules
    att.q_layernorm = LatentRMSNorm
    att.kv_layernorm = LatentRMSNorm
    att.core_attention = PackedCoreAttention
    return ls


def check_mla_layout(spec: ModelSpec, parallel) -> None:
    """megatron's column-parallel down projections split their output rows over TP."""
    m, tp = spec.mla, parallel.tensor_model_parallel_size
    if m is None or tp == 1:
        return
    for what, rows in (("q_lora_rank", m.q_lora_rank), ("kv_lora_rank + qk_rope_head_dim",
                                                         m.kv_lora_rank + m.qk_pos_emb_head_dim)):
        if rows is not None and rows % tp:
            raise ValueError(f"tensor_model_parallel_size={tp} must divide {what}={rows} "
                             "(megatron's MLA shards the down projections over TP)")
    if parallel.context_parallel_size > 1:
        raise ValueError("context parallelism with multi-head latent attention is not supported here")


# -- weight adapter ------------------------------------------------------------------------------
class MLAMoEAdapter(MoEAdapter):
    """DeepSeek: MoE rules of :class:`MoEAdapter` (router, expert bias, experts, shared experts,
    dense first layers) with the attention rules replaced by MLA's (table above)."""

    _LLAMA_ATTENTION = re.compile(r"decoder\.layers\.\d+\.self_attention\.(linear_qkv|q_layernorm|k_layernorm)\.")

    def _interleave_rope(self, w: torch.Tensor, heads: int) -> torch.Tensor:
        """HF rotate-half rope rows -> the interleaved order megatron's MLA rope expects: for each
        of ``heads`` blocks, rows [a | r] with r the dr rope rows become [a | r'] with
        r'[0::2] = r[:dr/2], r'[1::2] = r[dr/2:]. Example dr=4: [r0 r1 r2 r3] -> [r0 r2 r1 r3]."""
        dr = self.spec.mla.qk_pos_emb_head_dim
        x = w.reshape(heads, -1, *w.shape[1:])
        rope = x[:, -dr:]
        halves = rope.reshape(heads, 2, dr // 2, *w.shape[1:]).transpose(1, 2)
        return torch.cat([x[:, :-dr], halves.reshape(rope.shape)], dim=1).reshape(w.shape).contiguous()

    def _deinterleave_rope(self, w: torch.Tensor, heads: int) -> torch.Tensor:
        dr = self.spec.mla.qk_pos_emb_head_dim
        x = w.reshape(heads, -1, *w.shape[1:])
        rope = x[:, -dr:]
        return torch.cat([x[:, :-dr], rope[:, 0::2], rope[:, 1::2]], dim=1).reshape(w.shape).contiguous()

    def _rope_rule(self, mcore: str, hf: str, heads: int) -> Rule:
        if self.spec.mla.rope_interleave:
            return Rule(mcore, (hf,), _identity, lambda x: (x,))
        return Rule(mcore, (hf,), lambda w: self._interleave_rope(w, heads),
                    lambda w: (self._deinterleave_rope(w, heads),))

    def hf_ignored_prefixes(self) -> tuple[str, ...]:
        """DeepSeek-V3 checkpoints hold ``num_nextn_predict_layers`` multi-token-prediction
        layers after the last decoder layer (``model.layers.61.*``), which transformers skips."""
        n, extra = self.spec.num_layers, int(self.spec.hf_config.get("num_nextn_predict_layers") or 0)
        return tuple(f"model.layers.{i}." for i in range(n, n + extra))

    def _rules(self) -> list[Rule]:
        s, m = self.spec, self.spec.mla
        assert m is not None, f"family {s.family} uses the MLA adapter without an MlaSpec"
        one = lambda mc, h: Rule(mc, (h,), _identity, lambda x: (x,))  # noqa: E731
        rules = []
        for r in super()._rules():
            if self._LLAMA_ATTENTION.match(r.mcore):
                continue
            rules.append(r)
            if not r.mcore.endswith("input_layernorm.weight"):
                continue
            i = int(r.mcore.split(".")[2])
            ma, ha = f"decoder.layers.{i}.self_attention.", f"model.layers.{i}.self_attn."
            if m.q_lora_rank is None:
                rules.append(self._rope_rule(ma + "linear_q_proj.weight", ha + "q_proj.weight", s.num_attention_heads))
            else:
                rules += [one(ma + "linear_q_down_proj.weight", ha + "q_a_proj.weight"),
                          one(ma + "q_layernorm.weight", ha + "q_a_layernorm.weight"),
                          self._rope_rule(ma + "linear_q_up_proj.weight", ha + "q_b_proj.weight",
                                          s.num_attention_heads)]
            rules += [self._rope_rule(ma + "linear_kv_down_proj.weight", ha + "kv_a_proj_with_mqa.weight", 1),
                      one(ma + "kv_layernorm.weight", ha + "kv_a_layernorm.weight"),
                      one(ma + "linear_kv_up_proj.weight", ha + "kv_b_proj.weight")]
        return rules


ADAPTERS["mla_moe"] = MLAMoEAdapter
