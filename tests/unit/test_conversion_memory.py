"""Conversion is streaming: peak memory is a few tensors, not the model (measured, can fail)."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh process: RSS there is not shaped by earlier tests. A warm-up
# conversion of a tiny model loads every lazily imported module first; then the process's
# ANONYMOUS resident memory (RssAnon: tensors and buffers) is sampled every 2 ms during the
# measured conversion. File-backed pages (safetensors are memory-mapped) are page cache the
# kernel reclaims at will and varied with the load of the machine, so they are not counted.
SCRIPT = textwrap.dedent("""
    import json, sys, threading, time
    from pathlib import Path
    import torch

    def anon_rss():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no RssAnon in /proc/self/status")
    from mcore_align.models.tiny import make_tiny_model
    from mcore_align.checkpoint import convert_hf_to_mcore
    root = Path(sys.argv[1])
    make_tiny_model(root / "warm", "qwen2")
    convert_hf_to_mcore(root / "warm", root / "warm_mc")
    hf = make_tiny_model(root / "hf", "qwen2", num_layers=16, hidden_size=512, ffn_hidden_size=1024,
                         num_heads=8, num_kv_heads=4, vocab_size=1024, max_shard_size="20MB")
    base = anon_rss()
    peak = [base]
    stop = threading.Event()
    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], anon_rss())
            time.sleep(0.002)
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    convert_hf_to_mcore(hf, root / "mc")
    stop.set(); th.join()
    print(json.dumps({"extra": peak[0] - base}))
""")


def test_conversion_peak_memory_is_a_few_tensors(tmp_path):
    from safetensors import safe_open

    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    extra = json.loads(proc.stdout.strip().splitlines()[-1])["extra"]
    sizes = []
    for f in (tmp_path / "hf").glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            sizes += [st.get_slice(k).get_shape() for k in st.keys()]
    nbytes = [4 * int(__import__("math").prod(s)) for s in sizes]
    total, largest = sum(nbytes), max(nbytes)
    # fc1 (gate+up fused) is the largest megatron parameter, 2x the largest HF tensor;
    # while one is built, its inputs, its halves and the open output file are alive too.
    budget = 12 * largest
    assert total > 4 * budget, (total, budget)  # holding the model would fail the test
    print(f"extra={extra/2**20:.1f}MiB budget={budget/2**20:.1f}MiB total={total/2**20:.1f}MiB")
    assert extra < budget, f"peak extra anonymous RSS {extra / 2**20:.1f} MiB > budget {budget / 2**20:.1f} MiB " \
                           f"(largest tensor {largest / 2**20:.1f} MiB, model {total / 2**20:.1f} MiB)"
