"""Checkpoint conversion: HF safetensors <-> megatron-core dist checkpoints (any layout)."""
from mcore_align.checkpoint.hf_files import CheckpointError
from mcore_align.checkpoint.hf_to_mcore import convert_hf_to_mcore
from mcore_align.checkpoint.layout import (
    read_checkpoint_dtype,
    read_model_spec,
    resolve_checkpoint_dir,
    write_checkpoint_extras,
)
from mcore_align.checkpoint.loading import load_model_weights
from mcore_align.checkpoint.mcore_to_hf import EXTRA_HEADS, ExtraHead, convert_mcore_to_hf, register_extra_head

__all__ = [
    "CheckpointError", "EXTRA_HEADS", "ExtraHead", "convert_hf_to_mcore", "convert_mcore_to_hf",
    "load_model_weights", "read_checkpoint_dtype", "read_model_spec", "register_extra_head",
    "resolve_checkpoint_dir", "write_checkpoint_extras",
]
