#!/usr/bin/env python
"""Conversion benchmark: time and peak RSS of HF -> mcore -> HF next to checkpoint size.

    .venv/bin/python benchmarks/bench_conversion.py [--workdir /tmp/bench_conv] [--layers 12]

Makes a random Llama-style HF checkpoint (bf16, hidden 1536, vocab 32000, sharded
into >= 8 safetensors files), then runs tools/convert_hf_to_mcore.py and
tools/convert_mcore_to_hf.py as child processes, sampling each child's RSS every
10 ms with psutil. "baseline" is the RSS of a child that only imports the stack
(torch + megatron-core + transformers) and builds the meta model.
"""
import argparse
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def run_measured(cmd: list[str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    proc = psutil.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            try:
                peak = max(peak, proc.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = proc.communicate()
    stop.set()
    th.join()
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{err.decode()[-3000:]}")
    return time.perf_counter() - t0, peak


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


BASELINE = """
import sys
from mcore_align.models.families import spec_from_hf_config
from mcore_align.models.spec import read_hf_config
from mcore_align.checkpoint.hf_to_mcore import build_meta_model
import transformers, safetensors
build_meta_model(spec_from_hf_config(read_hf_config(sys.argv[1])))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/bench_conversion")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard-size", default="100MB")
    a = p.parse_args()
    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    import torch

    from mcore_align.models.tiny import make_tiny_model

    t0 = time.perf_counter()
    hf = make_tiny_model(work / "hf", "llama", num_layers=a.layers, hidden_size=a.hidden, ffn_hidden_size=a.ffn,
                         num_heads=a.hidden // 128, num_kv_heads=max(1, a.hidden // 512), vocab_size=a.vocab,
                         dtype=torch.bfloat16, max_shard_size=a.shard_size)
    n_shards = len(list(hf.glob("*.safetensors")))
    print(f"made HF checkpoint in {time.perf_counter() - t0:.0f} s: {n_shards} shards, "
          f"{dir_bytes(hf) / 2**20:.0f} MiB")
    py = sys.executable
    rows = [("import + meta model (baseline)", *run_measured([py, "-c", BASELINE, str(hf)]), dir_bytes(hf))]
    t, rss = run_measured([py, "tools/convert_hf_to_mcore.py", "--hf", str(hf), "--out", str(work / "mc")])
    rows.append(("HF -> mcore (bf16)", t, rss, dir_bytes(work / "mc")))
    t, rss = run_measured([py, "tools/convert_mcore_to_hf.py", "--ckpt", str(work / "mc"), "--out",
                           str(work / "back"), "--max-shard-size", a.shard_size])
    rows.append(("mcore -> HF (bf16)", t, rss, dir_bytes(work / "back")))
    largest = max(f.stat().st_size for f in hf.glob("*.safetensors"))
    print(f"\nlargest tensor: embedding {a.vocab}x{a.hidden} bf16 = {a.vocab * a.hidden * 2 / 2**20:.0f} MiB; "
          f"largest HF shard file {largest / 2**20:.0f} MiB")
    print(f"| step | wall time (s) | peak RSS (MiB) | output size (MiB) |\n|---|---|---|---|")
    for name, t, rss, size in rows:
        print(f"| {name} | {t:.1f} | {rss / 2**20:.0f} | {size / 2**20:.0f} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
