"""Mixture of Experts: HF config -> ModelSpec MoE fields, weight-adapter rules, layer specs.

Families (``families.py``) carry a :class:`MoeNames` record: the HF tensor names of one
MoE block. Everything else here is family-neutral.

Megatron's MoE block (local spec: ``MoELayer`` with ``SequentialMLP`` experts; TE spec:
``TEGroupedMLP``, same checkpoint format) has, per MoE layer ``i`` (names at EP=1, where
local expert index == global index; dist checkpoints store experts by global index, so
a checkpoint loads at any EP)::

    decoder.layers.{i}.mlp.router.weight                               [E, H]
    decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc1.weight [2F, H]  = [gate; up]
    decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc2.weight [H, F]
    decoder.layers.{i}.mlp.shared_experts.linear_fc1.weight            [2Fs, H] (Qwen2-MoE)
    decoder.layers.{i}.mlp.shared_experts.linear_fc2.weight            [H, Fs]
    decoder.layers.{i}.mlp.shared_experts.gate_weight                  [1, H]

HF writes one tensor per expert (transformers 5 fuses them in memory only)::

    model.layers.{i}.mlp.gate.weight                          (Qwen)  / block_sparse_moe.gate.weight (Mixtral)
    model.layers.{i}.mlp.experts.{e}.gate_proj|up_proj|down_proj.weight / block_sparse_moe.experts.{e}.w1|w3|w2.weight

A checkpoint with fused expert tensors on disk (``mlp.experts.gate_up_proj`` [E, 2F, H],
``mlp.experts.down_proj`` [E, H, F], transformers' in-memory layout) is read too
(``MoEAdapter.virtual_hf_tensors``); export always writes the per-expert names.

Routing conventions (measured against transformers, see shared/notes/moe-on-megatron-core.md):
HF softmax -> top-k -> renormalise (Mixtral; Qwen ``norm_topk_prob=True``) equals megatron's
``moe_router_pre_softmax=False`` (top-k on logits, softmax over the k); HF softmax -> top-k
without renormalising (Qwen ``norm_topk_prob=False``) equals ``moe_router_pre_softmax=True``.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass

from mcore_align.models.adapter import ADAPTERS, LlamaStyleAdapter, Rule, _identity
from mcore_align.models.spec import ModelSpec


@dataclass(frozen=True)
class MoeNames:
    """HF tensor names of one MoE block, relative to ``model.layers.{i}.``."""

    block: str
    """Prefix of the MoE block: ``mlp.`` (Qwen) or ``block_sparse_moe.`` (Mixtral)."""
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    """Per-expert projection names (Mixtral: w1 / w3 / w2)."""
    router: str = "gate.weight"
    shared_expert: str | None = None
    """Prefix of the shared expert's gate_proj/up_proj/down_proj (Qwen2-MoE: ``shared_expert.``)."""
    shared_expert_gate: str | None = None
    """The shared expert's sigmoid gate [1, H] (Qwen2-MoE: ``shared_expert_gate.weight``)."""
    expert_bias: str | None = None
    """The routing bias [E] of sigmoid routing (DeepSeek-V3: ``gate.e_score_correction_bias``)."""


# -- HF config -> ModelSpec fields --------------------------------------------------------
def _num_experts(c: dict) -> int:
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if c.get(key):
            return int(c[key])
    raise ValueError("config.json: a MoE family needs num_experts (or num_local_experts) > 0")


def _check_router(c: dict, e: int, k: int) -> None:
    """Refuse routing settings megatron's router does not compute the same way."""
    if not 1 <= k <= e:
        raise ValueError(f"config.json: num_experts_per_tok={k} must be in [1, num_experts={e}]")
    jitter = float(c.get("router_jitter_noise") or 0.0)
    if jitter:
        raise ValueError(f"config.json: router_jitter_noise={jitter} is not supported (megatron's router "
                         "has input jitter of another form); set it to 0")
    for key in ("topk_method", "scoring_func", "n_group", "topk_group", "routed_scaling_factor"):
        if c.get(key) not in (None, "greedy", "softmax", 1, 1.0):
            raise ValueError(f"config.json: router setting {key}={c[key]!r} is not supported "
                             "(only softmax top-k routing)")


