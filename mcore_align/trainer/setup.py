"""Build the policy (megatron DDP), the frozen reference, optimizer and LR scheduler."""
from __future__ import annotations

import dataclasses
import logging
import torch

from mcore_align.config import RunConfig
from mcore_align.models.provider import ModelOptions, build_model
from mcore_align.models.spec import ModelSpec
from mcore_align.parallel.runtime import Runtime

log = logging.getLogger(__name__)


def model_options(cfg: RunConfig, head: str = "lm") -> ModelOptions:
    """``head``: the objective's declared head ("lm" or "value")."""
    dtype = torch.bfloat16 if cfg.model.bf16 else torch.float16 if cfg.model.fp16 else torch.float32
    return ModelOptions(params_dtype=dtype, recompute_granularity=cfg.model.recompute_granularity,
                        head=head, fused_logprobs=cfg.model.fused_logprobs,
                        transformer_impl=cfg.model.transformer_impl, lora=cfg.model.train_type == "lora",
                        moe_aux_loss_coeff=cfg.model.moe_aux_loss_coeff,
                        freeze_vit=cfg.model.freeze_vit, freeze_aligner=cfg.model.freeze_aligner)


def check_device_support(cfg: RunConfig, runtime: Runtime) -> None:
    """What the CPU execution mode cannot train, refused before anything is built."""
    if not runtime.is_cpu:
        return
    if cfg.optim.use_distributed_optimizer:
        raise ValueError("use_distributed_optimizer needs CUDA; it is not available in the CPU execution mode")
    if cfg.model.bf16 or cfg.model.fp16:
        # megatron's mixed-precision optimizer wraps torch.cuda tensors only.
        raise ValueError("model.bf16 / model.fp16 training needs CUDA (megatron's mixed-precision optimizer); "
                         "train in fp32 in the CPU execution mode")
    par = cfg.parallel
    if par.virtual_pipeline_model_parallel_size and par.pipeline_model_parallel_size == 2:
        # At PP=2 a rank's previous and next stage are the same peer; megatron's interleaved
        # schedule posts activation and gradient messages to it in one batch, and gloo matches
        # them by posting order, so they cross. PP >= 3 is exact (tests/e2e/test_vpp_e2e.py).
        raise ValueError("virtual_pipeline_model_parallel_size with pipeline_model_parallel_size=2 cannot train "
                         "in the CPU execution mode (gloo); use pipeline_model_parallel_size >= 3 or no virtual "
                         "pipeline")


