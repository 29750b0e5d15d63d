"""Export a LoRA training checkpoint: merged HF weights, or a PEFT adapter directory.

A LoRA checkpoint (``model.train_type=lora``) holds the adapters only, under global
keys ``decoder.layers.{i}.<module>.lora_A.weight`` / ``lora_B.weight`` (see
``models/lora.py``); the base model is the run's ``model.load``, read from the
checkpoint's saved config (or given explicitly).

Both exports work in HF space with the family's weight adapter: the fused B of
``linear_qkv`` (grouped q/k/v rows) or ``linear_fc1`` ([gate; up] rows) is split like
the weight (``adapter.to_hf``), and every part shares the fused A, because
``split_rows(B) @ A == split_rows(B @ A)``.

* PEFT: ``adapter_model.safetensors`` with keys
  ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` ... and
  ``adapter_config.json``; ``peft.PeftModel.from_pretrained(hf_base, dir)`` loads it.
  MoE routed experts (``peft_expert_tensors``): transformers 5 holds them as fused 3-D
  parameters ``mlp.experts.gate_up_proj`` [E, 2F, H] / ``down_proj`` [E, H, F], which PEFT
  adapts through ``target_parameters`` (``lora.ParamWrapper``), not ``target_modules``.
* merged: the base exported with ``convert_mcore_to_hf`` (streaming, in the
  checkpoint's dtype), then each safetensors shard in turn gets
  ``W += lora_alpha / lora_rank * B @ A`` (in fp32) and is cast to the output dtype.
  Peak memory: one shard plus the adapters.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import torch

from mcore_align.checkpoint.layout import (atomic_output_dir, check_complete, parse_dtype, read_model_spec,
                                          resolve_checkpoint_dir)
from mcore_align.models.adapter import adapter_for
from mcore_align.models.lora import LoRAConfig, resolve_target_modules

log = logging.getLogger(__name__)

_KEY = re.compile(r"^(decoder\.layers\.\d+\..+|vision\..+)\.lora_([AB])\.weight$")


def _saved_model_config(path: Path) -> dict:
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(path))
    return (common.get("extra") or {}).get("config", {}).get("model", {})


def is_lora_checkpoint(ckpt_dir: str | Path) -> bool:
    import torch.distributed as dist

    from mcore_align.checkpoint.layout import init_single_process

    if not dist.is_initialized():  # offline tools; under torchrun the trainer's world is kept
        init_single_process()
    return _saved_model_config(check_complete(resolve_checkpoint_dir(ckpt_dir))).get("train_type") == "lora"


def saved_lora_config(path: Path):
    """(LoRAConfig, base checkpoint dir) recorded in a LoRA training checkpoint."""
    mcfg = _saved_model_config(path)
    if mcfg.get("train_type") != "lora":
        raise ValueError(f"{path} is not a LoRA checkpoint (model.train_type={mcfg.get('train_type')!r})")
    from mcore_align.config import lora_vision_children

    cfg = LoRAConfig(rank=mcfg["lora_rank"], alpha=mcfg["lora_alpha"], dropout=mcfg["lora_dropout"],
                     targets=resolve_target_modules(mcfg["lora_target_modules"]),
                     vision_children=lora_vision_children(mcfg.get("freeze_vit", True), mcfg.get("freeze_aligner", True)))
    return cfg, mcfg["load"]


def load_lora_model(chunks, ckpt_dir: str | Path, base: str | Path | None = None) -> Path:
    """Built model chunks (any layout) <- the base weights + the adapters of a LoRA checkpoint.

    The base is the run's ``model.load`` unless ``base`` is given. Adapters are attached
    (``apply_lora``) and filled from the checkpoint; everything stays frozen (evaluation).
    Collective over all ranks. Returns the resolved checkpoint directory.
    """
    from megatron.core import dist_checkpointing

    from mcore_align.checkpoint.loading import load_model_weights
    from mcore_align.models.lora import adapter_sharded_state_dict, apply_lora, load_adapter_state

    path = check_complete(resolve_checkpoint_dir(ckpt_dir))
    cfg, saved_base = saved_lora_config(path)
    load_model_weights(chunks, base or saved_base)
    apply_lora(chunks, cfg, seed=0)  # initial values are overwritten by the checkpoint's
    loaded = dist_checkpointing.load({f"chunk{i}": adapter_sharded_state_dict(c) for i, c in enumerate(chunks)},
                                     str(path))
    for i, c in enumerate(chunks):
        load_adapter_state(c, loaded[f"chunk{i}"])
        c.requires_grad_(False)
        c.eval()  # the adapters were attached after build_model's eval(): no LoRA dropout
    return path


def read_lora_checkpoint(ckpt_dir: str | Path):
    """(LoRAConfig, base checkpoint dir, {global module name: (A [r, in], B [out, r])}), unsharded."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from torch.distributed.checkpoint import FileSystemReader

    from mcore_align.checkpoint.layout import init_single_process

    init_single_process()
    path = check_complete(resolve_checkpoint_dir(ckpt_dir))
    cfg, base = saved_lora_config(path)
    stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    request = {}
    for key, md in stored.items():
        if _KEY.match(key):
            buf = torch.empty(tuple(md.size), dtype=md.properties.dtype)
            request[key] = ShardedTensor.from_rank_offsets(key, buf, replica_id=0)
    if not request:
        raise KeyError(f"{path}: no LoRA adapter tensors in the checkpoint")
    loaded = dist_checkpointing.load(request, str(path))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    # load() also returns the checkpoint's common (non-tensor) state: keep the adapters only.
    for key in request:
        t = loaded[key]
        module, which = _KEY.match(key).groups()
        pairs.setdefault(module, {})[which] = t
    assert all(set(p) == {"A", "B"} for p in pairs.values()), "adapter without its A or B"
    return cfg, base, {m: (p["A"], p["B"]) for m, p in sorted(pairs.items())}


