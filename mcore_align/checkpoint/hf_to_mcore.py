"""HF safetensors -> megatron-core distributed checkpoint, streaming, in one CPU process.

How it stays memory-bounded (peak ~ a few times the largest tensor, never the model):

1. The unsharded model (TP=1, PP=1) is built on the ``meta`` device: shapes, no memory.
2. Its ``sharded_state_dict()`` says how megatron stores every parameter (layer-stacked
   global keys, gate/up split of ``linear_fc1`` by a factory, ...). After
   ``apply_factories`` each ShardedTensor's ``data`` is the meta parameter or a meta
   *view* of it; its size / stride / storage_offset say which slice of the real
   parameter it is, so ``real.as_strided(size, stride, offset)`` cuts the same slice.
3. The dict goes through megatron's own ``dist_checkpointing.save`` (common state,
   sharding validation, ``metadata.json`` are exactly megatron's) with a sharded
   strategy of ours. It writes with torch.distributed.checkpoint like megatron's
   ``TorchDistSaveShardedStrategy`` (same key grouping, same translation to torch
   sharded tensors, a subclass of its planner), but the planner's ``resolve_data``
   builds each tensor only when the writer asks for it: read the HF tensors from
   safetensors, fuse with the adapter, cast, slice. torch's serial loader resolves
   items one at a time.
4. torch's writer keeps every tensor of a file alive until the file is closed, so
   our writer starts a new file whenever the next item would make the current one
   larger than the largest single item: at most ~2 items' worth is held.
"""
from __future__ import annotations

import logging
import queue
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from mcore_align.checkpoint.hf_files import CheckpointError, HFSafetensors, SlicedTensorsView
from mcore_align.checkpoint.layout import (
    atomic_output_dir,
    copy_tokenizer,
    init_single_process,
    parse_dtype,
    write_model_spec,
)
from mcore_align.models.adapter import adapter_for
from mcore_align.models.families import spec_from_hf_config
from mcore_align.models.spec import ModelSpec, read_hf_config
from mcore_align.models.vision import bind_checkpoint_names

log = logging.getLogger(__name__)


def build_meta_model(spec: ModelSpec, dtype: torch.dtype = torch.float32):
    """The TP=1/PP=1 GPTModel on the meta device (no memory), in a world of one."""
    from mcore_align.models.provider import ModelOptions, build_model

    runtime = init_single_process()
    with torch.device("meta"):
        (model,) = build_model(spec, runtime, role="reference",
                               opts=ModelOptions(params_dtype=dtype, core_attention="megatron"))
    return model


def checkpoint_tensors(model) -> dict[str, torch.Tensor]:
    """What conversion writes and export reads: the parameters and the persistent buffers
    megatron checkpoints with them (the router's ``expert_bias`` of sigmoid routing)."""
    tensors = dict(model.named_parameters())
    persistent = set(model.state_dict(keep_vars=True))
    tensors.update({n: b for n, b in model.named_buffers() if n in persistent})
    return tensors


