"""Run configuration: composed keyword-only dataclasses, YAML, dotted overrides.

A run is ``RunConfig(model=..., parallel=..., data=..., optim=..., train=..., algo=...)``.
YAML files use those sections; command-line overrides are ``section.key=value``
or just ``key=value`` when the name is unique (``beta=0.2``,
``tensor_model_parallel_size=2``): the names are the seed's (ms-swift/TRL) and
Megatron's. Unknown keys are rejected with a "did you mean". Objective
hyperparameters (``beta``, ``loss_type``, ``rpo_alpha``...) live in ``algo`` and are
validated by the chosen objective's own Config dataclass.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mcore_align.config.layout import check_layout  # noqa: F401 - re-exported for the trainer
from mcore_align.config.types import check_field_types, check_positive, check_range, typed_fields
from mcore_align.data.config import DataConfig
from mcore_align.models.provider import TRANSFORMER_IMPLS
from mcore_align.parallel.runtime import DEVICES, ParallelConfig

DTYPES = ("bf16", "fp16", "fp32")
REF_MODES = ("co_resident", "precompute")
LR_DECAY = ("constant", "linear", "cosine")


@dataclass(kw_only=True)
class ModelConfig:
    """Which checkpoint to train and with what numerics."""

    load: str
    """Megatron-Core checkpoint to start from (written by tools/convert_hf_to_mcore.py or by
    a previous run's ``save``). Its ``model_spec.json`` and ``tokenizer/`` define the model."""
    ref_load: str | None = None
    """Reference-model checkpoint for objectives that use one (TRL's / ms-swift's ``ref_model``);
    None: the reference is ``load`` (the usual case). Must have the same architecture."""
    bf16: bool = False
    """Train in bf16 (fp32 main weights and grads in the optimizer)."""
    fp16: bool = False
    """Train in fp16 with dynamic loss scaling."""
    recompute_granularity: str | None = None
    """Activation recomputation: None, "full" or "selective"."""
    fused_logprobs: bool = True
    """Compute log-probs straight from the final hidden states, chunk by chunk (output-layer
    matmul + log-softmax per chunk, recomputed in backward): the [tokens, V/TP] logits are
    never materialised, which is what runs out of memory on long sequences with large
    vocabularies. False: the model outputs logits and the chunked kernel reads them."""
    train_type: str = "full"
    """"full" fine-tuning or "lora" (adapters on the frozen base; the reference is the
    base itself, no second copy; checkpoints hold the adapters only). See docs/lora.md."""
    # -- LoRA (train_type="lora"; issue 8) --
    lora_rank: int = 8
    """r of the adapters."""
    lora_alpha: float = 32.0
    """The adapter update is scaled by lora_alpha / lora_rank."""
    lora_dropout: float = 0.05
    """Dropout on the adapters' input."""
    lora_target_modules: str | list[str] = "DEFAULT"
    """DEFAULT (attention q/k/v), ALL (every linear layer), or a list of names: megatron's
    (linear_qkv, linear_proj, linear_fc1, linear_fc2) or HF's (q_proj, k_proj, v_proj, o_proj,
    gate_proj, up_proj, down_proj; fused groups must be listed whole)."""
    transformer_impl: str = "auto"
    """Layer implementation: "transformer_engine" (TE's layer spec; an error when TE does not
    import, on CPU, or with LoRA), "local" (megatron's local spec and mcore_align's packed
    attention) or "auto" (TE when it imports and CUDA is present and train_type is not lora,
    else local; the start-up log says which and why)."""
    moe_aux_loss_coeff: float = 0.0
    """MoE models: coefficient of the Switch load-balancing loss over the whole global batch
    (models/moe_aux.py: exact for any micro-batch split and layout, padding ignored; costs one
    extra forward pass per step); 0 (default) turns it off for preference objectives
    (see docs/moe.md for why)."""
    # -- vision-language models (issue 13; ignored by text models) --
    freeze_vit: bool = True
    """Keep the vision tower (e.g. CLIP) frozen (ms-swift's ``freeze_vit``)."""
    freeze_aligner: bool = True
    """Keep the projector between the tower and the language model frozen (ms-swift's
    ``freeze_aligner``)."""
    vit_lr: float | None = None
    """Peak learning rate of a trainable vision tower (``freeze_vit=False``; ms-swift's
    ``vit_lr``): its own megatron optimizer param group, following the same warmup and decay
    (its end value is ``optim.min_lr * vit_lr / optim.learning_rate``). None: the tower
    trains at ``optim.learning_rate``. The projector keeps ``optim.learning_rate``."""

    def __post_init__(self) -> None:
        check_field_types(self, "model")
        if self.vit_lr is not None:
            if not self.vit_lr > 0:
                raise ValueError(f"model.vit_lr must be > 0, got {self.vit_lr}")
            if self.freeze_vit or self.train_type == "lora":
                why = ("freeze_vit=true" if self.freeze_vit else
                       "train_type=lora freezes its weights; its adapters train at optim.learning_rate")
                raise ValueError(f"model.vit_lr={self.vit_lr} has no effect: the vision tower is frozen ({why}); "
                                 "set model.freeze_vit=false (full training) to train it, or leave vit_lr unset")
        if self.moe_aux_loss_coeff < 0:
            raise ValueError(f"model.moe_aux_loss_coeff must be >= 0, got {self.moe_aux_loss_coeff}")
        if self.transformer_impl not in TRANSFORMER_IMPLS:
            raise ValueError(f"model.transformer_impl must be one of {TRANSFORMER_IMPLS}, got {self.transformer_impl!r}")
        check_positive(self, "model", "lora_rank", "lora_alpha")
        check_range(self, "model", "lora_dropout", 0.0, 1.0)
        if self.bf16 and self.fp16:
            raise ValueError("model: bf16 and fp16 are exclusive")
        if self.recompute_granularity not in (None, "full", "selective"):
            raise ValueError(f"model.recompute_granularity must be None, full or selective, got {self.recompute_granularity!r}")
        if self.train_type not in ("full", "lora"):
            raise ValueError(f"model.train_type must be 'full' or 'lora', got {self.train_type!r}")
        if self.train_type == "lora":
            self.lora_config()  # LoRA: validate rank, dropout and target names now
            if self.ref_load is not None:
                raise ValueError("model.ref_load cannot be used with train_type=lora: the reference is the "
                                 "base model (model.load) with the adapters switched off")
            if self.transformer_impl == "transformer_engine":
                raise ValueError("model.transformer_impl=transformer_engine cannot be used with train_type=lora: "
                                 "the adapters wrap megatron's local linear layers; use local or auto")

    def lora_config(self):
        """The adapters' LoRAConfig (train_type="lora")."""
        from mcore_align.models.lora import LoRAConfig, resolve_target_modules

        return LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          targets=resolve_target_modules(self.lora_target_modules),
                          vision_children=lora_vision_children(self.freeze_vit, self.freeze_aligner))


