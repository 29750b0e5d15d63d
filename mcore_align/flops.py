"""Floating-point operations of one training step, TFLOP/s per GPU and MFU.

The count is the one Megatron-LM users read in its log line ("throughput per GPU
(TFLOP/s/GPU)"): matrix multiplications only, 2 FLOPs per multiply-add, from the model's
shape and the step's sequence lengths. Elementwise work (norms, RoPE, SiLU, softmax,
residual adds, the optimizer) is not counted: it is memory-bound and well under 1% of
the matmuls at any size worth measuring.

Per token of a sequence, forward, one layer (``h`` hidden, ``a`` heads, ``g`` key/value
groups, ``d`` head_dim, ``f`` ffn):

===============================  ====================================================
attention projections (QKV, O)   2 * h * (a*d + 2*g*d)  +  2 * (a*d) * h
MLP (gated SiLU: gate, up, down) 2 * h * 2f  +  2 * f * h        = 6 h f
===============================  ====================================================

Attention scores, per SEQUENCE of length ``s`` (a packed micro-batch attends within
each sequence only, so the sum is over sequences, never over the packed row):
``QK^T`` and ``softmax(.)V``: ``2 * 2 * a * d * s^2`` with ``causal=False`` (what a
dense kernel computes), and half that, ``2 * a * d * s * (s + 1)``, with ``causal=True``
(what a causal flash kernel computes and what Megatron-LM counts since it halved the
causal term; the default here).

The vocabulary projection (or the fused log-prob head, which does the same matmul chunk
by chunk): ``2 * h * V`` per token; a value head (reward model): ``2 * h`` per token.

Passes (``expansion``): forward 1; backward 2 (input grads + weight grads) for trained
weights, 1 for frozen weights (input grads only: LoRA's base); recomputation adds one
forward of the layers with ``recompute_granularity="full"``, and the fused head's chunked
backward recomputes the head's forward (one more ``2 h V`` per token). The reference
model of DPO-like objectives adds one forward only (``co_resident``; ``precompute`` does
that pass once before training, counted by :func:`precompute_flops`).

Two totals, as in the PaLM paper (Chowdhery et al. 2022, appendix B):
``model_flops`` counts forward + backward + the reference forward, no recomputation: the
MFU numerator, comparable between runs that recompute and runs that do not.
``hardware_flops`` adds the recomputed forwards: what the GPU actually executed (HFU).

Embedding look-ups are gathers, not matmuls: zero. LoRA adapters add
``2 * r * (in + out)`` per token per adapted linear, forward, and 2x that backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from mcore_align.models.spec import ModelSpec

# Dense bf16 peak (no sparsity) by device name, TFLOP/s, from the vendors' datasheets.
# Matched as a substring of torch.cuda.get_device_name(), first match wins.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100", 989.0),  # SXM; the PCIe part is 756: set train.peak_tflops
    ("H800", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10G", 125.0),
    ("MI300X", 1307.0),
)


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one step, by part (each already multiplied by its passes)."""

    layers_dense: float
    """Attention projections and MLP, forward + backward."""
    attention_scores: float
    """QK^T and PV, forward + backward."""
    head: float
    """Vocabulary projection (or value head), forward + backward."""
    lora: float
    """Adapters, forward + backward."""
    reference: float
    """Reference model forward (0 without one or with precompute)."""
    recompute: float
    """Recomputed forwards (activation recomputation, fused-head chunks)."""

    @property
    def model_flops(self) -> float:
        """MFU numerator: everything but recomputation."""
        return self.layers_dense + self.attention_scores + self.head + self.lora + self.reference

    @property
    def hardware_flops(self) -> float:
        """What the GPU executed: model FLOPs plus recomputation."""
        return self.model_flops + self.recompute


def _per_token_dense(spec: ModelSpec) -> float:
    """Forward FLOPs of one layer's projections + MLP, per token."""
    h, a, g, d, f = (spec.hidden_size, spec.num_attention_heads, spec.num_query_groups, spec.head_dim,
                     spec.ffn_hidden_size)
    attn = 2 * h * (a * d + 2 * g * d) + 2 * (a * d) * h
    mlp = 2 * h * 2 * f + 2 * f * h
    return float(attn + mlp)