def expected_hf_shapes(spec: ModelSpec, meta_params: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, derived by splitting the meta parameters with the adapter."""
    adapter = adapter_for(spec)
    names = set(adapter.mcore_names())
    assert names == set(meta_params), (
        f"adapter and model disagree: only adapter {sorted(names - set(meta_params))}, "
        f"only model {sorted(set(meta_params) - names)}"
    )
    return {h: tuple(t.shape) for n in adapter.mcore_names() for h, t in adapter.to_hf(n, meta_params[n]).items()}


# -- which slice of which parameter each checkpoint item is ---------------------------------
@dataclass(frozen=True)
class _Slice:
    param: str
    size: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int

    @classmethod
    def of(cls, view: torch.Tensor, param: str = "") -> "_Slice":
        return cls(param, tuple(view.shape), tuple(view.stride()), view.storage_offset())


def _param_of(path: str, params: dict[str, torch.Tensor]) -> str:
    """Flattened state-dict path -> parameter name (factories append ``.0``, ``.1``, ...)."""
    p = path
    while p not in params:
        head, _, tail = p.rpartition(".")
        assert head and tail.isdigit(), f"cannot map sharded state dict entry {path!r} to a parameter"
        p = head
    return p


def _slices_by_item(flat_by_key: dict, rename_mapping: dict, params: dict) -> dict[tuple, _Slice]:
    """(checkpoint key, global offset) -> the parameter slice stored there."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    out = {}
    for key, sh_list in flat_by_key.items():
        for sh, path in zip(sh_list, rename_mapping[key]):
            if not isinstance(sh, ShardedTensor):
                continue
            name = _param_of(path, params)
            d = sh.data  # the meta parameter or a meta view of it
            assert d.numel() <= params[name].numel(), path
            out[(key, tuple(sh.global_offset))] = _Slice.of(d, name)
    return out


class _OneParamCache:
    """Computes a full parameter on demand and keeps only the last one.

    The gate and up halves of ``linear_fc1`` are two checkpoint items of the same
    parameter, written one after the other: the cache saves a second read.
    """

    def __init__(self, compute: Callable[[str], torch.Tensor], meta_params: dict[str, torch.Tensor]):
        self.compute = compute
        self.meta = meta_params
        self.name: str | None = None
        self.value: torch.Tensor | None = None

    def get(self, name: str) -> torch.Tensor:
        if name != self.name:
            self.name, self.value = None, None  # free the previous one before computing
            t = self.compute(name)
            m = self.meta[name]
            if tuple(t.shape) != tuple(m.shape):
                raise CheckpointError(f"parameter {name!r}: built shape {list(t.shape)}, model expects {list(m.shape)}")
            # The model's own dtype for this parameter: megatron keeps some in fp32 even in
            # a bf16 model (the torch RMSNorm weights), and saves them so.
            self.name, self.value = name, t.to(m.dtype).contiguous()
        return self.value


# -- torch.distributed.checkpoint pieces --------------------------------------------------
def _lazy_planner_cls():
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner
    from torch.distributed.checkpoint.planner import WriteItemType

    class LazySavePlanner(MCoreSavePlanner):
        """megatron's planner whose tensors are built when the writer asks for them."""

        def __init__(self, slices: dict[tuple, _Slice], params: _OneParamCache):
            super().__init__(dedup_replicated_tensors=False, flatten_state_dict=False)
            self.slices = slices
            self.params = params

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            sl = self.slices[(write_item.index.fqn, tuple(write_item.index.offset))]
            full = self.params.get(sl.param)
            part = full.as_strided(sl.size, sl.stride, sl.storage_offset)
            # (1,)*prepend_axis_num + local shape, the chunk shape the writer records.
            part = part.reshape(write_item.tensor_data.chunk.sizes)
            # Own storage: the writer holds items until their file is closed, and a
            # view would keep the whole parameter alive with it.
            return part if part.untyped_storage().nbytes() == part.nbytes else part.clone()

    return LazySavePlanner


def _bounded_writer_cls():
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _item_size
    from torch.distributed.checkpoint.planner import WriteItemType

    class BoundedFileWriter(FileSystemWriter):
        """One thread; files cut so that none holds more than the largest item plus one.

        torch's ``_write_files_from_queue`` keeps every tensor of a file referenced
        until the file is done, so file size bounds the memory held.
        """

        def __init__(self, path):
            super().__init__(path, single_file_per_rank=True, thread_count=1, sync_files=False)

        def write_data(self, plan, planner):
            tensors = [wi for wi in plan.items if wi.type != WriteItemType.BYTE_IO]
            limit = max((_item_size(wi) for wi in tensors), default=0)
            buckets: list[list] = [[wi for wi in plan.items if wi.type == WriteItemType.BYTE_IO]]
            size = 0
            for wi in tensors:
                n = _item_size(wi)
                if buckets[-1] and size + n > limit:
                    buckets.append([])
                    size = 0
                buckets[-1].append(wi)
                size += n
            file_queue: queue.Queue = queue.Queue()
            for i, bucket in enumerate(b for b in buckets if b):
                name = f"{plan.storage_data.prefix}{i}{DEFAULT_SUFFIX}"
                file_queue.put((self.fs.concat_path(self.path, name), name, bucket))
            return self._write_data(planner, file_queue)

    return BoundedFileWriter


def _streaming_strategy(params: _OneParamCache, meta_params: dict[str, torch.Tensor]):
    try:  # megatron-core <= 0.16: strategies derive from an abstract base
        from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
    except ImportError:  # 0.17+: no base module, and save() swaps any strategy that is not a
        # TorchDistSaveShardedStrategy for the default one, so derive from that (same init args)
        from megatron.core.dist_checkpointing.strategies.torch import \
            TorchDistSaveShardedStrategy as SaveShardedStrategy
    from megatron.core.dist_checkpointing.strategies.torch import (
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.api import CheckpointException

    class StreamingSaveStrategy(SaveShardedStrategy):
        """``torch_dist`` v1, the format of megatron's default strategy, written lazily."""

        def __init__(self):
            super().__init__("torch_dist", 1)

        @property
        def can_handle_sharded_objects(self):
            return True

        def save(self, sharded_state_dict, checkpoint_dir):
            by_key, _, rename = _replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, keep_only_main_replica=True)
            # Read the slice geometry now: the translation below makes data contiguous.
            slices = _slices_by_item(by_key, rename, meta_params)
            pyt_state_dict = mcore_to_pyt_state_dict(by_key, False)
            try:
                dcp_save(pyt_state_dict, storage_writer=_bounded_writer_cls()(checkpoint_dir),
                         planner=_lazy_planner_cls()(slices, params))
            except CheckpointException as e:
                # torch wraps what our resolver raised (e.g. a CheckpointError naming a
                # file); re-raise the original so the user sees its message.
                wrapped = next(iter(e.failures.values()), None)  # (exception, traceback summary)
                if isinstance(wrapped, tuple) and isinstance(wrapped[0], Exception):
                    raise wrapped[0] from e
                raise

    return StreamingSaveStrategy()


def save_streaming(model, compute_param: Callable[[str], torch.Tensor], out_dir: str | Path) -> None:
    """Write ``model``'s (meta) sharded state dict to ``out_dir``, each parameter built by
    ``compute_param(name)`` when it is written. ``out_dir`` must exist."""
    from megatron.core import dist_checkpointing

    meta_params = checkpoint_tensors(model)
    cache = _OneParamCache(compute_param, meta_params)
    dist_checkpointing.save(model.sharded_state_dict(), str(out_dir),
                            sharded_strategy=_streaming_strategy(cache, meta_params))


def convert_hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, dtype: str | torch.dtype | None = None,
                        overwrite: bool = False) -> Path:
    """Convert an HF checkpoint directory into a megatron-core dist checkpoint at ``out_dir``.

    ``dtype``: ``"bf16"``, ``"fp16"``, ``"fp32"`` (or a torch dtype); None keeps the
    dtype the safetensors hold. Raises ``ValueError`` (``CheckpointError``) naming the
    file or tensor for malformed input and ``FileExistsError`` for a non-empty
    ``out_dir`` without ``overwrite``.
    """
    hf_dir = Path(hf_dir)
    spec = spec_from_hf_config(read_hf_config(hf_dir))  # unknown families fail here
    src = HFSafetensors(hf_dir)
    spec = bind_checkpoint_names(spec, src.names())  # vision-language: which HF naming the files use
    adapter = adapter_for(spec)
    virtual = adapter.virtual_hf_tensors(src.shapes)  # e.g. fused MoE experts, read per expert
    if virtual:
        src = SlicedTensorsView(src, virtual)
    dtype = parse_dtype(dtype) or src.stored_dtype()
    model = build_meta_model(spec, dtype)
    meta_params = checkpoint_tensors(model)
    prefixes = adapter.hf_ignored_prefixes()
    ignored = sorted(n for n in src.names() if prefixes and n.startswith(prefixes))
    if ignored:
        log.warning("%s: %d tensors under %s are not converted (transformers does not load them either): %s",
                    hf_dir, len(ignored), list(prefixes), ignored[:4] + (["..."] if len(ignored) > 4 else []))
    src.check_against(expected_hf_shapes(spec, meta_params), adapter.hf_optional() | set(ignored))

    def compute(name: str) -> torch.Tensor:
        return adapter.to_mcore(name, src.get)

    with atomic_output_dir(out_dir, overwrite) as tmp:
        save_streaming(model, compute, tmp)
        write_model_spec(tmp, spec, dtype)
        copy_tokenizer(hf_dir, tmp)
    log.info("converted %s -> %s (%s, %s)", hf_dir, out_dir, spec.family, dtype)
    return Path(out_dir)
