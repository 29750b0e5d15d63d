"""Reading dataset files and turning every supported record format into an `Example`.

Formats (auto-detected from the first record's keys, or forced by `dataset_format`):

| name        | keys                                                               | origin |
| ---         | ---                                                                | ---    |
| sharegpt    | conversations [{from, value}], chosen/rejected {from, value}, label | LLaMA-Factory |
| messages    | messages [{role, content}], rejected_response, label               | ms-swift |
| swift       | system, query, response, rejected_response, history, label         | ms-swift |
| alpaca      | instruction, input, output, system, history                        | Alpaca/LLaMA-Factory |
| trl         | prompt, chosen, rejected (strings, or message lists)               | TRL |
| trl_implicit| chosen, rejected (full conversations, shared prompt)               | TRL |
| trl_kto     | prompt, completion, label                                          | TRL |
| prompt      | prompt (string or messages): prompt-only, for rollouts             | TRL |
| rlaif_v     | question, chosen, rejected (strings), image                        | RLAIF-V hub columns |

Any format may carry ``images`` (or one ``image``) and, for pairs, ``rejected_images``
(ms-swift: the rejected response's prompt shows these images instead; the prompt text and
its ``<image>`` placeholders are shared).

Plain-string TRL records (`prompt` a str) are raw text: no chat template, BOS from the
tokenizer and EOS appended, as TRL does. Everything else is a conversation rendered by
the tokenizer's chat template.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

FORMATS = ("sharegpt", "messages", "swift", "alpaca", "trl", "trl_implicit", "trl_kto", "prompt", "rlaif_v")
_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow")
# Metadata files `datasets.Dataset.save_to_disk` writes beside its .arrow shards (not records).
_ARROW_META = frozenset({"state.json", "dataset_info.json", "dataset_dict.json"})
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}
# Field that carries the rejected response / the KTO label, per format (for error messages).
REJECTED_FIELD = {"sharegpt": "rejected", "messages": "rejected_response", "swift": "rejected_response",
                  "alpaca": "rejected_response", "trl": "rejected", "trl_implicit": "rejected",
                  "trl_kto": "rejected", "prompt": "rejected", "rlaif_v": "rejected"}


class BadRecord(ValueError):
    """A record that cannot be used; `reason` is the counter key in the data report."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # picklable (tools/preprocess_data.py's worker processes send them)
        return (type(self), (self.reason, str(self)))


class DroppedRecord(BadRecord):
    """A well-formed record the pipeline drops by design whatever `on_bad_record` says
    (chosen == rejected, an empty user turn): always dropped and counted by `reason`."""


@dataclass
class Example:
    """One normalised record. `prompt` is a message list, or a raw string (TRL plain text)."""

    prompt: list[dict[str, str]] | str
    chosen: str | None = None
    """Final assistant response (the only response for SFT/KTO)."""
    rejected: str | None = None
    label: bool | None = None
    """KTO desirability."""
    images: list[Any] = field(default_factory=list)
    """Kept for vision models; the text pipeline does not read them."""
    image_field: str = "images"
    """The record field the images came from (``images``, or ``image`` for one image), for messages."""
    rejected_images: list[Any] | None = None
    """ms-swift ``rejected_images``: the images the rejected sequence's prompt shows instead of
    ``images`` (same prompt text and placeholders); None: the rejected side shares ``images``."""
    margin: float | None = None
    """Paired data: optional reward-model margin of the pair (field ``margin``)."""


# ---- reading ------------------------------------------------------------------------
def _files_of(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in _SUFFIXES and p.is_file())
        if any(p.suffix == ".arrow" for p in files):  # a save_to_disk folder: its .json files are metadata
            files = [p for p in files if p.name not in _ARROW_META]
        if not files:
            raise ValueError(f"dataset folder {path} holds no {'/'.join(_SUFFIXES)} files")
        return files
    if path.suffix not in _SUFFIXES:
        raise ValueError(f"dataset file {path} must end with one of {_SUFFIXES}")
    return [path]


def split_sampling_suffix(spec: str) -> tuple[str, int | None]:
    """"data.jsonl#100" -> ("data.jsonl", 100); "data.jsonl" -> ("data.jsonl", None)."""
    name, sep, n = spec.rpartition("#")
    if not sep:
        return spec, None
    if not n.isdigit() or int(n) <= 0:
        raise ValueError(f"dataset {spec!r}: the part after '#' must be a positive record count")
    return name, int(n)


