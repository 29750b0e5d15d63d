"""Online objectives (GRPO, RLOO, PPO) through the one trainer on 2 gloo ranks: TP=2 and PP=2.

The pytest side (tests/e2e/test_grpo_e2e.py) makes the tiny model and the prompts, then
exports the trained policy and generates with transformers. The reward is a rule a tiny
random model can learn in a few steps (mcore_align.rewards.even_token_fraction).
"""
from __future__ import annotations

import json
import math
import os
import signal
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from mcore_align.config import build_config
from mcore_align.trainer.trainer import Trainer

CKPT = os.environ.get("MA_TEST_CKPT", "")
PROMPTS = os.environ.get("MA_TEST_PROMPTS", "")
WORK = Path(os.environ.get("MA_TEST_WORK", "/tmp/ma_grpo_worker"))
REWARD = "mcore_align.rewards:even_token_fraction"


PARAMS = {
    "grpo": {"reward_funcs": REWARD, "num_generations": 4, "response_length": 24, "beta": 0.04},
    "rloo": {"reward_funcs": REWARD, "num_generations": 4, "response_length": 24, "beta": 0.04},
    # PPO: 2 epochs x 2 mini-batches per rollout; a small KL coefficient lets the tiny model move.
    "ppo": {"reward_funcs": REWARD, "response_length": 24, "kl_coef": 0.01, "num_ppo_epochs": 2,
            "num_mini_batches": 2},
}


def _cfg(algo: str, save: str | None, *overrides: str):
    raw = {
        "model": {"load": CKPT},
        "data": {"dataset": [PROMPTS], "max_length": 96, "max_tokens_per_micro_batch": 1024,
                 "cache_dir": str(WORK / "cache")},
        "optim": {"learning_rate": 1e-2, "lr_decay_style": "constant"},
        "train": {"global_batch_size": 4, "train_iters": 14, "device": "cpu", "progress_bar": False,
                  "plot": False, "seed": 3, "save": save},
        "algo": {"rlhf_type": algo, "params": dict(PARAMS[algo])},
    }
    return build_config(raw, overrides)


def _save_dir(name: str) -> str:
    path = WORK / name
    if dist.get_rank() == 0 and path.exists():
        shutil.rmtree(path)
    dist.barrier()
    return str(path)


def _mean(h, key, sl):
    return sum(x[key] for x in h[sl]) / len(h[sl])


def _learns(layout: list[str], name: str, save: bool = False):
    tr = Trainer(_cfg("grpo", _save_dir(name) if save else None, *layout))
    _check_logprob_alignment(tr)
    h = tr.train()["history"]
    if dist.get_rank() == 0:
        (WORK / f"{name}_history.json").write_text(json.dumps(h))
    assert all(math.isfinite(x["loss"]) and math.isfinite(x["grad_norm"]) and math.isfinite(x["objective/kl"])
               for x in h), h
    s0, s1 = _mean(h, "objective/scores", slice(0, 3)), _mean(h, "objective/scores", slice(-3, None))
    assert s1 > s0 + 0.1, f"{name}: score did not rise: {[round(x['objective/scores'], 3) for x in h]}"
    assert h[0]["objective/kl"] == 0.0 and h[-1]["objective/kl"] > 0  # policy = reference at step 1
    # TRL's objective/entropy: -sum of sampled log-probs; a near-uniform 512-token model starts near
    # 24 tokens x ln(512) = 150 nats per response.
    assert 100 < h[0]["objective/entropy"] < 160, h[0]["objective/entropy"]
    # policy/entropy_avg: the full distribution's entropy per response token, about ln(512) = 6.24.
    assert 5.5 < h[0]["policy/entropy_avg"] <= 6.24, h[0]["policy/entropy_avg"]


def _check_logprob_alignment(tr: Trainer):
    """The training forward's log-probs of the sampled tokens, read at the loss positions of the
    packed experience, equal the generator's (same temperature): the per-token plumbing
    (label positions, extras, packing order) is aligned."""
    rp = tr.rollout
    state = tr.data.train.state_dict()
    gb = next(tr.data.train)
    tr.data.train.load_state_dict(state)
    captured = {}
    generate = rp.engine.generate

    def keep(prompts, params):
        captured["batch"] = generate(prompts, params)
        return captured["batch"]

    rp.engine.generate = keep
    rp.save, save = None, rp.save  # this extra rollout writes no samples
    (exp,), _ = rp.make_experience(gb, step=0)
    rp.engine.generate, rp.save = generate, save
    st = tr.stepper
    logp = st.forward_only_token_logprobs(st.policy, st.to_device(exp.micro_batches), tr.objective.logprob_temperature)
    if logp is None:  # not the last pipeline stage
        return
    ours = torch.cat([lp[mb.loss_mask.reshape(-1) > 0] for lp, mb in zip(logp, exp.micro_batches)])
    b = captured["batch"]
    gen = torch.cat([b.logprobs_BT[i, :int(n)] for i, n in enumerate(b.response_lengths_B)])
    assert ours.shape == gen.shape, (ours.shape, gen.shape)
    torch.testing.assert_close(ours.cpu(), gen, rtol=0, atol=1e-4)


