"""Megatron-core dist checkpoint (any layout it was saved at) -> HF safetensors, streaming.

The checkpoint's tensors are global (layout-free), so export asks for them at the
TP=1/PP=1 layout: the meta model's ``sharded_state_dict()`` says under which keys
and slices each parameter is stored, and ``dist_checkpointing.load`` fills real
buffers for one layer at a time. The adapter splits each parameter into HF tensors,
which go to safetensors shards as they fill. Peak memory: one layer + one shard.

Extra heads
-----------
Tensors that are not part of the causal LM (a reward model's value head, hidden -> 1)
are exported to their own safetensors file by a registry of :class:`ExtraHead`
records: for each registered head whose checkpoint key is in the checkpoint, the
exporter loads the whole tensor and writes it to ``head.file`` under
``head.hf_name``. ``value_head.weight`` -> ``value_head.safetensors`` is registered
here; a head that a checkpoint does not hold is skipped (and listed in the log).
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from mcore_align.checkpoint.hf_files import ShardedSafetensorsWriter, parse_size
from mcore_align.checkpoint.hf_to_mcore import _param_of, _Slice, build_meta_model, checkpoint_tensors
from mcore_align.checkpoint.layout import (
    atomic_output_dir,
    check_complete,
    dtype_name,
    parse_dtype,
    read_model_spec,
    resolve_checkpoint_dir,
    tokenizer_dir,
)
from mcore_align.models.adapter import adapter_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtraHead:
    """A tensor exported beside the LM weights, into a file of its own."""

    ckpt_key: str
    """Key of the (global) tensor in the megatron checkpoint, e.g. ``value_head.weight``."""
    file: str
    """Output safetensors file name, e.g. ``value_head.safetensors``."""
    hf_name: str
    """Tensor name inside that file."""
    replaces: str | None = None
    """Prefix of the megatron names this head stands in for (not exported when the head is
    present), e.g. ``output_layer.``: a value head replaces the vocabulary projection."""


EXTRA_HEADS: dict[str, ExtraHead] = {}


def register_extra_head(head: ExtraHead) -> ExtraHead:
    assert head.ckpt_key not in EXTRA_HEADS, f"extra head {head.ckpt_key} registered twice"
    EXTRA_HEADS[head.ckpt_key] = head
    return head


# Reward model value head [1, hidden] (written by the RM trainer under this key).
register_extra_head(ExtraHead("value_head.weight", "value_head.safetensors", "value_head.weight",
                               replaces="output_layer."))


def _layer_groups(names: list[str]) -> list[list[str]]:
    """Parameter names grouped per transformer layer, in model order (others alone)."""
    groups: list[list[str]] = []
    current = None
    for n in names:
        m = re.match(r"decoder\.layers\.(\d+)\.", n)
        key = m.group(1) if m else n
        if key != current:
            groups.append([])
            current = key
        groups[-1].append(n)
    return groups


def _param_requests(model) -> dict[str, list]:
    """Parameter name -> the checkpoint slices it is made of, as (ShardedTensor, slice) pairs.

    Same geometry as the converter: after ``apply_factories`` each ShardedTensor's
    meta ``data`` is the parameter or a view of it (gate / up of ``linear_fc1``).
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
    from megatron.core.dist_checkpointing.strategies.torch import flatten_state_dict

    params = checkpoint_tensors(model)
    ssd = model.sharded_state_dict()
    apply_factories(ssd)
    out: dict[str, list] = {}
    for path, sh in flatten_state_dict(ssd)[0].items():
        if isinstance(sh, ShardedTensor):
            name = _param_of(path, params)
            out.setdefault(name, []).append((sh, _Slice.of(sh.data)))
    return out


