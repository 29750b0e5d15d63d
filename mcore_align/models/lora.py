"""LoRA adapters on megatron-core's tensor-parallel linears (Hu et al. 2021, arXiv:2106.09685).

A target linear ``y = W x`` becomes ``y = W x + scaling * B A dropout(x)`` with
``A [r, in]``, ``B [out, r]``, ``scaling = lora_alpha / lora_rank``, A initialised
like PEFT's (kaiming-uniform, a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))) and B = 0, so a
fresh adapter leaves the model unchanged. The base weights are frozen
(``requires_grad=False``): megatron DDP and the optimizer only ever see the adapters.

Tensor parallelism (TP ranks t = 0..T-1), for input ``x`` and output ``y``:

* ColumnParallelLinear (``linear_qkv``, ``linear_fc1``; rank t holds rows W_t):
  A is replicated, B is split by output rows like W (``B_t [out/T, r]``)::

      h = A x                    [s, b, r], same on every rank
      h = copy_to_tp(h)          identity; backward all-reduces dL/dh, which each rank
                                 only has partially (B_t^T dL/dy_t)
      y_t += scaling * B_t h     [s, b, out/T], laid out like the base output

* RowParallelLinear (``linear_proj``, ``linear_fc2``; rank t holds columns W_t):
  A is split by input columns like W (``A_t [r, in/T]``), B is replicated::

      h_t = A_t x_t              partial sums of A x
      h = reduce_from_tp(h_t)    all-reduce before B (backward: identity)
      y += scaling * B h         added after the base layer's own all-reduce

* Sequence parallelism: the column input is this rank's sequence shard
  ``[s/T, b, H]``; A is applied to the shard and the small ``[s/T, b, r]`` result is
  all-gathered (backward: reduce-scatter) instead of the ``[s/T, b, H]`` input. The
  row path reduce-scatters ``h_t`` over the sequence (the base output is sequence
  split too). The replicated factor (A of a column, B of a row) then sees only this
  rank's tokens, so its gradient is partial over TP: it carries megatron's
  ``sequence_parallel`` attribute and ``finalize_model_grads`` all-reduces it over
  TP, exactly as for the LayerNorm weights.
* Split factors carry megatron's ``tensor_model_parallel`` attributes, so gradient
  norms (clipping) count replicated factors once.

Fused layouts: one adapter on ``linear_qkv`` covers q, k and v (its B rows follow
megatron's grouped qkv layout, see ``models/adapter.py``); one on ``linear_fc1``
covers gate and up (B rows ``[gate; up]``, per TP rank ``[gate_t; up_t]`` like W).
Export splits B rows with the family's weight adapter (``checkpoint/lora_export.py``).

Where this departs from PEFT: q/k/v (and gate/up) share one A, since megatron fuses
them into one matmul; PEFT's separate q_proj/k_proj/v_proj adapters receive copies of
that A, which computes the same function.

MoE expert linears (``mlp.experts.local_experts.{e}.linear_fc1`` / ``linear_fc2`` of
megatron's ``SequentialMLP``; the shared expert is an ordinary MLP and takes the dense
path above). Each expert gets its own adapter (one A for gate+up, like PEFT's
``target_parameters`` adapter on transformers' fused ``gate_up_proj``). Three things differ:

* Expert tensor parallelism (ETP group, not TP): the token dispatcher already all-gathers
  the tokens over ETP before the experts and reduce-scatters their output after, and
  megatron's expert linears do no communication of their own (``explicit_expert_comm``).
  So the adapter does none in the forward either: a column adapter computes
  ``y_t += s B_t (A x)`` on the full token set of its ETP rank; a row adapter adds its
  partial ``s B (A_t x_t)`` to the partial base output, which the dispatcher sums. The
  replicated factor (A of fc1, B of fc2) then has a partial gradient on each ETP rank:
  it enters through ``copy_to_tensor_model_parallel_region(., etp)`` (identity forward,
  all-reduce of its gradient), while the input gradient stays partial, as the base
  layer's does, for the dispatcher's reduce-scatter to sum.
* Gradient reduction: at EP > 1 megatron marks expert weights ``allreduce=False``; DDP
  puts them in its expert-parallel buffers, reduced over the expert-data-parallel group,
  and the optimizer gives them its expert optimizer. The adapters copy the attribute of
  their base weight, so they go the same way (EP=2 computes what EP=1 does).
* Names: megatron names experts by local index; adapters are named, seeded and saved by
  the global index (``global_module_name``), so every EP layout starts from the same
  adapters and a checkpoint resumes (and exports) at any EP.
"""
from __future__ import annotations

