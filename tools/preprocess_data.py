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

How: the main process streams the records (file order; the format is detected on each
dataset's first record, as the trainer does) in chunks of ``--chunk`` records; ``--workers``
processes each normalise, render the chat template and tokenize whole chunks; the main
process writes the kept records in chunk order with the trainer's own writer and merges
the drop counters in the same order. So the arrays and ``meta.json`` are identical to the
trainer's own build (tests/unit/test_preprocess_data.py).

With ``--shard i/n`` a process tokenizes chunks ``i, i+n, i+2n, ...`` only and saves them
to ``<key>.shards/`` beside the cache; the shard that finishes last (it finds all n parts)
assembles the cache. Every shard reads all records (cheap next to rendering and
tokenizing). Re-running a shard whose part exists does nothing.

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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mcore_align.data.config import DataConfig  # noqa: E402
from mcore_align.data.formats import BadRecord, DroppedRecord, detect_format, iter_dataset  # noqa: E402
from mcore_align.data.store import (_Writer, bad_record_error, cache_key, extra_columns, prepare_record,  # noqa: E402
                                    publish,
                                    temp_dir_for, write_meta)
from mcore_align.data.tokenization import RecordTokenizer, TokenizedRecord  # noqa: E402

# -- worker side ---------------------------------------------------------------------------
_W: dict = {}


def _init_worker(tokenizer_dir: str, cfg: DataConfig, kind: str) -> None:
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


def _process_chunk(job: tuple[int, list]) -> tuple[int, dict]:
    """Items ``(loc, raw, fmt, error)`` -> kept records (in order) and the chunk's counters.

    ``events``: (reason, message) of every skipped record, in record order, so the merged
    ``first_dropped`` and ``skipped_examples`` are the serial build's."""
    idx, items = job
    rt: RecordTokenizer = _W["rt"]
    cfg: DataConfig = _W["cfg"]
    rt.dropped, rt.warnings = Counter(), Counter()
    pending, events = [], []
    for loc, raw, fmt, err, base_dir in items:
        try:
            if err is not None:
                raise err
            pending.append((prepare_record(rt, cfg, fmt, loc, raw, vision=_W["vision"], model_kind=_W["model_kind"],
                                           base_dir=base_dir),
                            extra_columns(raw) if _W["kind"] == "prompt" else None))
        except BadRecord as e:
            if cfg.on_bad_record == "error" and not isinstance(e, DroppedRecord):
                raise bad_record_error(e) from None
            events.append((e.reason, str(e)))
    kept = []
    for rec, ((_, label, margin, *images), cols) in zip(rt.tokenize([p[0][0] for p in pending]), pending):
        if rec is not None:  # images: per sequence, paths or in-memory bytes (store._Writer.add)
            kept.append((rec, label, margin, cols, images[0] if images else ()))
    tokens = sum(len(t) for rec, *_ in kept for t in rec.tokens)
    return idx, {"kept": kept, "events": events, "dropped": rt.dropped, "warnings": rt.warnings, "tokens": tokens}


# -- main side -----------------------------------------------------------------------------
def _chunks(cfg: DataConfig, chunk: int, read: Counter, formats: dict):
    """Yield ``(chunk index, items)`` over all datasets in order, detecting formats as the
    trainer's build_store does (a record that fails detection is carried as its error)."""
    def items():
        for spec in cfg.dataset:
            fmt = cfg.dataset_format
            for loc, raw, base_dir in iter_dataset(spec, cfg.seed, with_base_dir=True):
                read[spec] += 1
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
    i = 0
    while True:
        block = list(islice(it, chunk))
        if not block:
            return
        yield i, block
        i += 1


def _assemble(out: Path, kind: str, results, formats: dict, read: Counter) -> None:
    """Write the cache from chunk results in chunk order (the trainer's writer and meta)."""
    tmp = temp_dir_for(out)
    try:
        writer = _Writer(tmp)
        skipped, dropped, warnings, examples, first_of = Counter(), Counter(), Counter(), [], {}
        for _, r in results:
            for rec, label, margin, cols, images in r["kept"]:
                writer.add(rec, label, margin, images, cols)
            for reason, msg in r["events"]:
                skipped[reason] += 1
                first_of.setdefault(reason, msg)
                if len(examples) < 10:
                    examples.append(msg)
            dropped += r["dropped"]
            warnings += r["warnings"]
        write_meta(tmp, writer.close(), kind, formats=formats, read=read, dropped=skipped + dropped,
                   warnings=warnings, examples=examples, first_of=first_of)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def preprocess(cfg: DataConfig, tokenizer_dir: str, kind: str, *, workers: int = 1, chunk: int = 1024,
               shard: tuple[int, int] = (0, 1), log=print) -> dict:
    """Build ``cfg``'s cache (or this shard's part of it); returns counts and timings."""
    from transformers import AutoTokenizer

    from mcore_align.data.images import model_kind_of_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = Path(cfg.cache_dir) / cache_key(cfg, tokenizer, kind, model_kind_of_tokenizer(tokenizer)[1])
    i_shard, n_shards = shard
    if (out / "meta.json").exists():
        log(f"cache exists: {out} (nothing to do)")
        return {"cache": str(out), "built": False}
    read, formats = Counter(), {}
    t0 = time.perf_counter()
    jobs = ((i, block) for i, block in _chunks(cfg, chunk, read, formats) if i % n_shards == i_shard)
    init = (tokenizer_dir, cfg, kind)
    if workers <= 1:
        _init_worker(*init)
        results = [_process_chunk(j) for j in jobs]
    else:
        # fork: workers inherit nothing heavy (the tokenizer is loaded in each; the Rust
        # tokenizer has not run in this process, so its thread pool is not forked).
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ctx.Pool(workers, initializer=_init_worker, initargs=init) as pool:
            results = list(pool.imap(_process_chunk, jobs))  # imap: chunk order kept
    seconds = time.perf_counter() - t0
    tokens = sum(r["tokens"] for _, r in results)
    records = sum(len(r["kept"]) for _, r in results)
    stats = {"cache": str(out), "records_kept": records, "tokens": tokens, "seconds": seconds,
             "tokens_per_s": tokens / seconds if seconds > 0 else float("inf"), "workers": workers}
    if n_shards == 1:
        _assemble(out, kind, results, formats, read)
        stats["built"] = True
    else:
        parts = out.parent / f"{out.name}.shards"
        parts.mkdir(parents=True, exist_ok=True)
        part = parts / f"part-{i_shard}-of-{n_shards}.pkl"
        tmp = part.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            pickle.dump({"results": results, "formats": formats, "read": read}, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, part)
        have = sorted(parts.glob(f"part-*-of-{n_shards}.pkl"))
        stats["built"] = False
        if len(have) == n_shards:  # the last shard to finish assembles the cache
            merged = []
            for p in have:
                with open(p, "rb") as f:
                    merged += pickle.load(f)["results"]
            merged.sort(key=lambda r: r[0])
            _assemble(out, kind, merged, formats, read)
            shutil.rmtree(parts, ignore_errors=True)
            stats["built"] = True
        else:
            log(f"shard {i_shard}/{n_shards} saved ({len(have)} of {n_shards} parts present); "
                "the last shard to finish assembles the cache")
    log(f"{'built' if stats['built'] else 'tokenized'} {out}: {records} records, {tokens} tokens in "
        f"{seconds:.2f} s ({stats['tokens_per_s']:.0f} tokens/s, {workers} worker(s), shard {i_shard}/{n_shards})")
    return stats


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
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false" if a.workers > 1 else "true")
    preprocess(cfg.data, tok_dir, kind, workers=a.workers, chunk=a.chunk, shard=a.shard)
    if cfg.data.val_dataset:
        val = dataclasses.replace(cfg.data, dataset=cfg.data.val_dataset, val_dataset=None)
        preprocess(val, tok_dir, kind, workers=a.workers, chunk=a.chunk, shard=a.shard)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
