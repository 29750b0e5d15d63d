"""Rollout generation with megatron-core's inference path at TP=1 / TP=2 / PP=2 (2 gloo ranks,
one torchrun launch): KV-cache greedy decode == full-recompute greedy decode, generator
log-probs == a training-style forward's."""
import pytest

from mcore_align.checkpoint import convert_hf_to_mcore
from mcore_align.models.tiny import make_tiny_model
from tests.dist_utils import dist_cases, run_dist_module

WORKER = "tests.distributed.workers.rollout_worker"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout")
    # init_std 0.1: peaked next-token distributions, so greedy steps are never near-ties.
    make_tiny_model(root / "hf", "qwen2", init_std=0.1)
    convert_hf_to_mcore(root / "hf", root / "mc", dtype="fp32")
    return run_dist_module(WORKER, nproc=2, env={"MA_ROLLOUT_CKPT": str(root / "mc")})


@pytest.mark.parametrize("case", dist_cases(WORKER))
def test_case(results, case):
    results.check(case)
