"""2-rank gloo checks of mcore_align.ops: TP=2 / SP / tied weight / CP=2 equal the unsharded results.

All cases run in one torchrun launch (tests.dist_utils); see the worker module.
"""
import pytest

from tests.dist_utils import dist_cases, run_dist_module

WORKER = "tests.distributed.workers.logprobs_worker"


@pytest.fixture(scope="module")
def results():
    return run_dist_module(WORKER, nproc=2)


@pytest.mark.parametrize("case", dist_cases(WORKER))
def test_case(results, case):
    results.check(case)
