"""PPO / GRPO / RLOO maths against independent float64 transcriptions of the peers' code.

The references below transcribe HF TRL's PPOTrainer (trl/experimental/ppo/ppo_trainer.py:
truncate_response, first_true_indices, masked_whiten, INVALID_LOGPROB padding, the reward /
GAE / loss lines of ``train()``) and verl's core_algos.py (GRPO / RLOO loops over an index
dict), in float64 and in their own padding conventions: TRL derives each response's end from
the first pad token after truncating at EOS; the code under test takes explicit lengths
(float32, as in training).
"""
from collections import defaultdict

import pytest
import torch

from mcore_align.algorithms.ppo import (
    PPOConfig,
    apply_missing_eos_penalty,
    compute_advantages,
    entropy_from_logits,
    logprobs_from_logits,
    padding_masks,
    per_token_rewards,
    ppo_loss,
    rollout_metrics,
    train_metrics,
)

EOS, PAD, T = 2, 0, 6
INVALID_LOGPROB = 1.0


# ---------------------------------------------------------------- TRL, transcribed (float64)
def trl_first_true_indices(bools):
    row_len = bools.size(-1)
    zero_or_index = row_len * (~bools).long() + torch.arange(row_len)
    return torch.min(zero_or_index, dim=-1).values


def trl_truncate_response(stop_token_id, pad_token_id, responses):
    trunc_idxs = trl_first_true_indices(responses == stop_token_id).unsqueeze(-1)
    idxs = torch.arange(responses.shape[1]).view(1, -1)
    return torch.masked_fill(responses, idxs > trunc_idxs, pad_token_id)


def trl_masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def trl_masked_var(values, mask):
    mean = trl_masked_mean(values, mask)
    variance = trl_masked_mean((values - mean) ** 2, mask)
    mask_sum = mask.sum()
    return variance * (mask_sum / (mask_sum - 1))


def trl_masked_whiten(values, mask, shift_mean=True):
    mean, var = trl_masked_mean(values, mask), trl_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def trl_rollout(raw_responses, logprobs, ref_logprobs, values, scores, args):
    """TRL PPOTrainer.train(), rollout phase: response processing 1-3, rewards 4-5, GAE 6."""
    postprocessed = trl_truncate_response(EOS, PAD, raw_responses)
    sequence_lengths = trl_first_true_indices(postprocessed == PAD) - 1
    contain_eos_token = torch.any(postprocessed == EOS, dim=-1)
    scores = scores.clone()
    if args["missing_eos_penalty"] is not None:
        scores[~contain_eos_token] -= args["missing_eos_penalty"]
    response_idxs = torch.arange(raw_responses.shape[1]).repeat(raw_responses.shape[0], 1)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
    sequence_lengths_p1 = sequence_lengths + 1
    padding_mask_p1 = response_idxs > (sequence_lengths_p1.unsqueeze(1))
    values = torch.masked_fill(values, padding_mask_p1, 0)
    logr = ref_logprobs - logprobs
    kl = -logr if args["kl_estimator"] == "k1" else (logr.exp() - 1) - logr
    non_score_reward = -args["kl_coef"] * kl
    rewards = non_score_reward.clone()
    actual_start = torch.arange(rewards.size(0))
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
    rewards[actual_start, actual_end] += scores
    if args["whiten_rewards"]:
        rewards = trl_masked_whiten(rewards, mask=~padding_mask_p1, shift_mean=False)
        rewards = torch.masked_fill(rewards, padding_mask_p1, 0)
    lastgaelam = 0
    advantages_reversed = []
    gen_length = raw_responses.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + args["gamma"] * nextvalues - values[:, t]
        lastgaelam = delta + args["gamma"] * args["lam"] * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    advantages = trl_masked_whiten(advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)
    return dict(scores=scores, kl=kl, non_score_reward=non_score_reward, rewards=rewards, advantages=advantages,
                returns=returns, values=values, logprobs=logprobs, padding_mask=padding_mask,
                padding_mask_p1=padding_mask_p1, postprocessed=postprocessed, sequence_lengths=sequence_lengths)


