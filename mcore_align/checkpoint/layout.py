"""The converted checkpoint directory: what is in it, how it is written, how it is found.

A converted (or training) checkpoint directory looks like::

    ckpt/
      metadata.json        megatron dist_checkpointing: {"sharded_backend": "torch_dist", ...}
      common.pt            megatron's non-sharded state (empty for a converted model)
      .metadata            torch.distributed.checkpoint index of every tensor shard
      __0_0.distcp ...     tensor data (global, layout-free: loads at any TP/PP/VPP)
      model_spec.json      {"model_spec": ModelSpec incl. the source config.json, "dtype": ...}
      tokenizer/           tokenizer files + generation_config.json, copied from the HF dir

A training save directory holds ``latest_checkpointed_iteration.txt`` and
``iter_0000010/``-style checkpoint directories; :func:`resolve_checkpoint_dir`
picks the latest. ``model_spec.json`` and ``tokenizer/`` are looked up in the
checkpoint directory first, then in its parent (the save directory).

:func:`check_complete` is called before any load: a missing or truncated ``.distcp``
(a copy cut short, a full disk) is reported by file name as an incomplete checkpoint
instead of a traceback from inside torch.distributed.checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import torch

from mcore_align.checkpoint.hf_files import CheckpointError
from mcore_align.models.spec import ModelSpec

SPEC_FILE = "model_spec.json"
TOKENIZER_DIR = "tokenizer"
LATEST_FILE = "latest_checkpointed_iteration.txt"
# Files copied from an HF directory into tokenizer/ (whichever exist).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
    "preprocessor_config.json", "processor_config.json",  # vision-language: the image processor
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"`` / ``"bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``; None stays None."""
    if name is None or isinstance(name, torch.dtype):
        if name is not None and name not in _DTYPE_NAMES:
            raise ValueError(f"dtype {name} not supported; choose from {sorted(DTYPES)}")
        return name
    by_name = {**DTYPES, **{v: k for k, v in _DTYPE_NAMES.items()}}
    if name not in by_name:
        raise ValueError(f"dtype {name!r} not supported; choose from {sorted(DTYPES)}")
    return by_name[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling HF's config.json uses)."""
    return _DTYPE_NAMES[dtype]


# -- model_spec.json ------------------------------------------------------------------
def write_model_spec(ckpt_dir: str | Path, spec: ModelSpec, dtype: torch.dtype) -> None:
    doc = {"model_spec": asdict(spec), "dtype": dtype_name(dtype)}
    (Path(ckpt_dir) / SPEC_FILE).write_text(json.dumps(doc, indent=1, sort_keys=True))


def _find_beside(ckpt_dir: Path, name: str) -> Path | None:
    for d in (ckpt_dir, ckpt_dir.parent):
        if (d / name).exists():
            return d / name
    return None


def _spec_doc(ckpt_dir: str | Path) -> dict:
    ckpt_dir = resolve_checkpoint_dir(ckpt_dir)
    p = _find_beside(ckpt_dir, SPEC_FILE)
    if p is None:
        raise FileNotFoundError(
            f"{ckpt_dir}: no {SPEC_FILE} here or in the parent directory; checkpoints made by "
            "tools/convert_hf_to_mcore.py or the trainer carry one"
        )
    return json.loads(p.read_text())


def read_model_spec(ckpt_dir: str | Path) -> ModelSpec:
    """The :class:`ModelSpec` recorded with a converted or training checkpoint."""
    return ModelSpec.from_dict(_spec_doc(ckpt_dir)["model_spec"])


def read_checkpoint_dtype(ckpt_dir: str | Path) -> torch.dtype:
    """The parameter dtype recorded in ``model_spec.json``."""
    return parse_dtype(_spec_doc(ckpt_dir)["dtype"])


def sidecar_paths(ckpt_dir: str | Path) -> dict[str, Path]:
    """``{"model_spec.json": path, "tokenizer": path}`` of a checkpoint (or of the latest
    one of a save directory), each looked up beside it then in its parent. Both are needed
    to resume or export; a missing one is a :class:`CheckpointError` naming the directory."""
    ckpt_dir = resolve_checkpoint_dir(ckpt_dir)
    found = {name: _find_beside(ckpt_dir, name) for name in (SPEC_FILE, TOKENIZER_DIR)}
    missing = [name for name, p in found.items() if p is None]
    if missing:
        raise CheckpointError(f"{ckpt_dir}: no {' / '.join(missing)} here or in the parent directory; a checkpoint "
                              "needs both to be resumed or exported (converted and training checkpoints carry them)")
    return found


def tokenizer_dir(ckpt_dir: str | Path) -> Path | None:
    return _find_beside(resolve_checkpoint_dir(ckpt_dir), TOKENIZER_DIR)


def copy_tokenizer(hf_dir: str | Path, ckpt_dir: str | Path) -> list[str]:
    """Copy tokenizer files (+ generation_config.json) of an HF dir to ``ckpt_dir/tokenizer``."""
    dst = Path(ckpt_dir) / TOKENIZER_DIR
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(hf_dir) / name).is_file():
            shutil.copy2(Path(hf_dir) / name, dst / name)
            copied.append(name)
    return copied


