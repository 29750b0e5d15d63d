"""Model families: how each HF ``config.json`` maps onto a :class:`ModelSpec`.

A family is data (a :class:`Family` record) registered once; the weight adapter
that goes with it lives in ``adapter.py``. Llama, Mistral, Qwen2 and Qwen3 share
the HF tensor layout, so they share ``LlamaStyleAdapter`` and differ only in the
switches read here (qkv bias, q/k norm, rope scaling).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

from mcore_align.models.mla import deepseek_v2_mla, deepseek_v3_mla, mla_rope
from mcore_align.models.moe import MoeNames, deepseek_v2_fields, deepseek_v3_fields, mixtral_fields, qwen_moe_fields
from mcore_align.models.spec import MlaSpec, ModelSpec, RopeScaling


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    """HF ``architectures`` entries (``LlamaForCausalLM``) that select this family."""
    model_types: tuple[str, ...]
    """HF ``model_type`` values that select this family."""
    qkv_bias: Callable[[dict], bool]
    qk_norm: bool
    adapter: str = "llama_style"
    moe: Callable[[dict], dict] | None = None
    """MoE families: HF config -> the ModelSpec MoE fields (see models/moe.py); None: dense."""
    moe_names: "MoeNames | None" = None
    """MoE families: HF tensor names of the MoE block (read by models/moe.py's adapter)."""
    sliding_window_needs_flag: bool = False
    """``sliding_window`` applies only with ``use_sliding_window: true`` (Qwen2, Qwen-MoE configs)."""
    mla: "Callable[[dict], MlaSpec] | None" = None
    """Multi-head latent attention families: HF config -> MlaSpec (models/mla.py); None: GQA."""


FAMILIES: dict[str, Family] = {}


def register_family(f: Family) -> Family:
    assert f.name not in FAMILIES, f"family {f.name} registered twice"
    FAMILIES[f.name] = f
    return f


register_family(Family("llama", ("LlamaForCausalLM",), ("llama",), lambda c: bool(c.get("attention_bias", False)), False))
register_family(Family("mistral", ("MistralForCausalLM",), ("mistral",), lambda c: False, False))
register_family(Family("qwen2", ("Qwen2ForCausalLM",), ("qwen2",), lambda c: True, False,
                       sliding_window_needs_flag=True))
register_family(Family("qwen3", ("Qwen3ForCausalLM",), ("qwen3",), lambda c: bool(c.get("attention_bias", False)), True))


def _no_attention_bias(c: dict) -> bool:
    """Families whose ``attention_bias`` also puts a bias on o_proj, which megatron cannot add alone."""
    if c.get("attention_bias"):
        raise ValueError("config.json: attention_bias=True (o_proj bias) is not supported for "
                         f"{c.get('model_type')}")
    return False


register_family(Family("qwen3_moe", ("Qwen3MoeForCausalLM",), ("qwen3_moe",), _no_attention_bias, True,
                       adapter="moe", moe=qwen_moe_fields, moe_names=MoeNames(block="mlp."),
                       sliding_window_needs_flag=True))
register_family(Family("mixtral", ("MixtralForCausalLM",), ("mixtral",), lambda c: False, False,
                       adapter="moe", moe=mixtral_fields,
                       moe_names=MoeNames(block="block_sparse_moe.", gate="w1", up="w3", down="w2")))
register_family(Family("qwen2_moe", ("Qwen2MoeForCausalLM",), ("qwen2_moe",),
                       lambda c: bool(c.get("qkv_bias", True)), False,
                       adapter="moe", moe=qwen_moe_fields,
                       moe_names=MoeNames(block="mlp.", shared_expert="shared_expert.",
                                          shared_expert_gate="shared_expert_gate.weight"),
                       sliding_window_needs_flag=True))
# DeepSeek: MLA attention, first_k_dense_replace dense layers, ungated shared experts (models/mla.py, moe.py).
register_family(Family("deepseek_v3", ("DeepseekV3ForCausalLM",), ("deepseek_v3",), lambda c: False, False,
                       adapter="mla_moe", moe=deepseek_v3_fields, mla=deepseek_v3_mla,
                       moe_names=MoeNames(block="mlp.", shared_expert="shared_experts.",
                                          expert_bias="gate.e_score_correction_bias")))
register_family(Family("deepseek_v2", ("DeepseekV2ForCausalLM",), ("deepseek_v2",), lambda c: False, False,
                       adapter="mla_moe", moe=deepseek_v2_fields, mla=deepseek_v2_mla,
                       moe_names=MoeNames(block="mlp.", shared_expert="shared_experts.")))


def supported() -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.architectures)})" for f in FAMILIES.values())


