"""Policy and an identical reference compute bit-identical log-probs (2 gloo ranks, TP=2).

The pytest side (tests/distributed/test_numerics_dist.py) launches this module with MKL and
ATen restricted to AVX2 kernels (what an AMD EPYC without AVX-512 runs), at 1 and 2 threads
per rank. Before the reference kept ``requires_grad`` (models/provider.py,
``_freeze_for_inference``), its frozen weights sent ``torch.matmul`` down another kernel than
the policy's and the two disagreed by ~1e-7 per token there, so KTO's step-1 KL and the step-0
rewards were float noise instead of exactly 0.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from mcore_align.config import build_config
from mcore_align.trainer.trainer import Trainer

CKPT = os.environ.get("MA_TEST_CKPT", "")
DATA = os.environ.get("MA_TEST_DATA_TASK", "")
WORK = Path(os.environ.get("MA_TEST_WORK", "/tmp/ma_numerics_worker"))


def _trainer(algo: str, *overrides: str) -> Trainer:
    cache = WORK / f"cache_{algo}"
    raw = {
        "model": {"load": CKPT},
        "data": {"dataset": [DATA], "max_length": 256, "max_tokens_per_micro_batch": 1024, "cache_dir": str(cache)},
        "optim": {"learning_rate": 1e-3, "lr_decay_style": "constant"},
        "train": {"global_batch_size": 8, "train_iters": 1, "device": "cpu", "progress_bar": False, "plot": False},
        "algo": {"rlhf_type": algo, "params": {}},
    }
    return Trainer(build_config(raw, ["tensor_model_parallel_size=2", *overrides]))


def teardown_case():
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(WORK / "cache_dpo", ignore_errors=True)


def case_policy_and_identical_reference_are_bitwise_equal():
    tr = _trainer("dpo")
    st = tr.stepper
    gb = next(tr.data.train)
    batches = st.to_device(gb.micro_batches)
    for threads in (1, 2):  # per rank
        torch.set_num_threads(threads)
        pol = st.forward_only_sums(st.policy, batches)
        ref = st.reference_sums(batches)
        for p, r in zip(pol, ref):
            assert torch.equal(p, r), (f"{threads} thread(s): policy vs identical reference: "
                                       f"max |diff| {(p - r).abs().max().item():.3g}")


def case_step0_rewards_are_exactly_zero():
    """DPO at step 0 (policy = reference): rewards are exactly 0 and no tie counts as accurate."""
    tr = _trainer("dpo")
    gb = next(tr.data.train)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        m = tr.stepper.eval_step(gb)
        assert m["rewards/chosen"] == 0.0 and m["rewards/rejected"] == 0.0, (threads, m)
        assert m["rewards/accuracies"] == 0.0, (threads, m)  # ties are not accurate (TRL)


def case_reference_refuses_autograd():
    tr = _trainer("dpo")
    b = tr.stepper.to_device(next(tr.data.train).micro_batches)[0]
    try:
        tr.stepper._model_forward(tr.reference.chunks[0], b)
    except RuntimeError as e:
        assert "torch.no_grad" in str(e), e
    else:
        raise AssertionError("the frozen reference ran with autograd enabled")


def case_eval_metrics_do_not_depend_on_the_batch_split():
    """Evaluation pools (sum, count) over batches like training: the token-mean NLL over the
    same 24 held-out pairs is the same in 3 batches of 8 as in 2 batches of 12 (per-batch
    means averaged would weight the batches' tokens differently)."""
    got = {}
    for gbs in (8, 12):
        tr = _trainer("dpo", f"global_batch_size={gbs}", f"data.val_dataset=[{DATA}]", f"eval_iters={24 // gbs}")
        got[gbs] = tr.evaluate()
    for k in ("nll_loss", "loss", "rewards/accuracies", "logps/chosen"):
        assert abs(got[8][k] - got[12][k]) <= 1e-5 * max(1.0, abs(got[8][k])), (k, got)
