"""DPO with LoRA on a tiny Qwen2-VL through the Trainer (2 gloo ranks, one launch): the colour
task of tests/e2e/test_vision_train_e2e.py, with M-RoPE positions computed per packed sequence.

Reuses vision_train_worker's config and training helpers (MA_TEST_CKPT points at the Qwen2-VL
checkpoint here, MA_TEST_QWEN25_CKPT at the Qwen2.5-VL one)."""
from __future__ import annotations

import json
import os

import torch

from tests.distributed.workers.vision_train_worker import LORA_DPO, RM, WORK, _cfg, _dump_scores, _train
from mcore_align.trainer.trainer import Trainer

# The tiny Qwen2-VL sees each 32x32 image as 4 tokens (LLaVA's: 16); it needs a few more steps
# (14 steps: held-out accuracy 0.889 at TP=2 and PP=2).
STEPS = "train_iters=24"


def case_qwen2_vl_dpo_lora_tp2_learns_image_task():
    tr, _ = _train("qwen_dpo_lora_tp2", "dpo", "tensor_model_parallel_size=2", STEPS, *LORA_DPO)
    assert tr.spec.vision.family == "qwen2_vl" and tr.spec.mrope_section


def case_qwen2_vl_dpo_lora_cp2_matches_tp2():
    """CP=2 (whole-row M-RoPE positions, each rank's chunks of every sequence) gives the TP=2
    run's losses, margins, log-probs and grad norms on the same global batches."""
    tr = Trainer(_cfg("dpo", None, "context_parallel_size=2", "train_iters=4", *LORA_DPO))
    h = tr.train()["history"]
    ref = json.loads((WORK / "qwen_dpo_lora_tp2_history.json").read_text())["history"][:4]
    for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
        torch.testing.assert_close(torch.tensor([x[key] for x in h], dtype=torch.float64),
                                   torch.tensor([x[key] for x in ref], dtype=torch.float64),
                                   rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")


def case_qwen2_vl_dpo_lora_pp2_learns_image_task():
    _train("qwen_dpo_lora_pp2", "dpo", "pipeline_model_parallel_size=2", STEPS, *LORA_DPO)


# Qwen2.5-VL (window attention and RMSNorm in the tower, SwiGLU merger): the same task.
QWEN25 = (f"load={os.environ.get('MA_TEST_QWEN25_CKPT', '')}", f"cache_dir={WORK / 'cache_qwen25'}")


def case_qwen2_5_vl_dpo_lora_tp2_learns_image_task():
    tr, _ = _train("qwen25_dpo_lora_tp2", "dpo", "tensor_model_parallel_size=2", *QWEN25, STEPS, *LORA_DPO)
    assert tr.spec.vision.family == "qwen2_5_vl" and tr.spec.mrope_section


def case_qwen2_5_vl_rm_pp2_learns_image_task():
    """Full reward model at PP=2 (M-RoPE positions with the value head on the last stage);
    held-out scores dumped for the export check (tests/e2e/test_qwen_vl_train_e2e.py)."""
    tr, _ = _train("qwen2_5_vl_rm_pp2", "rm", "pipeline_model_parallel_size=2", *QWEN25, *RM, "train_iters=60")
    _dump_scores(tr, "qwen2_5_vl_rm_pp2")
