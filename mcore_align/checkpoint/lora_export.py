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
from mcore_align.models.lora import HF_GROUPS, LoRAConfig, resolve_target_modules

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


def export_peft(ckpt_dir: str | Path, out_dir: str | Path, *, base_model_name_or_path: str | None = None,
                dtype: str | torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write a PEFT LoRA adapter directory (adapter_model.safetensors + adapter_config.json)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    path = check_complete(resolve_checkpoint_dir(ckpt_dir))
    cfg, base, adapters = read_lora_checkpoint(path)
    spec = read_model_spec(path)
    if spec.vision is not None:
        # PEFT keys are the model's MODULE names (model.language_model.layers..., model.vision_tower...),
        # whatever naming style the checkpoint's weights were saved in: the "transformers" style
        # (VisionSpec's default) is exactly those.
        spec = dataclasses.replace(spec, vision=dataclasses.replace(spec.vision, hf_key_style="transformers"))
    hf = hf_adapters(spec, adapters)
    tensors = {}
    for name, (A, B) in hf.items():
        out_dtype = parse_dtype(dtype) or A.dtype
        # A fused megatron linear (qkv, gate+up) has one A: each HF projection gets its own copy.
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.to(out_dtype).clone().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.to(out_dtype).contiguous()
    targets = sorted({h for m in cfg.targets for h in HF_GROUPS[m]})
    # adapters on the vision module (model.freeze_vit / freeze_aligner = false): listed by full
    # HF module name, so that PEFT does not also match the language model's modules of that name
    targets += sorted(hf_adapters(spec, {m: ab for m, ab in adapters.items() if m.startswith("vision.")}))
    peft_cfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                          bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model_name_or_path or base)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        peft_cfg.save_pretrained(str(tmp))
    log.info("exported PEFT adapters of %s (%d modules) -> %s", path, len(hf), out_dir)
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