def _scores(spec: ModelSpec, lengths: Iterable[int], causal: bool) -> float:
    """Forward FLOPs of QK^T and PV for one layer, summed over sequences."""
    ad = spec.num_attention_heads * spec.head_dim
    if causal:  # row i attends to i + 1 keys: sum_i (i + 1) = s (s + 1) / 2 pairs, 2 matmuls, 2 FLOPs
        return float(sum(2 * ad * s * (s + 1) for s in lengths))
    return float(sum(4 * ad * s * s for s in lengths))


def _lora_per_token(spec: ModelSpec, rank: int, targets: Sequence[str]) -> float:
    """Forward FLOPs of the adapters of one layer, per token (megatron module names)."""
    h, a, g, d, f = (spec.hidden_size, spec.num_attention_heads, spec.num_query_groups, spec.head_dim,
                     spec.ffn_hidden_size)
    shapes = {"linear_qkv": (h, (a + 2 * g) * d), "linear_proj": (a * d, h),
              "linear_fc1": (h, 2 * f), "linear_fc2": (f, h)}
    unknown = set(targets) - set(shapes)
    if unknown:
        raise ValueError(f"flops: unknown LoRA target modules {sorted(unknown)}; expected {sorted(shapes)}")
    return float(sum(2 * rank * (shapes[t][0] + shapes[t][1]) for t in targets))


def step_flops(
    spec: ModelSpec,
    seq_lengths: Iterable[int],
    *,
    head: str = "lm",
    causal: bool = True,
    reference: bool = False,
    recompute_granularity: str | None = None,
    fused_head: bool = False,
    lora_rank: int | None = None,
    lora_targets: Sequence[str] = (),
    backward: bool = True,
) -> StepFlops:
    """FLOPs of a step over sequences of ``seq_lengths`` tokens (each attends to itself only).

    ``head``: "lm" (vocab projection) or "value" (a scalar per token). ``reference``: a
    co-resident reference model runs one forward over the same sequences. ``lora_rank``:
    the base is frozen (backward 1x for base weights) and adapters on ``lora_targets``
    (megatron names) are trained. ``backward=False``: a forward-only pass (evaluation).
    """
    lengths = [int(s) for s in seq_lengths]
    if any(s < 0 for s in lengths):
        raise ValueError(f"flops: negative sequence length in {lengths}")
    if head not in ("lm", "value"):
        raise ValueError(f"flops: head must be 'lm' or 'value', got {head!r}")
    if recompute_granularity not in (None, "full", "selective"):
        raise ValueError(f"flops: recompute_granularity must be None, full or selective, got {recompute_granularity!r}")
    tokens = sum(lengths)
    L = spec.num_layers
    lora = lora_rank is not None
    dense_fwd = L * _per_token_dense(spec) * tokens
    scores_fwd = L * _scores(spec, lengths, causal)
    head_fwd = 2.0 * spec.hidden_size * (spec.vocab_size if head == "lm" else 1) * tokens
    lora_fwd = L * _lora_per_token(spec, lora_rank, lora_targets) * tokens if lora else 0.0
    # Backward: input grads always (2x -> 1x of forward each); weight grads only when trained.
    # Attention scores have no weights: their backward is dQ, dK (from QK^T) and dP, dV: 2x.
    base_bwd = (1.0 if lora else 2.0) if backward else 0.0
    score_bwd = 2.0 if backward else 0.0
    passes = 1.0 + base_bwd
    # Recomputation: full re-runs each layer's forward (projections, scores, MLP, adapters);
    # selective re-runs only the core attention (megatron's "core_attn"): the scores.
    recompute = 0.0
    if backward and recompute_granularity == "full":
        recompute += dense_fwd + scores_fwd + lora_fwd
    elif backward and recompute_granularity == "selective":
        recompute += scores_fwd
    if backward and fused_head and head == "lm":
        recompute += head_fwd  # chunked head: logits recomputed in backward, never stored
    ref = (dense_fwd + scores_fwd + head_fwd) if reference else 0.0
    return StepFlops(
        layers_dense=dense_fwd * passes,
        attention_scores=scores_fwd * (1.0 + score_bwd),
        head=head_fwd * passes,
        lora=lora_fwd * (3.0 if backward else 1.0),
        reference=ref,
        recompute=recompute,
    )