def _iter_file(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (location, record). Location is "file:line" (jsonl) or "file[record i]"."""
    if path.suffix == ".jsonl":
        yield from iter_jsonl(path)
    elif path.suffix == ".json":
        # A JSON array has to be parsed whole; use .jsonl or .parquet for huge datasets.
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise ValueError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
        for i, rec in enumerate(data):
            yield f"{path}[record {i}]", rec
    elif path.suffix == ".parquet":  # image columns: {"bytes", "path"} structs, as for Arrow
        yield from iter_parquet(path)
    else:
        # Arrow IPC (.arrow: `datasets` writes the stream format, pyarrow often the file
        # format). Image columns hold {"bytes", "path"} structs (datasets' Image feature).
        i = 0
        for batch in _arrow_batches(path):
            for rec in batch.to_pylist():
                yield f"{path}[row {i}]", rec
                i += 1


def iter_jsonl(path: Path, start: int = 0, stop: int | None = None, first_line: int = 1) -> Iterator[tuple[str, Any]]:
    """Records of a ``.jsonl`` file as ("file:line", record), line by line (RAM stays bounded
    by the longest line). ``start``/``stop``: only the lines that begin in this byte range
    (``start`` at a line start, numbered ``first_line``), so that tools/preprocess_data.py's
    workers each parse only their share of a file."""
    with open(path, "rb") as f:
        f.seek(start)
        pos = start
        for lineno, raw in enumerate(f, start=first_line):
            if stop is not None and pos >= stop:
                return
            pos += len(raw)
            loc = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield loc, BadRecord("non_utf8", f"{loc}: not valid UTF-8 ({e})")
                continue
            if not line.strip():
                continue
            try:
                yield loc, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{loc}: malformed JSON: {e.msg} (column {e.colno})") from None


def iter_parquet(path: Path, row_groups: list[int] | None = None, first_row: int = 0) -> Iterator[tuple[str, Any]]:
    """Rows of a parquet file as ("file[row i]", record); ``row_groups``: only these (in
    order), whose first row is number ``first_row`` of the file."""
    import pyarrow.parquet as pq

    i = first_row
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, row_groups=row_groups):
        for rec in batch.to_pylist():
            yield f"{path}[row {i}]", rec
            i += 1


def _arrow_batches(path: Path):
    import pyarrow as pa

    with pa.memory_map(str(path)) as src:
        try:
            reader = pa.ipc.open_stream(src)
        except pa.ArrowInvalid:
            src.seek(0)
            f = pa.ipc.open_file(src)
            reader = (f.get_batch(k) for k in range(f.num_record_batches))
        for batch in reader:
            yield batch


def _iter_hub(name: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # noqa: BLE001 - re-raised with the dataset name
        raise ValueError(f"dataset {name!r} is not a local file or folder and loading it from the hub failed: {e}") from e
    for i, rec in enumerate(_undecoded_images(ds)):
        yield f"{name}[row {i}]", rec


def _undecoded_images(ds):
    """``ds`` with its Image features (and lists of them) left encoded: records then carry
    ``{"bytes", "path"}`` dicts, which the tokenized cache stores as they are, instead of
    decoded PIL images (which would have to be re-encoded)."""
    import datasets

    for col, feat in ds.features.items():
        if isinstance(feat, datasets.Image) and feat.decode:
            ds = ds.cast_column(col, datasets.Image(decode=False))
        elif isinstance(getattr(feat, "feature", None), datasets.Image) and feat.feature.decode:
            ds = ds.cast_column(col, type(feat)(datasets.Image(decode=False)))
    return ds


def iter_dataset(spec: str, seed: int, with_base_dir: bool = False) -> Iterator[tuple]:
    """Records of one `dataset` entry (file, folder or hub name, with optional `#N`) as
    ``(loc, record)``; ``with_base_dir``: ``(loc, record, folder of its file)`` (relative image
    paths are taken relative to it; None for hub datasets)."""
    name, n = split_sampling_suffix(spec)
    path = Path(os.path.expanduser(name))
    if path.exists():
        it = ((*rec, f.parent) for f in _files_of(path) for rec in _iter_file(f))
    else:
        it = ((*rec, None) for rec in _iter_hub(name))
    if not with_base_dir:
        it = (rec[:2] for rec in it)
    if n is None:
        yield from it
        return
    # Sampling needs the record count, so this path holds the records in memory.
    records = list(it)
    rng = np.random.default_rng(seed)
    reps, rest = divmod(n, len(records)) if records else (0, 0)
    idx = np.concatenate([np.tile(np.arange(len(records)), reps),
                          np.sort(rng.choice(len(records), size=rest, replace=False))]).astype(int)
    for i in idx:
        yield records[i]


def content_fingerprint(spec: str, memo_dir: str | Path) -> str:
    """Identity of a dataset entry for the cache key: a hash of each file's bytes.

    Hashing is memoised in `memo_dir` by (path, size, mtime), so a restart does not
    re-read a 10 GB dataset just to find its cache."""
    name, n = split_sampling_suffix(spec)
    path = Path(os.path.expanduser(name))
    if not path.exists():
        return f"hub:{name}#{n}"
    memo = Path(memo_dir) / "file_hashes"
    parts = []
    for f in _files_of(path):
        st = f.stat()
        stat_key = hashlib.sha256(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:32]
        memo_file = memo / stat_key
        if memo_file.exists():
            digest = memo_file.read_text().strip()
        else:
            h = hashlib.blake2b(digest_size=20)
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            digest = h.hexdigest()
            memo.mkdir(parents=True, exist_ok=True)
            tmp = memo_file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(digest)
            os.replace(tmp, memo_file)  # atomic: a concurrent reader sees all or nothing
        parts.append(digest)
    return f"{'+'.join(parts)}#{n}"


# ---- detection and normalisation ----------------------------------------------------
def detect_format(rec: Any, loc: str) -> str:
    if not isinstance(rec, dict):
        raise ValueError(f"{loc}: a record must be a JSON object, got {type(rec).__name__}")
    keys = set(rec)
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "messages"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "query" in keys:
        return "swift"
    if "question" in keys and "chosen" in keys:
        return "rlaif_v"
    if "prompt" in keys and "completion" in keys:
        return "trl_kto"
    if "prompt" in keys and "chosen" in keys:
        return "trl"
    if "chosen" in keys and "rejected" in keys:
        return "trl_implicit"
    if "prompt" in keys:
        return "prompt"
    raise ValueError(f"{loc}: cannot detect the dataset format from keys {sorted(keys)}; "
                     f"set DataConfig.dataset_format to one of {list(FORMATS)}")


def _field(rec: dict, key: str, types: type | tuple, fmt: str, loc: str, required: bool = True) -> Any:
    if key not in rec or rec[key] is None:
        if required:
            raise BadRecord("missing_field", f"{loc}: missing field '{key}' (detected format '{fmt}')")
        return None
    val = rec[key]
    if not isinstance(val, types):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise BadRecord("mistyped_field", f"{loc}: field '{key}' must be {names}, got "
                        f"{type(val).__name__} (detected format '{fmt}')")
    return val


def _label(rec: dict, fmt: str, loc: str) -> bool | None:
    key = "label" if "label" in rec else ("kto_tag" if "kto_tag" in rec else None)
    if key is None or rec[key] is None:
        return None
    if not isinstance(rec[key], bool):
        raise BadRecord("bad_label", f"{loc}: field '{key}' must be a boolean (true/false), got "
                        f"{rec[key]!r} (detected format '{fmt}')")
    return rec[key]


def _messages(msgs: list, key: str, fmt: str, loc: str, sharegpt: bool = False) -> list[dict[str, str]]:
    out = []
    rk, ck = ("from", "value") if sharegpt else ("role", "content")
    for j, m in enumerate(msgs):
        where = f"{key}[{j}]"
        if not isinstance(m, dict) or rk not in m or ck not in m:
            raise BadRecord("missing_field", f"{loc}: field '{where}' must be an object with '{rk}' and "
                            f"'{ck}' (detected format '{fmt}')")
        if isinstance(m[ck], list):  # TRL/OpenAI content parts: image parts become <image> placeholders
            from .images import content_parts_to_text

            m = {**m, ck: content_parts_to_text(m[ck], f"{where}.{ck}", loc)}
        role = _SHAREGPT_ROLES.get(m[rk]) if sharegpt else m[rk]
        if role not in ("system", "user", "assistant"):
            raise BadRecord("mistyped_field", f"{loc}: field '{where}.{rk}' has unsupported role {m[rk]!r} "
                            f"(detected format '{fmt}')")
        if not isinstance(m[ck], str):
            raise BadRecord("mistyped_field", f"{loc}: field '{where}.{ck}' must be str, got "
                            f"{type(m[ck]).__name__} (detected format '{fmt}')")
        out.append({"role": role, "content": m[ck]})
    return out


def _turn_text(val: Any, key: str, fmt: str, loc: str) -> str:
    """A response given as a str, a {from, value}/{role, content} dict or a one-message list."""
    if isinstance(val, list) and len(val) == 1:
        val = val[0]
    if isinstance(val, dict):
        val = val.get("value", val.get("content"))
    if not isinstance(val, str):
        raise BadRecord("mistyped_field", f"{loc}: field '{key}' must be a response string or one "
                        f"assistant message (detected format '{fmt}')")
    return val


def _split_last_assistant(msgs: list[dict], key: str, fmt: str, loc: str) -> tuple[list[dict], str | None]:
    if msgs and msgs[-1]["role"] == "assistant":
        return msgs[:-1], msgs[-1]["content"]
    return msgs, None


def _history(rec: dict, fmt: str, loc: str) -> list[dict[str, str]]:
    hist = _field(rec, "history", list, fmt, loc, required=False) or []
    out = []
    for j, turn in enumerate(hist):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise BadRecord("mistyped_field", f"{loc}: field 'history[{j}]' must be [query, response] "
                            f"strings (detected format '{fmt}')")
        out += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    return out


def _system(rec: dict, fmt: str, loc: str) -> list[dict[str, str]]:
    system = _field(rec, "system", str, fmt, loc, required=False)
    return [{"role": "system", "content": system}] if system else []


def _margin(rec: dict, fmt: str, loc: str) -> float | None:
    """Optional per-pair reward-model margin (TRL's RewardTrainer column ``margin``)."""
    v = rec.get("margin")
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise BadRecord("mistyped_field", f"{loc}: field 'margin' must be a finite number, got {v!r} "
                        f"(detected format '{fmt}')")
    return float(v)


def normalize(rec: Any, fmt: str, loc: str) -> Example:
    """Turn one raw record of format `fmt` into an `Example` (raises `BadRecord`)."""
    ex = _normalize(rec, fmt, loc)
    ex.margin = _margin(rec, fmt, loc)
    return ex


def _normalize(rec: Any, fmt: str, loc: str) -> Example:
    if isinstance(rec, BadRecord):
        raise rec
    if not isinstance(rec, dict):
        raise BadRecord("mistyped_field", f"{loc}: a record must be a JSON object, got {type(rec).__name__}")
    images, image_field = rec.get("images") or [], "images"
    if not images and rec.get("image") is not None:  # one image per record (RLAIF-V style column)
        images, image_field = [rec["image"]], "image"
    if isinstance(images, (str, dict)):  # a single image given without a list
        images = [images]
    if not isinstance(images, list):
        raise BadRecord("mistyped_field", f"{loc}: field 'images' must be a list (detected format '{fmt}')")
    ex = _normalize_text(rec, fmt, loc, images)
    rej = rec.get("rejected_images")
    if isinstance(rej, (str, dict)):
        rej = [rej]
    if rej is not None and not isinstance(rej, list):
        raise BadRecord("mistyped_field", f"{loc}: field 'rejected_images' must be a list (detected format '{fmt}')")
    ex.rejected_images = rej or None
    ex.image_field = image_field
    return ex


def _normalize_text(rec: dict, fmt: str, loc: str, images: list) -> Example:
    if fmt == "sharegpt":
        msgs = _messages(_field(rec, "conversations", list, fmt, loc), "conversations", fmt, loc, sharegpt=True)
        msgs = _system(rec, fmt, loc) + msgs
        if "chosen" in rec or "rejected" in rec:
            chosen = _turn_text(_field(rec, "chosen", (dict, str, list), fmt, loc), "chosen", fmt, loc)
            rej = _turn_text(_field(rec, "rejected", (dict, str, list), fmt, loc), "rejected", fmt, loc)
            return Example(msgs, chosen, rej, _label(rec, fmt, loc), images)
        prompt, resp = _split_last_assistant(msgs, "conversations", fmt, loc)
        return Example(prompt, resp, None, _label(rec, fmt, loc), images)
    if fmt == "messages":
        msgs = _messages(_field(rec, "messages", list, fmt, loc), "messages", fmt, loc)
        prompt, resp = _split_last_assistant(msgs, "messages", fmt, loc)
        rej = _field(rec, "rejected_response", str, fmt, loc, required=False)
        return Example(prompt, resp, rej, _label(rec, fmt, loc), images)
    if fmt == "swift":
        query = _field(rec, "query", str, fmt, loc)
        prompt = _system(rec, fmt, loc) + _history(rec, fmt, loc) + [{"role": "user", "content": query}]
        return Example(prompt, _field(rec, "response", str, fmt, loc, required=False),
                       _field(rec, "rejected_response", str, fmt, loc, required=False),
                       _label(rec, fmt, loc), images)
    if fmt == "rlaif_v":
        # RLAIF-V hub columns (ms-swift maps question -> query, chosen -> response, rejected ->
        # rejected_response). Its questions carry no <image> tag: as ms-swift's template does,
        # a question without placeholders gets one per image in front.
        query = _field(rec, "question", str, fmt, loc)
        if images and "<image>" not in query:
            query = "<image>" * len(images) + query
        prompt = _system(rec, fmt, loc) + [{"role": "user", "content": query}]
        return Example(prompt, _turn_text(_field(rec, "chosen", (str, dict, list), fmt, loc), "chosen", fmt, loc),
                       _turn_text(_field(rec, "rejected", (str, dict, list), fmt, loc), "rejected", fmt, loc),
                       _label(rec, fmt, loc), images)
    if fmt == "alpaca":
        inst = _field(rec, "instruction", str, fmt, loc)
        inp = _field(rec, "input", str, fmt, loc, required=False)
        query = f"{inst}\n{inp}" if inp else inst  # LLaMA-Factory joins them with a newline
        prompt = _system(rec, fmt, loc) + _history(rec, fmt, loc) + [{"role": "user", "content": query}]
        return Example(prompt, _field(rec, "output", str, fmt, loc),
                       _field(rec, "rejected_response", str, fmt, loc, required=False), None, images)
    if fmt in ("trl", "trl_kto", "prompt"):
        prompt = _field(rec, "prompt", (str, list), fmt, loc)
        if isinstance(prompt, list):
            prompt = _messages(prompt, "prompt", fmt, loc)
        if fmt == "prompt":
            return Example(prompt, None, None, None, images)
        keys = ("completion", None) if fmt == "trl_kto" else ("chosen", "rejected")
        resp = [None, None]
        for k, key in enumerate(keys):
            if key is None:
                continue
            val = _field(rec, key, (str, list), fmt, loc)
            if isinstance(prompt, str) and not isinstance(val, str):
                raise BadRecord("mistyped_field", f"{loc}: field '{key}' must be str when 'prompt' is a "
                                f"str (detected format '{fmt}')")
            resp[k] = val if isinstance(val, str) else _turn_text(_messages(val, key, fmt, loc), key, fmt, loc)
        return Example(prompt, resp[0], resp[1], _label(rec, fmt, loc), images)
    if fmt == "trl_implicit":
        ch = _messages(_field(rec, "chosen", list, fmt, loc), "chosen", fmt, loc)
        rj = _messages(_field(rec, "rejected", list, fmt, loc), "rejected", fmt, loc)
        if ch[:-1] != rj[:-1]:
            raise BadRecord("mistyped_field", f"{loc}: fields 'chosen' and 'rejected' must share every turn "
                            f"but the last (detected format '{fmt}')")
        (prompt, c), (_, r) = _split_last_assistant(ch, "chosen", fmt, loc), _split_last_assistant(rj, "rejected", fmt, loc)
        return Example(prompt, c, r, _label(rec, fmt, loc), images)
    raise ValueError(f"unknown dataset format {fmt!r}")
