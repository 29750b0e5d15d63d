"""The tiny built-in default of ``examples/ppo_mcore.sh`` and ``examples/grpo_mcore.sh``.

``python -m mcore_align.online_demo prepare --out DIR`` writes a tiny Qwen2-style model
(random weights, converted to Megatron-Core) and the demo's preference task: prompts for
the online run, and chosen/rejected pairs for the SFT and reward-model runs that PPO starts
from. ``python -m mcore_align.online_demo summary --save SAVE`` prints the score at the start
and at the end of an online run from its ``metrics.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def prepare(out: Path) -> None:
    from mcore_align.demo import make_task
    from mcore_align.models.tiny import make_tiny_model

    out.mkdir(parents=True, exist_ok=True)
    if not (out / "mcore" / "metadata.json").exists():
        hf = make_tiny_model(out / "hf", "qwen2", num_layers=2, hidden_size=64, vocab_size=512)
        subprocess.run([sys.executable, "tools/convert_hf_to_mcore.py", "--hf", str(hf), "--out", str(out / "mcore"),
                        "--overwrite"], check=True)
    make_task(out / "prefs.jsonl", 256, seed=0)  # SFT (chosen responses) and RM (pairs)
    make_task(out / "prompts.jsonl", 128, seed=1)  # the online run reads the prompts
    print(f"tiny model {out / 'mcore'}, data {out / 'prefs.jsonl'} and {out / 'prompts.jsonl'}")


def summary(save: Path) -> int:
    rows = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "objective/scores" in r]
    if not rows:
        print(f"{save}/metrics.jsonl has no objective/scores rows", file=sys.stderr)
        return 1
    k = max(1, min(3, len(rows) // 3))
    mean = lambda key, part: sum(r[key] for r in part) / len(part)  # noqa: E731
    first, last = rows[:k], rows[-k:]
    print("\n=== online run summary ===")
    print(f"steps: {rows[0]['step']} .. {rows[-1]['step']}")
    print(f"score (mean of {k} steps): {mean('objective/scores', first):.4f} at the start -> "
          f"{mean('objective/scores', last):.4f} at the end")
    for key in ("objective/kl", "loss/value_avg", "response_length"):
        if key in rows[0]:
            print(f"{key}: {mean(key, first):.4f} -> {mean(key, last):.4f}")
    print(f"metrics: {save / 'metrics.jsonl'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare").add_argument("--out", type=Path, required=True)
    sub.add_parser("summary").add_argument("--save", type=Path, required=True)
    a = p.parse_args(argv)
    if a.cmd == "prepare":
        prepare(a.out)
        return 0
    return summary(a.save)


if __name__ == "__main__":
    sys.exit(main())
