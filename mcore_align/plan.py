"""Memory planner: per-rank memory of a training layout, and layouts that fit a GPU.

    python -m mcore_align.plan --model /ckpt/Qwen2.5-7B-Instruct --algo dpo --gpus 8 --gpu-memory 80
    python -m mcore_align.plan --model config.json --tp 4 --pp 2 --dp 4 --distributed-optimizer \\
        --recompute full --tokens-per-micro-batch 8192 --dtype bf16

``--model``: an HF ``config.json`` (or the directory holding it) or a converted checkpoint
(``model_spec.json``). Without ``--tp/--pp/--dp`` and with ``--gpus``, every layout is
planned and the ones that fit ``--gpu-memory`` are listed, best first.

What is modelled, per rank, for the WORST pipeline stage (the first holds the embedding
and the most in-flight activations, the last the output layer and the logits):

* weights: exact parameter counts of megatron's local layer spec as the provider builds it
  (per layer: input/pre-MLP RMSNorm, QKV (+bias), optional q/k norm, output projection,
  gated MLP; embedding on the first stage; final norm and output layer, or a value head,
  on the last; a tied embedding is a second copy on the last stage when PP > 1), sharded
  by TP, at the training dtype. LoRA: the frozen base + adapters (A/B laid out as
  ``models/lora.py``).
* MoE (``--ep``, ``--etp``): per MoE layer the router [E, h] and a shared expert (by TP) are
  counted with the dense part, the rank's E/EP experts are sharded by ETP; the distributed
  optimizer shards expert state over the expert-data-parallel group (GPUs / (ETP x EP x PP))
  and the rest over DP x CP. MoE activations assume a balanced load (docs/moe.md).
* grads: megatron DDP's grad buffer, fp32 (``grad_reduce_in_fp32``), one value per
  TRAINED parameter; NOT sharded by the distributed optimizer (megatron keeps the full
  buffer and reduce-scatters into it).
* optimizer: Adam's two moments (fp32) per trained parameter, plus fp32 main weights in
  bf16/fp16; divided by DP*CP with the distributed optimizer.
* reference: a co-resident frozen copy of the weights (objectives with a reference, full
  fine-tuning); LoRA's reference is the base itself (0); ``precompute`` frees it before
  training, but it is held during the precompute pass, reported as ``precompute_peak``.
* activations: an ESTIMATE per token per layer, flash-style attention (no s x s scores
  stored: TE's, or flex attention on CUDA), bytes of the activation dtype:
  norms' and linears' inputs ``4h``, q/k/v ``(a+2g)d``, roped q/k ``(a+g)d``, attention
  output ``a d``, MLP ``2f`` (gate/up) + ``f`` (SiLU product), TP-sharded except the ``h``
  terms (sharded too with sequence parallelism); ``recompute=full`` keeps only each
  layer's input ``h`` plus one layer's activations. Tokens per rank: tokens per
  micro-batch / CP. In flight: 1 micro-batch without PP, ``min(PP, micro-batches)`` on
  the first stage with 1F1B, times ``1 + (PP-1)/(PP*VPP)`` interleaved (Korthikanti et al.
  2022, section 4.2.3).
* logits: the fused log-prob head keeps one chunk (1024 tokens) of logits + fp32 stats and
  grads, and an fp32 [V/TP, h] grad accumulator for the output weight in backward; unfused:
  the [T, V/TP] logits, their gradient and one fp32 chunk.

Not modelled: the CUDA context and NCCL buffers (~1-2 GiB), allocator fragmentation
(``--reserve`` covers both, 10% + 2 GiB by default in the layout search), megatron's
bucket padding, the optimizer's temporary buffers, KTO's extra KL sequences (add them to
the tokens). The weights/grads/optimizer columns are checked against the built model and
optimizer in tests/distributed/test_plan_dist.py; activations are not measured there (CPU).
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

from mcore_align.models.spec import ModelSpec

GiB = 2**30
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
LORA_SHAPES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass(kw_only=True)
class Layout:
    """What is planned: parallel layout, precision and the algorithm's memory needs."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    cp: int = 1
    dp: int = 1
    ep: int = 1
    """MoE: expert parallelism (experts split over EP ranks, carved out of DP x CP x TP)."""
    etp: int | None = None
    """MoE: tensor parallelism inside each expert (None: TP, like ParallelConfig)."""
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    recompute: str | None = None
    """None, "selective" or "full"."""
    dtype: str = "bf16"
    tokens_per_micro_batch: int = 8192
    micro_batches: int | None = None
    """Micro-batches per step per DP rank (None: enough to fill the pipeline, PP)."""
    head: str = "lm"
    """"lm" or "value" (reward models)."""
    reference: str | None = "co_resident"
    """None (no reference), "co_resident" or "precompute"."""
    lora_rank: int | None = None
    lora_targets: tuple[str, ...] = ("linear_qkv",)
    fused_logprobs: bool = True
    logprob_chunk: int = 1024

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp", "dp", "ep", "tokens_per_micro_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"plan: {name} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"plan: dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.recompute not in (None, "selective", "full"):
            raise ValueError(f"plan: recompute must be none, selective or full, got {self.recompute!r}")
        if self.reference not in (None, "co_resident", "precompute"):
            raise ValueError(f"plan: reference must be none, co_resident or precompute, got {self.reference!r}")
        if self.head not in ("lm", "value"):
            raise ValueError(f"plan: head must be lm or value, got {self.head!r}")
        bad = set(self.lora_targets) - set(LORA_SHAPES)
        if bad:
            raise ValueError(f"plan: unknown LoRA targets {sorted(bad)}; megatron names are {LORA_SHAPES}")

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def expert_tp(self) -> int:
        return self.etp or self.tp

    @property
    def expert_dp(self) -> int:
        """Ranks holding the same experts (megatron's expert-data-parallel group)."""
        return self.gpus // (self.expert_tp * self.ep * self.pp)


