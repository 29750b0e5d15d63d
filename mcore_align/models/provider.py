"""Model provider: ModelSpec + parallel layout -> megatron ``GPTModel`` chunks.

``build_model(spec, runtime, role=...)`` returns one ``GPTModel`` per virtual
pipeline stage held by this rank (a list of length 1 without VPP), built with
megatron-core's own classes: ``TransformerConfig``, the TE layer spec or the local
spec as ``ModelOptions.transformer_impl`` says (``select_transformer_impl``).

``role="reference"`` gives the frozen reference: same layout, eval mode, never handed
to DDP or the optimizer, and refusing to run with autograd enabled (see
``_freeze_for_inference`` for why its parameters keep ``requires_grad``).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mcore_align.models.mla import check_mla_layout, mla_config_kwargs, mla_layer_spec
from mcore_align.models.moe import check_moe_layout, is_moe, moe_config_kwargs, moe_layer_specs
from mcore_align.models.norm import TorchRMSNorm
from mcore_align.models.spec import ModelSpec
from mcore_align.parallel.runtime import ParallelConfig, Runtime

log = logging.getLogger(__name__)

ROLES = ("policy", "reference")


@dataclass(kw_only=True)
class ModelOptions:
    """Numerics and memory options of the built model."""

    params_dtype: torch.dtype = torch.float32
    """Parameter dtype (bf16 / fp16 / fp32); the optimizer keeps fp32 main weights."""
    recompute_granularity: str | None = None
    """None, "full" or "selective" activation recomputation (megatron semantics)."""
    core_attention: str = "auto"
    """Core attention for the local spec: "auto", "megatron" (local DotProductAttention,
    padded batches only) or "packed" (mcore_align.ops.attention, THD packed sequences)."""
    head: str = "lm"
    """Output head: "lm" (vocabulary projection) or "value" (reward model: hidden -> 1 at the
    last stage, see models/heads.py; the LM head is not built, embeddings are untied)."""
    fused_logprobs: bool = False
    """LM head: the model outputs final hidden states and the loss computes log-probs with
    the fused output-layer kernel (``ops.logprobs.fused_linear_logprobs``), so the
    ``[tokens, V/TP]`` logits are never materialised. False: the model outputs logits."""
    transformer_impl: str = "auto"
    """"transformer_engine" (TE's layer spec, or an error saying why it cannot run), "local"
    (megatron's local spec) or "auto" (TE when usable, else local; logged with the reason)."""
    lora: bool = False
    """LoRA adapters will wrap the linear layers: they wrap megatron's local
    ColumnParallelLinear/RowParallelLinear, so "auto" picks local and "transformer_engine" is refused."""
    moe_aux_loss_coeff: float = 0.0
    """MoE only: coefficient of the Switch load-balancing loss over the global batch
    (models/moe_aux.py, installed on the policy's routers); 0 turns it off. Default 0 for
    preference objectives: the policy starts from a balanced router and stays near the
    reference (docs/moe.md)."""
    freeze_vit: bool = True
    """Vision-language models: the vision tower gets ``requires_grad=False`` (not trained)."""
    freeze_aligner: bool = True
    """Vision-language models: the projector between vision tower and LM is not trained."""


TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
_REPORTED: set = set()


def report_model_backends(use_te: bool, why: str, opts: ModelOptions, runtime: Runtime, *, mla: bool = False) -> None:
    """The one start-up line that says which layer spec and core attention run, and why (rank 0, once).
    ``mla``: multi-head latent attention always runs the packed core attention (models/mla.py)."""
    if use_te:
        what = f"Transformer Engine layer spec ({why}; TE core attention, THD for packed sequences)"
    elif opts.core_attention == "megatron" and not mla:
        what = f"local layer spec ({why}), megatron DotProductAttention (padded batches only)"
    else:
        from mcore_align.ops.attention import select_backend

        what = f"local layer spec ({why}), packed core attention: {select_backend(runtime.device.type)}"
    if what not in _REPORTED and runtime.rank == 0:
        _REPORTED.add(what)
        # Training (packed attention) shows it; the tools' padded forward passes keep it quiet,
        # unless TE is installed but broken: that is worth seeing everywhere.
        loud = opts.core_attention != "megatron" or "does not import" in why
        log.log(logging.WARNING if loud else logging.INFO, "model: %s", what)


def transformer_engine_status() -> tuple[bool, str]:
    """(usable, reason) for Transformer Engine's PyTorch module on this machine.

    "Not installed" (the package itself is missing) and "installed but broken" (a missing
    CUDA library, an ABI mismatch, ...) are told apart: the second is a message to act on.
    """
    try:
        import transformer_engine.pytorch  # noqa: F401 - the part megatron's TE spec uses
    except ModuleNotFoundError as e:
        if e.name == "transformer_engine":
            return False, "Transformer Engine is not installed"
        return False, f"Transformer Engine is installed but does not import: {type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - reported with its type and text, never swallowed
        return False, f"Transformer Engine is installed but does not import: {type(e).__name__}: {e}"
    return True, "Transformer Engine imports"


def select_transformer_impl(opts: ModelOptions, *, cpu: bool, mla: bool = False) -> tuple[bool, str]:
    """(use Transformer Engine's layer spec, why), following ``opts.transformer_impl``.

    An explicit "transformer_engine" that cannot run is an error naming the reason;
    "auto" falls back to the local spec and says why. ``mla``: multi-head latent attention
    (DeepSeek) runs the local spec only (models/mla.py).
    """
    impl = opts.transformer_impl
    if impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"model.transformer_impl must be one of {TRANSFORMER_IMPLS}, got {impl!r}")
    if impl == "local":
        return False, "model.transformer_impl=local"
    if mla:
        if impl == "transformer_engine":
            raise ValueError("model.transformer_impl=transformer_engine is not supported for multi-head latent "
                             "attention: megatron's TE MLA spec fuses the q/kv latent norms into the up projections "
                             "(other checkpoint keys); use transformer_impl=local or auto")
        return False, "transformer_impl=auto: multi-head latent attention runs the local spec"
    if opts.lora:
        if impl == "transformer_engine":
            raise ValueError("model.transformer_impl=transformer_engine cannot be used with LoRA: the adapters "
                             "wrap megatron's local linear layers; use transformer_impl=local or auto")
        return False, "transformer_impl=auto: LoRA adapters wrap megatron's local linears"
    if cpu:
        if impl == "transformer_engine":
            raise ValueError("model.transformer_impl=transformer_engine needs CUDA; the CPU execution mode runs "
                             "the local spec (transformer_impl=local or auto)")
        return False, "transformer_impl=auto: CPU execution mode"
    ok, reason = transformer_engine_status()
    if impl == "transformer_engine":
        if not ok:
            raise RuntimeError(f"model.transformer_impl=transformer_engine, but {reason}")
        return True, "model.transformer_impl=transformer_engine"
    return ok, f"transformer_impl=auto: {reason}"


def transformer_config(spec: ModelSpec, parallel: ParallelConfig, opts: ModelOptions, *, cpu: bool):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    dt = opts.params_dtype
    return (MLATransformerConfig if spec.mla else TransformerConfig)(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        kv_channels=spec.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=spec.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        qk_layernorm=spec.qk_norm,
        # HF Llama/Qwen checkpoints are trained without dropout; megatron defaults to 0.1.
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=spec.init_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dt,
        pipeline_dtype=dt,
        bf16=dt == torch.bfloat16,
        fp16=dt == torch.float16,
        # Packed micro-batches differ in length: pipeline p2p must exchange shapes.
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",  # only to satisfy a MoE-side check of variable_seq_lengths
        # Fused kernels need Apex/TE/CUDA; the unfused torch code is exact everywhere.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=cpu,
        # Losses are contributions normalised by global counts (see trainer/step.py): schedules
        # and DDP must sum them, never divide by micro-batch count or DP size.
        calculate_per_token_loss=True,
        recompute_granularity=opts.recompute_granularity,
        recompute_method="uniform" if opts.recompute_granularity == "full" else None,
        recompute_num_layers=1 if opts.recompute_granularity == "full" else None,
        mrope_section=list(spec.mrope_section) if spec.mrope_section else None,
        # {} for dense families; grouped GEMM exactly where the TE layer spec is built.
        **moe_config_kwargs(spec, parallel, aux_loss_coeff=opts.moe_aux_loss_coeff,
                            grouped_gemm=select_transformer_impl(opts, cpu=cpu, mla=spec.mla is not None)[0]),
        **mla_config_kwargs(spec),  # {} without multi-head latent attention
    )


def layer_spec(spec: ModelSpec, opts: ModelOptions, *, use_te: bool):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if use_te:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=spec.qk_norm)
    if spec.mla is not None:  # always the packed core attention (separate K/V head sizes)
        return mla_layer_spec()
    ls = get_gpt_layer_local_spec(qk_layernorm=spec.qk_norm, normalization="RMSNorm")
    # torch RMSNorm that accepts sequence parallelism (megatron's wrapper refuses it).
    ls.submodules.input_layernorm = TorchRMSNorm
    ls.submodules.pre_mlp_layernorm = TorchRMSNorm
    if spec.qk_norm:
        ls.submodules.self_attention.submodules.q_layernorm = TorchRMSNorm
        ls.submodules.self_attention.submodules.k_layernorm = TorchRMSNorm
    if opts.core_attention in ("auto", "packed"):
        try:
            from mcore_align.ops.attention import PackedCoreAttention
        except ImportError:
            if opts.core_attention == "packed":
                raise
        else:
            ls.submodules.self_attention.submodules.core_attention = PackedCoreAttention
    return ls


