import pytest

from tests.dist_utils import dist_cases, run_dist_module

WORKER = "tests.distributed.workers.runtime_worker"


@pytest.fixture(scope="module")
def results():
    return run_dist_module(WORKER, nproc=2)


@pytest.mark.parametrize("case", dist_cases(WORKER))
def test_runtime_case(results, case):
    results.check(case)