def precompute_flops(spec: ModelSpec, seq_lengths: Iterable[int], *, causal: bool = True) -> float:
    """One reference forward over ``seq_lengths`` (``train.ref_model=precompute``)."""
    return step_flops(spec, seq_lengths, causal=causal, backward=False).model_flops


def micro_batch_lengths(micro_batches) -> list[int]:
    """Padded per-sequence lengths of a step's micro-batches, from their ``cu_seqlens``.

    What the kernels process: in packed mode each segment ``cu_seqlens[i+1] - cu_seqlens[i]``
    (real length rounded up to the TP/CP multiple); in padded mode every row is S long. The
    packing slack at the end of a packed row is not a sequence and is not counted.
    Worked example: cu_seqlens [0, 8, 12] -> [8, 4].
    """
    out: list[int] = []
    for mb in micro_batches:
        cu = [int(x) for x in mb.cu_seqlens.tolist()]
        out.extend(b - a for a, b in zip(cu[:-1], cu[1:]))
    return out


def step_flops_for_config(spec: ModelSpec, cfg, objective, seq_lengths: Iterable[int]) -> StepFlops:
    """:func:`step_flops` with the switches read from a RunConfig and the built objective."""
    m = cfg.model
    lora = m.train_type == "lora"
    targets: Sequence[str] = ()
    if lora:
        targets = m.lora_config().targets
    return step_flops(
        spec, seq_lengths, head=objective.head,
        reference=objective.needs_reference and cfg.train.ref_model == "co_resident",
        recompute_granularity=m.recompute_granularity, fused_head=m.fused_logprobs,
        lora_rank=m.lora_rank if lora else None, lora_targets=targets,
    )


def peak_tflops(device_name: str | None, override: float | None = None) -> float | None:
    """Dense bf16 peak TFLOP/s of one GPU: ``override`` if given, else by name, else None."""
    if override is not None:
        if not override > 0:
            raise ValueError(f"train.peak_tflops must be > 0, got {override!r}")
        return float(override)
    if not device_name:
        return None
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def throughput(flops_per_replica: float, seconds: float, gpus_per_replica: int,
               peak: float | None) -> dict[str, float]:
    """``{"tflops_per_gpu": ..., "mfu": ...}`` (mfu only with a known peak).

    ``flops_per_replica``: the FLOPs of one data-parallel replica's share of the step (its
    micro-batches), spread over its ``gpus_per_replica = TP * PP * CP`` GPUs.
    """
    if seconds <= 0 or gpus_per_replica < 1:
        raise ValueError(f"throughput: need seconds > 0 and gpus >= 1, got {seconds}, {gpus_per_replica}")
    tflops = flops_per_replica / seconds / gpus_per_replica / 1e12
    out = {"tflops_per_gpu": tflops}
    if peak:
        out["mfu"] = tflops / peak
    return out


def device_peak(runtime, override: float | None = None) -> float | None:
    """Peak for this run's device (None in the CPU mode unless ``override``)."""
    import torch

    if override is not None or runtime.is_cpu or not torch.cuda.is_available():
        return peak_tflops(None, override)
    return peak_tflops(torch.cuda.get_device_name(), None)


def step_metrics(trainer, gb, seconds: float) -> dict[str, float]:
    """The throughput columns of a training-log row: ``tflops_per_gpu`` and (with a known
    peak) ``mfu`` (model FLOPs) and ``hfu`` (hardware FLOPs, with recomputation).

    ``trainer``: a :class:`mcore_align.trainer.trainer.Trainer` (reads cfg, spec, objective,
    rt); ``gb``: the step's GlobalBatch (this DP rank's micro-batches); ``seconds``: step time.
    The FLOPs are this DP replica's, over its TP * PP * CP GPUs, as Megatron-LM reports.
    """
    f = step_flops_for_config(trainer.spec, trainer.cfg, trainer.objective, micro_batch_lengths(gb.micro_batches))
    peak = device_peak(trainer.rt, getattr(trainer.cfg.train, "peak_tflops", None))
    gpus = trainer.cfg.parallel.model_parallel_size
    out = throughput(f.model_flops, seconds, gpus, peak)
    if peak:
        out["hfu"] = throughput(f.hardware_flops, seconds, gpus, peak)["tflops_per_gpu"] / peak
    return out
