"""Training checkpoints with megatron ``dist_checkpointing`` (torch_dist format).

Layout of ``save``::

    save/
      iter_0000010/                     one complete checkpoint (any TP/PP/DP can load it)
        metadata.json, common.pt, *.distcp    model, optimizer, scheduler, data position, RNG
        model_spec.json, tokenizer/       so export and later runs need nothing else
      latest_checkpointed_iteration.txt  written last, atomically (tmp + rename)

A crash mid-save leaves a partial ``iter_*`` directory that the marker does not
point to: the previous checkpoint stays the one that is resumed.

Rules that keep every checkpoint usable:

* Every ``iter_*`` is self-contained. ``model_spec.json`` and ``tokenizer/`` are read
  into memory once at start (:class:`Sidecar`, from ``model.load`` or the resumed
  checkpoint) and written into each checkpoint, so pruning (``save_total_limit``)
  can never remove their source. A missing one is an error, never skipped.
* The marker's target is never deleted or rewritten: saving the step it already
  names (a finished run relaunched) keeps the existing checkpoint; pruning keeps it.
* ``iter_*`` directories without a marker are refused (:func:`latest_checkpoint`):
  starting from step 0 would overwrite them and repeat steps in ``metrics.jsonl``.
* Resuming keeps the checkpoint's step count but takes the LR schedule from the
  current config (megatron's ``override_opt_param_scheduler``, as Megatron-LM's
  ``--override-opt_param-scheduler``): relaunching with a larger ``train_iters``
  stretches the decay over the new length instead of running the extra steps at
  ``min_lr``. Every changed schedule value is logged.
* Per-rank RNG states are restored only at the world size they were saved at;
  otherwise a warning says they were not.
* Objective state (DPO ``bco_pair``'s running mean) is taken from the last
  pipeline stage, the only one that computes it, before rank 0 saves it.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mcore_align.checkpoint.hf_files import CheckpointError
from mcore_align.checkpoint.layout import TOKENIZER_DIR, check_complete, sidecar_paths

log = logging.getLogger(__name__)

LATEST = "latest_checkpointed_iteration.txt"


def iter_dir(save: str | Path, step: int) -> Path:
    return Path(save) / f"iter_{step:07d}"


def latest_checkpoint(save: str | Path | None) -> Path | None:
    """The complete checkpoint the marker points to, or None (empty or new save directory).

    Refuses a corrupt marker and a save directory that holds ``iter_*`` directories but
    no marker (see the module docstring), naming the paths.
    """
    if save is None:
        return None
    marker = Path(save) / LATEST
    if not marker.exists():
        found = sorted(p for p in Path(save).glob("iter_*") if p.is_dir())
        if found:
            complete = [p.name for p in found if (p / "metadata.json").exists()]
            raise CheckpointError(
                f"{save}: holds {', '.join(p.name for p in found)} but no {LATEST}; refusing to start again "
                f"from step 0 over them. Complete ones: {complete or 'none'}. To resume from one, write its "
                f"step number into {marker}; to start over, choose another train.save or remove them"
            )
        return None
    text = marker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{marker}: expected the step number of the latest checkpoint, found {text[:40]!r} "
                              "(corrupt marker); write the step of a complete iter_* directory into it")
    step = int(text)
    path = iter_dir(save, step)
    if not (path / "metadata.json").exists():
        raise FileNotFoundError(f"{marker} points to step {step} but {path} is not a complete checkpoint")
    return check_complete(path)


def marker_step(save: str | Path) -> int | None:
    """The step the latest marker names, or None without one."""
    marker = Path(save) / LATEST
    text = marker.read_text().strip() if marker.exists() else ""
    return int(text) if text.isdigit() else None


@dataclass
class Sidecar:
    """``model_spec.json`` and ``tokenizer/`` held in memory (relative path -> bytes),
    written into every checkpoint. Only the rank that writes (rank 0) keeps the bytes."""

    files: dict[str, bytes]

    @classmethod
    def read(cls, source: str | Path, keep: bool = True) -> "Sidecar":
        paths = sidecar_paths(source)  # CheckpointError if one is missing, on every rank
        files: dict[str, bytes] = {}
        for name, p in paths.items():
            if p.is_dir():
                for f in sorted(p.rglob("*")):
                    if f.is_file():
                        files[f"{name}/{f.relative_to(p).as_posix()}"] = f.read_bytes() if keep else b""
            else:
                files[name] = p.read_bytes() if keep else b""
        if not any(k.startswith(f"{TOKENIZER_DIR}/") for k in files):
            raise CheckpointError(f"{paths[TOKENIZER_DIR]}: empty tokenizer directory")
        return cls(files)

    def write(self, ckpt_dir: Path) -> None:
        for rel, data in self.files.items():
            (ckpt_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (ckpt_dir / rel).write_bytes(data)


def last_stage_state(state: dict, runtime) -> dict:
    """``state`` as the last pipeline stage of this rank's pipeline has it.

    Objective state (bco_pair's running mean) is updated where the loss is computed, on
    the last stage; rank 0, which writes the checkpoint's common state, is a first stage.
    """
    pp = runtime.pgs.pp
    if pp.size() == 1:
        return state
    obj = [state]
    dist.broadcast_object_list(obj, src=dist.get_global_rank(pp, pp.size() - 1), group=pp)
    return obj[0]


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def _sharded_state(policy, optimizer, runtime, *, loading: bool, companions: dict | None = None) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding

    # Unwrapped modules: the DDP wrapper would prefix local names with "module." (the
    # ShardedTensor keys, i.e. the checkpoint format, are the same either way).
    sd = {_model_key(i, len(policy)): _model_sharded_state(m.module) for i, m in enumerate(policy)}
    sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=loading)
    # Models trained beside the policy (PPO's critic): the same architecture, so their tensor
    # keys get a "<name>." prefix in the checkpoint.
    for name, (chunks, opt, _) in (companions or {}).items():
        msd = {}
        for i, m in enumerate(chunks):
            part = m.module.sharded_state_dict()
            replace_prefix_for_sharding(part, "", f"{name}.")
            msd[_model_key(i, len(chunks))] = part
        sd[f"{name}_models"] = msd
        sd[f"{name}_optimizer"] = opt.sharded_state_dict(msd, is_loading=loading)
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    sd["rng_state"] = ShardedObject("rng_state", rng, (runtime.world_size,), (runtime.rank,), replica_id=0)
    return sd


def _model_sharded_state(module) -> dict:
    """A model with adapters checkpoints only them (its base comes from model.load)."""
    from mcore_align.models.lora import adapter_sharded_state_dict, has_adapters

    return adapter_sharded_state_dict(module) if has_adapters(module) else module.sharded_state_dict()


def save_checkpoint(save: str | Path, step: int, policy, optimizer, scheduler, runtime, *,
                    extra: dict, sidecar: Sidecar, save_total_limit: int | None = None,
                    companions: dict | None = None) -> Path:
    """Write ``iter_{step}``, then (only when complete) move the ``latest`` marker.

    If the marker already names ``step`` (a finished run relaunched) that checkpoint is
    kept as it is: it is complete, and deleting it first would lose it on a crash.
    """
    from megatron.core import dist_checkpointing

    path = iter_dir(save, step)
    if marker_step(save) == step:  # every rank reads the same file (barrier after the last save)
        log.warning("step %d is already saved (%s is the latest checkpoint); not rewritten", step, path)
        return path
    if runtime.rank == 0:
        if path.exists():  # leftovers of a crashed save of the same step (never the marker's target)
            shutil.rmtree(path)
        path.mkdir(parents=True)
    dist.barrier()
    sd = _sharded_state(policy, optimizer, runtime, loading=False, companions=companions)
    sd["scheduler"] = scheduler.state_dict()
    for name, (_, _, sched) in (companions or {}).items():
        sd[f"{name}_scheduler"] = sched.state_dict()
    sd["world_size"] = runtime.world_size
    sd["extra"] = extra
    dist_checkpointing.save(sd, str(path))
    dist.barrier()
    if runtime.rank == 0:
        sidecar.write(path)
        tmp = Path(save) / (LATEST + ".tmp")
        tmp.write_text(str(step))
        os.replace(tmp, Path(save) / LATEST)
        _prune(Path(save), keep=save_total_limit, current=path)
    dist.barrier()
    log.info("saved checkpoint %s", path)
    return path


def _prune(save: Path, keep: int | None, current: Path) -> None:
    """Keep the newest ``keep`` checkpoints; ``current`` (the marker's target) always stays."""
    if not keep:
        return
    ckpts = sorted(p for p in save.glob("iter_*") if p.is_dir() and p != current)
    for old in ckpts[: max(0, len(ckpts) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str | Path, policy, optimizer, scheduler, runtime, companions: dict | None = None) -> dict:
    """Restore model, optimizer, scheduler and RNG (and those of ``companions``: name ->
    (chunks, optimizer, scheduler)); returns the ``extra`` dict saved with it."""
    from megatron.core import dist_checkpointing

    check_complete(path)  # a missing or truncated file: CheckpointError naming it
    sd = _sharded_state(policy, optimizer, runtime, loading=True, companions=companions)
    common = dist_checkpointing.load_common_state_dict(str(path))
    same_world = common.get("world_size") == runtime.world_size
    if not same_world:  # per-rank RNG states only make sense on the same layout
        sd.pop("rng_state")
        if runtime.rank == 0:
            log.warning("%s was saved by %s ranks, this run has %d: per-rank RNG states are not restored "
                        "(dropout and other random draws differ from an uninterrupted run)",
                        path, common.get("world_size"), runtime.world_size)
    keep_optimizer = _optimizer_layout_matches(sd["optimizer"], path, runtime)
    if not keep_optimizer:
        sd.pop("optimizer")
    loaded = dist_checkpointing.load(sd, str(path))
    from mcore_align.models.lora import has_adapters, load_adapter_state

    for i, m in enumerate(policy):
        if has_adapters(m.module):  # adapters only
            load_adapter_state(m.module, loaded[_model_key(i, len(policy))])
        else:
            m.module.load_state_dict(loaded[_model_key(i, len(policy))])
    if keep_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
    else:  # sharded_state_dict(is_loading=True) pre-filled moments without "step": a fresh Adam
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            opt.optimizer.state.clear()
    _load_scheduler(scheduler, loaded["scheduler"], path, runtime)
    for name, (chunks, opt, sched) in (companions or {}).items():
        if f"{name}_scheduler" not in common:
            raise CheckpointError(f"{path} holds no {name} (it was saved by a run without one)")
        for i, m in enumerate(chunks):
            m.module.load_state_dict(loaded[f"{name}_models"][_model_key(i, len(chunks))])
        opt.load_state_dict(loaded[f"{name}_optimizer"])
        _load_scheduler(sched, loaded[f"{name}_scheduler"], path, runtime)
    if same_world:
        rng = loaded["rng_state"]
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return loaded["extra"]


def _optimizer_layout_matches(opt_sd: dict, path, runtime) -> bool:
    """Whether every optimizer tensor this run asks for is in the checkpoint.

    megatron's (non-distributed) optimizer of a MoE model is a ChainedOptimizer at EP > 1
    (dense params, then expert params: tensor keys ``chained_0.optimizer.state.exp_avg.<param>``,
    ``chained_1...``) and a single optimizer at EP = 1 (``optimizer.state.exp_avg.<param>``), and
    the two state dicts also differ in their param-group structure. A checkpoint saved at one
    of these layouts therefore cannot fill the other's optimizer: the weights (experts stored
    by global index), LR-schedule step, data position and objective state are restored, and
    Adam's moments and step counts restart from zero (logged). Layouts whose optimizer is
    built the same way (EP=2 <-> EP=4, any TP/DP with the same chaining) restore everything.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    saved = set(dist_checkpointing.load_tensors_metadata(str(path)).keys())
    wanted = {v.key for v in nested_values(opt_sd) if isinstance(v, ShardedBase)}
    missing = sorted(k for k in wanted if k not in saved)
    if not missing:
        return True

    def unchained(key: str) -> str:  # "chained_1.optimizer.state.exp_avg.x" -> "optimizer.state.exp_avg.x"
        return re.sub(r"^chained_\d+\.", "", key)

    if not {unchained(k) for k in missing} <= {unchained(k) for k in saved}:
        return True  # not a chaining difference: let dist_checkpointing.load name the missing tensor
    if runtime.rank == 0:
        log.warning("%s: its optimizer state was saved at another expert layout (this run asks for %s, "
                    "the checkpoint has %s): the optimizer state is NOT restored -- Adam moments and step "
                    "counts restart from zero; weights, LR-schedule step, data position and objective "
                    "state are restored", path, missing[0],
                    next((k for k in sorted(saved) if "optimizer.state" in k), "no optimizer tensors"))
    return False


def _load_scheduler(scheduler, saved: dict, path, runtime) -> None:
    """The step count from the checkpoint, the schedule from the current config.

    The scheduler is built with ``override_opt_param_scheduler`` (trainer/setup.py), so
    megatron keeps its own (config) values and only advances ``num_steps``; each value
    that differs from the checkpoint's is logged. Example: saved with train_iters=100
    (lr_decay_steps=100) and relaunched with train_iters=200: the decay now ends at 200,
    and step 101 runs at the LR a 200-step run has at step 101, not at min_lr.
    """
    assert scheduler.override_opt_param_scheduler, "build the scheduler with override_opt_param_scheduler=True"
    ours = scheduler.state_dict()
    changed = {k: (saved[k], v) for k, v in ours.items() if k != "num_steps" and k in saved and saved[k] != v}
    scheduler.load_state_dict(saved)
    if changed and runtime.rank == 0:
        log.warning("%s: LR schedule rebuilt from the current config at step %d (checkpoint -> now: %s); "
                    "lr is now %.3g", path, scheduler.num_steps,
                    ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()),
                    scheduler.optimizer.param_groups[0]["lr"])
