#!/usr/bin/env python
"""DPO throughput of mcore_align next to TRL's DPOTrainer: same model, data, batch, machine.

    python benchmarks/bench_dpo_vs_trl.py [--steps 10] [--gbs 8] [--hidden 256 --layers 4]

Needs `pip install trl` (not a dependency of mcore_align). Both sides train the same
tiny Qwen2-style model (random init, our tiny tokenizer) with DPO (sigmoid, beta 0.1,
no RPO term, reference model run every step) on the same pairs of
shared/data/dpo_en_demo.json: the pairs whose chosen and rejected conversations both fit
in --max-length tokens, so neither side truncates. Throughput is reported as pairs/s
and as real (non-padding) tokens/s = pairs/s x mean real tokens per pair, measured over
the steps after the first two (warm-up). mcore_align runs packed sequences in the CPU
execution mode (gloo) at TP=1 (1 process, 2 threads) and TP=2 / DP=2 (2 processes, 1
thread each); TRL runs on CPU with 2 threads.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MCORE_ALIGN_DATA", ROOT.parent / "shared" / "data")) / "dpo_en_demo.json"

TRL_SCRIPT = r'''
import json, sys, time, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer
hf, data, steps, gbs, max_len, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
torch.set_num_threads(2)
tok = AutoTokenizer.from_pretrained(hf)
rows = [json.loads(l) for l in open(data)]
ds = Dataset.from_list(rows)
times = []
class Timer(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw): self.t = time.perf_counter()
    def on_step_end(self, args, state, control, **kw): times.append(time.perf_counter() - self.t)
cfg = DPOConfig(output_dir=out, per_device_train_batch_size=gbs, max_steps=steps, learning_rate=1e-5,
                logging_steps=1000, report_to=[], save_strategy="no", max_length=max_len, beta=0.1,
                use_cpu=True, bf16=False, dataloader_num_workers=0, seed=0)
model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Timer()])
trainer.train()
json.dump(times, open(out + "/times.json", "w"))
'''


def fitting_pairs(tok, max_len: int) -> tuple[list[dict], float]:
    """TRL conversational records whose chosen and rejected conversations fit max_len."""
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    out, tokens = [], 0
    for r in json.loads(DATA.read_text()):
        prompt = [{"role": role[t["from"]], "content": t["value"]} for t in r["conversations"]]
        chosen = [{"role": "assistant", "content": r["chosen"]["value"]}]
        rejected = [{"role": "assistant", "content": r["rejected"]["value"]}]
        lc = len(tok.apply_chat_template(prompt + chosen, tokenize=True, return_dict=False))
        lr = len(tok.apply_chat_template(prompt + rejected, tokenize=True, return_dict=False))
        if max(lc, lr) <= max_len:
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            tokens += lc + lr
    return out, tokens / max(len(out), 1)


def run_mcore(ckpt: Path, data: Path, work: Path, nproc: int, layout: list[str], steps: int, gbs: int, max_len: int) -> list[float]:
    save = work / f"mcore_{nproc}_{'_'.join(layout) or 'tp1'}"
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // nproc)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "-m", "mcore_align.train",
           f"model.load={ckpt}", f"data.dataset=[{data}]", f"max_length={max_len}",
           f"max_tokens_per_micro_batch={4 * max_len}", f"global_batch_size={gbs}", f"train_iters={steps}",
           "learning_rate=1e-5", "rpo_alpha=null", "device=cpu", f"train.save={save}", "progress_bar=false",
           "plot=false", f"data.cache_dir={work / 'cache'}", *layout]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time"] for r in rows if "step_time" in r]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--gbs", type=int, default=8)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    a = p.parse_args()
    from transformers import AutoTokenizer

    from mcore_align.checkpoint import convert_hf_to_mcore
    from mcore_align.models.tiny import make_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    hf = make_tiny_model(work / "hf", "qwen2", num_layers=a.layers, hidden_size=a.hidden, ffn_hidden_size=4 * a.hidden,
                         num_heads=8, num_kv_heads=2, vocab_size=512)
    subprocess.run([sys.executable, "tools/convert_hf_to_mcore.py", "--hf", str(hf), "--out", str(work / "mcore")],
                   cwd=ROOT, check=True, capture_output=True)
    pairs, tok_per_pair = fitting_pairs(AutoTokenizer.from_pretrained(hf), a.max_length)
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    print(f"{len(pairs)} pairs fit in {a.max_length} tokens; {tok_per_pair:.0f} real tokens per pair")

    results = {}
    for name, nproc, layout in (("mcore_align TP=1 (1 proc x 2 threads)", 1, []),
                                ("mcore_align TP=2 (2 procs x 1 thread)", 2, ["tensor_model_parallel_size=2"]),
                                ("mcore_align DP=2 (2 procs x 1 thread)", 2, [])):
        results[name] = run_mcore(work / "mcore", data, work, nproc, layout, a.steps, a.gbs, a.max_length)
    trl_out = work / "trl"
    trl_out.mkdir()
    t0 = time.time()
    subprocess.run([sys.executable, "-c", TRL_SCRIPT, str(hf), str(data), str(a.steps), str(a.gbs), str(a.max_length),
                    str(trl_out)], cwd=ROOT, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    results["TRL DPOTrainer (1 proc x 2 threads)"] = json.loads((trl_out / "times.json").read_text())

    print(f"\nDPO, {a.gbs} pairs/step, hidden {a.hidden}, {a.layers} layers, vocab 512, max_length {a.max_length}, "
          f"steps 3..{a.steps}")
    print("| run | s/step | pairs/s | real tokens/s | vs TRL |")
    print("|---|---:|---:|---:|---:|")
    trl = sum(results["TRL DPOTrainer (1 proc x 2 threads)"][2:]) / len(results["TRL DPOTrainer (1 proc x 2 threads)"][2:])
    for name, times in results.items():
        s = sum(times[2:]) / len(times[2:])
        print(f"| {name} | {s:.3f} | {a.gbs / s:.1f} | {a.gbs / s * tok_per_pair:.0f} | {trl / s:.2f}x |")


if __name__ == "__main__":
    main()