def trl_train_micro_batch(new_logits, responses, ro, args):
    """TRL PPOTrainer.train(), one micro-batch of the PPO epochs (loss and the logged stats)."""
    logits = new_logits / (args["temperature"] + 1e-7)
    new_logprobs = torch.log_softmax(logits, -1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    new_logprobs = torch.masked_fill(new_logprobs, ro["padding_mask"], INVALID_LOGPROB)
    vpred = torch.masked_fill(args["vpred"], ro["padding_mask_p1"], 0)
    vpredclipped = torch.clamp(vpred, ro["values"] - args["cliprange_value"], ro["values"] + args["cliprange_value"])
    vf_losses1 = torch.square(vpred - ro["returns"])
    vf_losses2 = torch.square(vpredclipped - ro["returns"])
    vf_loss_max = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * trl_masked_mean(vf_loss_max, ~ro["padding_mask_p1"])
    vf_clipfrac = trl_masked_mean((vf_losses2 > vf_losses1).double(), ~ro["padding_mask_p1"])
    logprobs_diff = new_logprobs - ro["logprobs"]
    ratio = torch.exp(logprobs_diff)
    pg_losses = -ro["advantages"] * ratio
    pg_losses2 = -ro["advantages"] * torch.clamp(ratio, 1.0 - args["cliprange"], 1.0 + args["cliprange"])
    pg_loss_max = torch.max(pg_losses, pg_losses2)
    pg_loss = trl_masked_mean(pg_loss_max, ~ro["padding_mask"])
    loss = pg_loss + args["vf_coef"] * vf_loss
    pg_clipfrac = trl_masked_mean((pg_losses2 > pg_losses).double(), ~ro["padding_mask"])
    prob_dist = torch.softmax(logits, dim=-1)
    entropy = torch.logsumexp(logits, dim=-1) - torch.sum(prob_dist * logits, dim=-1)
    approxkl = 0.5 * (logprobs_diff ** 2).mean()
    return loss, dict(approxkl=approxkl, clipfrac=pg_clipfrac, pg_loss=pg_loss, vf_loss=vf_loss,
                      vf_clipfrac=vf_clipfrac, entropy=entropy.mean(), ratio=ratio.mean())


# ---------------------------------------------------------------- verl, transcribed (float64)
def verl_grpo(token_level_rewards, response_mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=True):
    scores = token_level_rewards.sum(dim=-1)
    id2score, id2mean, id2std = defaultdict(list), {}, {}
    for i in range(scores.shape[0]):
        id2score[index[i]].append(scores[i])
    for idx in id2score:
        t = torch.stack(id2score[idx])
        id2mean[idx], id2std[idx] = torch.mean(t), torch.std(t)
    for i in range(scores.shape[0]):
        if norm_adv_by_std_in_grpo:
            scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + epsilon)
        else:
            scores[i] = scores[i] - id2mean[index[i]]
    return scores.unsqueeze(-1) * response_mask


def verl_rloo(token_level_rewards, response_mask, index):
    scores = token_level_rewards.sum(dim=-1)
    id2score, id2mean = defaultdict(list), {}
    for i in range(scores.shape[0]):
        id2score[index[i]].append(scores[i])
    for idx in id2score:
        id2mean[idx] = torch.mean(torch.stack(id2score[idx]))
    for i in range(scores.shape[0]):
        n = len(id2score[index[i]])
        scores[i] = scores[i] * n / (n - 1) - id2mean[index[i]] * n / (n - 1)
    return scores.unsqueeze(-1) * response_mask


