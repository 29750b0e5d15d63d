"""Tiny random-init HF checkpoints of every supported family, made offline.

Real HF formats and code paths (``save_pretrained`` safetensors, tokenizer with a
chat template), small enough for CPU tests and the demo.
"""
from __future__ import annotations

from pathlib import Path

import torch

from mcore_align.models.tiny_tokenizer import build_tiny_tokenizer

# family -> (HF architecture, model_type, tokenizer style, extra config)
TINY_FAMILIES = {
    "llama": ("LlamaForCausalLM", "llama", "llama3", {
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 128}}),
    "mistral": ("MistralForCausalLM", "mistral", "llama2", {"sliding_window": None}),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", "chatml", {}),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", "chatml", {"head_dim": 24}),
    # MoE: 4 experts, top-2 (Mixtral's experts are intermediate_size wide).
    "qwen3_moe": ("Qwen3MoeForCausalLM", "qwen3_moe", "chatml", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48, "norm_topk_prob": True}),
    "mixtral": ("MixtralForCausalLM", "mixtral", "llama2", {
        "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "qwen2_moe", "chatml", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
        "shared_expert_intermediate_size": 80, "norm_topk_prob": False}),
    # MLA (q_lora 32, kv_lora 24, nope 16 / rope 8 / v 12 per head: K and V head sizes differ),
    # layer 0 dense, 8 experts in 4 groups (2 used), top-4, one shared expert.
    "deepseek_v3": ("DeepseekV3ForCausalLM", "deepseek_v3", "llama3", {
        "num_key_value_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 24, "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8, "v_head_dim": 12, "n_routed_experts": 8, "n_group": 4, "topk_group": 2,
        "num_experts_per_tok": 4, "n_shared_experts": 1, "moe_intermediate_size": 32,
        "first_k_dense_replace": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True}),
    # V2: softmax routing (greedy, not renormalised), no q compression (V2-Lite), two shared experts.
    "deepseek_v2": ("DeepseekV2ForCausalLM", "deepseek_v2", "llama3", {
        "num_key_value_heads": 4, "q_lora_rank": None, "kv_lora_rank": 24, "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8, "v_head_dim": 12, "n_routed_experts": 8, "num_experts_per_tok": 2,
        "n_shared_experts": 2, "moe_intermediate_size": 32, "first_k_dense_replace": 1,
        "routed_scaling_factor": 1.5, "topk_method": "greedy"}),
}


def make_tiny_model(
    out_dir: str | Path,
    family: str = "qwen2",
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    ffn_hidden_size: int = 160,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 512,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 4096,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int = "2GB",
    init_std: float = 0.02,
    seed: int = 0,
    rope_theta: float = 10000.0,
    rms_norm_eps: float = 1e-6,
    rope_scaling: dict | None = None,
    hf_overrides: dict | None = None,
) -> Path:
    """Write a random-init HF checkpoint + tokenizer to ``out_dir``; returns the path.

    ``rope_scaling``: HF's dict, replacing the family's (the tiny Llama uses Llama 3.1's
    ``llama3`` scaling with a 128-token original window, so it matters at short lengths).
    ``hf_overrides``: further config.json fields over the family's (e.g. ``norm_topk_prob``,
    ``mlp_only_layers`` of a MoE family).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {sorted(TINY_FAMILIES)}")
    arch, model_type, tok_style, extra = TINY_FAMILIES[family]
    out = Path(out_dir)
    tok = build_tiny_tokenizer(out, style=tok_style, vocab_size=vocab_size)
    fields = dict(
        architectures=[arch],
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=ffn_hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=rms_norm_eps,
        rope_theta=rope_theta,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=init_std,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    # The family's fields, then the caller's, win over the defaults above.
    fields.update({**extra, **({"rope_scaling": rope_scaling} if rope_scaling else {}), **(hf_overrides or {})})
    cfg = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # norms at 1 +- noise so every weight is exercised by parity tests
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, init_std)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3 routing bias (a buffer, 0 at init)
                b.normal_(0.0, 0.05)
    model.to(dtype).save_pretrained(out, max_shard_size=max_shard_size)
    model.generation_config.save_pretrained(out)
    return out