def family_of(hf_config: dict) -> Family:
    archs = hf_config.get("architectures") or []
    mtype = hf_config.get("model_type")
    for f in FAMILIES.values():
        if any(a in f.architectures for a in archs) or (not archs and mtype in f.model_types):
            return f
    raise ValueError(
        f"unsupported architecture {archs or mtype!r}; supported families: {supported()}"
    )


def _rope(c: dict) -> tuple[float, RopeScaling | None]:
    # transformers >= 5 nests these under rope_parameters; older configs have
    # top-level rope_theta and rope_scaling.
    params = dict(c.get("rope_parameters") or {})
    scaling = c.get("rope_scaling") or params
    theta = params.get("rope_theta", c.get("rope_theta", 10000.0))
    rtype = (scaling or {}).get("rope_type", scaling.get("type") if scaling else None) or "default"
    if rtype == "default":
        return float(theta), None
    if rtype == "llama3":
        return float(theta), RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    raise ValueError(f"config.json: rope scaling type {rtype!r} is not supported (supported: default, llama3)")


def _mrope_section(c: dict) -> tuple[int, ...] | None:
    """Multimodal RoPE sections (Qwen2-VL text configs: ``rope_parameters.mrope_section``)."""
    sec = (c.get("rope_parameters") or {}).get("mrope_section") or (c.get("rope_scaling") or {}).get("mrope_section")
    return tuple(int(x) for x in sec) if sec else None


def spec_from_hf_config(c: dict) -> ModelSpec:
    """Map an HF ``config.json`` dict onto a :class:`ModelSpec` (strict about what we cannot run)."""
    from mcore_align.models.vision import vision_family_of, vision_spec_from_hf_config

    vision = vision_family_of(c)  # vision-language: the language model's spec + the vision side
    if vision is not None:
        return vision_spec_from_hf_config(c, vision)
    fam = family_of(c)
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act={c['hidden_act']!r} not supported (only silu / SwiGLU)")
    if c.get("mlp_bias"):
        raise ValueError("config.json: mlp_bias=True is not supported")
    if fam.name == "llama" and c.get("attention_bias"):
        # HF puts a bias on o_proj too; megatron can only add it together with MLP biases.
        raise ValueError("config.json: attention_bias=True (o_proj bias) is not supported for llama")
    window = c.get("sliding_window")
    if window is not None and (not fam.sliding_window_needs_flag or c.get("use_sliding_window")):
        warnings.warn(
            f"config.json: sliding_window={window} is ignored: attention is full causal, exact only "
            "for sequences no longer than the window"
        )
    heads = int(c["num_attention_heads"])
    theta, scaling = _rope(c) if fam.mla is None else (mla_rope(c)[0], None)  # MLA: yarn lives in MlaSpec
    return ModelSpec(
        family=fam.name,
        num_layers=int(c["num_hidden_layers"]),
        hidden_size=int(c["hidden_size"]),
        ffn_hidden_size=int(c["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=int(c.get("num_key_value_heads") or heads),
        head_dim=int(c.get("head_dim") or c["hidden_size"] // heads),
        vocab_size=int(c["vocab_size"]),
        max_position_embeddings=int(c.get("max_position_embeddings", 4096)),
        rope_theta=theta,
        rope_scaling=scaling,
        mrope_section=_mrope_section(c),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        qkv_bias=fam.qkv_bias(c),
        qk_norm=fam.qk_norm,
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        init_std=float(c.get("initializer_range", 0.02)),
        hf_config=c,
        **(fam.moe(c) if fam.moe else {}),
        **({"mla": fam.mla(c)} if fam.mla else {}),
    )