# ---------------------------------------------------------------- hand-made batch
def _batch(seed=0):
    """4 responses, T=6: EOS at index 2 (garbage after it, as sampled), no EOS (fills T), EOS at the
    last position, EOS first. Our convention: lengths count the EOS, padding after it."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(3, 50, (4, T), generator=g)
    raw[0, 2] = EOS
    raw[2, 5] = EOS
    raw[3, 0] = EOS
    lengths = torch.tensor([3, 6, 6, 1])
    eos = torch.tensor([True, False, True, True])
    ours = raw.clone()
    ours[torch.arange(T)[None] >= lengths[:, None]] = PAD
    logprobs = -torch.rand(4, T, generator=g, dtype=torch.float64) * 3
    ref_logprobs = logprobs + 0.3 * torch.randn(4, T, generator=g, dtype=torch.float64)
    values = torch.randn(4, T, generator=g, dtype=torch.float64)
    scores = torch.tensor([1.5, -0.7, 0.2, 2.0], dtype=torch.float64)
    return raw, ours, lengths, eos, logprobs, ref_logprobs, values, scores


def _close(ours, ref, atol=1e-5):
    torch.testing.assert_close(ours.double(), ref.double(), rtol=1e-5, atol=atol)


CONFIGS = [
    dict(kl_coef=0.05, kl_estimator="k1", whiten_rewards=False, missing_eos_penalty=None, gamma=1.0, lam=0.95),
    dict(kl_coef=0.2, kl_estimator="k3", whiten_rewards=True, missing_eos_penalty=1.0, gamma=0.9, lam=0.8),
    dict(kl_coef=0.1, kl_estimator="k1", whiten_rewards=True, missing_eos_penalty=0.5, gamma=1.0, lam=1.0),
]


def test_trl_length_convention_matches_ours():
    raw, ours, lengths, *_ = _batch()
    post = trl_truncate_response(EOS, PAD, raw)
    assert torch.equal(post, ours)
    assert torch.equal(trl_first_true_indices(post == PAD) - 1, lengths - 1)
    pm, pm1 = padding_masks(lengths, T)
    ro = trl_rollout(raw, *_batch()[4:], dict(CONFIGS[0]))
    assert torch.equal(pm, ro["padding_mask"]) and torch.equal(pm1, ro["padding_mask_p1"])


@pytest.mark.parametrize("args", CONFIGS)
def test_rewards_and_gae_match_trl(args):
    raw, ours, lengths, eos, logprobs, ref_logprobs, values, scores = _batch()
    ro = trl_rollout(raw, logprobs, ref_logprobs, values, scores, args)
    cfg = PPOConfig(**args)
    s = apply_missing_eos_penalty(scores.float(), eos, cfg.missing_eos_penalty)
    _close(s, ro["scores"])
    rewards, nsr, kl = per_token_rewards(s, logprobs.float(), ref_logprobs.float(), lengths, kl_coef=cfg.kl_coef,
                                         kl_estimator=cfg.kl_estimator, whiten_rewards=cfg.whiten_rewards)
    _close(kl, ro["kl"])
    _close(nsr, ro["non_score_reward"])
    _close(rewards, ro["rewards"])
    adv, ret = compute_advantages("gae", rewards, lengths, values_BT=values.float(), cfg=cfg)
    _close(adv, ro["advantages"])
    _close(ret, ro["returns"])


@pytest.mark.parametrize("args", CONFIGS)
def test_loss_and_train_stats_match_trl(args):
    raw, ours, lengths, eos, logprobs, ref_logprobs, values, scores = _batch()
    ro = trl_rollout(raw, logprobs, ref_logprobs, values, scores, args)
    g = torch.Generator().manual_seed(1)
    V = 50
    logits = torch.randn(4, T, V, generator=g, dtype=torch.float64)
    vpred = ro["values"] + 0.4 * torch.randn(4, T, generator=g, dtype=torch.float64)
    targs = dict(temperature=0.7, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, vpred=vpred)
    # Old log-probs far enough from the new ones that both clips engage somewhere.
    ro["logprobs"] = torch.masked_fill(
        torch.log_softmax(logits / 0.7, -1).gather(-1, raw.unsqueeze(-1)).squeeze(-1)
        + 0.5 * torch.randn(4, T, generator=g, dtype=torch.float64), ro["padding_mask"], INVALID_LOGPROB)
    ref_loss, ref_stats = trl_train_micro_batch(logits, raw, ro, targs)
    assert 0 < ref_stats["clipfrac"] < 1 and 0 < ref_stats["vf_clipfrac"] < 1  # the clips are exercised

    cfg = PPOConfig(**args)
    pm, pm1 = padding_masks(lengths, T)
    logits32 = logits.float().requires_grad_()
    new_logp = logprobs_from_logits(logits32, ours, temperature=0.7)
    loss, stats = ppo_loss(new_logp, ro["logprobs"].float(), ro["advantages"].float(), vpred.float(),
                           ro["values"].float(), ro["returns"].float(), pm, pm1, cliprange=cfg.cliprange,
                           cliprange_value=cfg.cliprange_value, vf_coef=cfg.vf_coef,
                           entropy_BT=entropy_from_logits(logits32.detach() / (0.7 + 1e-7)))
    _close(loss.detach(), ref_loss)
    for k, v in ref_stats.items():
        _close(stats[k], v)
    # Gradient w.r.t. logits equals the reference's autograd gradient.
    logits64 = logits.clone().requires_grad_()
    trl_train_micro_batch(logits64, raw, ro, targs)[0].backward()
    loss.backward()
    torch.testing.assert_close(logits32.grad.double(), logits64.grad, rtol=1e-4, atol=1e-6)


def test_metrics_match_trl():
    args = CONFIGS[1]
    raw, ours, lengths, eos, logprobs, ref_logprobs, values, scores = _batch()
    ro = trl_rollout(raw, logprobs, ref_logprobs, values, scores, args)
    cfg = PPOConfig(**args)
    s = apply_missing_eos_penalty(scores.float(), eos, cfg.missing_eos_penalty)
    rewards, nsr, kl = per_token_rewards(s, logprobs.float(), ref_logprobs.float(), lengths,
                                         kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator)
    pm, _ = padding_masks(lengths, T)
    m = rollout_metrics(s, kl, nsr, logprobs.float(), pm, ours, (EOS,))
    mean_nsr = ro["non_score_reward"].sum(1).mean()
    assert m["objective/kl"] == pytest.approx(float(ro["kl"].sum(1).mean()), rel=1e-5)
    assert m["objective/non_score_reward"] == pytest.approx(float(mean_nsr), rel=1e-5)
    assert m["objective/rlhf_reward"] == pytest.approx(float(mean_nsr + ro["scores"].mean()), rel=1e-5)
    assert m["objective/scores"] == pytest.approx(float(ro["scores"].mean()), rel=1e-5)
    # TRL: (-logprobs).sum(1).mean() with INVALID_LOGPROB=1 at padding; ours leaves padding out,
    # i.e. TRL's value plus 1 per padding position.
    trl_entropy = (-ro["logprobs"]).sum(1).mean()
    assert m["objective/entropy"] == pytest.approx(float(trl_entropy + ro["padding_mask"].sum(1).double().mean()), rel=1e-5)
    assert m["val/num_eos_tokens"] == int((ro["postprocessed"] == EOS).sum()) == 3
    # Train metrics: means over micro-batches, ratio variance across them.
    st = [dict(approxkl=torch.tensor(a), clipfrac=torch.tensor(0.1), pg_loss=torch.tensor(0.3), vf_loss=torch.tensor(1.0),
               vf_clipfrac=torch.tensor(0.2), entropy=torch.tensor(2.0), ratio=torch.tensor(r))
          for a, r in ((0.01, 1.0), (0.03, 1.2))]
    tm = train_metrics(st)
    assert tm["policy/approxkl_avg"] == pytest.approx(0.02) and tm["val/ratio"] == pytest.approx(1.1)
    assert tm["val/ratio_var"] == pytest.approx(0.02)  # unbiased var of (1.0, 1.2)
    assert {"policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg", "policy/entropy_avg"} <= set(tm)


@pytest.mark.parametrize("scale", [True, False])
def test_grpo_matches_verl(scale):
    G = 3
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([1, 4, 6, 2, 6, 3])
    pm, _ = padding_masks(lengths, T)
    # Token rewards: a score after the last token plus small per-token KL terms.
    rewards = (torch.randn(6, T, generator=g, dtype=torch.float64) * 0.1).masked_fill(pm, 0.0)
    cfg = PPOConfig(advantage_estimator="grpo", num_generations=G, grpo_scale_by_std=scale)
    adv, ret = compute_advantages("grpo", rewards.float(), lengths, num_generations=G, cfg=cfg)
    ref = verl_grpo(rewards.clone(), (~pm).double(), [0, 0, 0, 1, 1, 1], norm_adv_by_std_in_grpo=scale)
    _close(adv, ref)
    _close(ret, ref)


def test_rloo_matches_verl_and_leave_one_out():
    G = 4
    g = torch.Generator().manual_seed(4)
    lengths = torch.tensor([6, 1, 3, 5, 2, 6, 6, 4])
    pm, _ = padding_masks(lengths, T)
    rewards = torch.randn(8, T, generator=g, dtype=torch.float64).masked_fill(pm, 0.0)
    adv, _ = compute_advantages("rloo", rewards.float(), lengths, num_generations=G)
    _close(adv, verl_rloo(rewards.clone(), (~pm).double(), [0] * 4 + [1] * 4))
    # By hand for response 0: s_0 - mean of the other three.
    s = rewards.sum(-1)
    assert float(adv[0, 0]) == pytest.approx(float(s[0] - s[1:4].mean()), rel=1e-5)


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_group_estimators_refuse_bad_groups(name):
    r, lengths = torch.zeros(4, T), torch.full((4,), T)
    with pytest.raises(ValueError, match="num_generations must be >= 2, got 1"):
        compute_advantages(name, r, lengths, num_generations=1)
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        PPOConfig(advantage_estimator=name, num_generations=1)
    with pytest.raises(ValueError, match="not a whole number of groups"):
        compute_advantages(name, r, lengths, num_generations=3)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="needs values_BT"):
        compute_advantages("gae", torch.zeros(2, T), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo2'"):
        compute_advantages("ppo2", torch.zeros(2, T), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="response lengths must be in"):
        padding_masks(torch.tensor([0, 3]), T)
    with pytest.raises(ValueError, match="kl_estimator"):
        PPOConfig(kl_estimator="k2")
    with pytest.raises(ValueError, match="at least 2 valid positions"):
        from mcore_align.algorithms.ppo import masked_var

        masked_var(torch.ones(1, T), torch.arange(T)[None] < 1)


def test_defaults_are_the_seed_defaults():
    c = PPOConfig()
    assert (c.kl_coef, c.cliprange, c.vf_coef, c.cliprange_value, c.gamma, c.lam, c.whiten_rewards) == \
        (0.05, 0.2, 0.1, 0.2, 1.0, 0.95, False)
