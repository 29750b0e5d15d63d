"""Cases that misbehave on purpose, for tests/unit/test_dist_utils.py (the harness must
report them as failures). Not collected by any other test module."""
import os

import torch.distributed as dist

MODE = os.environ.get("MA_HARNESS_MODE", "")


def teardown_case():
    if MODE == "teardown" and dist.get_rank() == 1:
        raise RuntimeError("teardown failed on rank 1 (on purpose)")


def case_ok():
    pass


def case_crash_rank1():
    if MODE == "crash" and dist.get_rank() == 1:
        os._exit(3)  # a rank dying without a traceback (OOM kill, segfault)