def lora_vision_children(freeze_vit: bool, freeze_aligner: bool) -> tuple[str, ...]:
    """Vision parts that get LoRA adapters (``LoRAConfig.vision_children``): the unfrozen ones."""
    return tuple(p for p, frozen in (("vit", freeze_vit), ("aligner", freeze_aligner)) if not frozen)


@dataclass(kw_only=True)
class OptimConfig:
    """Adam(W) via megatron's get_megatron_optimizer and OptimizerParamScheduler."""

    learning_rate: float = 5e-7
    """Peak learning rate (DPO-typical default)."""
    min_lr: float = 0.0
    """Learning rate at the end of decay."""
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    lr_decay_style: str = "cosine"
    """constant, linear or cosine."""
    warmup_ratio: float = 0.0
    """Fraction of train_iters spent in linear warmup."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (CUDA only)."""

    def __post_init__(self) -> None:
        check_field_types(self, "optim")
        if self.lr_decay_style not in LR_DECAY:
            raise ValueError(f"optim.lr_decay_style must be one of {LR_DECAY}, got {self.lr_decay_style!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        check_positive(self, "optim", "learning_rate", "adam_eps")
        for name in ("min_lr", "weight_decay", "clip_grad"):
            if getattr(self, name) < 0:
                raise ValueError(f"optim.{name} must be >= 0, got {getattr(self, name)}")
        if self.min_lr > self.learning_rate:
            raise ValueError(f"optim.min_lr ({self.min_lr}) must not exceed optim.learning_rate ({self.learning_rate})")
        check_range(self, "optim", "adam_beta1", 0.0, 1.0)
        check_range(self, "optim", "adam_beta2", 0.0, 1.0)


@dataclass(kw_only=True)
class TrainConfig:
    """The loop: length, batch, checkpoints, evaluation, logging, faults."""

    global_batch_size: int = 8
    """Pairs per optimizer step for paired objectives (sequences for KTO/SFT), over all DP ranks."""
    train_iters: int | None = None
    """Optimizer steps; None derives it from num_train_epochs and the dataset size."""
    num_train_epochs: float = 1.0
    save: str | None = None
    """Directory for checkpoints, metrics.jsonl, the data report and the plot."""
    save_interval: int | None = None
    """Steps between checkpoints (a final one is always written when save is set)."""
    save_total_limit: int | None = None
    """Keep at most this many checkpoints (oldest removed first)."""
    eval_interval: int | None = None
    """Steps between evaluations on the held-out split (data.val_fraction)."""
    eval_iters: int = 4
    """Global batches per evaluation."""
    log_interval: int = 1
    seed: int = 1234
    device: str = "auto"
    """auto, cuda or cpu (the CPU execution mode; auto picks it only without CUDA)."""
    ref_model: str = "co_resident"
    """How the reference log-probs are produced: "co_resident" (frozen model of the same
    layout, run each step) or "precompute" (one forward pass over the data before
    training; the reference weights are freed)."""
    max_consecutive_nan: int = 3
    """Skip steps whose loss is NaN/inf; stop after this many in a row."""
    progress_bar: bool = True
    """tqdm bar on rank 0 when stderr is a terminal (with logs redirected, only the per-interval lines)."""
    tensorboard: bool = False
    wandb_project: str | None = None
    plot: bool = True
    """Write training_curves.png into `save` at the end."""
    exit_after_steps: int | None = None
    """Stop (with a checkpoint) after this many steps of this launch (testing preemption)."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one GPU for the MFU column (mcore_align/flops.py); None: by device
    name (H100/H200 bf16 dense: 989), no MFU column when unknown (the CPU mode)."""

    def __post_init__(self) -> None:
        check_field_types(self, "train")
        if self.ref_model not in REF_MODES:
            raise ValueError(f"train.ref_model must be one of {REF_MODES}, got {self.ref_model!r}")
        if self.device not in DEVICES:
            raise ValueError(f"train.device must be one of {DEVICES}, got {self.device!r}")
        # Counts and intervals: 0 would divide by zero (log_interval), stop at step 1
        # (max_consecutive_nan) or train nothing; None means "derive it" / "off".
        check_positive(self, "train", "global_batch_size", "train_iters", "num_train_epochs", "save_interval",
                       "save_total_limit", "eval_interval", "eval_iters", "log_interval", "max_consecutive_nan",
                       "exit_after_steps", "peak_tflops")


@dataclass(kw_only=True)
class AlgoConfig:
    """The objective: ``rlhf_type`` plus its hyperparameters (validated by the objective)."""

    rlhf_type: str = "dpo"
    params: dict = field(default_factory=dict)
    """Objective hyperparameters, e.g. {beta: 0.1, loss_type: sigmoid, rpo_alpha: 1.0}."""

    def __post_init__(self) -> None:
        check_field_types(self, "algo")

    def objective_config(self):
        from mcore_align.algorithms import available_objectives, objective_config_cls

        if self.rlhf_type not in available_objectives():
            raise ValueError(f"rlhf_type {self.rlhf_type!r} unknown; available: {available_objectives()}")
        cls = objective_config_cls(self.rlhf_type)
        names = [f.name for f in dataclasses.fields(cls)]
        for k in self.params:
            if k not in names:
                raise ValueError(f"unknown {self.rlhf_type} hyperparameter {k!r}{_did_you_mean(k, names)}")
        # The objective's dataclass declares the types; convert here, in one place, so
        # `beta: "0.1"` is 0.1 and `rpo_alpha: maybe` names algo.rpo_alpha.
        return cls(**typed_fields(cls, self.params, "algo"))


@dataclass(kw_only=True)
class RunConfig:
    model: ModelConfig
    data: DataConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)

    def __post_init__(self) -> None:
        if self.model.train_type == "lora":
            from mcore_align.algorithms.base import objective_class

            head = objective_class(self.algo.rlhf_type).head
            if head != "lm":
                # The head would be frozen with the base and is not part of an adapter
                # checkpoint or of the PEFT export: refuse rather than train a random head.
                raise ValueError(f"model.train_type=lora is not supported with rlhf_type={self.algo.rlhf_type} "
                                 f"(a {head} head) yet; train it with train_type=full")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "parallel": ParallelConfig,
            "optim": OptimConfig, "train": TrainConfig, "algo": AlgoConfig}


