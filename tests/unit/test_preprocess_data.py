"""tools/preprocess_data.py builds the trainer's own cache: same folder (cache key), same
arrays, same meta.json as load_or_build_store's serial build, with 1 or 2 worker processes
and sharded over 2 "nodes"; the trainer's loader then opens it without tokenizing.
Timing is not asserted here (benchmarks/bench_preprocess.py, docs/benchmarks.md)."""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, shared_data_dir

sys.path.insert(0, str(ROOT / "tools"))

DATA = shared_data_dir() / "dpo_en_demo.json"
pytestmark = pytest.mark.skipif(not DATA.exists(), reason=f"shared preference data not found at {DATA}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer

    from mcore_align.data.config import DataConfig
    from mcore_align.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("prep")
    hf = make_tiny_model(root / "hf", "qwen2", num_layers=1, hidden_size=32, ffn_hidden_size=64, vocab_size=512)
    recs = json.loads(DATA.read_text())[:120]
    # Bad and dropped records in the middle, so order-dependent counters are exercised.
    recs[7]["chosen"] = recs[7]["rejected"]  # identical pair: dropped
    recs[50]["conversations"] = [{"from": "gpt", "value": "no user turn"}]  # bad: skipped
    recs[51]["chosen"] = {"from": "gpt", "value": ""}  # empty response
    (root / "d.json").write_text(json.dumps(recs))
    cfg = DataConfig(dataset=[str(root / "d.json")], max_length=256, cache_dir=str(root / "ref_cache"),
                     on_bad_record="skip")
    return root, str(hf), cfg, AutoTokenizer.from_pretrained(str(hf))


def _arrays(path: Path) -> dict:
    from mcore_align.data.store import _ARRAYS

    return {n: np.fromfile(path / f"{n}.bin", dtype=t) for n, t in _ARRAYS.items()}


def _same_cache(a: Path, b: Path) -> None:
    assert a.name == b.name  # the same cache key
    ra, rb = _arrays(a), _arrays(b)
    for n in ra:
        np.testing.assert_array_equal(ra[n], rb[n], err_msg=n)
    assert json.loads((a / "meta.json").read_text()) == json.loads((b / "meta.json").read_text())


@pytest.mark.parametrize("workers,chunk,shards", [(1, 1024, 1), (2, 16, 1), (2, 7, 2)])
def test_preprocessed_cache_is_the_trainers(setup, tmp_path, workers, chunk, shards):
    from mcore_align.data.store import load_or_build_store
    from preprocess_data import preprocess

    root, tok_dir, cfg, tok = setup
    ref = load_or_build_store(cfg, tok, "paired")  # the trainer's own serial build
    assert ref.meta["dropped_total"] >= 3, ref.meta["dropped"]
    mine = dataclasses.replace(cfg, cache_dir=str(tmp_path / "cache"))
    for i in range(shards):
        stats = preprocess(mine, tok_dir, "paired", workers=workers, chunk=chunk, shard=(i, shards), log=lambda m: None)
        assert stats["built"] == (i == shards - 1)
    built = Path(stats["cache"])
    _same_cache(ref.path, built)
    assert not list(built.parent.glob("*.shards"))  # parts removed after assembly
    # The trainer's loader now finds it and builds nothing (build_store would fail loudly).
    import mcore_align.data.store as store

    orig = store.build_store
    store.build_store = lambda *a, **k: pytest.fail("the trainer tokenized again")
    try:
        assert load_or_build_store(mine, tok, "paired").path == built
    finally:
        store.build_store = orig


@pytest.fixture(scope="module")
def split_data(setup):
    """A .jsonl (blank lines, a non-UTF-8 line, bad and dropped records, no final newline)
    and a parquet file of 9 row groups: both are cut into pieces the workers read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, tok_dir, cfg, tok = setup
    recs = json.loads(DATA.read_text())[120:200]
    lines = [json.dumps(r).encode() for r in recs[:50]]
    lines[3] = b""  # blank: skipped, not counted as read
    lines[10] = b'{"conversations": "' + bytes([0xFF, 0xFE]) + b'"}'
    lines[17] = json.dumps({**recs[17], "chosen": recs[17]["rejected"]}).encode()  # identical pair: dropped
    lines[30] = json.dumps({"conversations": [{"from": "gpt", "value": "x"}], "chosen": recs[30]["chosen"],
                            "rejected": recs[30]["rejected"]}).encode()  # bad: skipped
    (root / "d.jsonl").write_bytes(b"\n".join(lines))
    rows = recs[50:]
    rows[4] = {**rows[4], "chosen": rows[4]["rejected"]}
    pq.write_table(pa.Table.from_pylist(rows), root / "d.parquet", row_group_size=4)
    assert pq.ParquetFile(root / "d.parquet").metadata.num_row_groups > 5
    return dataclasses.replace(cfg, dataset=[str(root / "d.jsonl"), str(root / "d.parquet"), cfg.dataset[0]],
                               cache_dir=str(root / "ref_split"), max_length=2048)


@pytest.mark.parametrize("workers,chunk,shards", [(2, 6, 1), (2, 5, 3)])
def test_split_files_give_the_trainers_cache(setup, split_data, tmp_path, workers, chunk, shards):
    """jsonl byte ranges and parquet row groups read by the workers themselves (several
    processes, several shards) give the single-process trainer's arrays and meta.json."""
    from mcore_align.data.store import load_or_build_store
    from preprocess_data import preprocess

    root, tok_dir, cfg, tok = setup
    ref = load_or_build_store(split_data, tok, "paired")
    assert {"non_utf8", "identical_chosen_rejected"} <= set(ref.meta["dropped"]), ref.meta["dropped"]
    assert ref.meta["records_kept"] > 60, ref.meta
    mine = dataclasses.replace(split_data, cache_dir=str(tmp_path / "cache"))
    for i in range(shards):
        stats = preprocess(mine, tok_dir, "paired", workers=workers, chunk=chunk, shard=(i, shards), log=lambda m: None)
    assert stats["built"]
    _same_cache(ref.path, Path(stats["cache"]))


def test_two_processes_give_the_one_process_cache(setup, split_data, tmp_path):
    """The same build with 1 and with 2 worker processes: identical arrays and meta.json."""
    from preprocess_data import preprocess

    root, tok_dir, cfg, tok = setup
    built = []
    for workers in (1, 2):
        mine = dataclasses.replace(split_data, cache_dir=str(tmp_path / f"w{workers}"))
        built.append(Path(preprocess(mine, tok_dir, "paired", workers=workers, chunk=8, log=lambda m: None)["cache"]))
    _same_cache(*built)


def test_jsonl_pieces_cover_the_file_with_line_numbers(tmp_path):
    from mcore_align.data.formats import iter_jsonl
    from preprocess_data import _jsonl_pieces

    f = tmp_path / "x.jsonl"
    f.write_bytes(b'{"a": 1}\n\n{"a": 3}\n{"a": 4}\n{"a": 5}\n{"a": 6}\n{"a": 7}')  # no final newline
    whole = list(iter_jsonl(f))
    for lines in (1, 2, 3, 7, 100):
        pieces = _jsonl_pieces(f, lines)
        assert pieces[0][0] == 0 and pieces[-1][1] == f.stat().st_size
        assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))  # contiguous
        assert len(pieces) == -(-7 // lines)
        assert [r for a, b, first in pieces for r in iter_jsonl(f, a, b, first)] == whole
    assert whole[-1] == (f"{f}:7", {"a": 7})


def test_a_shard_parses_only_its_share(setup, tmp_path):
    """A malformed line in shard 1's share: shard 0 never parses it and succeeds; shard 1
    fails naming the file and line."""
    from preprocess_data import preprocess

    root, tok_dir, cfg, tok = setup
    recs = json.loads(DATA.read_text())[:20]
    lines = [json.dumps(r) for r in recs]
    lines[14] = '{"conversations": ['  # line 15, in the third piece of 5 lines: shard 0 of 2 takes pieces 0, 2
    lines[7] = lines[7][:-1]  # line 8: piece 1 (shard 1)
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    mine = dataclasses.replace(cfg, dataset=[str(tmp_path / "m.jsonl")], cache_dir=str(tmp_path / "c"),
                               max_length=8192, on_bad_record="error")
    with pytest.raises(ValueError, match=r"m\.jsonl:15: malformed JSON"):
        preprocess(mine, tok_dir, "paired", chunk=5, shard=(0, 2), log=lambda m: None)
    ok = mine
    lines[14] = json.dumps(recs[14])
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    assert preprocess(ok, tok_dir, "paired", chunk=5, shard=(0, 2), log=lambda m: None)["records_kept"] == 10
    with pytest.raises(ValueError, match=r"m\.jsonl:8: malformed JSON"):
        preprocess(ok, tok_dir, "paired", chunk=5, shard=(1, 2), log=lambda m: None)


def test_cli_uses_the_run_config(setup, tmp_path):
    """The CLI reads the trainer's config (model.load's tokenizer, objective kind) and a
    second run is a no-op."""
    import subprocess

    root, tok_dir, cfg, tok = setup
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tok_dir, ckpt / "tokenizer")
    args = [sys.executable, "tools/preprocess_data.py", f"model.load={ckpt}", f"dataset={cfg.dataset[0]}",
            "max_length=256", f"cache_dir={tmp_path / 'c'}", "on_bad_record=skip", "--workers", "2"]
    first = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "tokens/s" in first.stdout and "built" in first.stdout
    second = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "nothing to do" in second.stdout, second.stdout
    bad = subprocess.run([*args[:2], "--shard", "2/2", *args[2:]], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "--shard" in bad.stderr