@dataclass
class StagePlan:
    """Bytes on one rank of one pipeline stage."""

    stage: int
    weights: float
    grads: float
    optimizer: float
    reference: float
    activations: float
    logits: float
    trained_params: int = 0
    params: int = 0

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.reference + self.activations + self.logits


@dataclass
class Plan:
    layout: Layout
    stages: list[StagePlan]
    precompute_peak: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def worst(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.total)

    @property
    def peak(self) -> float:
        return max(self.worst.total, self.precompute_peak or 0.0)


def check_divisible(spec: ModelSpec, lay: Layout) -> None:
    """The provider's own constraints (models/provider.py, config/layout.py), as ValueErrors."""
    if spec.num_attention_heads % lay.tp or spec.num_query_groups % lay.tp:
        raise ValueError(f"TP={lay.tp} must divide heads {spec.num_attention_heads} and kv heads {spec.num_query_groups}")
    if spec.vocab_size % lay.tp:
        raise ValueError(f"TP={lay.tp} must divide vocab_size {spec.vocab_size}")
    chunks = lay.pp * (lay.vpp or 1)
    if spec.num_layers % chunks:
        raise ValueError(f"PP*VPP={chunks} must divide num_layers {spec.num_layers}")
    if lay.sequence_parallel and lay.tp == 1:
        raise ValueError("sequence_parallel needs TP > 1")
    if not spec.num_moe_experts:
        if lay.ep > 1 or lay.etp not in (None, lay.tp):
            raise ValueError(f"EP={lay.ep} / ETP={lay.etp} on a dense model ({spec.family})")
        return
    if spec.num_moe_experts % lay.ep:
        raise ValueError(f"EP={lay.ep} must divide the number of experts {spec.num_moe_experts}")
    if spec.moe_ffn_hidden_size % lay.expert_tp:
        raise ValueError(f"ETP={lay.expert_tp} must divide the expert hidden size {spec.moe_ffn_hidden_size}")
    if lay.gpus % (lay.expert_tp * lay.ep * lay.pp):
        raise ValueError(f"ETP x EP x PP = {lay.expert_tp * lay.ep * lay.pp} must divide the {lay.gpus} GPUs")
    if lay.tp > 1 and not lay.sequence_parallel:
        raise ValueError(f"MoE at TP={lay.tp} needs sequence_parallel (megatron refuses MoE with TP and no SP)")


