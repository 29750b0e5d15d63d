import json
import os
import random
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """`../shared/data` beside the checkout, or $MCORE_ALIGN_DATA."""
    return Path(os.environ.get("MCORE_ALIGN_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data files themselves (tests of their parsing skip without them)."""
    d = shared_data_dir()
    if not (d / "dpo_en_demo.json").exists():
        pytest.skip(f"shared preference data not found at {d} (set MCORE_ALIGN_DATA)")
    return d


# The file formats of the shared demo files, generated from the demo's learnable task when
# they are absent, so that end-to-end tests always train (a user's clone has no ../shared).
def _generated(name: str, n: int) -> list[dict]:
    from mcore_align.demo import ASKS, BAD, GOOD, TOPICS

    rng = random.Random(f"{name}:{n}")
    out = []
    for i in range(n):
        t = rng.choice(TOPICS)
        prompt, good, bad = rng.choice(ASKS).format(t=t), rng.choice(GOOD).format(t=t), rng.choice(BAD)
        if name == "dpo_en_demo.json":  # sharegpt, paired
            out.append({"conversations": [{"from": "human", "value": prompt}],
                        "chosen": {"from": "gpt", "value": good}, "rejected": {"from": "gpt", "value": bad}})
        elif name == "kto_en_demo.json":  # messages + label, desirable and undesirable alternating
            label = i % 2 == 0
            out.append({"messages": [{"role": "user", "content": prompt},
                                     {"role": "assistant", "content": good if label else bad}], "label": label})
        elif name == "alpaca_en_demo.json":  # alpaca, SFT
            out.append({"instruction": prompt, "input": "", "output": good})
        else:
            raise ValueError(f"no generator for {name}")
    return out


def e2e_records(name: str, n: int) -> tuple[list[dict], str]:
    """``n`` records for an end-to-end run and where they came from ("shared" or "generated"):
    the ``n`` shortest records of the shared file ``name`` (so a few epochs fit in a few steps),
    or, without the shared data, ``n`` records of the same format made from the demo's task."""
    path = shared_data_dir() / name
    if path.exists():
        recs = sorted(json.loads(path.read_text()), key=lambda r: len(json.dumps(r)))
        return recs[:n], "shared"
    return _generated(name, n), "generated"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device; run by tools/gpu_check.sh (skipped on CPU)")


def pytest_terminal_summary(terminalreporter):
    """Threads left in the pytest process: each leaked gloo process group keeps ~3 threads
    that together burn CPU while idle (1,500 of them took over half a core), so a leak shows
    here long before it shows as a slow suite."""
    from tests.dist_utils import CASE_SECONDS

    task_dir = Path(f"/proc/{os.getpid()}/task")  # Linux only; elsewhere the line is left out
    if task_dir.is_dir():
        terminalreporter.write_line(f"threads in the pytest process at exit: {len(list(task_dir.iterdir()))}")

    if CASE_SECONDS:
        terminalreporter.write_sep("=", "slowest multi-rank cases (rank 0) and launches")
        for module, nproc, case, sec in sorted(CASE_SECONDS, key=lambda x: -x[3])[:25]:
            terminalreporter.write_line(f"{sec:8.2f}s  {nproc} ranks  {module.rsplit('.', 1)[-1]}::{case}")
