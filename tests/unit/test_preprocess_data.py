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
