"""Training checkpoints with megatron ``dist_checkpointing`` (torch_dist format).

Layout of ``save``::

    save/
      iter_0000010/                     one complete checkpoint (any TP/PP/DP can load it)
        metadata.json, common.pt, *.distcp    model, optimizer, scheduler, data position, RNG
        model_spec.json, tokenizer/       so export and later runs need nothing else
      latest_checkpointed_iteration.txt  written last, atomically (tmp + rename)

A crash mid-save leaves a partial ``iter_*`` directory that the marker does not
point to: the previous checkpoint stays the one that is resumed.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

LATEST = "latest_checkpointed_iteration.txt"
SIDECAR = ("model_spec.json", "tokenizer")


def iter_dir(save: str | Path, step: int) -> Path:
    return Path(save) / f"iter_{step:07d}"


def latest_checkpoint(save: str | Path | None) -> Path | None:
    """The checkpoint the marker points to, or None (no marker: nothing complete yet)."""
    if save is None:
        return None
    marker = Path(save) / LATEST
    if not marker.exists():
        return None
    step = int(marker.read_text().strip())
    path = iter_dir(save, step)
    if not (path / "metadata.json").exists():
        raise FileNotFoundError(f"{marker} points to step {step} but {path} is not a complete checkpoint")
    return path


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def _sharded_state(policy, optimizer, runtime, *, loading: bool) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    # Unwrapped modules: the DDP wrapper would prefix local names with "module." (the
    # ShardedTensor keys, i.e. the checkpoint format, are the same either way).
    sd = {_model_key(i, len(policy)): _model_sharded_state(m.module) for i, m in enumerate(policy)}
    sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=loading)
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    sd["rng_state"] = ShardedObject("rng_state", rng, (runtime.world_size,), (runtime.rank,), replica_id=0)
    return sd


def _model_sharded_state(module) -> dict:
    """[LoRA] A model with adapters checkpoints only them (its base comes from model.load)."""
    from mcore_align.models.lora import adapter_sharded_state_dict, has_adapters

    return adapter_sharded_state_dict(module) if has_adapters(module) else module.sharded_state_dict()


def save_checkpoint(save: str | Path, step: int, policy, optimizer, scheduler, runtime, *,
                    extra: dict, sidecar_from: str | Path, save_total_limit: int | None = None) -> Path:
    """Write ``iter_{step}``, then (only when complete) move the ``latest`` marker."""
    from megatron.core import dist_checkpointing

    path = iter_dir(save, step)
    if runtime.rank == 0:
        if path.exists():  # leftovers of a crashed save of the same step
            shutil.rmtree(path)
        path.mkdir(parents=True)
    dist.barrier()
    sd = _sharded_state(policy, optimizer, runtime, loading=False)
    sd["scheduler"] = scheduler.state_dict()
    sd["world_size"] = runtime.world_size
    sd["extra"] = extra
    dist_checkpointing.save(sd, str(path))
    dist.barrier()
    if runtime.rank == 0:
        for name in SIDECAR:
            src = Path(sidecar_from) / name
            if src.is_dir():
                shutil.copytree(src, path / name)
            elif src.exists():
                shutil.copy2(src, path / name)
        tmp = Path(save) / (LATEST + ".tmp")
        tmp.write_text(str(step))
        os.replace(tmp, Path(save) / LATEST)
        _prune(Path(save), keep=save_total_limit, current=path)
    dist.barrier()
    log.info("saved checkpoint %s", path)
    return path


def _prune(save: Path, keep: int | None, current: Path) -> None:
    if not keep:
        return
    ckpts = sorted(p for p in save.glob("iter_*") if p.is_dir() and p != current)
    for old in ckpts[: max(0, len(ckpts) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str | Path, policy, optimizer, scheduler, runtime) -> dict:
    """Restore model, optimizer, scheduler and RNG; returns the ``extra`` dict saved with it."""
    from megatron.core import dist_checkpointing

    sd = _sharded_state(policy, optimizer, runtime, loading=True)
    common = dist_checkpointing.load_common_state_dict(str(path))
    same_world = common.get("world_size") == runtime.world_size
    if not same_world:  # per-rank RNG states only make sense on the same layout
        sd.pop("rng_state")
    loaded = dist_checkpointing.load(sd, str(path))
    from mcore_align.models.lora import has_adapters, load_adapter_state

    for i, m in enumerate(policy):
        if has_adapters(m.module):  # [LoRA] adapters only
            load_adapter_state(m.module, loaded[_model_key(i, len(policy))])
        else:
            m.module.load_state_dict(loaded[_model_key(i, len(policy))])
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    if same_world:
        rng = loaded["rng_state"]
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return loaded["extra"]