import contextlib
import math
import re
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mcore_align.ops.collectives import all_gather_dim0, reduce_scatter_dim0

# Megatron module names (local and TE spec alike) of the linears LoRA can wrap.
COLUMN_TARGETS = ("linear_qkv", "linear_fc1")
ROW_TARGETS = ("linear_proj", "linear_fc2")
# ms-swift / PEFT names -> the megatron module holding them. A fused module can only
# be targeted as a whole: q_proj alone would need a masked B.
HF_GROUPS = {
    "linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "linear_proj": ("o_proj",),
    "linear_fc1": ("gate_proj", "up_proj"),
    "linear_fc2": ("down_proj",),
}
PRESETS = {
    "DEFAULT": ("linear_qkv",),  # ms-swift's DEFAULT: attention q/k/v
    # every linear layer; on MoE models also each routed expert and the shared expert (names match
    # by their last part), never the router (ms-swift: all-linear; docs/lora.md)
    "ALL": ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"),
}


def resolve_target_modules(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``DEFAULT`` / ``ALL`` / a list of megatron or HF module names -> megatron names.

    >>> resolve_target_modules(["q_proj", "k_proj", "v_proj", "o_proj"])
    ('linear_qkv', 'linear_proj')
    """
    if isinstance(value, str):
        if value.upper() in PRESETS:
            return PRESETS[value.upper()]
        value = [v for v in value.split(",") if v]
    names = list(value)
    out = []
    for mcore, hf in HF_GROUPS.items():
        hit_hf = [n for n in names if n in hf]
        if mcore in names or hit_hf:
            if hit_hf and len(hit_hf) != len(hf):
                raise ValueError(
                    f"lora_target_modules: {hit_hf} is part of the fused megatron module {mcore}; "
                    f"list all of {list(hf)} (or {mcore})")
            out.append(mcore)
    known = set(HF_GROUPS) | {h for g in HF_GROUPS.values() for h in g}
    unknown = [n for n in names if n not in known]
    if unknown or not out:
        raise ValueError(f"lora_target_modules: unknown {unknown or names}; use DEFAULT, ALL or names from "
                         f"{sorted(known)}")
    return tuple(out)


@dataclass(kw_only=True, frozen=True)
class LoRAConfig:
    """Adapter hyperparameters (ms-swift names)."""

    rank: int = 8
    """r: inner dimension of B @ A."""
    alpha: float = 32.0
    """lora_alpha: the update is scaled by alpha / rank."""
    dropout: float = 0.05
    """Dropout on the adapter's input (training mode only)."""
    targets: tuple[str, ...] = PRESETS["DEFAULT"]
    """Megatron module names to adapt (see resolve_target_modules)."""
    vision_children: tuple[str, ...] = ()
    """Vision-language models: which parts of the first stage's vision module get adapters on
    every one of their ``nn.Linear``s: "vit" (the tower, ``model.freeze_vit=false``) and/or
    "aligner" (the projector, ``model.freeze_aligner=false``), as ms-swift does with LoRA."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRA(nn.Module):
    """The adapter of one parallel linear; attached as its child ``lora`` (see apply_lora).

    ``A``: column -> [r, in] replicated; row -> [r, in/T] split on dim 1.
    ``B``: column -> [out/T, r] split on dim 0; row -> [out, r] replicated.
    ``replicated`` (a plain ``nn.Linear`` of the vision module, which every TP rank runs on
    the same input): ``A [r, in]``, ``B [out, r]``, no communication; every TP rank computes
    the same gradient (like the tower's own weights), so nothing is reduced over TP.
    """

    def __init__(self, kind: str, A: torch.Tensor, out_features: int, cfg: LoRAConfig, tp_group,
                 sequence_parallel: bool, expert_allreduce: bool | None = None):
        """``tp_group``: the linear's TP group (for an expert linear: the expert-TP group).
        ``expert_allreduce``: None for a dense linear; for an expert linear, its base weight's
        ``allreduce`` attribute (False at EP > 1: reduced over the expert-data-parallel group)."""
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        super().__init__()
        assert kind in ("column", "row", "replicated"), kind
        self.kind = kind
        self.expert = expert_allreduce is not None
        self.scaling = cfg.scaling
        self.tp_group = tp_group
        # Expert linears never see sequence-split input: the dispatcher gathers the tokens.
        self.sequence_parallel = sequence_parallel and tp_group.size() > 1 and not self.expert
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.enabled = True
        self.A = nn.Parameter(A)
        self.B = nn.Parameter(torch.zeros(out_features, cfg.rank, dtype=A.dtype, device=A.device))
        if kind == "replicated":
            return
        split, replicated = (self.B, self.A) if kind == "column" else (self.A, self.B)
        set_tensor_model_parallel_attributes(split, True, 0 if kind == "column" else 1, 1)
        if self.sequence_parallel:  # partial over TP: finalize_model_grads all-reduces it
            replicated.sequence_parallel = True
        if self.expert:
            for p in (self.A, self.B):
                p.allreduce = expert_allreduce
            if tp_group.size() == 1:
                # Not a duplicate of anything: megatron's grad norm skips replicated params on dense-TP
                # ranks > 0 (param_is_not_tensor_parallel_duplicate uses the dense TP group), which would
                # drop this rank's own expert adapters at TP > 1 with ETP = 1.
                set_tensor_model_parallel_attributes(replicated, True, 0, 1)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """scaling * B A dropout(x), laid out like the base layer's output."""
        from megatron.core.tensor_parallel import mappings as M

        if self.expert:  # x [tokens of this expert, in(/ETP)]; no communication (see module doc)
            A, B = self.A, self.B
            if self.tp_group.size() > 1:  # the replicated factor's gradient is partial over ETP
                if self.kind == "column":
                    A = M.copy_to_tensor_model_parallel_region(A, group=self.tp_group)
                else:
                    B = M.copy_to_tensor_model_parallel_region(B, group=self.tp_group)
            return F.linear(F.linear(self.dropout(x), A), B) * self.scaling
        h = F.linear(self.dropout(x), self.A)  # [s(/T), b, r]
        if self.kind == "replicated":
            pass
        elif self.kind == "column":
            if self.sequence_parallel:
                h = all_gather_dim0(h, self.tp_group)  # [s, b, r]; backward: reduce-scatter
            else:
                h = M.copy_to_tensor_model_parallel_region(h, group=self.tp_group)
        else:  # row: h holds partial sums over this rank's input columns
            if self.sequence_parallel:
                h = reduce_scatter_dim0(h, self.tp_group)  # [s/T, b, r]; backward: all-gather
            else:
                h = M.reduce_from_tensor_model_parallel_region(h, group=self.tp_group)
        return F.linear(h, self.B) * self.scaling

    def extra_repr(self) -> str:
        return f"{self.kind}, A={tuple(self.A.shape)}, B={tuple(self.B.shape)}, scaling={self.scaling}"


def _lora_hook(module, args, output):
    lora: LoRA = module.lora
    if not lora.enabled:
        return output
    out, bias = output
    return out + lora.delta(args[0]).to(out.dtype), bias


def _lora_hook_plain(module, args, output):
    """A plain ``nn.Linear`` (vision module) returns a tensor, not megatron's (out, bias)."""
    lora: LoRA = module.lora
    return output + lora.delta(args[0]).to(output.dtype) if lora.enabled else output


def _attach_vision_adapters(chunk, cfg: LoRAConfig, seed: int) -> list[str]:
    """Replicated adapters on every ``nn.Linear`` of the vision parts ``cfg.vision_children``
    names ("vit": the tower, "aligner": the projector) of a first-stage chunk; their names
    are the module names (``vision.vision_tower.encoder.layers.0.self_attn.q_proj``)."""
    from mcore_align.models.vision import vision_child

    vision = getattr(chunk, "vision", None)
    if not cfg.vision_children or vision is None:
        return []
    names = []
    for part in cfg.vision_children:
        for child in getattr(vision, f"{part}_children"):
            module = vision_child(vision, child)
            if not isinstance(module, nn.Module):  # a bare parameter (image_newline): no linear
                continue
            for n, m in module.named_modules():
                if type(m) is nn.Linear:
                    names.append(f"vision.{child}.{n}")
                    attach_lora(m, names[-1], cfg, seed=seed)
    return names


def init_A(global_name: str, rank: int, in_features: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The full (unsharded) A of one adapter, the same on every rank and at every layout.

    Seeded by the run seed and the adapter's global name, so TP/PP layouts start from
    identical adapters (a rank slices its part out).
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(global_name.encode()))
    bound = 1.0 / math.sqrt(in_features)  # PEFT: kaiming_uniform_(a=sqrt(5)) on [r, in]
    return (torch.rand(rank, in_features, generator=gen, dtype=torch.float64) * 2 - 1).mul_(bound).to(dtype)


def global_module_name(chunk, local_name: str) -> str:
    """``decoder.layers.{local}.x`` -> ``decoder.layers.{global}.x`` (PP/VPP offsets), and
    ``mlp.experts.local_experts.{local}`` -> ``{global}`` (EP: rank p of P holds experts
    p*E/P .. (p+1)*E/P - 1; e.g. E=4, EP=2: local 1 on EP rank 1 is expert 3).
    The vision module (first stage only) keeps its names: ``vision.vision_tower...``."""
    if local_name.startswith("vision."):
        return local_name
    m = re.match(r"decoder\.layers\.(\d+)\.(.*)", local_name)
    assert m, local_name
    layer = chunk.decoder.layers[int(m.group(1))]
    rest = m.group(2)
    e = re.match(r"mlp\.experts\.local_experts\.(\d+)(\..*)?$", rest)
    if e:
        experts = layer.mlp.experts
        g = experts.ep_group.rank() * experts.num_local_experts + int(e.group(1))
        rest = f"mlp.experts.local_experts.{g}{e.group(2) or ''}"
    return f"decoder.layers.{layer.layer_number - 1}.{rest}"


def _check_expert_tp_group(etp, global_name: str) -> None:
    """ETP > 1 must be the dense TP group's ranks: megatron's grad norm counts a replicated
    parameter on dense-TP rank 0 only, which is one ETP rank only if the groups coincide
    (ETP = TP, megatron's default; ETP = 1 needs nothing)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if etp.size() == 1:
        return
    tp = parallel_state.get_tensor_model_parallel_group()
    if dist.get_process_group_ranks(etp) != dist.get_process_group_ranks(tp):
        raise NotImplementedError(
            f"LoRA on expert linears ({global_name}) needs expert_tensor_parallel_size equal to 1 or to "
            f"tensor_model_parallel_size (got ETP={etp.size()}, TP={tp.size()})")


def attach_lora(mod, global_name: str, cfg: LoRAConfig, *, seed: int) -> LoRA:
    """Give one megatron parallel linear an adapter (child ``lora`` + a forward hook)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    if type(mod) is nn.Linear and global_name.startswith("vision."):  # replicated over TP
        from megatron.core import parallel_state

        A = init_A(global_name, cfg.rank, mod.in_features, seed, mod.weight.dtype)
        lora = LoRA("replicated", A, mod.out_features, cfg, parallel_state.get_tensor_model_parallel_group(), False)
        mod.lora = lora.to(mod.weight.device)
        mod.register_forward_hook(_lora_hook_plain)
        return lora
    if type(mod) not in (ColumnParallelLinear, RowParallelLinear):
        raise NotImplementedError(
            f"LoRA wraps megatron's local-spec ColumnParallelLinear/RowParallelLinear; {global_name} is "
            f"{type(mod).__name__} (Transformer Engine spec: not supported yet)")
    w, tp = mod.weight, mod.tp_group  # expert linears: tp is the expert-TP group
    expert_allreduce = None
    if getattr(mod, "is_expert", False):
        expert_allreduce = getattr(w, "allreduce", True)
        _check_expert_tp_group(tp, global_name)
    A_full = init_A(global_name, cfg.rank, mod.input_size, seed, w.dtype)
    if isinstance(mod, ColumnParallelLinear):
        assert not mod.gather_output, global_name  # the LoRA output is added in the split layout
        lora = LoRA("column", A_full, mod.output_size_per_partition, cfg, tp, mod.sequence_parallel,
                    expert_allreduce)
    else:
        assert mod.input_is_parallel, global_name
        A = A_full.chunk(tp.size(), dim=1)[tp.rank()].contiguous()  # [r, in/T]
        lora = LoRA("row", A, mod.output_size, cfg, tp, mod.sequence_parallel, expert_allreduce)
    mod.lora = lora.to(w.device)
    mod.register_forward_hook(_lora_hook)
    return lora


def apply_lora(chunks, cfg: LoRAConfig, *, seed: int) -> list[str]:
    """Attach adapters to every target linear of ``chunks`` and freeze everything else.

    Call after the base weights are loaded and before the DDP wrap. Returns the global
    names of the adapted modules on this rank.
    """
    adapted = []
    for chunk in chunks:
        chunk.requires_grad_(False)
        # Names match by their last part: linear_fc1 is the dense MLP's, the shared expert's and
        # every routed expert's (docs/lora.md, MoE). The router is not a target.
        targets = [(name, mod) for name, mod in chunk.named_modules() if name.rsplit(".", 1)[-1] in cfg.targets]
        for name, mod in targets:
            gname = global_module_name(chunk, name)
            attach_lora(mod, gname, cfg, seed=seed)
            adapted.append(gname)
        adapted += _attach_vision_adapters(chunk, cfg, seed)
    if not adapted:
        raise ValueError(f"LoRA: no module named {cfg.targets} in the model")
    return adapted


def lora_modules(chunk):
    """(local module name, LoRA) of every adapter in one chunk."""
    return [(n[: -len(".lora")], m) for n, m in chunk.named_modules() if isinstance(m, LoRA)]


def has_adapters(chunk) -> bool:
    return any(isinstance(m, LoRA) for m in chunk.modules())


@contextlib.contextmanager
def adapters_disabled(chunks):
    """The base model: every adapter of ``chunks`` (DDP-wrapped or not) switched off."""
    loras = [m for c in chunks for m in c.modules() if isinstance(m, LoRA)]
    before = [m.enabled for m in loras]
    for m in loras:
        m.enabled = False
    try:
        yield
    finally:
        for m, b in zip(loras, before):
            m.enabled = b


# -- checkpoints: adapters only ----------------------------------------------------------
def adapter_sharded_state_dict(chunk) -> dict:
    """``{local param name: ShardedTensor(Factory)}`` of this chunk's adapters.

    Global keys ``decoder.layers.{g}.<module>.lora_A.weight`` / ``lora_B.weight`` hold
    the unsharded factors, so a checkpoint resumes at any TP/PP layout. ``linear_fc1``'s
    B is ``[gate_t; up_t]`` on each rank: megatron's swiglu factory stores it as the
    global ``[gate; up]`` (as it does for the weight).
    """
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

    dense_dp = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    sd = {}
    for name, lora in lora_modules(chunk):
        # Experts: one key per global expert index, split over ETP, replicated over expert-DP.
        g = global_module_name(chunk, name)
        dp = parallel_state.get_expert_data_parallel_rank() if lora.expert else dense_dp
        t, T = lora.tp_group.rank(), lora.tp_group.size()
        kA, kB = f"{g}.lora_A.weight", f"{g}.lora_B.weight"
        if lora.kind == "replicated":  # the same on every TP rank
            a = ShardedTensor.from_rank_offsets(kA, lora.A, replica_id=(0, t, dp))
            b = ShardedTensor.from_rank_offsets(kB, lora.B, replica_id=(0, t, dp))
        elif lora.kind == "column":
            a = ShardedTensor.from_rank_offsets(kA, lora.A, replica_id=(0, t, dp))
            b = ShardedTensor.from_rank_offsets(kB, lora.B, (0, t, T), replica_id=(0, 0, dp))
            if name.endswith("linear_fc1") and chunk.config.gated_linear_unit:
                b = apply_swiglu_sharded_factory(b, ())
        else:
            a = ShardedTensor.from_rank_offsets(kA, lora.A, (1, t, T), replica_id=(0, 0, dp))
            b = ShardedTensor.from_rank_offsets(kB, lora.B, replica_id=(0, t, dp))
        sd[f"{name}.lora.A"], sd[f"{name}.lora.B"] = a, b
    return sd


def load_adapter_state(chunk, loaded: dict) -> None:
    """Copy what ``dist_checkpointing.load`` returned for adapter_sharded_state_dict."""
    params = dict(chunk.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    assert set(loaded) == expected, (sorted(set(loaded) ^ expected))
    with torch.no_grad():
        for n, t in loaded.items():
            params[n].copy_(t)


def shard_adapter(kind: str, module: str, A: torch.Tensor, B: torch.Tensor, tp_rank: int, tp: int,
                  gated: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """This TP rank's (A, B) of full factors, as apply_lora lays them out (for tests)."""
    if kind == "row":
        return A.chunk(tp, dim=1)[tp_rank], B
    if module == "linear_fc1" and gated:
        gate, up = B.chunk(2, dim=0)
        return A, torch.cat([gate.chunk(tp)[tp_rank], up.chunk(tp)[tp_rank]])
    return A, B.chunk(tp, dim=0)[tp_rank]