def build_model(spec: ModelSpec, runtime: Runtime, *, role: str = "policy", opts: ModelOptions | None = None):
    """This rank's model chunks (one per virtual pipeline stage)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    opts = opts or ModelOptions()
    from mcore_align.models.heads import HEADS, attach_value_head, emit_hidden_states

    if opts.head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {opts.head!r}")
    par = runtime.parallel
    tp = par.tensor_model_parallel_size
    if spec.vocab_size % tp:
        raise ValueError(
            f"vocab_size {spec.vocab_size} is not divisible by tensor_model_parallel_size {tp}; "
            "megatron shards the vocabulary evenly across TP ranks"
        )
    if spec.num_query_groups % tp or spec.num_attention_heads % tp:
        raise ValueError(
            f"num_key_value_heads {spec.num_query_groups} and num_attention_heads "
            f"{spec.num_attention_heads} must be divisible by tensor_model_parallel_size {tp}"
        )
    check_moe_layout(spec, par)
    check_mla_layout(spec, par)
    use_te, why = select_transformer_impl(opts, cpu=runtime.is_cpu, mla=spec.mla is not None)
    report_model_backends(use_te, why, opts, runtime, mla=spec.mla is not None)
    cfg = transformer_config(spec, par, opts, cpu=runtime.is_cpu)
    lspec = layer_spec(spec, opts, use_te=use_te)
    vpp = par.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for vp_stage in range(vpp):
        stage = vp_stage if par.virtual_pipeline_model_parallel_size else None
        model = GPTModel(
            config=cfg,
            transformer_layer_spec=_block_spec(spec, lspec, cfg, stage, use_te),
            vocab_size=spec.vocab_size,
            max_sequence_length=spec.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            parallel_output=True,
            # A value head has no vocabulary projection to tie to the embeddings.
            share_embeddings_and_output_weights=spec.tie_word_embeddings and opts.head == "lm",
            position_embedding_type="mrope" if spec.mrope_section else "rope",
            rotary_base=spec.rope_theta,
            pg_collection=runtime.pgs,
            vp_stage=stage,
        )
        _apply_rope_scaling(model, spec)
        if spec.mrope_section:
            model.rotary_pos_emb.__class__ = whole_row_mrope_class()  # see its docstring (CP + THD)
        if spec.vision is not None:  # first stage only: HF vision tower + projector as model.vision
            from mcore_align.models.vision import attach_vision

            attach_vision(model, spec, opts)
        if opts.head == "value":  # output_layer -> ValueHead (last stage only)
            attach_value_head(model, runtime)
        elif opts.fused_logprobs:  # hidden states out; log-probs fused in the loss
            emit_hidden_states(model)
        if not runtime.is_cpu:
            model.cuda(torch.cuda.current_device())
        if role == "reference":
            _freeze_for_inference(model)
        chunks.append(model)
    if role == "policy":
        from mcore_align.models.moe_aux import install_global_aux_loss

        install_global_aux_loss(chunks, opts.moe_aux_loss_coeff)
    return chunks


def _freeze_for_inference(model) -> None:
    """Make ``model`` a frozen, forward-only copy whose numerics equal the policy's bit for bit.

    The parameters keep ``requires_grad=True`` on purpose. A weight with
    ``requires_grad=False`` sends megatron's parallel linears to ``LinearWithFrozenWeight`` and,
    inside it, ``torch.matmul`` decides differently whether to fold ``[S, B, H] @ [H, O]`` into
    one ``mm``: it always folds when an operand requires grad, and for a frozen weight only when
    the input's leading dims are contiguous, which packed ``[S, 1, H]`` activations (strides
    ``(H, S*H, 1)``) are not. The unfolded path runs S batched ``[1, H] @ [H, O]`` products,
    which round differently from one ``mm`` on some CPUs (AVX2 MKL kernels: the policy and an
    identical reference then disagreed by ~1e-7 per token, KTO's step-1 KL was 2.9e-5 instead
    of 0 and step-0 reward accuracies were noise instead of 0). Keeping ``requires_grad`` makes
    the reference take exactly the policy's kernels. Safety comes from elsewhere: the reference
    is never given to DDP or the optimizer, and the pre-hook below refuses any forward that
    would record a graph (callers run it under ``torch.no_grad()``).
    """
    model.eval()

    def no_autograd(module, args):
        if torch.is_grad_enabled():
            raise RuntimeError(f"{type(module).__name__} is a frozen reference/inference model: "
                               "run it under torch.no_grad()")

    model.register_forward_pre_hook(no_autograd)


def _block_spec(spec: ModelSpec, lspec, cfg, vp_stage, use_te: bool):
    """What GPTModel is given: the layer spec (TE, dense), or this stage's block with per-layer
    specs (local spec; MoE models, whose layers are dense or MoE per ``moe_layer_pattern``)."""
    if not is_moe(spec):
        return lspec if use_te else _local_block_spec(lspec, cfg, vp_stage)
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules

    layers = moe_layer_specs(spec, lspec, cfg, vp_stage, use_te=use_te)
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm as final
    else:
        final = TorchRMSNorm
    return ModuleSpec(module=TransformerBlock,
                      submodules=TransformerBlockSubmodules(layer_specs=layers, layer_norm=final))


def _local_block_spec(lspec, cfg, vp_stage):
    """The block of this stage's layers with our RMSNorm as the final norm too."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import (
        TransformerBlock,
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    n = get_num_layers_to_build(cfg, vp_stage=vp_stage)
    return ModuleSpec(module=TransformerBlock,
                      submodules=TransformerBlockSubmodules(layer_specs=[lspec] * n, layer_norm=TorchRMSNorm))


