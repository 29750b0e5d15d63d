"""GRPO / RLOO / PPO end to end on 2 ranks (see tests/distributed/workers/online_worker.py), then
the trained policy's HF export loads in transformers and generates."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from tests.dist_utils import dist_cases, run_dist_module

WORKER = "tests.distributed.workers.online_worker"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from mcore_align.demo import make_task
    from mcore_align.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("grpo_e2e")
    hf = make_tiny_model(root / "hf", "qwen2", num_layers=2, hidden_size=64, vocab_size=512)
    subprocess.run([sys.executable, "tools/convert_hf_to_mcore.py", "--hf", str(hf), "--out", str(root / "mcore")],
                   cwd=ROOT, check=True, capture_output=True)
    make_task(root / "prompts.jsonl", 64, seed=0)  # prompt / chosen / rejected: the prompts are used
    # Prompt-only records with another column, which reward functions receive.
    topics = ["the river", "a poem", "the city", "my homework", "the data", "a recipe", "the weather", "your code"]
    import json

    (root / "prompts_cols.jsonl").write_text("".join(
        json.dumps({"prompt": f"Tell me about {t}.", "topic": t}) + "\n" for t in topics))
    # Another tokenizer (Llama-3 style): a reward model made from it must be refused.
    other = make_tiny_model(root / "hf_llama", "llama", num_layers=2, hidden_size=64, vocab_size=512)
    subprocess.run([sys.executable, "tools/convert_hf_to_mcore.py", "--hf", str(other), "--out", str(root / "mcore_llama")],
                   cwd=ROOT, check=True, capture_output=True)
    return root


@pytest.fixture(scope="module")
def results(work):
    env = {"MA_TEST_CKPT": str(work / "mcore"), "MA_TEST_PROMPTS": str(work / "prompts.jsonl"),
           "MA_TEST_PROMPTS_COLS": str(work / "prompts_cols.jsonl"),
           "MA_TEST_WORK": str(work), "MA_TEST_OTHER_TOKENIZER_CKPT": str(work / "mcore_llama")}
    return run_dist_module(WORKER, nproc=2, env=env)


@pytest.mark.parametrize("case", dist_cases(WORKER))
def test_online_case(results, case):
    results.check(case)


def test_sample_generations_are_written(results, work):
    """num_sample_generations (10 by default) over 14 steps: every step writes 4 samples."""
    import json

    results.check("case_grpo_tp2_learns")
    rows = [json.loads(x) for x in (work / "grpo_tp2" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 14 * 4 and {r["step"] for r in rows} == set(range(1, 15))
    assert all(isinstance(r["completion"], str) and 0.0 <= r["score"] <= 1.0 and r["prompt"] for r in rows)


def test_policy_export_loads_in_transformers_and_generates(results, work):
    results.check("case_grpo_tp2_learns")
    out = work / "grpo_hf"
    subprocess.run([sys.executable, "tools/convert_mcore_to_hf.py", "--ckpt", str(work / "grpo_tp2"), "--out", str(out),
                    "--overwrite"], cwd=ROOT, check=True, capture_output=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "Tell me about the river."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] > ids.shape[1]


def test_critic_exports_as_a_reward_style_checkpoint(results, work, tmp_path):
    """tools/export_critic.py: the PPO run's critic becomes a checkpoint like rlhf_type=rm writes;
    its HF export has value_head.safetensors holding the TRAINED critic's head (not the reward
    model's it started from)."""
    results.check("case_ppo_with_reward_model_resumes_exactly")
    from safetensors.torch import load_file

    run = lambda *a: subprocess.run([sys.executable, *a], cwd=ROOT, check=True, capture_output=True)  # noqa: E731
    run("tools/export_critic.py", "--ckpt", str(work / "ppo_resume"), "--out", str(tmp_path / "critic"))
    run("tools/convert_mcore_to_hf.py", "--ckpt", str(tmp_path / "critic"), "--out", str(tmp_path / "critic_hf"))
    run("tools/convert_mcore_to_hf.py", "--ckpt", str(work / "rm"), "--out", str(tmp_path / "rm_hf"))
    critic = load_file(tmp_path / "critic_hf" / "value_head.safetensors")["value_head.weight"]
    rm = load_file(tmp_path / "rm_hf" / "value_head.safetensors")["value_head.weight"]
    assert critic.shape == rm.shape and not torch.equal(critic, rm)  # trained for 4 steps from the RM
    # Not a PPO checkpoint: refused with the path.
    bad = subprocess.run([sys.executable, "tools/export_critic.py", "--ckpt", str(work / "rm"), "--out",
                          str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "holds no critic" in bad.stderr
