"""The on-disk tokenized dataset: built once per node, memory-mapped by every rank.

Layout of `<cache_dir>/<key>/` (key = hash of dataset contents + tokenizer + settings):

    tokens.bin     int32  [total_tokens]   all sequences back to back
    targets.bin    uint8  [total_tokens]   1 where the token is a scored response token
    seq_off.bin    int64  [S + 1]          sequence s = tokens[seq_off[s]:seq_off[s+1]]
    seq_plen.bin   int32  [S]              prompt length of sequence s
    rec_seq.bin    int64  [R, 2]           record -> (chosen/only seq, rejected seq or -1)
    rec_label.bin  int8   [R]              KTO label (1, 0) or -1
    rec_margin.bin float32 [R]             paired data: reward-model margin, NaN when absent
    seq_img.bin    int64  [S, 2]           vision models: sequence s's images are
                                           image_paths[seq_img[s, 0]:seq_img[s, 1]]
                                           (a pair's two sequences share one range, unless
                                           the record has ``rejected_images``)
    image_paths.json                       image references, not pixels: absolute paths of
                                           image files, or ``images/<hash>`` (relative to
                                           this folder) for in-memory images
    images/<hash>                          in-memory images (parquet/arrow bytes, datasets
                                           Image features) as their encoded bytes, named by
                                           content hash (blake2b-160)
    rec_columns.jsonl, rec_col_off.bin     each record's other columns (prompt data; JSON lines
                                           at byte offsets rec_col_off[r]:rec_col_off[r+1])
    meta.json      counts by reason, formats, length statistics

Records are streamed in chunks, so building needs RAM for one chunk, not the dataset
(except `.json` arrays and `#N` sampling, which are parsed whole). The folder is written
under a temporary name and renamed into place, so a crash never leaves a half cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import DataConfig
from .formats import (BadRecord, content_fingerprint, detect_format, iter_dataset, normalize,
                      split_sampling_suffix)
from .tokenization import RecordTokenizer

log = logging.getLogger(__name__)
CACHE_VERSION = 4  # 3: identical pairs, empty user turns and out-of-order roles are dropped; 4: record columns
IMAGE_DIR = "images"  # in-memory images, inside the cache folder (references are relative to it)
_CHUNK = 1024  # records tokenized per batched tokenizer call
_ARRAYS = {"tokens": np.int32, "targets": np.uint8, "seq_off": np.int64, "seq_plen": np.int32,
           "rec_seq": np.int64, "rec_label": np.int8, "rec_margin": np.float32, "seq_img": np.int64,
           "rec_col_off": np.int64}
# The text fields the formats read; every other top-level field of a record is one of its
# "other columns", kept for prompt data (online objectives hand them to reward functions).
TEXT_FIELDS = frozenset({"conversations", "chosen", "rejected", "messages", "rejected_response", "query", "response",
                         "history", "system", "instruction", "input", "output", "prompt", "completion", "label",
                         "images", "image", "rejected_images", "margin", "question"})


def extra_columns(raw) -> dict:
    """A record's other columns (JSON-serialisable values only)."""
    if not isinstance(raw, dict):
        return {}
    out = {}
    for k, v in raw.items():
        if k in TEXT_FIELDS:
            continue
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        out[k] = v
    return out


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]).encode())
    return h.hexdigest()


def cache_key(cfg: DataConfig, tokenizer, objective_kind: str, vision=None) -> str:
    """``vision``: the VisionProcessor of a vision model (its image processing decides how many
    tokens each image becomes), else None (text keys are unchanged by vision support)."""
    settings = {
        "version": CACHE_VERSION,
        "data": [content_fingerprint(d, cfg.cache_dir) for d in cfg.dataset],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "kind": objective_kind, "max_length": cfg.max_length, "trunc": cfg.truncation_strategy,
        "all_turns": cfg.train_on_all_assistant_turns, "format": cfg.dataset_format,
        "bad": cfg.on_bad_record, "seed": cfg.seed,
    }
    if cfg.skip_bad_images:  # only when set: existing keys stay as they were
        settings["skip_bad_images"] = True
    if vision is not None:
        from .images import processor_fingerprint

        settings["vision"] = processor_fingerprint(vision)
        # The cache stores image paths resolved against each dataset file's folder, so where
        # the dataset lies is part of what it holds: a moved or copied dataset gets its own cache
        # (the old one would point at the old folder's images).
        settings["where"] = [str(Path(os.path.expanduser(split_sampling_suffix(d)[0])).resolve()) for d in cfg.dataset]
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]