def case_grpo_tp2_learns():
    _learns(["tensor_model_parallel_size=2"], "grpo_tp2", save=True)


def case_grpo_pp2_learns():
    _learns(["pipeline_model_parallel_size=2"], "grpo_pp2")


def case_grpo_resume_is_exact():
    """3 steps, stop with a checkpoint, relaunch: the next steps sample the same tokens and
    give the same metrics as an uninterrupted run."""
    keys = ("loss", "grad_norm", "objective/scores", "objective/kl", "response_length")
    full = Trainer(_cfg("grpo", None, "tensor_model_parallel_size=2", "train_iters=6")).train()["history"]
    save = _save_dir("grpo_resume")
    first = Trainer(_cfg("grpo", save, "tensor_model_parallel_size=2", "train_iters=6", "exit_after_steps=3")).train()
    assert first["stopped"] and first["step"] == 3
    rest = Trainer(_cfg("grpo", save, "tensor_model_parallel_size=2", "train_iters=6")).train()["history"]
    got = first["history"] + rest
    assert len(got) == 6
    for i, (a, b) in enumerate(zip(full, got)):
        for k in keys:
            assert math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-7), (i, k, a[k], b[k])


def case_rloo_tp2_trains():
    tr = Trainer(_cfg("rloo", None, "tensor_model_parallel_size=2", "train_iters=3"))
    h = tr.train()["history"]
    assert all(math.isfinite(x["loss"]) and math.isfinite(x["grad_norm"]) for x in h), h
    assert tr.objective.cfg.advantage_estimator == "rloo"


def case_bad_reward_function_is_named():
    try:
        Trainer(_cfg("grpo", None, "tensor_model_parallel_size=2", "reward_funcs=no_such_module:fn"))
    except ImportError as e:
        assert "no_such_module:fn" in str(e), e
    else:
        raise AssertionError("an unimportable reward function was accepted")


def _ppo(layout: list[str], name: str, *extra: str) -> list[dict]:
    tr = Trainer(_cfg("ppo", None, *layout, "global_batch_size=8", "train_iters=16", "learning_rate=3e-3", *extra))
    assert tr.critic is not None and tr.reference is not None  # kl_coef > 0: a reference; GAE: a critic
    h = tr.train()["history"]
    if dist.get_rank() == 0:
        (WORK / f"{name}_history.json").write_text(json.dumps(h))
    for x in h:
        assert all(math.isfinite(x[k]) for k in ("loss", "grad_norm", "critic/grad_norm", "objective/kl",
                                                 "loss/value_avg", "policy/entropy_avg")), x
    s0, s1 = _mean(h, "objective/scores", slice(0, 3)), _mean(h, "objective/scores", slice(-3, None))
    assert s1 > s0 + 0.05, f"{name}: score did not rise: {[round(x['objective/scores'], 3) for x in h]}"
    v0, v1 = _mean(h, "loss/value_avg", slice(0, 2)), _mean(h, "loss/value_avg", slice(-3, None))
    assert v1 < 0.5 * v0, f"{name}: value loss did not fall: {[round(x['loss/value_avg'], 4) for x in h]}"
    assert h[0]["objective/kl"] == 0.0  # step 1: policy = reference, bit for bit
    return h


def case_ppo_tp2_learns():
    _ppo(["tensor_model_parallel_size=2"], "ppo_tp2")


def case_ppo_pp2_learns():
    _ppo(["pipeline_model_parallel_size=2"], "ppo_pp2")