def build_policy(spec: ModelSpec, runtime: Runtime, cfg: RunConfig, load_dir: str | None, head: str = "lm",
                 require_head: bool = False):
    """Policy chunks wrapped in megatron DDP, weights loaded from ``load_dir`` (if given).
    ``require_head``: a non-LM head must come from ``load_dir`` (not freshly initialised)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from mcore_align.checkpoint import load_model_weights
    from mcore_align.checkpoint.heads import load_weights_allowing_fresh_head

    opts = model_options(cfg, head)
    chunks = build_model(spec, runtime, role="policy", opts=opts)
    if load_dir is not None and opts.head != "lm":  # a base/SFT checkpoint has no such head yet
        if not load_weights_allowing_fresh_head(chunks, load_dir) and require_head:
            raise ValueError(f"{load_dir} has no value head: it is not a reward-model checkpoint "
                             "(train one with rlhf_type=rm, or leave value_model unset)")
    elif load_dir is not None:
        load_model_weights(chunks, load_dir)
    if cfg.model.train_type == "lora":  # adapters on the loaded base, base frozen, before DDP
        from mcore_align.models.lora import apply_lora

        apply_lora(chunks, cfg.model.lora_config(), seed=cfg.train.seed)
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        # Overlap needs CUDA streams; in the CPU mode gradients are reduced after backward.
        overlap_grad_reduce=not runtime.is_cpu,
        use_distributed_optimizer=cfg.optim.use_distributed_optimizer,
    )
    return [
        DistributedDataParallel(
            config=c.config, ddp_config=ddp_cfg, module=c,
            # Bucket 0 only: the first chunk's grads are synchronised with the others.
            disable_bucketing=i > 0, pg_collection=runtime.pgs,
        )
        for i, c in enumerate(chunks)
    ]


def build_reference(spec: ModelSpec, runtime: Runtime, cfg: RunConfig, policy, objective):
    """The reference provider (trainer/reference.py) the objective needs, or None.

    A policy with adapters is its own reference (adapters off); otherwise a frozen copy of
    the same layout, weights from ``model.ref_load`` or ``model.load``."""
    from mcore_align.checkpoint import load_model_weights, read_model_spec
    from mcore_align.models.lora import has_adapters
    from mcore_align.trainer.reference import FrozenModel, PolicyWithoutAdapters

    if not objective.needs_reference:
        return None
    if any(has_adapters(m.module) for m in policy):
        return PolicyWithoutAdapters(policy)
    load_dir = cfg.model.ref_load or cfg.model.load
    ref_spec = read_model_spec(load_dir)
    if dataclasses.replace(ref_spec, init_std=spec.init_std) != spec:  # init_std: irrelevant once trained
        raise ValueError(f"reference checkpoint {load_dir} has another architecture than the policy: "
                         f"{ref_spec} vs {spec}")
    chunks = build_model(spec, runtime, role="reference", opts=model_options(cfg, objective.head))
    load_model_weights(chunks, load_dir)
    return FrozenModel(chunks, offload=getattr(objective.cfg, "offload_ref_rm", False), device=runtime.device)


def build_reward_model(spec: ModelSpec, runtime: Runtime, cfg: RunConfig, load_dir: str, tokenizer, tokenizer_dir,
                       cfg_online=None):
    """A frozen reward model (value head) of the policy's layout, as a reference provider
    (trainer/reference.py). Refused when its vocabulary or tokenizer differs from the policy's
    (its scores would read other tokens), or when the checkpoint has no value head."""
    from transformers import AutoTokenizer

    from mcore_align.checkpoint import load_model_weights, read_model_spec
    from mcore_align.checkpoint.layout import resolve_checkpoint_dir, tokenizer_dir as tok_dir_of
    from mcore_align.models.heads import VALUE_HEAD_KEY
    from mcore_align.trainer.reference import FrozenModel

    path = resolve_checkpoint_dir(load_dir)
    rm_spec = read_model_spec(path)
    rm_tok_dir = tok_dir_of(path)
    rm_tok = AutoTokenizer.from_pretrained(str(rm_tok_dir)) if rm_tok_dir is not None else None
    if rm_spec.vocab_size != spec.vocab_size or rm_tok is None or rm_tok.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"reward model {path} (tokenizer {rm_tok_dir}, vocab {rm_spec.vocab_size}) and policy "
                         f"(tokenizer {tokenizer_dir}, vocab {spec.vocab_size}) do not share a tokenizer; "
                         "re-tokenisation is not implemented: train the reward model from the policy's base")
    from torch.distributed.checkpoint import FileSystemReader

    if VALUE_HEAD_KEY not in FileSystemReader(str(path)).read_metadata().state_dict_metadata:
        raise ValueError(f"reward model {path} has no {VALUE_HEAD_KEY}: it is not a reward-model checkpoint "
                         "(rlhf_type=rm)")
    # Its own architecture (it may be smaller than the policy), the policy's parallel layout.
    chunks = build_model(rm_spec, runtime, role="reference", opts=model_options(cfg, "value"))
    load_model_weights(chunks, path)
    return FrozenModel(chunks, offload=getattr(cfg_online, "offload_ref_rm", False), device=runtime.device)


def build_optimizer(policy, runtime: Runtime, cfg: RunConfig, train_iters: int):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optim
    ocfg = OptimizerConfig(
        optimizer="adam",
        lr=o.learning_rate,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=cfg.model.bf16,
        fp16=cfg.model.fp16,
        params_dtype=model_options(cfg).params_dtype,  # the head does not change the dtype
        use_distributed_optimizer=o.use_distributed_optimizer,
        initial_loss_scale=2.0**16 if cfg.model.fp16 else None,
    )
    optimizer = get_megatron_optimizer(ocfg, policy, config_overrides=param_group_overrides(ocfg, cfg),
                                       use_gloo_process_groups=False, pg_collection=runtime.pgs)
    warmup = int(round(o.warmup_ratio * train_iters))
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else o.learning_rate,
        max_lr=o.learning_rate,
        min_lr=o.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(train_iters, warmup + 1),
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=train_iters,
        wd_incr_style="constant",
        # On resume the schedule comes from this config and only the step count from the
        # checkpoint (Megatron-LM's --override-opt_param-scheduler): a relaunch with a larger
        # train_iters decays over the new length. Changes are logged (trainer/checkpointing.py).
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
    return optimizer, scheduler


def param_group_overrides(ocfg, cfg: RunConfig):
    """megatron's per-parameter optimizer overrides: its standard ones (no weight decay on
    biases and 1-D parameters), plus, with ``model.vit_lr``, the vision tower's own peak and
    end learning rate (``max_lr`` / ``min_lr`` of its param group, which
    ``OptimizerParamScheduler.get_lr`` reads per group, so warmup and decay apply to it too).
    None (megatron's default, the standard overrides) without ``vit_lr``."""
    if cfg.model.vit_lr is None:
        return None
    from megatron.core.optimizer import ParamKey, get_standard_config_overrides

    from mcore_align.models.vision import VISION_TOWER_ATTR

    o = cfg.optim
    overrides = get_standard_config_overrides(ocfg)
    overrides[ParamKey(attr=VISION_TOWER_ATTR)] = {
        "max_lr": cfg.model.vit_lr, "min_lr": o.min_lr * cfg.model.vit_lr / o.learning_rate}
    return overrides


def wire_model_config(policy, optimizer, runtime: Runtime) -> None:
    """Hooks megatron's schedules read from the model config (as Megatron-LM's training.py)."""
    from megatron.core.distributed import finalize_model_grads

    config = policy[0].config
    assert config.calculate_per_token_loss, "provider must build with calculate_per_token_loss"
    config.finalize_model_grads_func = _finalize_without_token_scaling(finalize_model_grads)
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = [m.no_sync for m in policy] if len(policy) > 1 else policy[0].no_sync
    config.timers = None


def _finalize_without_token_scaling(fn):
    def finalize(model, num_tokens=None, **kwargs):
        # megatron would divide grads by the token count; our losses are normalised already.
        return fn(model, None, **kwargs)

    return finalize