def _sparse_pattern(c: dict, n_layers: int) -> tuple[int, ...]:
    """Qwen-MoE: layer i is MoE unless listed in mlp_only_layers, and (i+1) % decoder_sparse_step == 0."""
    only_dense = set(c.get("mlp_only_layers") or [])
    bad = sorted(i for i in only_dense if not 0 <= i < n_layers)
    if bad:
        raise ValueError(f"config.json: mlp_only_layers {bad} outside [0, {n_layers})")
    step = int(c.get("decoder_sparse_step") or 1)
    return tuple(int(i not in only_dense and (i + 1) % step == 0) for i in range(n_layers))


def qwen_moe_fields(c: dict) -> dict:
    """Qwen2-MoE / Qwen3-MoE: ``norm_topk_prob`` picks the routing convention; dense layers
    by ``mlp_only_layers`` / ``decoder_sparse_step``; shared expert when the config has one."""
    e, k, n = _num_experts(c), int(c.get("num_experts_per_tok", 0)), int(c["num_hidden_layers"])
    _check_router(c, e, k)
    shared = c.get("shared_expert_intermediate_size")
    return dict(
        num_moe_experts=e,
        moe_ffn_hidden_size=int(c["moe_intermediate_size"]),
        moe_router_topk=k,
        moe_router_pre_softmax=not bool(c.get("norm_topk_prob", False)),
        moe_layer_pattern=_sparse_pattern(c, n),
        moe_shared_expert_intermediate_size=int(shared) if shared else None,
        moe_shared_expert_gate=bool(shared),
    )


def mixtral_fields(c: dict) -> dict:
    """Mixtral: every layer MoE, experts of ``intermediate_size``, renormalised top-k."""
    e, k, n = _num_experts(c), int(c.get("num_experts_per_tok", 0)), int(c["num_hidden_layers"])
    _check_router(c, e, k)
    return dict(
        num_moe_experts=e,
        moe_ffn_hidden_size=int(c["intermediate_size"]),
        moe_router_topk=k,
        moe_router_pre_softmax=False,
        moe_layer_pattern=(1,) * n,
    )


def _deepseek_common(c: dict) -> tuple[int, int, dict]:
    """DeepSeek-V2/V3: experts, top-k and the fields both share (first dense layers, shared experts)."""
    e, k, n = _num_experts(c), int(c.get("num_experts_per_tok") or 0), int(c["num_hidden_layers"])
    if not 1 <= k <= e:
        raise ValueError(f"config.json: num_experts_per_tok={k} must be in [1, n_routed_experts={e}]")
    dense = int(c.get("first_k_dense_replace") or 0)
    if not 0 <= dense <= n:
        raise ValueError(f"config.json: first_k_dense_replace={dense} outside [0, num_hidden_layers={n}]")
    if int(c.get("moe_layer_freq") or 1) != 1:
        raise ValueError(f"config.json: moe_layer_freq={c['moe_layer_freq']} is not supported (transformers "
                         "makes every layer from first_k_dense_replace on MoE)")
    shared = int(c.get("n_shared_experts") or 0)
    f = int(c["moe_intermediate_size"])
    scale = float(c.get("routed_scaling_factor") or 1.0)
    return e, k, dict(
        num_moe_experts=e,
        moe_ffn_hidden_size=f,
        moe_router_topk=k,
        moe_layer_pattern=(0,) * dense + (1,) * (n - dense),
        # HF: one MLP of n_shared_experts * moe_intermediate_size beside the routed experts, ungated.
        moe_shared_expert_intermediate_size=shared * f if shared else None,
        moe_router_topk_scaling_factor=None if scale == 1.0 else scale,
    )


