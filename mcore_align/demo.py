"""`make demo`: tiny model -> convert -> DPO at TP=2 on CPU -> export to HF -> summary.

The preference task is one a 2-layer random model can learn in a few minutes:
for varied prompts, the chosen answer is courteous and on topic, the rejected one
is curt and dismissive (disjoint vocabularies), so the policy can move probability
mass from one style to the other. Held-out pairs (a separate `val_dataset`) are about
topics never seen in training; their reward accuracy is printed before and after
training, and the demo fails if it does not reach 0.9.

Steps: tiny HF model -> convert -> verify the conversion at TP=2 against
`transformers` -> DPO at TP=2 -> export to HF -> summary.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

TOPICS = ["the weather", "a recipe", "the history of science", "a poem", "the python function",
          "two numbers", "a short story", "the best response", "my homework", "the river",
          "the city", "three examples", "a helpful summary", "the data", "your code"]
HELDOUT_TOPICS = ["the mountain", "a letter", "the garden", "my travel plans", "the music"]
ASKS = ["Can you help me with {t}?", "Tell me about {t}.", "What do you think of {t}?",
        "Please explain {t}.", "I need advice on {t}.", "Write something about {t}."]
GOOD = ["Sure, I would be glad to help with {t}. Here is a clear answer.",
        "Of course! Let me explain {t} step by step.",
        "Happy to help: here is a short, careful note on {t}."]
BAD = ["No.", "Figure it out yourself.", "Not my problem, go away.", "Whatever, I do not care."]


def make_task(path: Path, n: int, seed: int, topics: list[str] = TOPICS) -> None:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        t = rng.choice(topics)
        rows.append({"prompt": rng.choice(ASKS).format(t=t), "chosen": rng.choice(GOOD).format(t=t),
                     "rejected": rng.choice(BAD)})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run(cmd: list[str], env: dict | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, **(env or {})})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--nproc", type=int, default=2, help="ranks (TP=2 needs 2)")
    p.add_argument("--verbose", action="store_true",
                   help="show the library warnings and INFO logs that are filtered by default (parallel/quiet.py)")
    a = p.parse_args()
    if a.verbose:  # inherited by every step's subprocess
        os.environ["MCORE_ALIGN_VERBOSE"] = "1"
    out = Path(a.out).resolve()
    py = sys.executable
    t0 = time.time()
    from mcore_align.models.tiny import make_tiny_model

    hf = make_tiny_model(out / "hf_base", "qwen2", num_layers=2, hidden_size=64, vocab_size=512)
    run([py, "tools/convert_hf_to_mcore.py", "--hf", str(hf), "--out", str(out / "mcore_base"), "--overwrite"])
    torchrun = [py, "-m", "torch.distributed.run", f"--nproc-per-node={a.nproc}"]
    # The converted checkpoint computes the HF model's logits at the training layout (exit 1 if not).
    run([*torchrun, "tools/verify_conversion.py", "--hf", str(hf), "--ckpt", str(out / "mcore_base"),
         "--tp", str(a.nproc), "--device", "cpu"], env={"OMP_NUM_THREADS": "1"})
    make_task(out / "data" / "prefs.jsonl", 480, seed=0)
    make_task(out / "data" / "heldout.jsonl", 96, seed=99, topics=HELDOUT_TOPICS)
    save = out / "run"
    run([*torchrun, "-m", "mcore_align.train", "--config", "examples/configs/dpo_demo.yaml",
         f"model.load={out / 'mcore_base'}", f"data.dataset=[{out / 'data' / 'prefs.jsonl'}]",
         f"data.val_dataset=[{out / 'data' / 'heldout.jsonl'}]",
         f"train.save={save}", f"train.train_iters={a.steps}", f"data.cache_dir={out / 'cache'}"],
        env={"OMP_NUM_THREADS": "1"})
    run([py, "tools/convert_mcore_to_hf.py", "--ckpt", str(save), "--out", str(out / "hf_dpo"), "--overwrite"])
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in rows if "eval/rewards/accuracies" in r]
    tr = [r for r in rows if "loss" in r]
    print("\n=== demo summary ===")
    print(f"train loss: {tr[0]['loss']:.4f} (step 1) -> {tr[-1]['loss']:.4f} (step {tr[-1]['step']})")
    final_acc = ev[-1]["eval/rewards/accuracies"] if ev else float("nan")
    if ev:
        # At step 0 the policy is the reference, bit for bit: every reward is exactly 0, a tie,
        # which (as in TRL) does not count as accurate.
        print(f"held-out reward accuracy: {ev[0]['eval/rewards/accuracies']:.3f} (step {ev[0]['step']}, "
              f"policy = reference, rewards 0) -> {final_acc:.3f} (step {ev[-1]['step']})")
        print(f"held-out reward margin:   {ev[0]['eval/rewards/margins']:.3f} -> {ev[-1]['eval/rewards/margins']:.3f}")
    print(f"plot: {save / 'training_curves.png'}")
    print(f"exported HF model: {out / 'hf_dpo'}")
    print(f"total time: {time.time() - t0:.0f} s")
    if not final_acc >= 0.9:
        print(f"FAIL: held-out reward accuracy {final_acc:.3f} < 0.9", file=sys.stderr)
        sys.exit(1)
    print("OK: held-out reward accuracy >= 0.9")


if __name__ == "__main__":
    main()
