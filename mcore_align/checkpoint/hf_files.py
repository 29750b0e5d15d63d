"""HF safetensors checkpoints: a validating, one-tensor-at-a-time reader and a sharded writer.

Reading never holds more than the tensor asked for: each :meth:`HFSafetensors.get`
opens the shard, copies one tensor out and closes it (a long-lived ``safe_open``
would keep the touched pages of a memory-mapped multi-GB file mapped into the process).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A malformed input checkpoint (names the file or tensor at fault)."""


class HFSafetensors:
    """The tensors of an HF checkpoint directory (single file or sharded with an index)."""

    def __init__(self, hf_dir: str | Path):
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        index = self.dir / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
            files = sorted(set(weight_map.values()))
        elif (self.dir / SINGLE_FILE).exists():
            weight_map, files = None, [SINGLE_FILE]
        else:
            raise CheckpointError(f"{self.dir}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are supported)")
        self.file_of: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for fname in files:
            path = self.dir / fname
            if not path.exists():
                raise CheckpointError(f"{path}: safetensors shard listed in {INDEX_FILE} is missing")
            try:  # parses and checks the header (sizes against the file length)
                with safe_open(path, "pt") as f:
                    for name in f.keys():
                        sl = f.get_slice(name)
                        self.file_of[name] = fname
                        self.shapes[name] = tuple(sl.get_shape())
                        self.dtypes[name] = sl.get_dtype()
            except Exception as e:  # noqa: BLE001 - safetensors raises several error types
                raise CheckpointError(f"{path}: cannot read safetensors shard: {e}") from e
        if weight_map is not None:
            for name, fname in weight_map.items():
                if self.file_of.get(name) != fname:
                    raise CheckpointError(f"{self.dir / fname}: tensor {name!r} listed in {INDEX_FILE} is not in this shard")

    def names(self) -> set[str]:
        return set(self.file_of)

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.dir / self.file_of[name]
        try:
            with safe_open(path, "pt") as f:
                return f.get_tensor(name)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{path}: cannot read tensor {name!r}: {e}") from e

    def check_against(self, expected: dict[str, tuple[int, ...]], optional: set[str]) -> None:
        """Strict key set both ways, and shapes; errors name every offending tensor."""
        have = self.names()
        missing = sorted(set(expected) - have)
        unexpected = sorted(have - set(expected) - set(optional))
        wrong = sorted(n for n in set(expected) & have if self.shapes[n] != tuple(expected[n]))
        problems = []
        if missing:
            problems.append(f"missing tensors: {missing}")
        if unexpected:
            problems.append(f"unexpected tensors (not used by the model): {unexpected}")
        for n in wrong:
            problems.append(f"tensor {n!r} has shape {list(self.shapes[n])}, expected {list(expected[n])} "
                            f"(in {self.file_of[n]})")
        if problems:
            raise CheckpointError(f"{self.dir}: checkpoint does not match config.json: " + "; ".join(problems))

    def stored_dtype(self) -> torch.dtype:
        """The dtype most tensors are stored in (used when no dtype is asked for)."""
        from collections import Counter

        names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
        common = Counter(self.dtypes.values()).most_common(1)[0][0]
        if common not in names:
            raise CheckpointError(f"{self.dir}: tensors stored as {common}; pass a dtype explicitly")
        return names[common]


class SlicedTensorsView(HFSafetensors):
    """An :class:`HFSafetensors` in which some stored tensors appear as their sub-tensors.

    ``virtual``: name -> (stored name, index along dim 0, row slice), e.g. MoE's
    ``...experts.3.up_proj.weight`` -> (``...experts.gate_up_proj``, 3, rows F..2F-1). The
    stored tensors behind virtual names are hidden (the strict key check sees the virtual
    names). ``get`` keeps the last stored tensor it read, so asking for the sub-tensors of one
    stored tensor in a row reads it once.
    """

    def __init__(self, src: HFSafetensors, virtual: dict[str, tuple[str, int, slice]]):
        self.src, self.virtual, self.dir = src, virtual, src.dir
        self.file_of, self.shapes, self.dtypes = dict(src.file_of), dict(src.shapes), dict(src.dtypes)
        for name, (stored, _, rows) in virtual.items():
            full = src.shapes[stored]
            self.file_of[name], self.dtypes[name] = src.file_of[stored], src.dtypes[stored]
            self.shapes[name] = (len(range(*rows.indices(full[1]))), *full[2:])
        for stored in {v[0] for v in virtual.values()}:
            del self.file_of[stored], self.shapes[stored], self.dtypes[stored]
        self._last: tuple[str, torch.Tensor] | None = None

    def get(self, name: str) -> torch.Tensor:
        if name not in self.virtual:
            return self.src.get(name)
        stored, index, rows = self.virtual[name]
        if self._last is None or self._last[0] != stored:
            self._last = None  # free the previous one before reading the next
            self._last = (stored, self.src.get(stored))
        return self._last[1][index, rows].clone()


def parse_size(size: str | int) -> int:
    """``"5GB"`` -> 5 * 10**9 bytes (HF's convention: decimal units; ``GiB`` binary)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {size!r} (e.g. 5GB, 500MB, 2GiB)")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * mult)


class ShardedSafetensorsWriter:
    """Writes tensors to ``model-0000i-of-0000n.safetensors`` files as they come.

    Tensors are buffered until the next one would push the buffer past
    ``max_shard_bytes``; then the buffer is written and freed. Peak memory is one
    shard (or the largest tensor, if larger). Shard names need the total count,
    so shards are written as ``model-0000i.safetensors`` and renamed by
    :meth:`finish`, which also writes the index (or a single ``model.safetensors``).
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int, *, prefix: str = "model"):
        self.dir = Path(out_dir)
        self.max = max_shard_bytes
        self.prefix = prefix
        self.buf: dict[str, torch.Tensor] = {}
        self.buf_bytes = 0
        self.shards: list[list[str]] = []
        self.seen: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        assert name not in self.seen, f"{name} written twice"
        self.seen.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self.buf and self.buf_bytes + nbytes > self.max:
            self._flush()
        self.buf[name] = tensor.contiguous()
        self.buf_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.buf, self.dir / f"{self.prefix}-{len(self.shards) + 1:05d}.partial.safetensors",
                  metadata={"format": "pt"})
        self.shards.append(list(self.buf))
        self.buf, self.buf_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write what is buffered, name the shards, write the index; returns file names."""
        if self.buf or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            (self.dir / f"{self.prefix}-00001.partial.safetensors").rename(self.dir / f"{self.prefix}.safetensors")
            return [f"{self.prefix}.safetensors"]
        weight_map, names = {}, []
        for i, keys in enumerate(self.shards, 1):
            fname = f"{self.prefix}-{i:05d}-of-{n:05d}.safetensors"
            (self.dir / f"{self.prefix}-{i:05d}.partial.safetensors").rename(self.dir / fname)
            names.append(fname)
            weight_map.update({k: fname for k in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names
