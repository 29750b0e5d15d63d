"""Family-neutral description of a decoder-only model, read from an HF ``config.json``.

A :class:`ModelSpec` holds only numbers and switches; every family maps its HF
config onto it (``families.py``), and the provider turns it into megatron's
``TransformerConfig`` + layer spec. The family name selects the family's entry in
``families.py`` and its weight adapter (``adapter.adapter_for``); nothing else reads it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama-3.1 style frequency scaling (``rope_type: llama3``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True, kw_only=True)
class YarnScaling:
    """YaRN rope scaling as megatron's ``YarnRotaryEmbedding`` takes it (MLA families; HF
    ``rope_parameters`` with ``rope_type: yarn``, see ``models/mla.py`` for the mapping)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass(frozen=True, kw_only=True)
class MlaSpec:
    """Multi-head latent attention (DeepSeek-V2/V3): the HF config fields megatron's
    ``MLATransformerConfig`` needs (names as megatron spells them; see ``models/mla.py``)."""

    q_lora_rank: int | None
    """Rank of the query compression (None: one q_proj, no q_a/q_b pair; DeepSeek-V2-Lite)."""
    kv_lora_rank: int
    qk_head_dim: int
    """Per-head query/key part without rope (HF ``qk_nope_head_dim``)."""
    qk_pos_emb_head_dim: int
    """Per-head rope part (HF ``qk_rope_head_dim``); shared by all heads on the key side."""
    v_head_dim: int
    rope_interleave: bool = True
    """HF rotates interleaved pairs (x0, x1), (x2, x3), ... (DeepSeek-V2 always, V3 when
    ``rope_interleave``), which is what megatron's MLA rope does; False: HF's rotate-half rope,
    reproduced by permuting the rope rows of the weights (``models/mla.py``)."""
    yarn: YarnScaling | None = None


@dataclass(frozen=True, kw_only=True)
class VisionSpec:
    """The vision side of a vision-language checkpoint (read by ``models/vision.py`` only)."""

    family: str
    """Registered vision family (``llava``): selects the HF modules and the weight adapter."""
    image_token_id: int
    """Id of the image placeholder token; the processor repeats it once per image feature."""
    hf_key_style: str = "transformers"
    """How the HF safetensors name the tensors (transformers versions differ; see
    ``models/llava.py``); detected at conversion, used again at export."""


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    family: str
    """Registered family name (``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``qwen3_moe``, ``mixtral``, ``qwen2_moe``,
    ``deepseek_v2``, ``deepseek_v3``)."""
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    """Key/value heads (GQA); equal to num_attention_heads for MHA."""
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: RopeScaling | None = None
    mrope_section: tuple[int, ...] | None = None
    """Multimodal RoPE (Qwen2-VL): rotary channel pairs given to the temporal, height and width
    positions (``rope_parameters.mrope_section``); None: ordinary 1-D RoPE."""
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    init_std: float = 0.02
    hf_config: dict = field(default_factory=dict, compare=False, repr=False)
    """The source ``config.json``, kept so export needs no other input."""
    # -- Mixture of Experts (None / empty for dense families; see models/moe.py) -------------
    num_moe_experts: int | None = None
    """Routed experts per MoE layer (HF ``num_experts`` / ``num_local_experts``)."""
    moe_ffn_hidden_size: int | None = None
    """Hidden size of one routed expert's SwiGLU MLP."""
    moe_router_topk: int = 0
    """Experts per token (HF ``num_experts_per_tok``)."""
    moe_router_pre_softmax: bool = False
    """megatron's routing convention: True = softmax over all experts, then top-k (the k
    probabilities are not renormalised); False = top-k on the logits, then softmax over those k
    (equal to softmax-then-top-k renormalised to sum 1)."""
    moe_layer_pattern: tuple[int, ...] = ()
    """Per layer, 1 = MoE, 0 = dense MLP of ``ffn_hidden_size`` (megatron's list ``moe_layer_freq``)."""
    moe_shared_expert_intermediate_size: int | None = None
    """Hidden size of the always-on shared expert (Qwen2-MoE); None: no shared expert."""
    moe_shared_expert_gate: bool = False
    """The shared expert's output is scaled by sigmoid(hidden @ gate) (Qwen2-MoE)."""
    moe_router_score_function: str = "softmax"
    """"softmax" or "sigmoid" (DeepSeek-V3: sigmoid scores, top-k renormalised)."""
    moe_router_expert_bias: bool = False
    """Sigmoid routing picks experts by score + a per-expert bias (HF
    ``e_score_correction_bias``, megatron's ``expert_bias``); the weights use the raw scores."""
    moe_router_num_groups: int | None = None
    """Group-limited routing: experts form this many groups (HF ``n_group``); None: off."""
    moe_router_group_topk: int | None = None
    """Groups each token may use (HF ``topk_group``)."""
    moe_router_topk_scaling_factor: float | None = None
    """Routing weights are multiplied by this (HF ``routed_scaling_factor``); None: 1."""
    mla: MlaSpec | None = None
    """Multi-head latent attention (DeepSeek); None: grouped-query attention of ``head_dim``."""
    vision: VisionSpec | None = None
    """Vision-language checkpoints (LLaVA): the image side; the fields above describe the
    language model (``text_config``). None for text-only models. See ``models/vision.py``."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        d = dict(d)
        if d.get("rope_scaling"):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        if d.get("mrope_section"):
            d["mrope_section"] = tuple(d["mrope_section"])
        if "moe_layer_pattern" in d:  # JSON lists back to the tuple the dataclass holds
            d["moe_layer_pattern"] = tuple(d["moe_layer_pattern"])
        if d.get("vision"):
            d["vision"] = VisionSpec(**d["vision"])
        if d.get("mla"):
            mla = dict(d["mla"])
            if mla.get("yarn"):
                mla["yarn"] = YarnScaling(**mla["yarn"])
            d["mla"] = MlaSpec(**mla)
        return cls(**d)


def read_hf_config(path: str | Path) -> dict:
    """Load ``config.json`` from a file or a checkpoint directory, with a clear error."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise FileNotFoundError(f"{p}: no config.json (is this an HF checkpoint directory?)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: invalid JSON at line {e.lineno}: {e.msg}") from e
