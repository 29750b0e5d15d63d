#!/usr/bin/env python
"""Tokenize a run's datasets once, in parallel, into the cache the trainer reads.

    python tools/preprocess_data.py --config run.yaml [key=value ...] --workers 16
    # several nodes on a shared filesystem, then nothing else to run:
    python tools/preprocess_data.py --config run.yaml --workers 16 --shard 0/4   # node 0
    python tools/preprocess_data.py --config run.yaml --workers 16 --shard 3/4   # node 3

It reads the SAME run configuration as the trainer (``--config`` and overrides), so the
cache key (mcore_align/data/store.py ``cache_key``: dataset contents, tokenizer, objective
kind, max_length, truncation, turns, format, bad-record policy, seed) and the folder
``<data.cache_dir>/<key>/`` are the ones ``load_or_build_store`` looks for: the trainer then
opens the cache and tokenizes nothing. ``data.val_dataset`` gets its own cache, as in training.

How: the datasets are cut into tasks of about ``--chunk`` records, in file order:
``.jsonl`` files by byte ranges of ``--chunk`` lines (a scan for newlines, no parsing,
finds the ranges and their line numbers), parquet files by row groups, ``.json`` arrays
whole; ``#N`` sampling and hub datasets are read by the main process and handed over in
chunks. ``--workers`` processes each read (parse) their task's records themselves,
normalise, render the chat template and tokenize them; the main process writes the kept
records in task order with the trainer's own writer and merges the drop counters in the
same order. The format is detected on each dataset's first record, as the trainer does.
So the arrays and ``meta.json`` are identical to the trainer's own build
(tests/unit/test_preprocess_data.py).

Threads: one tokenizers (rayon) thread per worker when the workers fill the cores
(``RAYON_NUM_THREADS`` = cores // workers), so N workers do not start N x cores threads.

With ``--shard i/n`` a process takes tasks ``i, i+n, i+2n, ...`` only (it parses only their
records; ``#N``-sampled and hub datasets are still read whole by every shard) and streams
its results to ``<key>.shards/`` beside the cache; the shard that finishes last (it finds
all n parts) assembles the cache. Re-running a shard whose part exists does nothing.

A vision-language checkpoint (its ``tokenizer/`` holds the processor files) expands image
placeholders with its processor, as the trainer does: the cache keeps image references
(paths; in-memory images as ``images/<hash>`` files in the cache folder).

Reports records and tokens per second on stdout.
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import pickle
import shutil
import sys
import time
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mcore_align.data.config import DataConfig  # noqa: E402
from mcore_align.data.formats import (BadRecord, _files_of, _iter_file, detect_format,  # noqa: E402
                                      iter_dataset, iter_jsonl, iter_parquet, split_sampling_suffix)
from mcore_align.data.store import (_Writer, bad_record_error, cache_key, extra_columns, prepare_record,  # noqa: E402
                                    publish,
                                    temp_dir_for, write_meta)
from mcore_align.data.tokenization import RecordTokenizer, TokenizedRecord  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Task:
    """One unit of work, in dataset order. Either a piece of a file that the worker reads
    itself (``path`` set: a ``.jsonl`` byte range ``[start, stop)`` whose first line is
    ``first``; parquet row groups ``[start, stop)`` whose first row is ``first``; a whole
    ``.json`` file), or ``items`` read by the main process, each ``(loc, raw, fmt, error,
    base_dir)`` (``base_dir``: the folder relative image paths start from; None for hub data)."""

    spec: str
    fmt: str | None = None
    path: str | None = None
    start: int = 0
    stop: int = 0
    first: int = 0
    items: list | None = None

    def records(self):
        """``(loc, raw, fmt, error, base_dir)`` of the task's records, in file order."""
        if self.items is not None:
            return self.items
        path = Path(self.path)
        if path.suffix == ".jsonl":
            it = iter_jsonl(path, self.start, self.stop, self.first)
        elif path.suffix == ".parquet":
            it = iter_parquet(path, list(range(self.start, self.stop)), self.first)
        else:
            it = _iter_file(path)
        # A raw BadRecord (e.g. non-UTF-8 line) raises inside prepare_record (normalize).
        return [(loc, raw, self.fmt, None, path.parent) for loc, raw in it]


# -- worker side ---------------------------------------------------------------------------
_W: dict = {}


