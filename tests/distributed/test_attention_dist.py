"""Packed attention under context and tensor parallelism vs the single-rank model (gloo, CPU).

One 2-rank launch: CP=2 vs CP=1 (logits, per-sequence log-prob sums, a DPO-style loss,
parameter gradients), TP=2 and TP=2 + sequence parallelism vs TP=1 (logits, every
gradient). One 4-rank launch for TP=2 x CP=2 (logits, sums, loss, every gradient).
"""
import pytest

from tests.dist_utils import dist_cases, run_dist_module

WORKER = "tests.distributed.workers.attention_worker"
CASES = dist_cases(WORKER)
TPxCP = "case_tp2_cp2_matches_reference"


@pytest.fixture(scope="module")
def results2():
    return run_dist_module(WORKER, nproc=2)


@pytest.fixture(scope="module")
def results4():
    return run_dist_module(WORKER, nproc=4)


@pytest.mark.parametrize("case", [c for c in CASES if c != TPxCP])
def test_two_ranks(results2, case):
    results2.check(case)


def test_tp2_cp2_four_ranks(results4):
    results4.check(TPxCP)
