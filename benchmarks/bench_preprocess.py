"""Tokenizing a dataset into the trainer's cache: tools/preprocess_data.py with 1 vs N worker
processes (and the trainer's own serial build), on a synthetic .jsonl of ``--pairs`` distinct
pairs made from the shared DPO demo records; plus where one process spends its time.

    .venv/bin/python benchmarks/bench_preprocess.py --pairs 20000 --workers 1,2 --trials 3

Every build runs in a fresh process (the CLI's code path: ``preprocess()``), so no build
inherits another's tokenizer thread pool; builds of the different kinds are interleaved
trial by trial, so load from other jobs on a shared machine hits them alike. Reported: the
median, min and max wall time over trials, tokens/s at the median, and the CPU seconds the
build used (user + system of the process and its workers: what parallelism cannot reduce).

The tokenizer is a tiny model's byte-level BPE (vocab 512, ~2400 tokens per pair; a real
150k-vocabulary tokenizer makes fewer, longer tokens: fewer tokens/s, similar chars/s).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_BUILD = """
import json, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tools!r})
from mcore_align.data.config import DataConfig
cfg = DataConfig(dataset=[{data!r}], max_length=8192, cache_dir={cache!r}, seed=1)
if {workers} == 0:  # the trainer's own build
    from transformers import AutoTokenizer
    from mcore_align.data.store import load_or_build_store
    s = load_or_build_store(cfg, AutoTokenizer.from_pretrained({tok!r}), "paired")
    print(json.dumps({{"tokens": s.meta["num_tokens"], "records": s.meta["records_kept"]}}))
else:
    from preprocess_data import preprocess
    s = preprocess(cfg, {tok!r}, "paired", workers={workers}, chunk={chunk}, log=lambda m: None)
    print(json.dumps({{"tokens": s["tokens"], "records": s["records_kept"]}}))
"""

_STAGES = """
import os, sys, time, json
os.environ["RAYON_NUM_THREADS"] = "1"; os.environ["TOKENIZERS_PARALLELISM"] = "false"
sys.path.insert(0, {root!r})
from transformers import AutoTokenizer
from mcore_align.data.config import DataConfig
from mcore_align.data.formats import detect_format, iter_jsonl
from mcore_align.data.store import prepare_record, _Writer
from mcore_align.data.tokenization import RecordTokenizer
from pathlib import Path
import tempfile
tok = AutoTokenizer.from_pretrained({tok!r})
cfg = DataConfig(dataset=[{data!r}], max_length=8192)
rt = RecordTokenizer(tok, "paired", 8192, "delete", False)
t = {{}}
t0 = time.process_time(); recs = [r for _, r in zip(range({n}), iter_jsonl(Path({data!r})))]
t["read + json parse"] = time.process_time() - t0
fmt = detect_format(recs[0][1], recs[0][0])
t0 = time.process_time(); prep = [prepare_record(rt, cfg, fmt, loc, raw) for loc, raw in recs]
t["normalise + chat template"] = time.process_time() - t0
texts = [r.text for p in prep for r in p[0]]
t0 = time.process_time(); encs = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
t["Rust BPE encode (1 thread)"] = time.process_time() - t0
t0 = time.process_time(); ids = [(e.ids, e.offsets) for e in encs]
t["ids/offsets to Python lists"] = time.process_time() - t0
t0 = time.process_time(); out = rt.tokenize([p[0] for p in prep])
t["whole tokenize() (encode + lists + targets)"] = time.process_time() - t0
d = tempfile.mkdtemp(); w = _Writer(Path(d))
t0 = time.process_time()
for r in out:
    if r is not None: w.add(r, -1, None)
w.close(); t["write arrays"] = time.process_time() - t0
print(json.dumps(t))
"""


def _make_data(path: Path, pairs: int, source: Path) -> None:
    """``pairs`` distinct records: the demo's, each copy with its last user turn varied."""
    recs = json.loads(source.read_text())
    with open(path, "w") as f:
        for i in range(pairs):
            r = json.loads(json.dumps(recs[i % len(recs)]))
            r["conversations"][-1]["value"] += f" (variant {i // len(recs)})"
            f.write(json.dumps(r) + "\n")


def _run(code: str) -> tuple[float, float, dict]:
    """(wall s, CPU s of the child and its workers, its JSON line)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    from mcore_align.models.tiny import make_tiny_model

    p = argparse.ArgumentParser()
    data_dir = os.environ.get("MCORE_ALIGN_DATA", str(ROOT.parent / "shared" / "data"))
    p.add_argument("--source", default=os.path.join(data_dir, "dpo_en_demo.json"))
    p.add_argument("--pairs", type=int, default=20000)
    p.add_argument("--workers", default="1,2", help="worker counts to compare (0 = the trainer's serial build)")
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--stages", type=int, default=2000, help="records for the per-stage profile (0: skip)")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_prep"))
    try:
        hf = make_tiny_model(work / "hf", "qwen2", num_layers=1, hidden_size=32, ffn_hidden_size=64, vocab_size=512)
        data = work / "pairs.jsonl"
        _make_data(data, a.pairs, Path(a.source))
        kinds = [int(x) for x in a.workers.split(",")]
        runs: dict[int, list] = {w: [] for w in kinds}
        for t in range(a.trials):
            for w in kinds:
                code = _BUILD.format(root=str(ROOT), tools=str(ROOT / "tools"), data=str(data),
                                     cache=str(work / f"c{w}_{t}"), workers=w, chunk=a.chunk, tok=str(hf))
                runs[w].append((*_run(code), os.getloadavg()[0]))
                print(f"trial {t} workers {w}: {runs[w][-1][0]:.1f} s wall, {runs[w][-1][1]:.1f} s CPU, "
                      f"load average {runs[w][-1][3]:.1f}", file=sys.stderr, flush=True)
                shutil.rmtree(work / f"c{w}_{t}", ignore_errors=True)
        cpu_name = platform.processor() or platform.machine()
        print(f"{a.pairs} pairs ({data.stat().st_size / 1e6:.0f} MB jsonl), {runs[kinds[0]][0][2]['tokens']} "
              f"tokens; {cpu_name}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
        print("| build | wall s: median (min-max) | tokens/s at median | records/s | CPU s (median) | load avg (1 min) |")
        print("|---|---:|---:|---:|---:|---|")
        for w in kinds:
            walls = [r[0] for r in runs[w]]
            med = statistics.median(walls)
            toks, recs = runs[w][0][2]["tokens"], runs[w][0][2]["records"]
            name = "trainer build (serial)" if w == 0 else f"preprocess_data.py --workers {w}"
            print(f"| {name} | {med:.1f} ({min(walls):.1f}-{max(walls):.1f}) | {toks / med:.0f} | {recs / med:.0f} | "
                  f"{statistics.median(r[1] for r in runs[w]):.1f} | {', '.join(f'{r[3]:.0f}' for r in runs[w])} |")
        if a.stages:
            _, _, stages = _run(_STAGES.format(root=str(ROOT), tok=str(hf), data=str(data), n=a.stages))
            total = stages["read + json parse"] + stages["normalise + chat template"] + \
                stages["whole tokenize() (encode + lists + targets)"] + stages["write arrays"]
            print(f"\nCPU seconds per stage, one process, one thread, first {a.stages} records:")
            print("| stage | CPU s | share |")
            print("|---|---:|---:|")
            for k, v in stages.items():
                print(f"| {k} | {v:.2f} | {v / total:.0%} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
