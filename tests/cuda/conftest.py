"""Fixtures of the CUDA tests (marker ``cuda``; run by tools/gpu_check.sh on a GPU machine).

Everything they need is made here, offline: a tiny Qwen2 checkpoint converted with the
project's own converter, and a synthetic preference dataset (the shared demo data does not
travel to the device machine). Without CUDA every test in this folder is skipped with the
reason, so `make test` collects them cleanly on CPU.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
NO_CUDA = not torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason="needs a CUDA device (run tools/gpu_check.sh on a GPU machine)")
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.cuda)
            if NO_CUDA:
                item.add_marker(skip)


WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    """ShareGPT-format preference pairs of random words; chosen answers repeat the prompt's
    first word (a learnable preference), rejected ones do not."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24)))
        first = prompt.split()[0]
        chosen = " ".join([first] * 3 + [rng.choice(WORDS) for _ in range(rng.randint(2, 30))])
        rejected = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30)))
        out.append({"conversations": [{"from": "human", "value": prompt}],
                    "chosen": {"from": "gpt", "value": chosen}, "rejected": {"from": "gpt", "value": rejected}})
    return out


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    from mcore_align.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("cuda")
    hf = make_tiny_model(root / "hf", "qwen2", num_layers=2, hidden_size=128, ffn_hidden_size=352,
                         num_heads=4, num_kv_heads=2, vocab_size=512)
    subprocess.run([sys.executable, "tools/convert_hf_to_mcore.py", "--hf", str(hf), "--out", str(root / "mcore")],
                   cwd=ROOT, check=True, capture_output=True)
    (root / "pairs.json").write_text(json.dumps(synthetic_pairs(64)))
    return root


def raw_config(work: Path, save: str | None, device: str = "cuda") -> dict:
    return {
        "model": {"load": str(work / "mcore")},
        "data": {"dataset": [str(work / "pairs.json")], "max_length": 512, "max_tokens_per_micro_batch": 1024,
                 "cache_dir": str(work / "cache")},
        "optim": {"learning_rate": 1e-3, "lr_decay_style": "constant", "clip_grad": 1.0},
        "train": {"global_batch_size": 8, "train_iters": 4, "device": device, "progress_bar": False,
                  "save": save, "plot": False, "seed": 7},
        "algo": {"rlhf_type": "dpo", "beta": 0.1, "rpo_alpha": None},
    }


def train(work: Path, *overrides: str, save: str | None = None) -> dict:
    """One Trainer run on this process's GPU (a world of one, as trainer_worker.py does)."""
    from mcore_align.config import build_config
    from mcore_align.trainer.trainer import Trainer

    tr = Trainer(build_config(raw_config(work, save), overrides))
    res = tr.train()
    res["trainer"] = tr
    return res


def history(res: dict, key: str) -> list[float]:
    return [h[key] for h in res["history"]]