def _init_worker(tokenizer_dir: str, cfg: DataConfig, kind: str, threads: int | None = None) -> None:
    if threads is not None:
        # Before the tokenizer's first encode: the rayon pool is sized once per process.
        os.environ["RAYON_NUM_THREADS"] = str(threads)
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    from transformers import AutoTokenizer

    from mcore_align.data.images import model_kind_of_tokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    _W["rt"] = RecordTokenizer(tok, kind, cfg.max_length, cfg.truncation_strategy, cfg.train_on_all_assistant_turns)
    # A vision checkpoint's processor expands image placeholders, as the trainer's build does.
    _W["model_kind"], _W["vision"] = model_kind_of_tokenizer(tok)
    if _W["vision"] is not None:
        _W["rt"].image_token_id = _W["vision"].image_token_id
    _W["cfg"] = cfg
    _W["kind"] = kind


def _process_task(job: tuple[int, Task]) -> tuple[int, dict]:
    """A task -> kept records (in order), its counters and how many records it read.

    ``events``: (reason, message) of every skipped record, in record order, so the merged
    ``first_dropped`` and ``skipped_examples`` are the serial build's."""
    idx, task = job
    rt: RecordTokenizer = _W["rt"]
    cfg: DataConfig = _W["cfg"]
    rt.dropped, rt.warnings = Counter(), Counter()
    pending, events = [], []
    items = task.records()
    for loc, raw, fmt, err, base_dir in items:
        try:
            if err is not None:
                raise err
            pending.append((prepare_record(rt, cfg, fmt, loc, raw, vision=_W["vision"], model_kind=_W["model_kind"],
                                           base_dir=base_dir),
                            extra_columns(raw) if _W["kind"] == "prompt" else None))
        except BadRecord as e:
            if cfg.raises(e):
                raise bad_record_error(e) from None
            events.append((e.reason, str(e)))
    kept = []
    for rec, ((_, label, margin, *images), cols) in zip(rt.tokenize([p[0][0] for p in pending]), pending):
        if rec is not None:  # images: per sequence, paths or in-memory bytes (store._Writer.add)
            kept.append((rec, label, margin, cols, images[0] if images else ()))
    tokens = sum(len(t) for rec, *_ in kept for t in rec.tokens)
    return idx, {"kept": kept, "events": events, "dropped": rt.dropped, "warnings": rt.warnings, "tokens": tokens,
                 "read": (task.spec, len(items))}


