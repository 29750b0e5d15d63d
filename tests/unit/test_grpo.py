"""GRPO / RLOO objective: the per-token loss against an independent float64 transcription of
TRL's GRPOTrainer (loss_type "dapo": normalised by the global number of completion tokens,
k3 KL in the loss), split invariance, declarations and configuration errors."""
from __future__ import annotations

import pytest
import torch

from mcore_align.algorithms import GlobalCounts, SequenceStats, build_objective
from mcore_align.algorithms.base import objective_class


def _batch(seed=0, T=40):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(T, generator=g) < 0.7).double()
    logp = -torch.rand(T, generator=g, dtype=torch.float64) * 3
    old = logp + 0.3 * torch.randn(T, generator=g, dtype=torch.float64)  # ratios away from 1: clipping is live
    ref = logp + 0.5 * torch.randn(T, generator=g, dtype=torch.float64)
    adv = torch.randn(T, generator=g, dtype=torch.float64)
    return logp, old, ref, adv, mask


def trl_grpo_loss(logp, old, ref, adv, mask, *, beta, eps_low, eps_high):
    """TRL GRPOTrainer._compute_loss, written out on flat tokens (float64)."""
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss1 = coef_1 * adv
    per_token_loss2 = coef_2 * adv
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    per_token_kl = torch.exp(ref - logp) - (ref - logp) - 1
    per_token_loss = per_token_loss + beta * per_token_kl
    return (per_token_loss * mask).sum() / mask.sum()


def _stats(logp, old, ref, adv, mask, idx=None):
    s = slice(None) if idx is None else idx
    return SequenceStats(token_logps=logp[s], token_mask=mask[s], token_old_logps=old[s], token_ref_logps=ref[s],
                         token_advantages=adv[s])


@pytest.mark.parametrize("beta,eps_high", [(0.04, None), (0.1, 0.28)])
def test_grpo_loss_and_gradient_match_trl(beta, eps_high):
    logp, old, ref, adv, mask = _batch()
    obj = build_objective("grpo", reward_funcs="m:f", beta=beta, epsilon=0.2, epsilon_high=eps_high)
    leaf = logp.clone().requires_grad_(True)
    st = _stats(leaf, old, ref, adv, mask)
    loss, metrics = obj(st, GlobalCounts(num_tokens=int(mask.sum()), num_sequences=4))
    leaf2 = logp.clone().requires_grad_(True)
    expected = trl_grpo_loss(leaf2, old, ref, adv, mask, beta=beta, eps_low=0.2, eps_high=eps_high or 0.2)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(leaf.grad, leaf2.grad, rtol=1e-12, atol=1e-14)
    kl = ((torch.exp(ref - logp) - (ref - logp) - 1) * mask).sum() / mask.sum()
    assert float(metrics["objective/kl"][0] / metrics["objective/kl"][1]) == pytest.approx(float(kl), rel=1e-12)
    clipped = (((-adv * torch.clamp(torch.exp(logp - old), 0.8, 1 + (eps_high or 0.2))) >
                (-adv * torch.exp(logp - old))).double() * mask).sum() / mask.sum()
    assert float(metrics["policy/clipfrac_avg"][0] / metrics["policy/clipfrac_avg"][1]) == pytest.approx(float(clipped))
    assert 0 < float(clipped) < 1  # the batch exercises clipping


def test_one_step_per_rollout_uses_the_current_policy_as_old():
    """Without old log-probs (num_iterations = 1) rho = 1: the loss is -sum(A)/N (+ KL) and its
    gradient is TRL's -A / N per token."""
    logp, _, ref, adv, mask = _batch(1)
    obj = build_objective("grpo", reward_funcs="m:f", beta=0.0)
    assert "token_ref_logps" not in obj.inputs and not obj.needs_reference
    leaf = logp.clone().requires_grad_(True)
    st = SequenceStats(token_logps=leaf, token_mask=mask, token_advantages=adv)
    loss, _ = obj(st, GlobalCounts(num_tokens=int(mask.sum())))
    loss.backward()
    torch.testing.assert_close(leaf.grad, -adv * mask / mask.sum(), rtol=1e-12, atol=1e-15)


def test_split_invariance():
    logp, old, ref, adv, mask = _batch(2, T=60)
    obj = build_objective("grpo", reward_funcs="m:f", beta=0.04)
    counts = GlobalCounts(num_tokens=int(mask.sum()))
    whole, _ = obj(_stats(logp, old, ref, adv, mask), counts)
    parts = sum(obj(_stats(logp, old, ref, adv, mask, slice(a, a + 20)), counts)[0] for a in (0, 20, 40))
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-14)


def test_declarations_and_rloo():
    g = objective_class("grpo")
    assert g.data_kind == "prompt" and g.head == "lm" and g.needs_reference
    assert {"token_logps", "token_mask", "token_entropy", "token_advantages", "token_ref_logps"} == g.inputs
    assert build_objective("rloo", reward_funcs="m:f").cfg.advantage_estimator == "rloo"
    obj = build_objective("grpo", reward_funcs="m:f", temperature=0.7)
    assert obj.logprob_temperature == 0.7


@pytest.mark.parametrize("kw,msg", [
    ({}, "reward_funcs or reward_model is required"),
    ({"reward_funcs": "m:f", "num_generations": 1}, "num_generations must be >= 2"),
    ({"reward_funcs": "m:f", "advantage_estimator": "gae"}, "advantage_estimator"),
    ({"reward_funcs": "m:f", "rollout_backend": "sglang"}, "rollout_backend"),
    ({"reward_funcs": "m:f", "temperature": 0.0}, "temperature"),
    ({"reward_funcs": "m:f", "top_p": 1.5}, "top_p"),
    ({"reward_funcs": "m:f", "num_sample_generations": -1}, "num_sample_generations"),
])
def test_config_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        build_objective("grpo", **kw)
