import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """`../shared/data` beside the checkout, or $MCORE_ALIGN_DATA."""
    return Path(os.environ.get("MCORE_ALIGN_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if not (d / "dpo_en_demo.json").exists():
        pytest.skip(f"shared preference data not found at {d} (set MCORE_ALIGN_DATA)")
    return d


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device; run by tools/gpu_check.sh (skipped on CPU)")