def _did_you_mean(key: str, candidates) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def _section_fields() -> dict[str, list[str]]:
    return {s: [f.name for f in dataclasses.fields(c)] for s, c in SECTIONS.items()}


def _objective_fields() -> set[str]:
    from mcore_align.algorithms import available_objectives, objective_config_cls

    return {f.name for n in available_objectives() for f in dataclasses.fields(objective_config_cls(n))}


def _parse_value(text: str):
    """`key=value` values are YAML scalars/lists: 2, 0.1, true, null, [sigmoid, sft]."""
    return yaml.safe_load(text)


# Other names users bring from the seed (ms-swift) for the same setting.
ALIASES = {"sft_type": "train_type"}


def resolve_key(key: str) -> tuple[str, str]:
    """Map ``beta`` / ``algo.beta`` / ``tensor_model_parallel_size`` to (section, field)."""
    fields = _section_fields()
    key = ALIASES.get(key, key)
    if "." in key:
        sec, name = key.split(".", 1)
        if sec not in fields:
            raise ValueError(f"unknown config section {sec!r} in {key!r}{_did_you_mean(sec, fields)}")
        if sec == "algo" and name not in ("rlhf_type", "params"):
            return "algo.params", name
        if name not in fields[sec]:
            raise ValueError(f"unknown key {key!r}{_did_you_mean(name, fields[sec])}")
        return sec, name
    owners = [s for s, names in fields.items() if key in names and s != "algo"]
    if key == "rlhf_type":
        return "algo", key
    if key in _objective_fields():
        owners.append("algo.params")
    if len(owners) == 1:
        return owners[0], key
    if len(owners) > 1:
        raise ValueError(f"key {key!r} is ambiguous: write one of {[o.split('.')[0] + '.' + key for o in owners]}")
    every = [n for names in fields.values() for n in names] + sorted(_objective_fields())
    raise ValueError(f"unknown config key {key!r}{_did_you_mean(key, every)}")


