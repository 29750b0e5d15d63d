"""Multi-rank test harness: one `torchrun` launch runs every case of a worker module.

Launching torch + megatron-core costs ~5 s per process, so a worker module defines
many `case_*` functions and they all run in one launch (in file order). Each case
runs on every rank; a case fails if it raises on any rank. Cases may re-initialise
megatron parallel_state with a different layout (see `mcore_align.parallel`).

Usage from a pytest module::

    from tests.dist_utils import dist_cases, run_dist_module
    WORKER = "tests.distributed.workers.ops_worker"

    @pytest.fixture(scope="module")
    def results():
        return run_dist_module(WORKER, nproc=2)

    @pytest.mark.parametrize("case", dist_cases(WORKER))
    def test_case(results, case):
        results.check(case)
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dist_cases(module: str) -> list[str]:
    """Names of `case_*` functions in a worker module, read without importing it."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, module
    tree = ast.parse(Path(spec.origin).read_text())
    return [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("case_")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class DistResults:
    module: str
    per_case: dict
    log: str
    returncode: int = 0
    nproc: int = 1
    missing_ranks: tuple = ()

    def launch_error(self) -> str | None:
        """Why the launch as a whole failed (a rank crashed, exited non-zero or wrote no
        results), or None. A crashed rank fails every case, even those that passed."""
        problems = []
        if self.returncode != 0:
            problems.append(f"torchrun exited with code {self.returncode}")
        if self.missing_ranks:
            problems.append(f"no result file from rank(s) {list(self.missing_ranks)}")
        if not problems:
            return None
        return f"{self.module}: {'; '.join(problems)}\n{self.log[-6000:]}"

    def check(self, case: str) -> None:
        import pytest

        if case not in self.per_case:
            raise AssertionError(f"{self.module}:{case} did not run (launch crashed?)\n{self.log[-6000:]}")
        res = self.per_case[case]
        if res["status"] == "fail":
            raise AssertionError(f"{self.module}:{case} failed:\n{res['message']}")
        if len(res["ranks"]) != self.nproc:
            missing = sorted(set(range(self.nproc)) - set(res["ranks"]))
            raise AssertionError(f"{self.module}:{case} has no result from rank(s) {missing}\n{self.log[-6000:]}")
        err = self.launch_error()
        if err is not None:
            raise AssertionError(f"{case}: {err}")
        if res["status"] == "skip":
            pytest.skip(res["message"])
        assert res["status"] == "ok", res


def merge_rank_results(per_rank: dict[int, dict]) -> dict:
    """{rank: {case: {status, message}}} -> {case: {status, message, ranks}}. A failure on
    any rank wins over ok/skip from another rank; `ranks` lists the ranks that reported."""
    per_case: dict = {}
    for rank in sorted(per_rank):
        for name, res in per_rank[rank].items():
            prev = per_case.get(name)
            ranks = (prev["ranks"] if prev else []) + [rank]
            if prev is None or (prev["status"] != "fail" and res["status"] == "fail"):
                per_case[name] = {**res, "message": f"[rank {rank}] {res['message']}", "ranks": ranks}
            else:
                prev["ranks"] = ranks
    return per_case


# (module, nproc, case, seconds on rank 0) of every launch in this pytest process, for the
# slowest-cases report at the end of the session (tests/conftest.py).
CASE_SECONDS: list[tuple[str, int, str, float]] = []


def run_dist_module(module: str, nproc: int = 2, timeout: int = 900, env: dict | None = None) -> DistResults:
    """Run every case of `module` under torchrun with `nproc` ranks (gloo, CPU)."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={_free_port()}", "--master-addr=127.0.0.1",
            "-m", "tests.dist_utils", module, str(out),
        ]
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                    "MCORE_ALIGN_DIST_TIMEOUT": "180", **(env or {})}
        proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
        log = proc.stdout + proc.stderr
        per_rank, missing = {}, []
        for rank in range(nproc):
            path = out.with_suffix(f".rank{rank}.json")
            if not path.exists():
                missing.append(rank)
                continue
            per_rank[rank] = json.loads(path.read_text())
        CASE_SECONDS.append((module, nproc, "(launch, all cases)", round(time.perf_counter() - start, 2)))
        CASE_SECONDS.extend((module, nproc, case, res.get("seconds", 0.0))
                            for case, res in per_rank.get(0, {}).items())
        return DistResults(module, merge_rank_results(per_rank), log, returncode=proc.returncode, nproc=nproc,
                           missing_ranks=tuple(missing))


class SkipCase(Exception):
    """Raise inside a case to report it as skipped (with the reason)."""


def _worker_main(module: str, out_prefix: str) -> None:
    import datetime

    import torch.distributed as dist

    # Under torchrun this file runs as __main__: worker modules raise tests.dist_utils.SkipCase.
    from tests.dist_utils import SkipCase as ImportedSkipCase

    rank = int(os.environ["RANK"])
    if not dist.is_initialized():
        # A case failing on one rank while the other waits in a collective must fail, not hang.
        timeout = datetime.timedelta(seconds=float(os.environ.get("MCORE_ALIGN_DIST_TIMEOUT", "180")))
        dist.init_process_group("gloo", timeout=timeout)
    mod = importlib.import_module(module)
    results = {}
    for name in dist_cases(module):
        start = time.perf_counter()
        try:
            getattr(mod, name)()
            results[name] = {"status": "ok", "message": ""}
        except (SkipCase, ImportedSkipCase) as e:
            results[name] = {"status": "skip", "message": str(e)}
        except Exception:  # noqa: BLE001 - report every failure to pytest
            results[name] = {"status": "fail", "message": traceback.format_exc()}
        finally:
            # Keep ranks in step so one rank's failure cannot deadlock the next case.
            teardown = getattr(mod, "teardown_case", None)
            if teardown is not None:
                try:
                    teardown()
                except Exception:  # noqa: BLE001 - a failed teardown fails the case
                    prev = results.get(name, {}).get("message", "")
                    results[name] = {"status": "fail",
                                     "message": f"{prev}\nteardown_case failed:\n{traceback.format_exc()}"}
            if name in results:  # absent only when a BaseException is on its way out
                results[name]["seconds"] = round(time.perf_counter() - start, 2)
            # Written after every case, so a later hang or crash keeps what ran.
            Path(f"{out_prefix}.rank{rank}.json").write_text(json.dumps(results))
            dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker_main(sys.argv[1], sys.argv[2])
