"""Weight adapters: HF tensors <-> megatron-core parameters, one parameter at a time.

An adapter answers, for every megatron parameter name of the unsharded (TP=1,
PP=1) model, which HF tensors it is made of and how. Working one parameter at a
time is what keeps conversion memory-bounded (see ``tools/convert_hf_to_mcore.py``)
and lets export stream too. Names use global layer indices.

Megatron layouts that differ from HF (local and TE specs alike):

* ``linear_qkv.weight`` [(nq + 2*nkv) * d, H] is grouped by key/value head: for each
  of the nkv groups, its nq/nkv query heads, then its key head, then its value
  head. Example, nq=4, nkv=2, d=1: HF q rows [q0 q1 q2 q3], k [k0 k1], v [v0 v1]
  -> megatron rows [q0 q1 k0 v0 | q2 q3 k1 v1]. TP splits along this dim by groups.
* ``linear_fc1.weight`` [2F, H] is [gate; up] (SwiGLU: silu(gate) * up).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from mcore_align.models.spec import ModelSpec


@dataclass(frozen=True)
class Rule:
    """How one megatron parameter is made of HF tensors."""

    mcore: str
    hf: tuple[str, ...]
    fuse: Callable[..., torch.Tensor]
    split: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class LlamaStyleAdapter:
    """Llama / Mistral / Qwen2 / Qwen3 (``model.layers.{i}.self_attn.q_proj`` ... layout)."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.rules: dict[str, Rule] = {r.mcore: r for r in self._rules()}

    # -- qkv: [nq*d | nkv*d | nkv*d] (HF) <-> grouped (megatron) ---------------------
    def _fuse_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s = self.spec
        g, per, d = s.num_query_groups, s.num_attention_heads // s.num_query_groups, s.head_dim
        tail = q.shape[1:]  # (H,) for weights, () for biases
        q = q.reshape(g, per, d, *tail)
        k = k.reshape(g, 1, d, *tail)
        v = v.reshape(g, 1, d, *tail)
        return torch.cat([q, k, v], dim=1).reshape(g * (per + 2) * d, *tail)

    def _split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.spec
        g, per, d = s.num_query_groups, s.num_attention_heads // s.num_query_groups, s.head_dim
        tail = qkv.shape[1:]
        x = qkv.reshape(g, per + 2, d, *tail)
        q = x[:, :per].reshape(g * per * d, *tail)
        k = x[:, per].reshape(g * d, *tail)
        v = x[:, per + 1].reshape(g * d, *tail)
        return q.contiguous(), k.contiguous(), v.contiguous()

    @staticmethod
    def _fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return torch.cat([gate, up], dim=0)

    @staticmethod
    def _split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = fc1.chunk(2, dim=0)
        return gate.contiguous(), up.contiguous()

    def _rules(self) -> list[Rule]:
        s = self.spec
        one = lambda m, h: Rule(m, (h,), _identity, lambda x: (x,))  # noqa: E731
        rules = [one("embedding.word_embeddings.weight", "model.embed_tokens.weight")]
        for i in range(s.num_layers):
            m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
            a = h + "self_attn."
            rules += [
                one(m + "input_layernorm.weight", h + "input_layernorm.weight"),
                Rule(m + "self_attention.linear_qkv.weight",
                     (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
                     self._fuse_qkv, self._split_qkv),
                one(m + "self_attention.linear_proj.weight", a + "o_proj.weight"),
                one(m + "pre_mlp_layernorm.weight", h + "post_attention_layernorm.weight"),
                Rule(m + "mlp.linear_fc1.weight", (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"),
                     self._fuse_gate_up, self._split_gate_up),
                one(m + "mlp.linear_fc2.weight", h + "mlp.down_proj.weight"),
            ]
            if s.qkv_bias:
                rules.append(Rule(m + "self_attention.linear_qkv.bias",
                                  (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"),
                                  self._fuse_qkv, self._split_qkv))
            if s.qk_norm:
                rules += [one(m + "self_attention.q_layernorm.weight", a + "q_norm.weight"),
                          one(m + "self_attention.k_layernorm.weight", a + "k_norm.weight")]
        rules.append(one("decoder.final_layernorm.weight", "model.norm.weight"))
        if not s.tie_word_embeddings:
            rules.append(one("output_layer.weight", "lm_head.weight"))
        return rules

    # -- public API ----------------------------------------------------------------
    def mcore_names(self) -> list[str]:
        return list(self.rules)

    def hf_names(self) -> list[str]:
        return [h for r in self.rules.values() for h in r.hf]

    def hf_optional(self) -> set[str]:
        """HF tensors that may be present but carry no information we keep."""
        # Tied checkpoints sometimes still store lm_head.weight (== embed_tokens).
        return {"lm_head.weight"} if self.spec.tie_word_embeddings else set()

    def hf_ignored_prefixes(self) -> tuple[str, ...]:
        """Prefixes of HF tensors a checkpoint may hold that transformers itself does not load
        (DeepSeek-V3's multi-token-prediction layer); conversion skips them and says so."""
        return ()

    def virtual_hf_tensors(self, stored_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[str, int, slice]]:
        """HF names this adapter reads that the checkpoint stores inside a larger tensor:
        name -> (stored name, index along dim 0, row slice of that sub-tensor). Dense
        layouts have none; MoE reads fused expert tensors this way (models/moe.py)."""
        return {}

    def to_mcore(self, name: str, get_hf: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """Build megatron parameter ``name`` from HF tensors fetched by ``get_hf``."""
        r = self.rules[name]
        return r.fuse(*(get_hf(h) for h in r.hf))

    def to_hf(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        r = self.rules[name]
        return dict(zip(r.hf, r.split(tensor)))


ADAPTERS = {"llama_style": LlamaStyleAdapter}


def adapter_for(spec: ModelSpec) -> LlamaStyleAdapter:
    from mcore_align.models.families import FAMILIES

    adapter = ADAPTERS[FAMILIES[spec.family].adapter](spec)
    if spec.vision is not None:  # vision-language: the vision family's adapter wraps the language model's
        from mcore_align.models.vision import vision_adapter

        adapter = vision_adapter(spec, adapter)
    return adapter