def write_checkpoint_extras(ckpt_dir: str | Path, spec: ModelSpec, dtype: torch.dtype,
                            tokenizer_src: str | Path) -> None:
    """``model_spec.json`` + ``tokenizer/`` beside a checkpoint, so that export needs no other
    input (the trainer writes the same files from memory, see trainer/checkpointing.Sidecar;
    this is for checkpoints assembled by hand or in tests).

    ``tokenizer_src`` is an HF directory or a converted checkpoint (its ``tokenizer/``).
    """
    write_model_spec(ckpt_dir, spec, dtype)
    src = Path(tokenizer_src)
    copy_tokenizer(src / TOKENIZER_DIR if (src / TOKENIZER_DIR).is_dir() else src, ckpt_dir)


# -- locating a checkpoint --------------------------------------------------------------
def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint directory, or the latest ``iter_*`` of a training save directory."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: checkpoint directory does not exist")
    if (p / "metadata.json").exists():
        return p
    if (p / LATEST_FILE).exists():
        it = (p / LATEST_FILE).read_text().strip()
        if not it.isdigit():
            raise CheckpointError(f"{p / LATEST_FILE}: expected an iteration number, found {it[:40]!r} "
                                  "(corrupt marker)")
        sub = p / f"iter_{int(it):07d}"
        if not (sub / "metadata.json").exists():
            raise FileNotFoundError(f"{p / LATEST_FILE} names iteration {it!r} but {sub} is not a checkpoint")
        return sub
    raise FileNotFoundError(
        f"{p}: not a megatron dist checkpoint (no metadata.json) nor a training save directory "
        f"(no {LATEST_FILE})"
    )


def check_complete(ckpt_dir: str | Path) -> Path:
    """Raise :class:`CheckpointError` naming the file if a dist checkpoint is incomplete.

    torch_dist's ``.metadata`` records, for every stored item, the ``.distcp`` file and
    the byte range (offset, length) it occupies; each file must exist and be at least as
    long as the furthest range in it. Cheap: reads the index and stats the files.
    Returns the checkpoint directory.
    """
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(ckpt_dir)
    for name in ("metadata.json", ".metadata"):
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing; the checkpoint {path} is incomplete")
    try:
        storage = FileSystemReader(str(path)).read_metadata().storage_data
    except Exception as e:  # noqa: BLE001 - a torn pickle can raise anything
        raise CheckpointError(f"{path / '.metadata'}: unreadable ({type(e).__name__}: {e}); "
                              f"the checkpoint {path} is incomplete or corrupt") from e
    # The non-sharded state: common.pt (megatron-core <= 0.16), or a "common_state" item in
    # the torch_dist index (0.17+ write no common.pt; their loader reads either).
    if not (path / "common.pt").is_file() and not any(k.fqn.startswith("common_state") for k in storage):
        raise CheckpointError(f"{path / 'common.pt'}: missing; the checkpoint {path} is incomplete")
    need: dict[str, int] = {}  # file -> bytes the index says it holds
    for info in storage.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing; the checkpoint {path} is incomplete")
        if f.stat().st_size < size:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, the index (.metadata) needs {size}; "
                                  f"the checkpoint {path} is incomplete (truncated file)")
    return path


# -- atomic output ------------------------------------------------------------------------
def check_output_dir(out_dir: str | Path, overwrite: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out}: output directory exists and is not empty; pass --overwrite to replace it")
    return out


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling of ``out_dir``; rename it to ``out_dir`` only on success.

    An interrupted or failed write leaves at most a ``.<name>.tmp-*`` sibling, never a
    directory at ``out_dir`` that looks complete.
    """
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        # Move the old directory aside first, so that at no moment is there a partial one.
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


# -- a process of one for the offline tools ---------------------------------------------
def init_single_process():
    """Megatron at TP=1/PP=1 in a world of one, CPU mode (the offline tools run here)."""
    import torch.distributed as dist

    from mcore_align.parallel.runtime import ParallelConfig, initialize

    if dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError(
            "checkpoint conversion runs in a single process (world size 1); "
            f"this process is one of {dist.get_world_size()} ranks"
        )
    return initialize(ParallelConfig(), device="cpu")


def run_tool(main) -> int:
    """``main()`` of an offline tool, then the process group (if one was started) torn down
    before the interpreter exits: gloo's threads joined while the runtime is whole, not at
    static destruction (where an exiting export was once seen to abort: "terminate called
    without an active exception", exit -6)."""
    import torch.distributed as dist

    try:
        return main()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