def build_config(raw: dict, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Merge a nested (or flat) dict with ``key=value`` overrides into a RunConfig."""
    tree: dict[str, dict] = {s: {} for s in SECTIONS}
    tree["algo"]["params"] = {}

    def put(key: str, value) -> None:
        sec, name = resolve_key(key)
        if sec == "algo.params":
            tree["algo"]["params"][name] = value
        elif sec == "algo" and name == "params":
            if not isinstance(value or {}, dict):
                raise ValueError(f"algo.params: expected a mapping of hyperparameters, got {value!r}")
            tree["algo"]["params"].update(value or {})
        else:
            tree[sec][name] = value

    if not isinstance(raw or {}, dict):
        raise ValueError(f"config: expected a mapping of sections (model, data, ...), got {type(raw).__name__}")
    for k, v in (raw or {}).items():
        if k in SECTIONS and v is None:  # an empty section in YAML (`algo:`)
            continue
        if k in SECTIONS and not isinstance(v, dict):
            raise ValueError(f"config section {k!r}: expected a mapping of keys, got {v!r}")
        if k in SECTIONS:
            for kk, vv in v.items():
                put(f"{k}.{kk}" if k != "algo" or kk in ("rlhf_type", "params") else kk, vv)
        else:
            put(k, v)
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"override {ov!r} is not key=value")
        k, v = ov.split("=", 1)
        put(k.strip().lstrip("-"), _parse_value(v))
    if isinstance(tree["data"].get("dataset"), str):
        tree["data"]["dataset"] = [d for d in tree["data"]["dataset"].split(",") if d]
    if "load" not in tree["model"]:
        raise ValueError("config: model.load (the checkpoint to train) is required")
    if "dataset" not in tree["data"]:
        raise ValueError("config: data.dataset is required")
    cfg = RunConfig(**{name: cls(**tree[name]) for name, cls in SECTIONS.items()})
    # Validate the hyperparameters now, not at step 0, and keep them typed for the objective.
    objective_cfg = cfg.algo.objective_config()
    cfg.algo.params = {k: getattr(objective_cfg, k) for k in cfg.algo.params}
    if cfg.parallel.context_parallel_size > 1 and not cfg.data.packing:
        raise ValueError("context_parallel_size > 1 needs data.packing=true (CP splits packed THD sequences)")
    return cfg


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    raw = {}
    if path is not None:
        p = Path(path)
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ValueError(f"{p}:{where} invalid YAML: {e}") from e
    return build_config(raw, overrides)
