"""The multi-rank harness must fail a test when a rank crashes, exits non-zero, writes no
result file, or fails its teardown (tests/dist_utils.py)."""
import pytest

from tests.dist_utils import DistResults, merge_rank_results, run_dist_module

WORKER = "tests.distributed.workers.harness_worker"


def _ok(msg=""):
    return {"status": "ok", "message": msg}


def test_merge_failure_on_any_rank_wins():
    merged = merge_rank_results({0: {"a": _ok(), "b": _ok()}, 1: {"a": {"status": "fail", "message": "boom"}}})
    assert merged["a"]["status"] == "fail" and "[rank 1] boom" in merged["a"]["message"]
    assert merged["a"]["ranks"] == [0, 1] and merged["b"]["ranks"] == [0]


def test_case_missing_on_one_rank_fails():
    res = DistResults("m", merge_rank_results({0: {"a": _ok()}}), "log", returncode=0, nproc=2, missing_ranks=(1,))
    with pytest.raises(AssertionError, match=r"no result from rank\(s\) \[1\]"):
        res.check("a")


def test_nonzero_exit_fails_even_passing_cases():
    per = merge_rank_results({0: {"a": _ok()}, 1: {"a": _ok()}})
    with pytest.raises(AssertionError, match="exited with code 1"):
        DistResults("m", per, "log", returncode=1, nproc=2).check("a")
    DistResults("m", per, "log", returncode=0, nproc=2).check("a")  # and a clean launch passes


def test_crashed_rank_fails_the_launch():
    res = run_dist_module(WORKER, nproc=2, timeout=300, env={"MA_HARNESS_MODE": "crash", "MCORE_ALIGN_DIST_TIMEOUT": "30"})
    assert res.returncode != 0
    for case in ("case_ok", "case_crash_rank1"):
        with pytest.raises(AssertionError):
            res.check(case)


def test_teardown_error_fails_the_case():
    res = run_dist_module(WORKER, nproc=2, timeout=300, env={"MA_HARNESS_MODE": "teardown"})
    with pytest.raises(AssertionError, match="teardown_case failed"):
        res.check("case_ok")