def _groups(c: dict, e: int, k: int, experts_per_group_score: int) -> dict:
    """Group-limited routing: megatron scores a group by the sum of its top (k / topk_group)
    expert scores; HF by the sum of its top ``experts_per_group_score`` (V3: 2, V2: 1 = max)."""
    groups, top = c.get("n_group"), c.get("topk_group")
    if not groups or groups == 1 or top == groups:
        return {}  # one group, or every group selected: plain top-k
    groups, top = int(groups), int(top or 0)
    if e % groups or not 1 <= top <= groups:
        raise ValueError(f"config.json: n_group={groups} must divide n_routed_experts={e} and topk_group={top} "
                         f"must be in [1, n_group]")
    if k % top or k // top != experts_per_group_score:
        raise ValueError(f"config.json: group-limited routing with num_experts_per_tok={k}, topk_group={top}: "
                         f"transformers scores a group by its top {experts_per_group_score} expert(s), megatron "
                         f"by its top num_experts_per_tok / topk_group; supported only when they agree")
    return dict(moe_router_num_groups=groups, moe_router_group_topk=top)


def deepseek_v3_fields(c: dict) -> dict:
    """DeepSeek-V3 (``noaux_tc``): sigmoid scores; experts chosen by score +
    ``e_score_correction_bias`` within the best ``topk_group`` of ``n_group`` groups (a group's
    score: the sum of its top-2 biased scores); weights = raw scores of the chosen experts,
    renormalised (``norm_topk_prob``), times ``routed_scaling_factor``. megatron: score function
    sigmoid, expert bias, num_groups / group_topk, topk_scaling_factor."""
    e, k, fields = _deepseek_common(c)
    if c.get("topk_method") not in (None, "noaux_tc"):
        raise ValueError(f"config.json: topk_method={c['topk_method']!r} is not supported for deepseek_v3 "
                         "(transformers implements noaux_tc)")
    if c.get("scoring_func") not in (None, "sigmoid"):
        raise ValueError(f"config.json: scoring_func={c['scoring_func']!r} is not supported for deepseek_v3")
    if k > 1 and not c.get("norm_topk_prob", True):
        raise ValueError("config.json: norm_topk_prob=false with sigmoid routing is not supported (megatron "
                         "always renormalises the top-k sigmoid scores)")
    return dict(fields, moe_router_score_function="sigmoid", moe_router_expert_bias=True,
                moe_router_pre_softmax=False, **_groups(c, e, k, experts_per_group_score=2))


def deepseek_v2_fields(c: dict) -> dict:
    """DeepSeek-V2: softmax over all experts, top-k (``greedy``) or top-k within the best
    ``topk_group`` groups scored by their max (``group_limited_greedy``), never renormalised
    (megatron ``pre_softmax=True``), times ``routed_scaling_factor``."""
    e, k, fields = _deepseek_common(c)
    method = c.get("topk_method") or "greedy"
    if method not in ("greedy", "group_limited_greedy"):
        raise ValueError(f"config.json: topk_method={method!r} is not supported for deepseek_v2 "
                         "(greedy, group_limited_greedy)")
    if c.get("scoring_func") not in (None, "softmax"):
        raise ValueError(f"config.json: scoring_func={c['scoring_func']!r} is not supported for deepseek_v2")
    groups = _groups(c, e, k, experts_per_group_score=1) if method == "group_limited_greedy" else {}
    return dict(fields, moe_router_pre_softmax=True, **groups)


def is_moe(spec: ModelSpec) -> bool:
    return bool(spec.num_moe_experts)


