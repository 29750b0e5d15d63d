"""Data pipeline: dataset formats -> chat-templated tokens (cached) -> packed micro-batches.

Public API (see docs/data.md for the micro-batch contract)::

    from mcore_align.data import DataConfig, build_data, required_pad_multiple
    data = build_data(cfg, tokenizer, "paired", dp_rank=r, dp_size=d, global_batch_size=64,
                      pad_multiple=required_pad_multiple(tp, cp, sequence_parallel))
    gb = next(data.train)          # GlobalBatch: gb.micro_batches, gb.counts_dict()
    state = data.train.state_dict()
"""
from .batch import (ROLE_CHOSEN, ROLE_KL, ROLE_REJECTED, ROLE_UNPAIRED, GlobalBatch, MicroBatch,
                    layout_multiples, plan_bins, required_pad_multiple)
from .config import DataConfig
from .formats import FORMATS, BadRecord
from .loader import BatchLoader, DataBundle, EpochSampler, build_data

__all__ = [
    "DataConfig", "build_data", "DataBundle", "BatchLoader", "EpochSampler", "MicroBatch", "GlobalBatch",
    "required_pad_multiple", "layout_multiples", "plan_bins", "FORMATS", "BadRecord",
    "ROLE_CHOSEN", "ROLE_REJECTED", "ROLE_UNPAIRED", "ROLE_KL",
]