def _reward_model() -> str:
    """A reward-model checkpoint (rlhf_type=rm, 2 steps on the task's preference pairs)."""
    path = WORK / "rm"
    if not (path / "latest_checkpointed_iteration.txt").exists():
        raw = {"model": {"load": CKPT},
               "data": {"dataset": [PROMPTS], "max_length": 96, "max_tokens_per_micro_batch": 1024,
                        "cache_dir": str(WORK / "cache")},
               "optim": {"learning_rate": 1e-3, "lr_decay_style": "constant"},
               "train": {"global_batch_size": 8, "train_iters": 2, "device": "cpu", "progress_bar": False,
                         "plot": False, "save": _save_dir("rm")},
               "algo": {"rlhf_type": "rm"}}
        Trainer(build_config(raw, ["tensor_model_parallel_size=2"])).train()
    dist.barrier()
    return str(path)


def case_ppo_with_reward_model_resumes_exactly():
    """Reward model scores (value model initialised from it); SIGTERM after step 1 checkpoints,
    the relaunch continues: policy, critic, both optimizers and the sampling seed as if never stopped."""
    rm = _reward_model()
    common = ("tensor_model_parallel_size=2", "global_batch_size=4", "train_iters=4", f"reward_model={rm}",
              "reward_funcs=null")
    keys = ("loss", "grad_norm", "critic/grad_norm", "objective/scores", "objective/kl", "loss/value_avg")
    tr = Trainer(_cfg("ppo", None, *common))
    assert "rewards/reward_model" in (h := tr.train()["history"])[0] and "objective/rlhf_reward" in h[0]
    save = _save_dir("ppo_resume")
    first = Trainer(_cfg("ppo", save, *common))
    if dist.get_rank() == 1:  # SIGTERM on one rank (a preemption): every rank checkpoints after step 1
        os.kill(os.getpid(), signal.SIGTERM)
    first = first.train()
    assert first["stopped"] and first["step"] == 1
    rest = Trainer(_cfg("ppo", save, *common)).train()["history"]
    got = first["history"] + rest
    for i, (a, b) in enumerate(zip(h, got)):
        for k in keys:
            assert math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-7), (i, k, a[k], b[k])


def case_ppo_bad_models_are_refused():
    rm = _reward_model()
    try:  # a value model without a value head
        Trainer(_cfg("ppo", None, "tensor_model_parallel_size=2", f"value_model={CKPT}"))
    except ValueError as e:
        assert "not a reward-model checkpoint" in str(e) and CKPT in str(e), e
    else:
        raise AssertionError("a value model without a value head was accepted")
    other = os.environ["MA_TEST_OTHER_TOKENIZER_CKPT"]
    try:  # a reward model with another tokenizer: both named
        Trainer(_cfg("ppo", None, "tensor_model_parallel_size=2", f"reward_model={other}"))
    except ValueError as e:
        assert "do not share a tokenizer" in str(e) and other in str(e) and CKPT in str(e), e
    else:
        raise AssertionError("a reward model with another tokenizer was accepted")
    del rm


def case_grpo_lora_tp2_trains():
    """LoRA policy: generation runs through the adapters, the reference is the base (adapters
    off), only adapters train; at step 1 (B = 0) policy and reference agree exactly."""
    from mcore_align.trainer.reference import PolicyWithoutAdapters

    tr = Trainer(_cfg("grpo", None, "tensor_model_parallel_size=2", "train_iters=3", "train_type=lora",
                      "lora_dropout=0.0", "learning_rate=1e-2"))
    assert isinstance(tr.reference, PolicyWithoutAdapters)
    h = tr.train()["history"]
    assert all(math.isfinite(x["loss"]) and math.isfinite(x["grad_norm"]) for x in h), h
    assert h[0]["objective/kl"] == 0.0 and h[-1]["objective/kl"] > 0, [x["objective/kl"] for x in h]


SEEN: dict = {}


def column_reward(prompts, completions, completion_ids=None, topic=None, **_):
    """A reward function reading a dataset column: records what it was given, scores 0."""
    SEEN.setdefault("calls", []).append((list(prompts), list(topic)))
    return [0.0] * len(completions)


def case_reward_functions_receive_the_records_other_columns():
    tr = Trainer(_cfg("grpo", None, "tensor_model_parallel_size=2", "train_iters=1", "global_batch_size=4",
                      f"data.dataset=[{os.environ['MA_TEST_PROMPTS_COLS']}]",
                      "reward_funcs=[tests.distributed.workers.online_worker:column_reward,"
                      "mcore_align.rewards:even_token_fraction]"))
    tr.train()
    prompts, topics = SEEN["calls"][0]
    assert len(prompts) == len(topics) == 4 * 4  # 4 prompts x 4 generations
    for p, t in zip(prompts, topics):
        assert t in p, (p, t)  # each response gets its own record's column value