# -- weight adapter -------------------------------------------------------------------------
class MoEAdapter(LlamaStyleAdapter):
    """Llama-style attention and norms; the MLP of each MoE layer is router + experts (+ shared)."""

    def __init__(self, spec: ModelSpec):
        from mcore_align.models.families import FAMILIES

        self.names: MoeNames = FAMILIES[spec.family].moe_names
        assert self.names is not None, f"family {spec.family} uses the MoE adapter without MoeNames"
        super().__init__(spec)

    def _rules(self) -> list[Rule]:
        s, nm = self.spec, self.names
        one = lambda m, h: Rule(m, (h,), _identity, lambda x: (x,))  # noqa: E731
        moe_layers = {i for i, flag in enumerate(s.moe_layer_pattern) if flag}
        dense_mlp = re.compile(r"decoder\.layers\.(\d+)\.mlp\.linear_fc[12]\.weight")
        rules = []
        for r in super()._rules():
            m = dense_mlp.fullmatch(r.mcore)
            if m is None or int(m.group(1)) not in moe_layers:
                rules.append(r)
                continue
            if r.mcore.endswith("linear_fc2.weight"):
                continue  # the whole block is added once, after linear_fc1's place
            i = int(m.group(1))
            mp, hp = f"decoder.layers.{i}.mlp.", f"model.layers.{i}.{nm.block}"
            rules.append(one(mp + "router.weight", hp + nm.router))
            for e in range(s.num_moe_experts):
                me, he = f"{mp}experts.local_experts.{e}.", f"{hp}experts.{e}."
                rules += [
                    Rule(me + "linear_fc1.weight", (f"{he}{nm.gate}.weight", f"{he}{nm.up}.weight"),
                         self._fuse_gate_up, self._split_gate_up),
                    one(me + "linear_fc2.weight", f"{he}{nm.down}.weight"),
                ]
            if s.moe_shared_expert_intermediate_size:
                hs = hp + nm.shared_expert
                rules += [
                    Rule(mp + "shared_experts.linear_fc1.weight", (hs + "gate_proj.weight", hs + "up_proj.weight"),
                         self._fuse_gate_up, self._split_gate_up),
                    one(mp + "shared_experts.linear_fc2.weight", hs + "down_proj.weight"),
                ]
                if s.moe_shared_expert_gate:
                    rules.append(one(mp + "shared_experts.gate_weight", hp + nm.shared_expert_gate))
            if s.moe_router_expert_bias:  # a buffer, fp32 in both (HF keeps it fp32 in any dtype)
                assert nm.expert_bias, f"family {s.family}: expert bias without its HF name"
                rules.append(one(mp + "router.expert_bias", hp + nm.expert_bias))
        return rules

    def virtual_hf_tensors(self, stored_shapes):
        """Fused on-disk experts (transformers' in-memory layout) read as per-expert tensors:
        ``gate_up_proj[e]`` [2F, H] is [gate_e; up_e], ``down_proj[e]`` [H, F] is down_e."""
        s, nm = self.spec, self.names
        virtual = {}
        for i, flag in enumerate(s.moe_layer_pattern):
            hp = f"model.layers.{i}.{nm.block}experts."
            fused_gu, fused_d = hp + "gate_up_proj", hp + "down_proj"
            if not flag or (fused_gu not in stored_shapes and fused_d not in stored_shapes):
                continue
            for fused, rows_multiple in ((fused_gu, 2), (fused_d, 1)):  # gate_up_proj: [gate; up] rows
                shape = stored_shapes.get(fused)
                if shape is None or len(shape) != 3 or shape[0] != s.num_moe_experts or shape[1] % rows_multiple:
                    raise ValueError(f"fused expert tensor {fused!r} has shape {list(shape) if shape else None}, "
                                     f"expected [{s.num_moe_experts}, ., .] (gate_up_proj: an even row count)")
            f2 = stored_shapes[fused_gu][1]
            for e in range(s.num_moe_experts):
                virtual[f"{hp}{e}.{nm.gate}.weight"] = (fused_gu, e, slice(0, f2 // 2))
                virtual[f"{hp}{e}.{nm.up}.weight"] = (fused_gu, e, slice(f2 // 2, f2))
                virtual[f"{hp}{e}.{nm.down}.weight"] = (fused_d, e, slice(None))
        return virtual


ADAPTERS["moe"] = MoEAdapter


# -- megatron config and layer specs -----------------------------------------------------------
def moe_config_kwargs(spec: ModelSpec, parallel, *, grouped_gemm: bool, aux_loss_coeff: float = 0.0) -> dict:
    """TransformerConfig fields of a MoE model ({} for a dense one). ``aux_loss_coeff`` is
    only checked here (the loss is models/moe_aux.py's). ``grouped_gemm``: the TE
    layer spec is built (TEGroupedMLP); False: local spec, SequentialMLP. The provider already
    sets ``moe_token_dispatcher_type="alltoall"`` (megatron refuses ``allgather`` with
    variable sequence lengths)."""
    if not is_moe(spec):
        return {}
    if aux_loss_coeff < 0:
        raise ValueError(f"moe_aux_loss_coeff must be >= 0, got {aux_loss_coeff}")
    return dict(
        num_moe_experts=spec.num_moe_experts,
        moe_ffn_hidden_size=spec.moe_ffn_hidden_size,
        moe_router_topk=spec.moe_router_topk,
        moe_router_pre_softmax=spec.moe_router_pre_softmax,
        moe_router_score_function=spec.moe_router_score_function,
        # Router logits in fp32, as transformers computes its softmax / sigmoid.
        moe_router_dtype="fp32",
        moe_router_num_groups=spec.moe_router_num_groups,
        moe_router_group_topk=spec.moe_router_group_topk,
        moe_router_topk_scaling_factor=spec.moe_router_topk_scaling_factor,
        moe_router_enable_expert_bias=spec.moe_router_expert_bias,
        # The bias is a fixed buffer in transformers (DeepSeek-V3's e_score_correction_bias is not
        # trained); megatron would move it by sign(mean load - load) * rate after every step.
        # Rate 0: the update adds 0 (bias + sign * 0), the trained model keeps the checkpoint's bias.
        moe_router_bias_update_rate=0.0,
        moe_layer_freq=list(spec.moe_layer_pattern),
        moe_shared_expert_intermediate_size=spec.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=spec.moe_shared_expert_gate,
        moe_grouped_gemm=grouped_gemm,
        # megatron's own aux-loss types stay off: with coeff > 0 the policy's routers compute the
        # global-batch loss of models/moe_aux.py instead (installed by build_model).
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
    )


def _megatron_moe_layer_spec(spec: ModelSpec, *, use_te: bool):
    """megatron's MoE layer spec, whose ``mlp`` (MoELayer: TEGroupedMLP experts with TE,
    SequentialMLP without) we take."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if use_te:
        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=spec.num_moe_experts, moe_grouped_gemm=True, qk_layernorm=spec.qk_norm)
    return get_gpt_layer_local_spec(num_experts=spec.num_moe_experts, moe_grouped_gemm=False,
                                    qk_layernorm=spec.qk_norm, normalization="RMSNorm")


def moe_layer_specs(spec: ModelSpec, dense, cfg, vp_stage, *, use_te: bool) -> list:
    """Per-layer specs of this (virtual) pipeline stage: ``dense`` for dense layers, and for
    MoE layers the same spec with its ``mlp`` (and, with TE, its pre-MLP norm) replaced."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from mcore_align.parallel.cpu_mode import bridge_moe_without_te

    bridge_moe_without_te()
    moe_full = _megatron_moe_layer_spec(spec, use_te=use_te)
    moe = copy.deepcopy(dense)
    moe.submodules.mlp = moe_full.submodules.mlp
    if use_te:  # TE's dense spec fuses the pre-MLP norm into linear_fc1; MoE needs its own norm
        moe.submodules.pre_mlp_layernorm = moe_full.submodules.pre_mlp_layernorm
    offset = get_transformer_layer_offset(cfg, vp_stage=vp_stage)
    n = get_num_layers_to_build(cfg, vp_stage=vp_stage)
    return [moe if spec.moe_layer_pattern[offset + j] else dense for j in range(n)]


# -- layout checks (before anything is built) ---------------------------------------------------
def check_moe_layout(spec: ModelSpec, parallel) -> None:
    """Raise ``ValueError`` for a parallel layout this MoE model cannot run at."""
    ep = parallel.expert_model_parallel_size
    etp = parallel.expert_tensor_parallel_size or parallel.tensor_model_parallel_size
    if not is_moe(spec):
        if ep > 1:
            raise ValueError(f"expert_model_parallel_size={ep} needs a MoE model; "
                             f"{spec.family} has no experts")
        return
    if spec.num_moe_experts % ep:
        raise ValueError(f"expert_model_parallel_size={ep} must divide the number of experts "
                         f"({spec.num_moe_experts}, config.json num_experts)")
    if parallel.tensor_model_parallel_size > 1 and not parallel.sequence_parallel:
        raise ValueError(f"MoE at tensor_model_parallel_size={parallel.tensor_model_parallel_size} "
                         "needs sequence_parallel=True (megatron refuses to train MoE with TP and no SP)")
    if spec.moe_ffn_hidden_size % etp:
        raise ValueError(f"expert_tensor_parallel_size={etp} must divide the expert hidden size "
                         f"{spec.moe_ffn_hidden_size} (config.json moe_intermediate_size)")


class RouterLoad:
    """Tokens each expert receives in the training forwards, per MoE layer, read from
    megatron's routers (forward hooks on ``TopKRouter``: its output is ``(probs,
    routing_map)``, routing_map ``[T, E]`` bool, T the tokens this rank routes).

    ``metrics()`` (a collective: every rank calls it once per step) sums the counts of all
    ranks and returns the load imbalance ``max_e load_e / mean_e load_e`` (1 = balanced, E/k =
    every token on the same k experts) averaged over the MoE layers and its worst layer. The
    world sum is right for every layout: DP/EP/SP/CP ranks route different tokens; TP ranks
    without SP route the same ones (a uniform factor, which the ratio ignores); PP stages fill
    their own layers' rows. Only passes with gradients on a module in training mode count
    (not the reference, not no-grad policy passes, not evaluation). Empty for dense models.
    """

    def __init__(self, model_chunks):
        import torch
        from megatron.core.transformer.moe.router import TopKRouter
        from megatron.core.utils import get_model_config

        cfg = get_model_config(model_chunks[0])
        self.num_experts = getattr(cfg, "num_moe_experts", None) or 0
        self.num_layers = cfg.num_layers
        self.counts = None  # [num_layers, E] float64, rows of this rank's MoE layers
        if not self.num_experts:
            return
        self.counts = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64)
        for chunk in model_chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    module.register_forward_hook(self._hook)

    def _hook(self, router, args, output) -> None:
        import torch

        if router.training and torch.is_grad_enabled():
            routing_map_TE = output[1]
            # layer_number is 1-based and global (PP offset included)
            self.counts[router.layer_number - 1] += routing_map_TE.sum(0).to("cpu", torch.float64)

    def metrics(self, device) -> dict[str, float]:
        import torch

        if self.counts is None:
            return {}
        total = self.counts.to(device, copy=True)  # a copy: counts are zeroed below
        torch.distributed.all_reduce(total)  # [L, E]: tokens per expert, all ranks
        self.counts.zero_()
        total = total[total.sum(1) > 0]  # MoE layers that routed tokens this step
        if total.numel() == 0:
            return {}
        imbalance_L = total.max(1).values / total.mean(1)
        return {"moe/load_imbalance": float(imbalance_L.mean()), "moe/load_imbalance_max": float(imbalance_L.max())}