def hf_adapters(spec, adapters: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """HF module name (``model.layers.0.self_attn.q_proj``) -> (A, B part), split by the family adapter."""
    adapter = adapter_for(spec)
    out = {}
    for module, (A, B) in adapters.items():
        for hf_name, B_part in adapter.to_hf(f"{module}.weight", B).items():
            assert hf_name.endswith(".weight"), hf_name
            out[hf_name[: -len(".weight")]] = (A, B_part)
    return out


# decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc1 (global expert index e)
EXPERT_MODULE = re.compile(r"^decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)$")
# megatron expert linear -> transformers 5's fused expert parameter (in memory, every MoE family here)
_FUSED = {"linear_fc1": "gate_up_proj", "linear_fc2": "down_proj"}


def peft_expert_tensors(adapters: dict, num_experts: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Expert adapters -> PEFT ``ParamWrapper`` tensors (keys without ``base_model.model.``)
    and the ``target_parameters`` list.

    PEFT (0.21) adapts a 3-D parameter [E, out, in] with one wrapper holding
    ``lora_A`` [E*r, in] and ``lora_B`` [out, r*E] (``ParamWrapper.get_delta_weight``:
    A reshaped (E, r, in), B reshaped (out, r, E)), so expert e's factors are
    ``A_e = lora_A[e*r:(e+1)*r]`` and ``B_e[:, k] = lora_B[:, k*E + e]``; delta_e =
    scaling * B_e @ A_e, the megatron adapter's. ``gate_up_proj[e]`` = [gate_e; up_e] =
    megatron's ``linear_fc1`` rows, so B needs no split. Two parameters of one module are
    nested wrappers in parameter order: ``gate_up_proj`` inner (``experts.base_layer.lora_*``),
    ``down_proj`` outer (``experts.lora_*``); one alone is ``experts.lora_*``.
    """
    per: dict[tuple[int, str], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for module, (A, B) in adapters.items():
        m = EXPERT_MODULE.match(module)
        if m:
            per.setdefault((int(m.group(1)), m.group(3)), {})[int(m.group(2))] = (A, B)
    tensors, params = {}, set()
    for (i, which), by_e in sorted(per.items()):
        if sorted(by_e) != list(range(num_experts)):
            raise KeyError(f"layer {i} {which}: adapters for experts {sorted(by_e)}, expected 0..{num_experts - 1}")
        A_ErI = torch.stack([by_e[e][0] for e in range(num_experts)])  # [E, r, in]
        B_ErO = torch.stack([by_e[e][1] for e in range(num_experts)])  # [E, out, r]
        E, r, _ = A_ErI.shape
        both = (i, "linear_fc1") in per and (i, "linear_fc2") in per
        base = f"model.layers.{i}.mlp.experts." + ("base_layer." if both and which == "linear_fc1" else "")
        tensors[base + "lora_A.weight"] = A_ErI.reshape(E * r, -1).contiguous()
        tensors[base + "lora_B.weight"] = B_ErO.permute(1, 2, 0).reshape(B_ErO.shape[1], r * E).contiguous()
        params.add(f"mlp.experts.{_FUSED[which]}")
    return tensors, sorted(params)


def _peft_renamed_targets(model_type: str) -> set[str]:
    """Module names that peft, on transformers 5, rewrites to fused expert parameters for this
    model type (``peft.utils.transformers_weight_conversion``: a v4 ``target_modules``
    ``gate_proj`` becomes ``target_parameters`` ``mlp.experts.gate_up_proj`` at rank 2r, and is
    dropped from ``target_modules``). A dense MLP's or shared expert's adapter under such a
    name cannot be expressed."""
    try:
        from peft.utils.transformers_weight_conversion import (_MODEL_TO_CONVERSION_PATTERN,
                                                               _MOE_TARGET_MODULE_MAPPING)
    except ImportError:  # transformers < 5: no conversion, nothing is renamed
        return set()
    return set(_MOE_TARGET_MODULE_MAPPING.get(_MODEL_TO_CONVERSION_PATTERN.get(model_type), {}))


def peft_state(spec, cfg: LoRAConfig, adapters: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Megatron adapters -> (PEFT tensors keyed ``model.layers...lora_A.weight`` (no
    ``base_model.model.`` prefix, the adapter name not included), ``LoraConfig`` kwargs).

    ``target_modules`` are the HF leaf names of the adapted non-expert linears,
    ``target_parameters`` the fused expert parameters. Raises ValueError where PEFT cannot
    hold the adapters (see ``_peft_renamed_targets``)."""
    import peft
    import transformers

    if spec.vision is not None:
        # PEFT keys are the model's MODULE names (model.language_model.layers..., model.vision_tower...),
        # whatever naming style the checkpoint's weights were saved in: the "transformers" style is
        # exactly those.
        spec = dataclasses.replace(spec, vision=dataclasses.replace(spec.vision, hf_key_style="transformers"))
    dense = {m: ab for m, ab in adapters.items() if not EXPERT_MODULE.match(m)}
    hf = hf_adapters(spec, dense)
    tensors = {}
    for name, (A, B) in hf.items():
        # A fused megatron linear (qkv, gate+up) has one A: each HF projection gets its own copy.
        tensors[f"{name}.lora_A.weight"] = A.clone().contiguous()
        tensors[f"{name}.lora_B.weight"] = B.contiguous()
    vision = hf_adapters(spec, {m: ab for m, ab in dense.items() if m.startswith("vision.")})
    # language-model linears by leaf name; adapters on the vision module (freeze_vit /
    # freeze_aligner = false) by full HF module name, so PEFT does not match them elsewhere
    targets = sorted({n.rsplit(".", 1)[-1] for n in hf if n not in vision}) + sorted(vision)
    expert_tensors, params = peft_expert_tensors(adapters, spec.num_moe_experts or 0)
    tensors.update(expert_tensors)
    kwargs = dict(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                  bias="none", task_type="CAUSAL_LM")
    if params:
        model_type = spec.hf_config.get("model_type", spec.family)
        clash = sorted(set(targets) & _peft_renamed_targets(model_type))
        if clash:
            where = sorted({n for n in hf if n.rsplit(".", 1)[-1] in clash})
            raise ValueError(
                f"PEFT export: the adapters on {where[:3]}{' ...' if len(where) > 3 else ''} cannot be written as "
                f"PEFT adapters together with expert adapters: peft {peft.__version__} on transformers "
                f"{transformers.__version__} rewrites target_modules {clash} of model_type {model_type!r} to the "
                "fused expert parameters (mlp.experts.gate_up_proj / down_proj). Export merged weights instead "
                "(--lora merged), or train without LoRA on dense MLP layers")
        # PEFT's ParamWrapper refuses lora_dropout != 0 (dropout cannot be factored out of a
        # weight delta); dropout is a training-time setting and changes no output at inference.
        kwargs.update(lora_dropout=0.0, target_parameters=params)
    return tensors, kwargs


def export_peft(ckpt_dir: str | Path, out_dir: str | Path, *, base_model_name_or_path: str | None = None,
                dtype: str | torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write a PEFT LoRA adapter directory (adapter_model.safetensors + adapter_config.json)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    path = check_complete(resolve_checkpoint_dir(ckpt_dir))
    cfg, base, adapters = read_lora_checkpoint(path)
    state, kwargs = peft_state(read_model_spec(path), cfg, adapters)
    tensors = {f"base_model.model.{k}": t.to(parse_dtype(dtype) or t.dtype).contiguous() for k, t in state.items()}
    peft_cfg = LoraConfig(**kwargs, base_model_name_or_path=base_model_name_or_path or base)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        peft_cfg.save_pretrained(str(tmp))
    log.info("exported PEFT adapters of %s (%d modules) -> %s", path, len(adapters), out_dir)
    return Path(out_dir)


def export_merged(ckpt_dir: str | Path, out_dir: str | Path, *, base: str | Path | None = None,
                  dtype: str | torch.dtype | None = None, max_shard_size: str | int = "5GB",
                  overwrite: bool = False) -> Path:
    """HF checkpoint of base + scaling * B @ A (``base`` defaults to the run's model.load)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mcore_align.checkpoint.mcore_to_hf import convert_mcore_to_hf

    path = check_complete(resolve_checkpoint_dir(ckpt_dir))
    cfg, saved_base, adapters = read_lora_checkpoint(path)
    base = base or saved_base
    deltas = hf_adapters(read_model_spec(path), adapters)
    pending = {f"{name}.weight" for name in deltas}
    with atomic_output_dir(out_dir, overwrite) as tmp:
        # The base in its stored dtype: merging before any down-cast rounds once, not twice.
        hf_dir = convert_mcore_to_hf(base, tmp / "base", dtype=None, max_shard_size=max_shard_size)
        out_dtype = parse_dtype(dtype)
        for f in sorted(hf_dir.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                shard = {k: st.get_tensor(k) for k in st.keys()}
            for k, w in shard.items():
                if k in pending:
                    A, B = deltas[k[: -len(".weight")]]
                    w = (w.float() + cfg.scaling * (B.float() @ A.float())).to(w.dtype)
                    pending.discard(k)
                shard[k] = w.to(out_dtype or w.dtype).contiguous()
            save_file(shard, f, metadata={"format": "pt"})
        if pending:
            raise KeyError(f"adapted weights not found in the base export: {sorted(pending)}")
        if out_dtype is not None:  # config.json states the dtype of the weights
            cfg_file = hf_dir / "config.json"
            c = json.loads(cfg_file.read_text())
            from mcore_align.checkpoint.layout import dtype_name

            for key in ("dtype", "torch_dtype"):
                if key in c:
                    c[key] = dtype_name(out_dtype)
            cfg_file.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
            index = hf_dir / "model.safetensors.index.json"
            if index.exists():
                doc = json.loads(index.read_text())
                doc.setdefault("metadata", {})["total_size"] = sum(
                    n * out_dtype.itemsize for n in _numels(hf_dir).values())
                index.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        for f in hf_dir.iterdir():
            os.replace(f, tmp / f.name)
        shutil.rmtree(hf_dir)
    log.info("exported %s merged into %s -> %s", path, base, out_dir)
    return Path(out_dir)


def _numels(hf_dir: Path) -> dict[str, int]:
    from safetensors import safe_open

    out = {}
    for f in hf_dir.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                out[k] = math.prod(st.get_slice(k).get_shape())
    return out
