"""`DataConfig`: everything the data pipeline reads from the user."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

TRUNCATION_STRATEGIES = ("delete", "truncation_left", "right")
BAD_RECORD_POLICIES = ("error", "skip")
IMAGE_READ_ERRORS = ("missing_image", "corrupt_image")  # data.skip_bad_images
OBJECTIVE_KINDS = ("paired", "kto", "sft", "prompt")


def default_cache_dir() -> str:
    return os.environ.get("MCORE_ALIGN_CACHE", str(Path.home() / ".cache" / "mcore_align" / "data"))


@dataclass(kw_only=True)
class DataConfig:
    """Datasets, tokenization limits, batching and caching of the data pipeline."""

    dataset: list[str]
    """Local .json/.jsonl/.parquet files or folders of them, or hub names (loaded with
    `datasets.load_dataset`, needs network). `path#N` samples N records (seeded, without
    replacement; N larger than the dataset repeats it whole, then samples the rest)."""
    max_length: int = 2048
    """Longest sequence (prompt + one response) in tokens; see `truncation_strategy`."""
    truncation_strategy: str = "delete"
    """Records over `max_length`: "delete" drops the record; "truncation_left" cuts the
    shared prompt from the left; "right" cuts each response on the right. Counted by reason."""
    packing: bool = True
    """True: pack several pairs into one [1, T] row (THD, `PackedSeqParams`).
    False: right-padded [B, S] micro-batches of `micro_batch_size` units."""
    max_tokens_per_micro_batch: int = 4096
    """Packed mode: capacity of one micro-batch in (padded) tokens. Must hold the
    largest unit: 2 * max_length (rounded up to pad_multiple) for paired and KTO data."""
    micro_batch_size: int = 1
    """Padded mode: units (pairs for paired objectives, examples otherwise) per micro-batch."""
    seed: int = 42
    """Seed of the per-epoch shuffle, `#N` sampling and the eval split."""
    cache_dir: str = field(default_factory=default_cache_dir)
    """Where tokenized datasets are cached (keyed by content, tokenizer and settings).
    Default $MCORE_ALIGN_CACHE or ~/.cache/mcore_align/data."""
    on_bad_record: str = "error"
    """"error": raise on the first bad record (file, line, field). "skip": drop it and count it."""
    skip_bad_images: bool = False
    """Vision data: a record whose image is missing, unreadable or corrupt (``missing_image``,
    ``corrupt_image``) is dropped and counted even with ``on_bad_record: error``; every other
    bad record still follows ``on_bad_record``."""
    train_on_all_assistant_turns: bool = False
    """False: loss only on the final assistant response. True: on every assistant turn."""
    dataset_format: str | None = None
    """Force one input format instead of auto-detection (see `formats.FORMATS`)."""
    val_fraction: float = 0.0
    """Fraction of records held out (seeded) for the eval loader; 0 disables it."""
    val_dataset: list[str] | None = None
    """Separate eval dataset(s), same syntax as `dataset` (instead of `val_fraction`)."""

    def __post_init__(self) -> None:
        from mcore_align.config.types import check_field_types, check_positive  # local: config imports this module

        if isinstance(self.dataset, str):
            raise ValueError("DataConfig.dataset must be a list of strings, got a str")
        if isinstance(self.val_dataset, str):
            self.val_dataset = [self.val_dataset]
        check_field_types(self, "data")
        if not self.dataset or not all(isinstance(d, str) and d for d in self.dataset):
            raise ValueError(f"DataConfig.dataset must be a non-empty list of paths/names, got {self.dataset!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.truncation_strategy not in TRUNCATION_STRATEGIES:
            raise ValueError(f"truncation_strategy must be one of {TRUNCATION_STRATEGIES}, got {self.truncation_strategy!r}")
        if self.on_bad_record not in BAD_RECORD_POLICIES:
            raise ValueError(f"on_bad_record must be one of {BAD_RECORD_POLICIES}, got {self.on_bad_record!r}")
        if self.max_tokens_per_micro_batch < 2:
            raise ValueError(f"max_tokens_per_micro_batch must be >= 2, got {self.max_tokens_per_micro_batch}")
        check_positive(self, "data", "micro_batch_size")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_dataset is not None:
            if not self.val_dataset or not all(isinstance(d, str) and d for d in self.val_dataset):
                raise ValueError(f"val_dataset must be a non-empty list of paths, got {self.val_dataset!r}")
            if self.val_fraction > 0:
                raise ValueError("give either val_dataset or val_fraction, not both")
        from .formats import FORMATS  # local import: formats imports nothing from here

        if self.dataset_format is not None and self.dataset_format not in FORMATS:
            raise ValueError(f"dataset_format must be one of {sorted(FORMATS)} or None, got {self.dataset_format!r}")

    def raises(self, e) -> bool:
        """Whether the bad record ``e`` (a ``formats.BadRecord``) stops the build."""
        from .formats import DroppedRecord

        if isinstance(e, DroppedRecord):
            return False
        if self.skip_bad_images and e.reason in IMAGE_READ_ERRORS:
            return False
        return self.on_bad_record == "error"