def _load_request(name: str, pieces: list, buf: torch.Tensor) -> dict:
    """ShardedTensors whose data are views into ``buf`` (the full parameter), one per piece.

    The layer axis that megatron prepends is made an ordinary axis of size 1
    (``prepend_axis_num=0``): torch's ShardedTensor translation of prepended axes
    assumes every shard of a global tensor is requested, and we ask for one layer.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    req = {}
    for i, (sh, sl) in enumerate(pieces):
        local = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
        view = buf.as_strided(sl.size, sl.stride, sl.storage_offset).view(local)
        req[f"{name}.{i}"] = ShardedTensor(
            key=sh.key, data=view, dtype=buf.dtype, local_shape=local, global_shape=tuple(sh.global_shape),
            global_offset=tuple(sh.global_offset),
            axis_fragmentations=tuple(g // l for g, l in zip(sh.global_shape, local)),
            replica_id=0, prepend_axis_num=0,
        )
    return req


def _stored_metadata(path: Path):
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(path)).read_metadata().state_dict_metadata


def _export_extra_heads(path: Path, out: Path, stored: dict, dtype: torch.dtype | None) -> list[str]:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from safetensors.torch import save_file

    written = []
    for head in EXTRA_HEADS.values():
        md = stored.get(head.ckpt_key)
        if md is None:
            log.info("extra head %s not in checkpoint; not exported", head.ckpt_key)
            continue
        buf = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        req = {head.ckpt_key: ShardedTensor.from_rank_offsets(head.ckpt_key, buf, replica_id=0)}
        t = dist_checkpointing.load(req, str(path))[head.ckpt_key]
        save_file({head.hf_name: t.to(dtype or t.dtype).contiguous()}, out / head.file, metadata={"format": "pt"})
        written.append(head.file)
    return written


def convert_mcore_to_hf(ckpt_dir: str | Path, out_dir: str | Path, dtype: str | torch.dtype | None = None,
                        max_shard_size: str | int = "5GB", overwrite: bool = False) -> Path:
    """Export a converted or training checkpoint (or the latest one of a save dir) to HF.

    ``dtype`` None keeps the dtype the checkpoint stores the model in. Writes
    safetensors (sharded with ``model.safetensors.index.json`` above
    ``max_shard_size``), ``config.json``, tokenizer files, ``generation_config.json``
    and any registered extra heads. Output is atomic (see ``layout.atomic_output_dir``).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    path = check_complete(resolve_checkpoint_dir(ckpt_dir))  # incomplete: CheckpointError naming the file
    spec = read_model_spec(path)
    adapter = adapter_for(spec)
    model = build_meta_model(spec)
    meta = checkpoint_tensors(model)
    # Buffers (the router's expert_bias) stay in the dtype they are stored in: fp32, as HF keeps
    # DeepSeek-V3's e_score_correction_bias in any model dtype.
    keep_dtype = set(meta) - {n for n, _ in model.named_parameters()}
    pieces = _param_requests(model)
    stored = _stored_metadata(path)
    names = adapter.mcore_names()
    for head in EXTRA_HEADS.values():  # e.g. a value head instead of the LM head: backbone + head file
        if head.replaces and head.ckpt_key in stored:
            names = [n for n in names if not n.startswith(head.replaces)]
    missing = sorted({sh.key for n in names for sh, _ in pieces[n]} - set(stored))
    if missing:
        raise KeyError(f"{path}: checkpoint lacks model tensors {missing}")
    out_dtype = parse_dtype(dtype) or stored[pieces[names[0]][0][0].key].properties.dtype

    with atomic_output_dir(out_dir, overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, parse_size(max_shard_size))
        for group in _layer_groups(names):
            bufs = {n: torch.empty(meta[n].shape, dtype=stored[pieces[n][0][0].key].properties.dtype)
                    for n in group}
            request = {k: v for n in group for k, v in _load_request(n, pieces[n], bufs[n]).items()}
            # A partial request (one layer of layer-stacked tensors): skip megatron's check
            # that the request covers every shard of each global tensor. Data is read
            # in place into the views, i.e. into bufs.
            dist_checkpointing.load(request, str(path), validate_access_integrity=False,
                                    strict=StrictHandling.RAISE_UNEXPECTED)
            for n in group:
                for hf_name, t in adapter.to_hf(n, bufs[n]).items():
                    writer.add(hf_name, t if n in keep_dtype else t.to(out_dtype))
            del bufs, request
        writer.finish()
        _export_extra_heads(path, tmp, stored, parse_dtype(dtype))
        _write_hf_config(tmp, spec.hf_config, out_dtype)
        tok = tokenizer_dir(path)
        if tok is None:
            log.warning("%s: no tokenizer/ directory beside the checkpoint; exporting weights and config only", path)
        else:
            for f in tok.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        if not (tmp / "generation_config.json").exists():
            _write_generation_config(tmp)
    log.info("exported %s -> %s (%s)", path, out_dir, out_dtype)
    return Path(out_dir)


def _write_generation_config(out: Path) -> None:
    """The source had no generation_config.json: derive transformers' default from config.json
    (bos / eos / pad token ids), as ``save_pretrained`` would."""
    from transformers import AutoConfig, GenerationConfig

    GenerationConfig.from_model_config(AutoConfig.from_pretrained(out)).save_pretrained(out)


def _write_hf_config(out: Path, hf_config: dict, dtype: torch.dtype) -> None:
    cfg = dict(hf_config)
    cfg["dtype"] = dtype_name(dtype)  # transformers >= 5 spelling
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = dtype_name(dtype)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