def mla_attention_params(spec: ModelSpec, tp: int) -> int:
    """Multi-head latent attention of one layer on one TP rank (local spec, models/mla.py): the
    down projections are column-parallel too (rows by TP, gathered), the latent norms replicated."""
    m, h, a = spec.mla, spec.hidden_size, spec.num_attention_heads
    dq = m.qk_head_dim + m.qk_pos_emb_head_dim
    if m.q_lora_rank is None:
        q = h * a * dq // tp
    else:
        q = h * m.q_lora_rank // tp + m.q_lora_rank + m.q_lora_rank * a * dq // tp
    kv = h * (m.kv_lora_rank + m.qk_pos_emb_head_dim) // tp + m.kv_lora_rank \
        + m.kv_lora_rank * a * (m.qk_head_dim + m.v_head_dim) // tp
    return q + kv + a * m.v_head_dim // tp * h


def layer_params(spec: ModelSpec, tp: int) -> int:
    """Parameters of one transformer layer on one TP rank (local spec)."""
    h, a, g, d, f = (spec.hidden_size, spec.num_attention_heads, spec.num_query_groups, spec.head_dim,
                     spec.ffn_hidden_size)
    mlp = h * 2 * f // tp + f * h // tp
    if spec.mla is not None:
        return mla_attention_params(spec, tp) + mlp + 2 * h
    qkv = h * (a + 2 * g) * d // tp + ((a + 2 * g) * d // tp if spec.qkv_bias else 0)
    norms = 2 * h + (2 * d if spec.qk_norm else 0)  # input + pre-MLP RMSNorm (+ q/k norm), replicated
    return qkv + (a * d // tp) * h + mlp + norms


def moe_mlp_params(spec: ModelSpec, lay: "Layout") -> tuple[int, int]:
    """(non-expert, expert) parameters of one MoE layer's MLP on one rank: router [E, h]
    (replicated), shared expert (fc1 [2Fs, h], fc2 [h, Fs], by TP) and its gate [1, h];
    the rank's E / EP experts (fc1 [2F, h], fc2 [h, F], by ETP). The pre-MLP RMSNorm is
    counted with the layer."""
    h, E, F = spec.hidden_size, spec.num_moe_experts, spec.moe_ffn_hidden_size
    dense = E * h
    if spec.moe_shared_expert_intermediate_size:
        dense += 3 * h * spec.moe_shared_expert_intermediate_size // lay.tp + (h if spec.moe_shared_expert_gate else 0)
    return dense, E // lay.ep * 3 * h * F // lay.expert_tp


def _is_moe(spec: ModelSpec, layer: int) -> bool:
    return bool(spec.num_moe_experts) and bool(spec.moe_layer_pattern[layer])


def stage_layer_params(spec: ModelSpec, lay: "Layout", stage: int) -> tuple[int, int]:
    """(non-expert, expert) parameters of the transformer layers of ``stage`` on one rank."""
    n = _stage_layers(spec, lay)
    dense_layer = layer_params(spec, lay.tp)
    dense_mlp = 3 * spec.hidden_size * spec.ffn_hidden_size // lay.tp
    dense = experts = 0
    for i in range(stage * n, (stage + 1) * n):
        if _is_moe(spec, i):
            d, e = moe_mlp_params(spec, lay)
            dense, experts = dense + dense_layer - dense_mlp + d, experts + e
        else:
            dense += dense_layer
    return dense, experts


def lora_layer_params(spec: ModelSpec, tp: int, rank: int, targets: Sequence[str],
                      moe: "Layout | None" = None) -> int:
    """Adapter parameters of one layer on one TP rank (A/B layout of models/lora.py).
    ``moe``: the layout, for a MoE layer, whose MLP targets are the rank's E / EP experts
    (split by ETP) and the shared expert (by TP) instead of a dense MLP."""
    h, a, g, d, f = (spec.hidden_size, spec.num_attention_heads, spec.num_query_groups, spec.head_dim,
                     spec.ffn_hidden_size)

    def mlp(ffn: int, t: int) -> dict[str, int]:  # column fc1 [2F, h], row fc2 [h, F], split over t
        return {"linear_fc1": rank * h + 2 * ffn // t * rank, "linear_fc2": rank * ffn // t + h * rank}

    # column: A [r, in] replicated, B [out/TP, r]; row: A [r, in/TP], B [out, r] replicated
    sizes = {"linear_qkv": rank * h + (a + 2 * g) * d // tp * rank, "linear_proj": rank * (a * d) // tp + h * rank}
    if moe is None:
        sizes.update(mlp(f, tp))
    else:
        experts = mlp(spec.moe_ffn_hidden_size, moe.expert_tp)
        fs = spec.moe_shared_expert_intermediate_size
        shared = mlp(fs, tp) if fs else {"linear_fc1": 0, "linear_fc2": 0}
        for t in experts:
            sizes[t] = spec.num_moe_experts // moe.ep * experts[t] + shared[t]
    return sum(sizes[t] for t in targets)


def _stage_layers(spec: ModelSpec, lay: Layout) -> int:
    return spec.num_layers // lay.pp  # VPP splits a stage's layers into chunks, same total


def stage_params(spec: ModelSpec, lay: Layout, stage: int) -> tuple[int, int]:
    """(base parameters, adapter parameters) on one rank of pipeline ``stage``."""
    h, V, tp = spec.hidden_size, spec.vocab_size, lay.tp
    n = sum(stage_layer_params(spec, lay, stage))
    first, last = stage == 0, stage == lay.pp - 1
    if first:
        n += V // tp * h  # word embeddings
    if last:
        n += h  # final norm
        if lay.head == "value":
            n += h  # ValueHead [1, h], replicated
        elif not spec.tie_word_embeddings:
            n += V // tp * h  # output layer
        elif not first:
            n += V // tp * h  # tied: the last stage holds its own copy, kept in sync by megatron
    n_layers = _stage_layers(spec, lay)
    adapters = sum(lora_layer_params(spec, tp, lay.lora_rank, lay.lora_targets, lay if _is_moe(spec, i) else None)
                   for i in range(stage * n_layers, (stage + 1) * n_layers)) if lay.lora_rank else 0
    return n, adapters


def _activation_bytes_per_token_layer(spec: ModelSpec, lay: Layout, moe: bool = False) -> float:
    h, a, g, d, f = (spec.hidden_size, spec.num_attention_heads, spec.num_query_groups, spec.head_dim,
                     spec.ffn_hidden_size)
    ab = DTYPE_BYTES[lay.dtype]
    h_share = lay.tp if lay.sequence_parallel else 1
    attn = ((a + 2 * g) * d + (a + g) * d + a * d) / lay.tp
    if spec.mla is not None:  # q, k (dn + dr per head), v and the output (dv), plus the latents
        m = spec.mla
        dq = m.qk_head_dim + m.qk_pos_emb_head_dim
        latents = (m.q_lora_rank or 0) + m.kv_lora_rank + m.qk_pos_emb_head_dim
        attn = (a * (2 * dq + 2 * m.v_head_dim) + latents) / lay.tp
    if not moe:
        sharded = attn + 3 * f / lay.tp
        return ab * (4 * h / h_share + sharded)
    # MoE layer: attention as above; per token, k routed copies reach expert ranks (balanced
    # load assumed: each rank receives as many copies as it sends, times ETP, whose ranks all
    # see the gathered tokens), each keeping the dispatched input h, fc1's 2F/ETP, the SiLU
    # product F/ETP and fc2's output h before the weighted combine; the router's fp32 logits
    # and probs (2E, over the rank's own tokens); a shared expert like a dense MLP.
    F, k, E = spec.moe_ffn_hidden_size, spec.moe_router_topk, spec.num_moe_experts
    routed = k * lay.expert_tp / h_share * (2 * h + 3 * F / lay.expert_tp)
    shared = 3 * (spec.moe_shared_expert_intermediate_size or 0) / lay.tp
    return ab * (4 * h / h_share + attn + routed + shared) + 4 * 2 * E / h_share


def _in_flight(lay: Layout, stage: int) -> float:
    if lay.pp == 1:
        return 1.0
    m = lay.micro_batches or lay.pp
    # 1F1B: stage i starts PP - i micro-batches before its first backward.
    k = min(m, lay.pp - stage)
    if lay.vpp:
        k *= 1 + (lay.pp - 1) / (lay.pp * lay.vpp)
    return float(k)


def plan(spec: ModelSpec, lay: Layout) -> Plan:
    """Per-rank bytes of every pipeline stage of ``lay``."""
    check_divisible(spec, lay)
    wb = DTYPE_BYTES[lay.dtype]
    lora = lay.lora_rank is not None
    mixed = lay.dtype != "fp32"
    shard = lay.dp * lay.cp if lay.distributed_optimizer else 1
    tokens = lay.tokens_per_micro_batch / lay.cp
    per_tok_layer = max(_activation_bytes_per_token_layer(spec, lay, moe) for moe in (False, bool(spec.num_moe_experts)))
    layers = _stage_layers(spec, lay)
    V_tp, h = spec.vocab_size // lay.tp, spec.hidden_size
    stages = []
    for s in range(lay.pp):
        base, adapters = stage_params(spec, lay, s)
        trained = adapters if lora else base
        # Adapters are created in the base's dtype (models/lora.py init_A); value head is fp32.
        weights = (base + adapters) * wb
        if lay.head == "value" and s == lay.pp - 1 and wb != 4:
            weights += h * (4 - wb)
        grads = 4.0 * trained
        # Expert parameters: megatron's distributed optimizer shards them over the
        # expert-data-parallel group (GPUs / (ETP x EP x PP)), the rest over DP x CP.
        experts = 0 if lora else stage_layer_params(spec, lay, s)[1]
        eshard = lay.expert_dp if lay.distributed_optimizer else 1
        optimizer = (12.0 if mixed else 8.0) * ((trained - experts) / shard + experts / eshard)
        reference = base * wb if lay.reference == "co_resident" and not lora else 0.0
        if lay.recompute == "full":
            act = tokens * h * DTYPE_BYTES[lay.dtype] / (lay.tp if lay.sequence_parallel else 1) * layers
            act = act * _in_flight(lay, s) + tokens * per_tok_layer  # + one layer being recomputed
        else:
            act = tokens * sum(_activation_bytes_per_token_layer(spec, lay, _is_moe(spec, i))
                               for i in range(s * layers, (s + 1) * layers)) * _in_flight(lay, s)
        logits = 0.0
        if s == lay.pp - 1 and lay.head == "lm":
            if lay.fused_logprobs:
                c = min(lay.logprob_chunk, tokens)
                logits = c * V_tp * (wb + 4 + 4) + (0.0 if lora else 4.0 * V_tp * h)
            else:
                logits = tokens * V_tp * 2 * wb + min(4096, tokens) * V_tp * 4
        stages.append(StagePlan(stage=s, weights=weights, grads=grads, optimizer=optimizer, reference=reference,
                                activations=act, logits=logits, trained_params=trained, params=base + adapters))
    out = Plan(layout=lay, stages=stages)
    if lay.reference == "precompute" and not lora:
        # The precompute pass runs after the optimizer is built, with the reference loaded and no
        # training activations (forward-only, one layer at a time, plus the head's chunk).
        out.precompute_peak = max(st.weights * 2 + st.grads + st.optimizer + tokens * per_tok_layer + st.logits * 0.5
                                  for st in stages)
    if lay.recompute == "selective":
        out.notes.append("selective recompute: with flash-style attention the core-attention activations it "
                         "drops are already small; planned as no recompute")
    return out


def read_spec(path: str | Path) -> ModelSpec:
    """A ModelSpec from a converted checkpoint (model_spec.json) or an HF config.json / directory."""
    p = Path(path)
    if (p / "model_spec.json").exists() or p.name == "model_spec.json":
        from mcore_align.checkpoint import read_model_spec

        return read_model_spec(p.parent if p.name == "model_spec.json" else p)
    from mcore_align.models.families import spec_from_hf_config
    from mcore_align.models.spec import read_hf_config

    return spec_from_hf_config(read_hf_config(p))


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def search(spec: ModelSpec, gpus: int, gpu_memory_gib: float, base: Layout, *, reserve_frac: float = 0.10,
           reserve_gib: float = 2.0, gpus_per_node: int = 8, max_pp: int = 32, top: int = 5) -> list[Plan]:
    """Layouts of at most ``gpus`` GPUs whose peak fits ``gpu_memory_gib`` after the reserve, best first.

    Order: layouts that use every GPU first (the layers must split evenly over PP*VPP, so a
    126-layer model cannot be pipelined 4-, 8- or 16-way and some GPU counts leave GPUs idle);
    then fewest model-parallel GPUs (more data parallelism, less communication), no
    recomputation, less PP (bubbles), TP before CP. TP stays within a node.
    """
    budget = (gpu_memory_gib * (1 - reserve_frac) - reserve_gib) * GiB
    found = []
    for tp in [t for t in (1, 2, 4, 8) if t <= min(gpus, gpus_per_node)]:
        for cp in (1, 2, 4, 8):
            for pp in [d for d in _divisors(spec.num_layers) if d <= max_pp]:
                if tp * pp * cp > gpus:
                    continue
                dp = gpus // (tp * pp * cp)
                # MoE: expert parallelism within a node (all-to-all), experts not tensor-parallel.
                eps = [e for e in (1, 2, 4, 8) if e <= gpus_per_node] if spec.num_moe_experts else [1]
                for ep, recompute in [(e, r) for e in eps for r in (None, "full")]:
                    lay = replace(base, tp=tp, pp=pp, cp=cp, dp=dp, vpp=None, recompute=recompute,
                                  sequence_parallel=tp > 1, distributed_optimizer=dp * cp > 1,
                                  ep=ep, etp=1 if spec.num_moe_experts else None)
                    try:
                        p = plan(spec, lay)
                    except ValueError:
                        continue
                    if p.peak <= budget:
                        if lay.gpus < gpus:
                            p.notes.append(f"uses {lay.gpus} of {gpus} GPUs: {spec.num_layers} layers do not split "
                                           f"evenly over a pipeline that would use them all")
                        found.append(p)
    found.sort(key=lambda p: (p.layout.gpus < gpus, p.layout.tp * p.layout.pp * p.layout.cp,
                              p.layout.recompute is not None, p.layout.pp, p.layout.cp, p.layout.ep, p.peak))
    return found[:top]


def format_plan(p: Plan) -> str:
    lay = p.layout
    moe = f"EP={lay.ep} ETP={lay.expert_tp} " if lay.ep > 1 or lay.etp else ""
    head = (f"TP={lay.tp} PP={lay.pp}{f' VPP={lay.vpp}' if lay.vpp else ''} CP={lay.cp} DP={lay.dp} {moe}"
            f"({lay.gpus} GPUs) {lay.dtype} recompute={lay.recompute or 'none'} "
            f"distributed_optimizer={lay.distributed_optimizer} sequence_parallel={lay.sequence_parallel} "
            f"tokens/micro-batch={lay.tokens_per_micro_batch} "
            f"reference={'base (adapters off)' if lay.lora_rank and lay.reference else lay.reference or 'none'}"
            f"{f' lora_rank={lay.lora_rank} targets={list(lay.lora_targets)}' if lay.lora_rank else ''}")
    cols = ("weights", "grads", "optimizer", "reference", "activations", "logits", "total")
    rows = ["| stage | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for st in p.stages:
        rows.append(f"| {st.stage} | " + " | ".join(f"{getattr(st, c) / GiB:.2f}" for c in cols) + " |")
    text = head + "\n(GiB per rank)\n" + "\n".join(rows)
    if p.precompute_peak is not None:
        text += f"\nprecompute pass peak (reference loaded, before training): {p.precompute_peak / GiB:.2f} GiB"
    for n in p.notes:
        text += f"\nnote: {n}"
    return text


def _layout_from_args(a, spec: ModelSpec) -> Layout:
    from mcore_align.algorithms.base import objective_class

    obj = objective_class(a.algo)
    reference = a.ref_model if obj.needs_reference else None
    targets: tuple[str, ...] = ()
    if a.lora_rank:
        from mcore_align.models.lora import resolve_target_modules

        targets = resolve_target_modules(a.lora_targets)
    return Layout(tp=a.tp, pp=a.pp, vpp=a.vpp, cp=a.cp, dp=a.dp, ep=a.ep, etp=a.etp,
                  sequence_parallel=a.sequence_parallel,
                  distributed_optimizer=a.distributed_optimizer, recompute=None if a.recompute == "none" else a.recompute,
                  dtype=a.dtype, tokens_per_micro_batch=a.tokens_per_micro_batch, micro_batches=a.micro_batches,
                  head=obj.head, reference=reference, lora_rank=a.lora_rank, lora_targets=targets or ("linear_qkv",),
                  fused_logprobs=not a.unfused_logprobs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mcore_align.plan", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF config.json / checkpoint dir, or a converted checkpoint")
    p.add_argument("--algo", default="dpo", help="objective (decides the head and whether a reference runs)")
    p.add_argument("--ref-model", choices=("co_resident", "precompute"), default="co_resident")
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA: adapters of this rank on a frozen base")
    p.add_argument("--lora-targets", default="DEFAULT", help="DEFAULT, ALL or comma-separated module names")
    for name, default in (("tp", 1), ("pp", 1), ("cp", 1), ("dp", 1)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--vpp", type=int, default=None)
    p.add_argument("--ep", type=int, default=1, help="MoE: expert parallelism (within TP x DP x CP)")
    p.add_argument("--etp", type=int, default=None, help="MoE: tensor parallelism inside experts (default TP)")
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--distributed-optimizer", action="store_true")
    p.add_argument("--recompute", choices=("none", "selective", "full"), default="none")
    p.add_argument("--tokens-per-micro-batch", type=int, default=8192)
    p.add_argument("--micro-batches", type=int, default=None, help="per step per DP rank (default: PP)")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16")
    p.add_argument("--unfused-logprobs", action="store_true", help="model.fused_logprobs=false")
    p.add_argument("--gpus", type=int, default=None, help="search layouts of this many GPUs")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU, for the search")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print JSON")
    a = p.parse_args(argv)
    spec = read_spec(a.model)
    lay = _layout_from_args(a, spec)
    if a.gpus:
        found = search(spec, a.gpus, a.gpu_memory, lay, gpus_per_node=a.gpus_per_node)
        if a.json:
            print(json.dumps([_plan_json(x) for x in found], indent=1))
            return 0 if found else 1
        print(f"{spec.family} {spec.num_layers} layers, h={spec.hidden_size}, V={spec.vocab_size}: "
              f"layouts of {a.gpus} GPUs fitting {a.gpu_memory:g} GiB (10% + 2 GiB reserved), best first")
        if not found:
            print("none fits: more GPUs, recompute, LoRA, or fewer tokens per micro-batch")
            return 1
        for x in found:
            print("\n" + format_plan(x) + f"\npeak {x.peak / GiB:.1f} GiB")
        return 0
    pl = plan(spec, lay)
    print(json.dumps(_plan_json(pl), indent=1) if a.json else format_plan(pl) + f"\npeak {pl.peak / GiB:.1f} GiB")
    return 0


def _plan_json(p: Plan) -> dict:
    return {"layout": asdict(p.layout), "peak_gib": p.peak / GiB,
            "stages": [{**asdict(s), "total": s.total} for s in p.stages],
            "precompute_peak_gib": None if p.precompute_peak is None else p.precompute_peak / GiB, "notes": p.notes}


if __name__ == "__main__":
    raise SystemExit(main())