# -- main side: planning -------------------------------------------------------------------
def _jsonl_pieces(path: Path, lines: int) -> list[tuple[int, int, int]]:
    """``(start byte, stop byte, first line)`` of consecutive pieces of ``lines`` lines.

    Only finds newlines (numpy over 16 MiB blocks, no JSON parsing), so that each worker
    parses its own piece and locations keep the file's line numbers."""
    size = path.stat().st_size
    starts = [(0, 1)]  # (byte offset, line number) of each piece's first line
    seen, pos = 0, 0  # newlines before this block, its byte offset
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            nl = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 0x0A)
            # Newline number k (1-based, whole file) ends line k; piece m starts after newline m * lines.
            first_k = (seen // lines + 1) * lines
            for k in range(first_k, seen + len(nl) + 1, lines):
                off = pos + int(nl[k - seen - 1]) + 1
                if off < size:
                    starts.append((off, k + 1))
            seen += len(nl)
            pos += len(block)
    return [(a, b, line) for (a, line), (b, _) in zip(starts, starts[1:] + [(size, 0)])]


def _parquet_pieces(path: Path, rows: int) -> list[tuple[int, int, int]]:
    """``(first row group, stop row group, first row)``: consecutive row groups of about ``rows``
    rows (a row group is never split; parquet writers usually make them 10k-1M rows)."""
    import pyarrow.parquet as pq

    md = pq.ParquetFile(path).metadata
    out, a, n, first = [], 0, 0, 0
    for g in range(md.num_row_groups):
        n += md.row_group(g).num_rows
        if n >= rows or g == md.num_row_groups - 1:
            out.append((a, g + 1, first))
            a, first, n = g + 1, first + n, 0
    return out


def _detect(spec: str, cfg: DataConfig) -> str | None:
    """The format the trainer detects on ``spec``: that of its first record that is not a bad
    (non-UTF-8) line; None if it has none."""
    for loc, raw in iter_dataset(spec, cfg.seed):
        if isinstance(raw, BadRecord):
            if cfg.raises(raw):
                raise bad_record_error(raw)
            continue
        return detect_format(raw, loc)
    return None


def _tasks(cfg: DataConfig, chunk: int, formats: dict):
    """All tasks over all datasets in order (the same list in every shard). Local files
    without ``#N`` are cut into pieces the workers read; the rest is streamed here in chunks,
    detecting the format as the trainer's build_store does (a record that fails detection is
    carried as its error)."""
    for spec in cfg.dataset:
        name, n = split_sampling_suffix(spec)
        path = Path(os.path.expanduser(name))
        if n is None and path.exists():
            fmt = cfg.dataset_format or _detect(spec, cfg)
            formats[spec] = fmt
            for f in _files_of(path):
                if f.suffix == ".jsonl":
                    pieces = _jsonl_pieces(f, chunk)
                elif f.suffix == ".parquet":
                    pieces = _parquet_pieces(f, chunk)
                else:  # a JSON array is parsed whole anyway
                    pieces = [(0, 0, 0)]
                for a, b, first in pieces:
                    yield Task(spec, fmt, str(f), a, b, first)
            continue

        def items(spec=spec):
            fmt = cfg.dataset_format
            for loc, raw, base_dir in iter_dataset(spec, cfg.seed, with_base_dir=True):
                err = None
                if fmt is None:
                    try:
                        if isinstance(raw, BadRecord):
                            raise raw
                        fmt = detect_format(raw, loc)
                        formats[spec] = fmt
                    except BadRecord as e:
                        err = e
                yield (loc, None if err else raw, fmt, err, base_dir)
            formats.setdefault(spec, fmt)

        it = items()
        while block := list(islice(it, chunk)):
            yield Task(spec, items=block)


# -- main side: writing ----------------------------------------------------------------------
class _Assembler:
    """Writes the cache from task results fed in task order (the trainer's writer and meta)."""

    def __init__(self, out: Path, kind: str):
        self.out, self.kind = out, kind
        self.tmp = temp_dir_for(out)
        self.writer = _Writer(self.tmp)
        self.read, self.skipped, self.dropped, self.warnings = Counter(), Counter(), Counter(), Counter()
        self.examples, self.first_of = [], {}

    def add(self, r: dict) -> None:
        for rec, label, margin, cols, images in r["kept"]:
            self.writer.add(rec, label, margin, images, cols)
        for reason, msg in r["events"]:
            self.skipped[reason] += 1
            self.first_of.setdefault(reason, msg)
            if len(self.examples) < 10:
                self.examples.append(msg)
        self.dropped += r["dropped"]
        self.warnings += r["warnings"]
        spec, n = r["read"]
        if n:
            self.read[spec] += n

    def finish(self, formats: dict) -> None:
        write_meta(self.tmp, self.writer.close(), self.kind, formats=formats, read=self.read,
                   dropped=self.skipped + self.dropped, warnings=self.warnings, examples=self.examples,
                   first_of=self.first_of)
        publish(self.tmp, self.out)

    def abort(self) -> None:
        for f in self.writer.files.values():
            f.close()
        self.writer.columns.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _read_parts(paths: list[Path]):
    """Task results from the n shards' part files in task order: task i is the next entry of
    part i % n (each shard wrote its tasks i, i+n, ... in order)."""
    files = [open(p, "rb") for p in paths]
    try:
        for f in files:
            pickle.load(f)  # header
        i = 0
        while True:
            try:
                idx, r = pickle.load(files[i % len(files)])
            except EOFError:
                return
            assert idx == i, f"{paths[i % len(files)]}: expected task {i}, found {idx}"
            yield r
            i += 1
    finally:
        for f in files:
            f.close()


def _default_threads(workers: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // workers)


def _run(jobs, workers: int, init: tuple, consume) -> tuple[int, int]:
    """Run the tasks (here, or in ``workers`` processes) and hand each result to
    ``consume(idx, result)`` in task order, as it arrives (RAM holds a few tasks' results,
    not the dataset). Returns (records kept, tokens)."""
    records = tokens = 0

    def feed(results):
        nonlocal records, tokens
        for idx, r in results:
            records += len(r["kept"])
            tokens += r["tokens"]
            consume(idx, r)

    if workers <= 1:
        _init_worker(*init)
        feed(map(_process_task, jobs))
    else:
        # fork: workers inherit nothing heavy (the tokenizer is loaded in each; the Rust
        # tokenizer has not run in this process, so its thread pool is not forked).
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        tok_dir, cfg, kind, threads = init
        with ctx.Pool(workers, initializer=_init_worker,
                      initargs=(tok_dir, cfg, kind, threads or _default_threads(workers))) as pool:
            feed(pool.imap(_process_task, jobs))  # imap: task order kept
    return records, tokens


def preprocess(cfg: DataConfig, tokenizer_dir: str, kind: str, *, workers: int = 1, chunk: int = 1024,
               shard: tuple[int, int] = (0, 1), threads: int | None = None, log=print) -> dict:
    """Build ``cfg``'s cache (or this shard's part of it); returns counts and timings.
    ``threads``: tokenizer threads per worker process (default: cores // workers; with one
    worker the tokenizer runs in this process with its own default)."""
    from transformers import AutoTokenizer

    from mcore_align.data.images import model_kind_of_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = Path(cfg.cache_dir) / cache_key(cfg, tokenizer, kind, model_kind_of_tokenizer(tokenizer)[1])
    i_shard, n_shards = shard
    if (out / "meta.json").exists():
        log(f"cache exists: {out} (nothing to do)")
        return {"cache": str(out), "built": False}
    formats: dict = {}
    t0 = time.perf_counter()
    jobs = ((i, t) for i, t in enumerate(_tasks(cfg, chunk, formats)) if i % n_shards == i_shard)
    init = (tokenizer_dir, cfg, kind, threads)
    parts = out.parent / f"{out.name}.shards"
    part = parts / f"part-{i_shard}-of-{n_shards}.pkl"
    records = tokens = 0
    if n_shards == 1:
        asm = _Assembler(out, kind)
        try:
            records, tokens = _run(jobs, workers, init, lambda idx, r: asm.add(r))
            asm.finish(formats)
        except BaseException:
            asm.abort()
            raise
    elif part.exists():  # done before: only the assembly check below
        log(f"shard {i_shard}/{n_shards}: {part} exists (not tokenized again)")
        for _ in _tasks(cfg, chunk, formats):  # for ``formats`` (no task is run)
            pass
    else:
        parts.mkdir(parents=True, exist_ok=True)
        tmp_part = part.with_suffix(f".tmp{os.getpid()}")
        try:
            with open(tmp_part, "wb") as f:
                pickle.dump({"shard": shard}, f, protocol=pickle.HIGHEST_PROTOCOL)
                records, tokens = _run(jobs, workers, init,
                                       lambda idx, r: pickle.dump((idx, r), f, protocol=pickle.HIGHEST_PROTOCOL))
            os.replace(tmp_part, part)
        except BaseException:
            tmp_part.unlink(missing_ok=True)
            raise
    seconds = time.perf_counter() - t0
    stats = {"cache": str(out), "records_kept": records, "tokens": tokens, "seconds": seconds,
             "tokens_per_s": tokens / seconds if seconds > 0 else float("inf"), "workers": workers,
             "built": n_shards == 1}
    if n_shards > 1:
        have = sorted(parts.glob(f"part-*-of-{n_shards}.pkl"), key=lambda p: int(p.name.split("-")[1]))
        if len(have) == n_shards and _claim(parts):  # the last shard to finish assembles the cache
            asm = _Assembler(out, kind)
            try:
                for r in _read_parts(have):
                    asm.add(r)
                asm.finish(formats)
            except BaseException:
                asm.abort()
                (parts / "assembling").unlink(missing_ok=True)
                raise
            shutil.rmtree(parts, ignore_errors=True)
            stats["built"] = True
        else:
            log(f"shard {i_shard}/{n_shards} saved ({len(have)} of {n_shards} parts present); "
                "the last shard to finish assembles the cache")
    log(f"{'built' if stats['built'] else 'tokenized'} {out}: {records} records, {tokens} tokens in "
        f"{seconds:.2f} s ({stats['tokens_per_s']:.0f} tokens/s, {workers} worker(s), shard {i_shard}/{n_shards})")
    return stats


def _claim(parts: Path) -> bool:
    """True for exactly one of the shards that found all parts (two may finish together)."""
    try:
        os.close(os.open(parts / "assembling", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must be i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= i < n")
    return i, n


def main(argv: list[str] | None = None) -> int:
    from mcore_align.algorithms import build_objective
    from mcore_align.config import load_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="the run's YAML (the trainer's)")
    p.add_argument("overrides", nargs="*", help="key=value, as for training")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--chunk", type=int, default=1024, help="records per task")
    p.add_argument("--shard", type=_parse_shard, default=(0, 1), help="i/n: this node's share (default 0/1)")
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    kind = build_objective(cfg.algo.rlhf_type, **cfg.algo.params).data_kind
    # The tokenizer the trainer will use: the checkpoint's (a resume reads the same one).
    tok_dir = str(Path(cfg.model.load) / "tokenizer")
    if not Path(tok_dir).is_dir():
        raise SystemExit(f"{tok_dir}: no tokenizer folder (model.load must be a converted checkpoint)")
    preprocess(cfg.data, tok_dir, kind, workers=a.workers, chunk=a.chunk, shard=a.shard)
    if cfg.data.val_dataset:
        val = dataclasses.replace(cfg.data, dataset=cfg.data.val_dataset, val_dataset=None)
        preprocess(val, tok_dir, kind, workers=a.workers, chunk=a.chunk, shard=a.shard)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