@dataclass
class TokenizedStore:
    """Read-only view of a built cache folder (arrays are memory-mapped)."""

    path: Path
    tokens: np.ndarray
    targets: np.ndarray
    seq_off: np.ndarray
    seq_plen: np.ndarray
    rec_seq: np.ndarray
    rec_label: np.ndarray
    rec_margin: np.ndarray
    seq_img: np.ndarray
    """int64 [S, 2]: image range of each sequence in ``image_paths`` ([0, 0] without images)."""
    meta: dict
    rec_col_off: np.ndarray = None
    """int64 [R + 1]: byte offsets of each record's line in ``rec_columns.jsonl``."""
    image_paths: list = None
    """Resolved image paths of the records (vision models), indexed by ``seq_img``."""

    @classmethod
    def open(cls, path: Path) -> "TokenizedStore":
        meta = json.loads((path / "meta.json").read_text())
        arrays = {}
        for name, dtype in _ARRAYS.items():
            n = meta["array_sizes"].get(name, 0)
            arrays[name] = (np.memmap(path / f"{name}.bin", dtype=dtype, mode="r") if n
                            else np.zeros(0, dtype=dtype))
        arrays["rec_seq"] = arrays["rec_seq"].reshape(-1, 2)
        arrays["seq_img"] = arrays["seq_img"].reshape(-1, 2)
        paths_file = path / "image_paths.json"
        paths = json.loads(paths_file.read_text()) if paths_file.exists() else []
        return cls(path=path, meta=meta, image_paths=paths, **arrays)

    def record_columns(self, r: int) -> dict:
        """Record ``r``'s other columns (prompt data; ``{}`` otherwise), from ``rec_columns.jsonl``."""
        if len(self.rec_col_off) <= r + 1:
            return {}
        a, b = int(self.rec_col_off[r]), int(self.rec_col_off[r + 1])
        with open(self.path / "rec_columns.jsonl", "rb") as f:
            f.seek(a)
            return json.loads(f.read(b - a))

    @property
    def has_images(self) -> bool:
        return bool(self.image_paths)

    def seq_images(self, s: int) -> list[str]:
        """Image paths of sequence ``s`` in placeholder order ([] for text sequences); in-memory
        images point into this cache folder (``<cache>/images/<hash>``)."""
        if not self.has_images:
            return []
        a, b = self.seq_img[s]
        return [p if os.path.isabs(p) else str(self.path / p) for p in self.image_paths[int(a):int(b)]]

    @property
    def num_records(self) -> int:
        return len(self.rec_label)

    def seq_len(self, s: np.ndarray | int) -> np.ndarray:
        return self.seq_off[np.asarray(s) + 1] - self.seq_off[np.asarray(s)]

    def seq(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.seq_off[s], self.seq_off[s + 1]
        return np.asarray(self.tokens[a:b]), np.asarray(self.targets[a:b])


class _Writer:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.files = {n: open(tmp / f"{n}.bin", "wb") for n in _ARRAYS}
        self.sizes = Counter({n: 0 for n in _ARRAYS})
        self.num_tokens = 0
        self.num_seqs = 0
        self.image_paths: list[str] = []
        self._write("seq_off", np.zeros(1, np.int64))
        self.columns = open(tmp / "rec_columns.jsonl", "wb")
        self._col_pos = 0
        self._write("rec_col_off", np.zeros(1, np.int64))

    def _write(self, name: str, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=_ARRAYS[name])
        self.files[name].write(arr.tobytes())
        self.sizes[name] += arr.size

    def _image_range(self, images: list) -> np.ndarray:
        """Append one sequence's image entries; ``[start, end)`` in ``image_paths``. An entry is a
        resolved path (str) or an in-memory image's encoded bytes, written once as
        ``images/<content hash>`` in the cache folder (the reference is that relative name)."""
        start = len(self.image_paths)
        for im in images:
            if isinstance(im, bytes):
                name = f"{IMAGE_DIR}/{hashlib.blake2b(im, digest_size=20).hexdigest()}"
                dest = self.tmp / name
                if not dest.exists():
                    dest.parent.mkdir(exist_ok=True)
                    dest.write_bytes(im)  # (inside the temporary cache folder: renamed with it)
                im = name
            self.image_paths.append(im)
        return np.array([start, len(self.image_paths)])

    def add(self, rec, label: int, margin: float | None = None, images: list = (),
            columns: dict | None = None) -> None:
        """``images``: per sequence, its image entries (see ``_image_range``); one list
        (or ``[list]``) is shared by all the record's sequences. ``columns``: its other
        dataset columns (prompt data)."""
        line = (json.dumps(columns or {}, sort_keys=True) + "\n").encode()
        self.columns.write(line)
        self._col_pos += len(line)
        self._write("rec_col_off", np.array([self._col_pos]))
        sid = []
        per_seq = [images] if not images or not isinstance(images[0], list) else list(images)
        ranges = [self._image_range(im) for im in per_seq]
        for k, (tok, tgt) in enumerate(zip(rec.tokens, rec.targets)):
            img = ranges[min(k, len(ranges) - 1)]
            self._write("tokens", tok)
            self._write("targets", tgt)
            self.num_tokens += len(tok)
            self._write("seq_off", np.array([self.num_tokens]))
            self._write("seq_plen", np.array([rec.prompt_len]))
            self._write("seq_img", img)
            sid.append(self.num_seqs)
            self.num_seqs += 1
        self._write("rec_seq", np.array(sid + [-1] * (2 - len(sid))))
        self._write("rec_label", np.array([label]))
        self._write("rec_margin", np.array([np.nan if margin is None else margin]))

    def close(self) -> dict:
        for f in self.files.values():
            f.close()
        self.columns.close()
        if self.image_paths:
            (self.tmp / "image_paths.json").write_text(json.dumps(self.image_paths))
        return dict(self.sizes)


def _length_stats(x: np.ndarray) -> dict:
    if len(x) == 0:
        return {"count": 0}
    return {"count": int(len(x)), "min": int(x.min()), "mean": round(float(x.mean()), 1),
            "p50": int(np.percentile(x, 50)), "p95": int(np.percentile(x, 95)), "max": int(x.max())}


def prepare_record(rt: RecordTokenizer, cfg: DataConfig, fmt: str, loc: str, raw, *, vision=None,
                   model_kind: str = "unknown", base_dir: Path | None = None) -> tuple:
    """One raw record -> ``(rendered sequences, KTO label or -1, margin[, images per sequence])``;
    raises BadRecord.

    Everything per record before tokenization (normalise, validate, render the chat
    template). Shared by :func:`build_store` and tools/preprocess_data.py's workers.
    ``vision``: the model's VisionProcessor: image placeholders are expanded into image
    tokens (so lengths, ``max_length`` and packing count them) and the images come back as a
    4th element: one list per sequence (``_Writer.add``) of resolved paths, or encoded bytes
    for in-memory images (parquet/arrow bytes, datasets Image features). With ms-swift's
    ``rejected_images`` the rejected sequence has its own list (and its own expansion). ``model_kind`` (``images.model_kind_of_tokenizer``):
    "text_model" makes image records bad records; "unknown" (a bare tokenizer) counts them
    as ``images_ignored``. ``base_dir``: the dataset file's folder (relative image paths)."""
    ex = normalize(raw, fmt, loc)
    images = None
    views = [ex]  # the example each sequence is rendered from (rejected_images: its own expansion)
    if ex.images and vision is not None:
        from .images import prepare_vision_example

        v = prepare_vision_example(ex, loc, base_dir, vision)
        sides = [v] if v.rejected is None else [v, v.rejected]
        views = [s.example for s in sides]
        images = [[str(r.path.resolve()) if r.path is not None else r.encoded() for r in s.refs] for s in sides]
        ex = v.example
    elif ex.images and model_kind == "text_model":
        raise BadRecord("images_on_text_model", f"{loc}: the record has {len(ex.images)} image(s) but the model "
                        "is text-only; train a vision-language checkpoint (e.g. LLaVA-1.5) or drop the images")
    elif ex.images:  # parsed and validated, but this text pipeline has no vision model
        rt.warnings["images_ignored"] += 1
    rendered = [rt.templater.render(views[min(k, len(views) - 1)], r, loc)
                for k, r in enumerate(rt.responses(ex, fmt, loc))]
    out = (rendered, -1 if ex.label is None else int(ex.label), ex.margin)
    return out if vision is None else (*out, (images or [])[:len(rendered)])


def bad_record_error(e: BadRecord) -> BadRecord:
    """The error raised for a bad record under ``data.on_bad_record=error``."""
    return BadRecord(e.reason, f"{e} [data.on_bad_record=skip drops and counts such records]")


def write_meta(tmp: Path, sizes: dict, objective_kind: str, *, formats: dict, read: Counter, dropped: Counter,
               warnings: Counter, examples: list, first_of: dict) -> None:
    """``meta.json`` of a cache folder whose arrays are written (lengths read back from them)."""
    seq_off = np.fromfile(tmp / "seq_off.bin", dtype=np.int64)
    plen = np.fromfile(tmp / "seq_plen.bin", dtype=np.int32)
    rec_seq = np.fromfile(tmp / "rec_seq.bin", dtype=np.int64).reshape(-1, 2)
    lens = np.diff(seq_off)
    stats = {"prompt": _length_stats(plen[rec_seq[:, 0]]) if len(rec_seq) else {"count": 0},
             "chosen_response": _length_stats(lens[rec_seq[:, 0]] - plen[rec_seq[:, 0]]) if len(rec_seq) else {"count": 0},
             "sequence": _length_stats(lens)}
    rej = rec_seq[:, 1][rec_seq[:, 1] >= 0]
    if len(rej):
        stats["rejected_response"] = _length_stats(lens[rej] - plen[rej])
    meta = {
        "cache_version": CACHE_VERSION, "objective_kind": objective_kind,
        "formats": formats, "records_read": dict(read), "records_read_total": sum(read.values()),
        "records_kept": int(len(rec_seq)), "dropped": dict(dropped), "dropped_total": sum(dropped.values()),
        "warnings": dict(warnings), "skipped_examples": examples, "first_dropped": first_of,
        "num_sequences": int(len(lens)), "num_tokens": int(seq_off[-1]),
        "token_lengths": stats, "array_sizes": sizes,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


def publish(tmp: Path, out: Path) -> None:
    """Rename a finished cache folder into place (another process may have won the race)."""
    try:
        os.rename(tmp, out)
    except OSError:
        # Another process (another node on a shared filesystem) finished first.
        assert (out / "meta.json").exists(), f"cannot rename {tmp} to {out}"
        shutil.rmtree(tmp, ignore_errors=True)


def temp_dir_for(out: Path) -> Path:
    tmp = out.parent / f"{out.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def build_store(cfg: DataConfig, tokenizer, objective_kind: str, out: Path, *, vision=None,
                model_kind: str = "unknown") -> None:
    """Tokenize every dataset of `cfg` into the cache folder `out` (atomically).
    ``vision`` / ``model_kind``: see :func:`prepare_record`."""
    tmp = temp_dir_for(out)
    try:
        rt = RecordTokenizer(tokenizer, objective_kind, cfg.max_length, cfg.truncation_strategy,
                             cfg.train_on_all_assistant_turns)
        if vision is not None:  # a truncation that would cut an image span drops the record
            rt.image_token_id = vision.image_token_id
        writer = _Writer(tmp)
        formats, read, skipped, examples = {}, Counter(), Counter(), []
        first_of: dict[str, str] = {}  # reason -> message of its first record (for the summary)
        pending: list = []

        def flush():
            for rec, ((_, label, margin, *images), cols) in zip(rt.tokenize([p[0][0] for p in pending]), pending):
                if rec is not None:
                    writer.add(rec, label, margin, images[0] if images else (), cols)
            pending.clear()

        for spec in cfg.dataset:
            fmt = cfg.dataset_format
            for loc, raw, base_dir in iter_dataset(spec, cfg.seed, with_base_dir=True):
                read[spec] += 1
                try:
                    if fmt is None:
                        if isinstance(raw, BadRecord):
                            raise raw
                        fmt = detect_format(raw, loc)
                        formats[spec] = fmt
                    pending.append((prepare_record(rt, cfg, fmt, loc, raw, vision=vision, model_kind=model_kind,
                                                   base_dir=base_dir),
                                    extra_columns(raw) if objective_kind == "prompt" else None))
                except BadRecord as e:
                    if cfg.raises(e):
                        raise bad_record_error(e) from None
                    skipped[e.reason] += 1
                    first_of.setdefault(e.reason, str(e))
                    if len(examples) < 10:
                        examples.append(str(e))
                    continue
                if len(pending) >= _CHUNK:
                    flush()
            formats.setdefault(spec, fmt)
        flush()
        write_meta(tmp, writer.close(), objective_kind, formats=formats, read=read,
                   dropped=Counter(skipped) + rt.dropped, warnings=rt.warnings, examples=examples, first_of=first_of)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_or_build_store(cfg: DataConfig, tokenizer, objective_kind: str, *, vision=None,
                        model_kind: str = "unknown") -> TokenizedStore:
    """Open the cached tokenized dataset, building it first if needed.
    ``vision`` / ``model_kind``: see :func:`prepare_record`.

    With torch.distributed initialised, only local rank 0 of each node tokenizes; the
    others wait for the cache folder (or rank 0's failure note) on the filesystem, not
    in a collective, so tokenizing a large dataset cannot hit the collective timeout.
    Without torch.distributed, the caller builds.
    """
    import torch.distributed as dist

    out = Path(cfg.cache_dir) / cache_key(cfg, tokenizer, objective_kind, vision)
    distributed = dist.is_available() and dist.is_initialized()
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if distributed else 0
    failed = None
    if distributed:
        # A per-launch name for the failure note, so a note left by an earlier run is never read.
        # (secrets, not torch: drawing from the seeded torch generator on one rank only would
        # shift that rank's RNG stream, and a seeded draw repeats on relaunch.)
        nonce = [secrets.randbits(62) if dist.get_rank() == 0 else 0]
        dist.broadcast_object_list(nonce, src=0)  # (object collective: works on gloo and NCCL)
        failed = out.parent / f"{out.name}.failed-{nonce[0]}-{socket.gethostname()}"
    if local_rank == 0:
        _sweep_stale_notes(out.parent)
    if not (out / "meta.json").exists():
        if local_rank == 0:
            log.info("tokenizing %s into %s", cfg.dataset, out)
            try:
                build_store(cfg, tokenizer, objective_kind, out, vision=vision, model_kind=model_kind)
            except BaseException as e:
                if failed is not None:  # let this node's waiting ranks stop with the same error
                    _leave_failure_note(failed, f"{type(e).__name__}: {e}")
                raise
        else:
            _wait_for_cache(out, failed)
    if not (out / "meta.json").exists():
        raise RuntimeError(f"tokenized cache {out} missing after local rank 0 built it; see its log")
    store = TokenizedStore.open(out)
    ignored = store.meta.get("warnings", {}).get("images_ignored", 0)
    if model_kind == "text_model" and ignored and cfg.on_bad_record == "error":
        # Text caches share one key; this one was built without knowing the model (e.g. by
        # tools/preprocess_data.py) and kept image records as text.
        raise BadRecord("images_on_text_model", f"{cfg.dataset}: {ignored} record(s) have images but the model is "
                        f"text-only (tokenized cache {out}); train a vision-language checkpoint or drop the images "
                        "[data.on_bad_record=skip trains their text]")
    return store


_NOTE_MAX_AGE_S = 3600  # a note is read within seconds; one this old was left by a killed launch


def _leave_failure_note(failed: Path, message: str, poll_s: float = 1.0) -> None:
    """Write the note the node's waiting ranks poll for, give them time to read it, remove it.

    Waiters poll every `poll_s`; a waiter that misses the note is stopped by torchrun anyway
    once this rank exits with the error, so the note never has to outlive this call."""
    import time

    failed.parent.mkdir(parents=True, exist_ok=True)
    tmp = failed.with_name(failed.name + f".tmp{os.getpid()}")
    tmp.write_text(message)
    os.replace(tmp, failed)  # waiters read all of it or nothing
    try:
        if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            time.sleep(3 * poll_s)
    finally:
        failed.unlink(missing_ok=True)


def _sweep_stale_notes(cache_dir: Path) -> None:
    """Remove failure notes (any dataset, any node) left behind by launches that were killed
    between writing and removing them."""
    import time

    if not cache_dir.is_dir():
        return
    now = time.time()
    for note in cache_dir.glob("*.failed-*"):
        try:
            if now - note.stat().st_mtime > _NOTE_MAX_AGE_S:
                note.unlink()
        except FileNotFoundError:  # another node's sweep took it first
            pass


def _wait_for_cache(out: Path, failed: Path, poll_s: float = 1.0) -> None:
    """Wait until local rank 0 has renamed the finished cache into place, or raise its error."""
    import time

    waited = 0.0
    while not (out / "meta.json").exists():
        if failed.exists():
            try:
                why = failed.read_text()
            except FileNotFoundError:  # removed between the check and the read
                why = "see local rank 0's log"
            raise RuntimeError(f"local rank 0 failed to tokenize into {out}: {why}")
        time.sleep(poll_s)
        waited += poll_s
        if waited % 600 < poll_s:
            log.info("still waiting for local rank 0 to tokenize into %s (%.0f s)", out, waited)