class _WholeRow:
    """Stands in for the CP group inside ``MultimodalRotaryEmbedding.forward``: size 1, no slicing."""

    @staticmethod
    def size() -> int:
        return 1


@functools.lru_cache(maxsize=None)
def whole_row_mrope_class():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import MultimodalRotaryEmbedding

    class WholeRowMultimodalRotaryEmbedding(MultimodalRotaryEmbedding):
        """megatron's M-RoPE, returning the frequencies of EVERY token of the whole packed row.

        megatron's own class cuts its output into ``2*CP`` chunks of the whole row
        (``get_pos_emb_on_this_cp_rank``), which is right for one unpacked sequence but not for a
        packed THD row, where CP's chunks are per sequence. Given ``[T_global, 1, 1, D]``
        frequencies, megatron's unfused THD rotary path (``rope_utils._apply_rotary_pos_emb_thd``,
        "exact mapping" case: ``freqs.size(0) == cu_seqlens[-1]``) takes, for each sequence, the
        frequencies of this CP rank's two chunks at the sequence's own offset, so every CP rank
        rotates its tokens with their own (per-sequence, 3-D) positions. The caller passes the
        positions of the whole row (``models/vision.py::multimodal_forward``). Packed rows only
        under CP (the project's CP is packed-only).
        """

        def forward(self, position_ids, mrope_section, cp_group=None):
            return super().forward(position_ids, mrope_section, cp_group=_WholeRow())

    return WholeRowMultimodalRotaryEmbedding


def _apply_rope_scaling(model, spec: ModelSpec) -> None:
    """Llama-3.1 rope scaling with the checkpoint's own factors.

    GPTModel's ``rope_scaling`` flag only takes ``factor`` and hard-codes the other
    three numbers, so we rescale ``inv_freq`` with all four from the HF config.
    """
    rs = spec.rope_scaling
    rot = getattr(model, "rotary_pos_emb", None)
    if rs is None or rot is None:
        return
    rot.inv_freq = rot._apply_scaling(
        rot.inv_freq,
        factor=rs.factor,
        low_freq_factor=rs.low_freq_factor,
        high_freq_factor=rs.high_freq_factor,
        original_max_position_embeddings=rs.original_max_position_embeddings,
    )


def model_layer_offset(model) -> int:
    """Global index of this chunk's first transformer layer (for name mapping)."""
    layers = model.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0
