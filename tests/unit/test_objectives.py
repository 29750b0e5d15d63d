"""Objectives vs independent references.

Every expected value here comes from formulas written out below per pair / per sequence
in mpmath at 50 digits (no torch, so no shared primitive with the code under test);
gradients are compared with central differences of the same mpmath references. The
references follow the papers / TRL's formulas as quoted in each objective's docstring.
"""
from __future__ import annotations

import math
import warnings

import mpmath as mp
import pytest
import torch

from mcore_align.algorithms import (
    DPO_LOSS_TYPES,
    GlobalCounts,
    SequenceStats,
    available_objectives,
    build_objective,
    check_weight_ratio,
    kl_partial_sums,
    kl_reference_point,
    objective_config_cls,
)
from mcore_align.algorithms.orpo import log1mexp

mp.mp.dps = 50
M = mp.mpf


# ---------------------------------------------------------------- mpmath reference formulas
def lsig(x):
    """log sigmoid(x) = -log(1 + e^-x)."""
    return -mp.log(1 + mp.exp(-x))


def sig(x):
    return 1 / (1 + mp.exp(-x))


def dpo_pair_ref(lt, pc, pr, rc, rr, *, beta, ls=0.0, tau=0.05, delta=0.0):
    """One pair's loss for DPO loss type `lt` (TRL dpo_loss, written out plainly)."""
    cl, rl = pc - rc, pr - rr
    lg = cl - rl
    beta, ls = M(beta), M(ls)
    if lt == "sigmoid":
        return -(1 - ls) * lsig(beta * lg) - ls * lsig(-beta * lg)
    if lt == "robust":
        return (-(1 - ls) * lsig(beta * lg) + ls * lsig(-beta * lg)) / (1 - 2 * ls)
    if lt == "hinge":
        return max(M(0), 1 - beta * lg)
    if lt == "ipo":
        return (lg - 1 / (2 * beta)) ** 2
    if lt == "exo_pair":
        e = ls if ls > 0 else M("1e-3")
        return sig(beta * lg) * (lsig(beta * lg) - mp.log(1 - e)) + sig(-beta * lg) * (lsig(-beta * lg) - mp.log(e))
    if lt == "nca_pair":
        return -lsig(beta * cl) - lsig(-beta * cl) / 2 - lsig(-beta * rl) / 2
    if lt == "bco_pair":
        return -lsig(beta * cl - delta) - lsig(-(beta * rl - delta))
    if lt == "sppo_hard":
        return (cl - 1 / (2 * beta)) ** 2 + (rl + 1 / (2 * beta)) ** 2
    if lt == "apo_zero":
        return (1 - sig(beta * cl)) + sig(beta * rl)
    if lt == "apo_down":
        return sig(beta * cl) + (1 - sig(beta * (cl - rl)))
    if lt == "discopop":
        z = beta * lg
        s = sig(z / M(tau))
        return (1 - s) * (-lsig(z)) + s * mp.exp(-z)
    raise AssertionError(lt)


def dpo_ref(pol, ref, ntok, *, loss_types, weights=None, beta=0.1, ls=0.0, rpo_alpha=1.0, tau=0.05, delta=0.0):
    """Whole-batch DPO loss; pol/ref/ntok are lists of mpf of length 2P (chosen at even)."""
    P = len(pol) // 2
    weights = weights or [1] * len(loss_types)
    # TRL 1.16: only the ipo term is length-normalised (each log-ratio by its own length).
    norm = ([p / n for p, n in zip(pol, ntok)], [r / n for r, n in zip(ref, ntok)])
    nll = -sum(pol[0::2]) / sum(ntok[0::2])
    total = M(0)
    for lt, w in zip(loss_types, weights):
        if lt == "sft":
            total += w * nll
        else:
            pn, rn = norm if lt == "ipo" else (pol, ref)
            total += w * sum(dpo_pair_ref(lt, pn[2 * i], pn[2 * i + 1], rn[2 * i], rn[2 * i + 1], beta=beta, ls=ls,
                                          tau=tau, delta=delta) for i in range(P)) / P
    if rpo_alpha is not None:
        total += rpo_alpha * nll
    return total


def cpo_ref(pol, ntok, *, loss_type, beta=0.1, alpha=1.0, ls=0.0, gamma=None):
    """CPO (gamma None) or SimPO (gamma = simpo_gamma) per TRL CPOTrainer.cpo_loss."""
    P = len(pol) // 2
    norm = gamma is not None or loss_type == "ipo"
    a = [p / n for p, n in zip(pol, ntok)] if norm else pol
    beta = M(beta)
    total = M(0)
    for i in range(P):
        lg = a[2 * i] - a[2 * i + 1]
        if gamma is not None:
            lg = lg - M(gamma) / beta
        if loss_type == "sigmoid":
            total += -(1 - M(ls)) * lsig(beta * lg) - M(ls) * lsig(-beta * lg)
        elif loss_type == "hinge":
            total += max(M(0), 1 - beta * lg)
        elif loss_type == "ipo":
            total += (lg - 1 / (2 * beta)) ** 2
    return total / P + alpha * (-sum(pol[0::2]) / sum(ntok[0::2]))


def orpo_ref(pol, ntok, *, beta=0.1, nll=None):
    """TRL's ORPOTrainer; `nll` overrides the response-only NLL (e.g. TRL's default over the
    chosen prompt and response)."""
    P = len(pol) // 2
    a = [p / n for p, n in zip(pol, ntok)]
    ratio = []
    log_odds = []
    for i in range(P):
        c, r = a[2 * i], a[2 * i + 1]
        lo = mp.log(mp.exp(c) / (1 - mp.exp(c))) - mp.log(mp.exp(r) / (1 - mp.exp(r)))  # log(odds_c / odds_r)
        log_odds.append(lo)
        ratio.append(lsig(lo))
    if nll is None:
        nll = -sum(pol[0::2]) / sum(ntok[0::2])
    return nll - M(beta) * sum(ratio) / P, ratio, log_odds


def kto_ref(pol, ref, labels, z0, *, beta=0.1, dw=1.0, uw=1.0, loss_type="kto"):
    beta = M(beta)
    z0 = M(z0) if loss_type == "kto" else M(0)
    total = M(0)
    for p, r, lab in zip(pol, ref, labels):
        lr = p - r
        total += dw * (1 - sig(beta * (lr - z0))) if lab else uw * (1 - sig(beta * (z0 - lr)))
    return total / len(pol)


def rm_ref(rew, margins=None, coef=None):
    P = len(rew) // 2
    total = M(0)
    for i in range(P):
        m = margins[i] if margins is not None else 0
        total += -lsig(rew[2 * i] - rew[2 * i + 1] - m)
        if coef:
            total += M(coef) * (rew[2 * i] + rew[2 * i + 1]) ** 2
    return total / P


def sft_ref(pol, ntok):
    return -sum(pol) / sum(ntok)


# ---------------------------------------------------------------- inputs
def make_batch(kind: str, P: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """float64 tensors: logps, ref_logps, num_tokens (long), rewards, kl_logps, ref_kl_logps, labels, margins."""
    g = torch.Generator().manual_seed(seed)
    N = 2 * P
    ntok = torch.randint(1, 30, (N,), generator=g)
    if kind == "len1":
        ntok = torch.ones(N, dtype=torch.long)
    avg = -(0.02 + 2.5 * torch.rand(N, generator=g, dtype=torch.float64))  # per-token log-prob
    logps = avg * ntok
    ref = logps + 3.0 * torch.randn(N, generator=g, dtype=torch.float64)
    rewards = 2.0 * torch.randn(N, generator=g, dtype=torch.float64)
    if kind == "neg":  # very negative sums, some pairs with huge log-ratios (saturated sigmoids)
        logps = -1e4 + 50 * torch.rand(N, generator=g, dtype=torch.float64)
        ref = logps + 3.0 * torch.randn(N, generator=g, dtype=torch.float64)
        ref[0], ref[3] = -5.0, -1e4 + 5e3  # pair 0: chosen far below ref; pair 1: rejected far above
        rewards = -1e4 + 50 * torch.rand(N, generator=g, dtype=torch.float64)
    if kind == "equal":
        logps = torch.full((N,), -7.0, dtype=torch.float64)
        ref = torch.full((N,), -6.0, dtype=torch.float64)
        ntok = torch.full((N,), 5, dtype=torch.long)
        rewards = torch.full((N,), 0.3, dtype=torch.float64)
    kl = logps.roll(1) + torch.randn(N, generator=g, dtype=torch.float64)
    ref_kl = kl - 0.5 - torch.rand(N, generator=g, dtype=torch.float64)  # mean KL > 0
    labels = torch.rand(N, generator=g) < 0.6
    labels[0], labels[1] = True, False
    margins = torch.rand(P, generator=g, dtype=torch.float64)
    # Whole sequences (prompt + response): a prompt of 1..20 predicted tokens before the response.
    prompt_ntok = torch.randint(1, 21, (N,), generator=g)
    seq_logps = logps - (0.1 + 3.0 * torch.rand(N, generator=g, dtype=torch.float64)) * prompt_ntok
    # Round through fp32 so fp32 and float64 runs see the same numbers.
    f = lambda t: t.float().double()  # noqa: E731
    return dict(logps=f(logps), ref_logps=f(ref), num_tokens=ntok, rewards=f(rewards), kl_logps=f(kl),
                ref_kl_logps=f(ref_kl), labels=labels, margins=f(margins), seq_logps=f(seq_logps),
                seq_num_tokens=ntok + prompt_ntok)


def counts_for(b, paired=True) -> GlobalCounts:
    N = b["logps"].numel()
    return GlobalCounts(
        num_pairs=N // 2 if paired else N,
        num_sequences=N,
        num_chosen_tokens=int(b["num_tokens"][0::2].sum()),
        num_tokens=int(b["num_tokens"].sum()),
        num_desirable=int(b["labels"].sum()),
        num_undesirable=int((~b["labels"]).sum()),
        num_chosen_seq_tokens=int(b["seq_num_tokens"][0::2].sum()),
    )


def mpl(t: torch.Tensor) -> list:
    return [M(float(x)) for x in t.tolist()]


def stats_of(b, idx=None, dtype=torch.float32, grad_of=None, z0=None) -> SequenceStats:
    """SequenceStats over rows `idx` (all when None); `grad_of` = leaf tensor to slice logps from."""
    sel = (lambda t: t) if idx is None else (lambda t: t[idx])
    logps = sel(grad_of) if grad_of is not None else sel(b["logps"]).to(dtype)
    P_idx = None if idx is None else idx[0::2] // 2
    return SequenceStats(
        logps=logps,
        num_tokens=sel(b["num_tokens"]),
        ref_logps=sel(b["ref_logps"]).to(dtype),
        rewards=sel(b["rewards"]).to(dtype),
        labels=sel(b["labels"]),
        kl_logps=sel(b["kl_logps"]).to(dtype),
        ref_kl_logps=sel(b["ref_kl_logps"]).to(dtype),
        kl_reference=z0,
        margins=(b["margins"] if P_idx is None else b["margins"][P_idx]).to(dtype),
        seq_logps=sel(b["seq_logps"]).to(dtype),
        seq_num_tokens=sel(b["seq_num_tokens"]),
    )


def z0_of(b, dtype=torch.float32) -> torch.Tensor:
    s, c = kl_partial_sums(stats_of(b, dtype=dtype))
    return kl_reference_point(s, c)


def check_close(actual: torch.Tensor, expected, rtol: float, atol: float = 0.0, what: str = "") -> None:
    a = float(actual.detach()) if isinstance(actual, torch.Tensor) else float(actual)
    e = float(expected)
    assert math.isfinite(a), f"{what}: got {a}"
    assert abs(a - e) <= atol + rtol * abs(e), f"{what}: got {a!r}, expected {e!r}"


def fd_grad(f, xs: list, h=M("1e-25")) -> list:
    """Central differences of the mpmath function f(list) -> mpf, per coordinate."""
    out = []
    for i in range(len(xs)):
        up, dn = list(xs), list(xs)
        up[i] += h
        dn[i] -= h
        out.append((f(up) - f(dn)) / (2 * h))
    return out


def check_grad(objective, b, f_ref, field="logps", z0=None, rtol=1e-8):
    """Autograd of `objective` in float64 vs central differences of the mpmath reference."""
    leaf = b[field].clone().requires_grad_(True)
    st = stats_of(b, dtype=torch.float64, z0=z0)
    setattr(st, field, leaf)
    loss, _ = objective(st, counts_for(b, objective.paired))
    loss.backward()
    expected = fd_grad(f_ref, mpl(b[field]))
    for i, (a, e) in enumerate(zip(leaf.grad.tolist(), expected)):
        assert abs(a - float(e)) <= 1e-12 + rtol * abs(float(e)), f"d loss / d {field}[{i}]: {a} vs {float(e)}"


KINDS = ["random", "neg", "len1", "equal"]


def fp32_tol(kind):  # fp32 inputs, float64 reference: relative tolerance
    return 1e-5 if kind != "neg" else 1e-4


# ---------------------------------------------------------------- DPO
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_loss_types_match_reference(loss_type, kind):
    b = make_batch(kind, seed=1)
    # rpo_alpha=None isolates the loss type; the rpo term is tested separately.
    obj = build_objective("dpo", loss_type=loss_type, beta=0.1, rpo_alpha=None, label_smoothing=0.0)
    expected = dpo_ref(mpl(b["logps"]), mpl(b["ref_logps"]), mpl(b["num_tokens"]), loss_types=[loss_type], rpo_alpha=None)
    for dtype, rtol in ((torch.float32, fp32_tol(kind)), (torch.float64, 1e-12)):
        loss, _ = obj(stats_of(b, dtype=dtype), counts_for(b))
        check_close(loss, expected, rtol, atol=1e-6 if dtype == torch.float32 else 1e-13, what=f"{loss_type}/{kind}/{dtype}")


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "exo_pair"])
def test_dpo_label_smoothing(loss_type):
    b = make_batch("random", seed=2)
    obj = build_objective("dpo", loss_type=loss_type, beta=0.3, label_smoothing=0.2, rpo_alpha=None)
    expected = dpo_ref(mpl(b["logps"]), mpl(b["ref_logps"]), mpl(b["num_tokens"]), loss_types=[loss_type], beta=0.3,
                       ls=0.2, rpo_alpha=None)
    loss, _ = obj(stats_of(b, dtype=torch.float64), counts_for(b))
    check_close(loss, expected, 1e-12)


@pytest.mark.parametrize("kind", ["random", "neg"])
@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_gradients(loss_type, kind):
    b = make_batch(kind, P=4, seed=3)
    obj = build_objective("dpo", loss_type=loss_type, rpo_alpha=0.5)
    ref, nt = mpl(b["ref_logps"]), mpl(b["num_tokens"])
    check_grad(obj, b, lambda x: dpo_ref(x, ref, nt, loss_types=[loss_type], rpo_alpha=0.5))


def test_dpo_rpo_and_loss_weights_mix():
    b = make_batch("random", seed=4)
    types, weights = ["sigmoid", "bco_pair", "sft", "discopop"], [0.8, 0.2, 1.0, 0.5]
    obj = build_objective("dpo", loss_type=types, loss_weights=weights, rpo_alpha=1.0, beta=0.2)
    expected = dpo_ref(mpl(b["logps"]), mpl(b["ref_logps"]), mpl(b["num_tokens"]), loss_types=types, weights=weights,
                       beta=0.2, rpo_alpha=1.0)
    loss, metrics = obj(stats_of(b, dtype=torch.float64), counts_for(b))
    check_close(loss, expected, 1e-12)
    # default weights are all 1.0
    obj1 = build_objective("dpo", loss_type=["sigmoid", "hinge"], rpo_alpha=None)
    expected1 = dpo_ref(mpl(b["logps"]), mpl(b["ref_logps"]), mpl(b["num_tokens"]), loss_types=["sigmoid", "hinge"],
                        rpo_alpha=None)
    check_close(obj1(stats_of(b, dtype=torch.float64), counts_for(b))[0], expected1, 1e-12)


def test_dpo_default_is_sigmoid_plus_rpo():
    b = make_batch("random", seed=5)
    obj = build_objective("dpo")
    assert obj.cfg.beta == 0.1 and obj.cfg.rpo_alpha == 1.0 and obj.cfg.loss_type == "sigmoid"
    expected = dpo_ref(mpl(b["logps"]), mpl(b["ref_logps"]), mpl(b["num_tokens"]), loss_types=["sigmoid"], rpo_alpha=1.0)
    check_close(obj(stats_of(b, dtype=torch.float64), counts_for(b))[0], expected, 1e-12)


def metric_means(metrics):
    return {k: float(s) / float(c) for k, (s, c) in metrics.items()}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_metrics(loss_type):
    b = make_batch("random", seed=6)
    beta = 0.25
    obj = build_objective("dpo", loss_type=loss_type, beta=beta)
    _, metrics = obj(stats_of(b, dtype=torch.float64), counts_for(b))
    for s, c in metrics.values():
        assert not s.requires_grad and not c.requires_grad
    pol, ref, nt = mpl(b["logps"]), mpl(b["ref_logps"]), mpl(b["num_tokens"])
    # TRL 1.16 logs raw sums for every loss type (ipo normalises inside its loss only).
    P = len(pol) // 2
    rc = [beta * (pol[2 * i] - ref[2 * i]) for i in range(P)]
    rr = [beta * (pol[2 * i + 1] - ref[2 * i + 1]) for i in range(P)]
    raw = mpl(b["logps"])
    expected = {
        "rewards/chosen": sum(rc) / P,
        "rewards/rejected": sum(rr) / P,
        "rewards/accuracies": M(sum(1 for c, r in zip(rc, rr) if c > r)) / P,
        "rewards/margins": sum(c - r for c, r in zip(rc, rr)) / P,
        "logps/chosen": sum(pol[0::2]) / P,
        "logps/rejected": sum(pol[1::2]) / P,
        "nll_loss": -sum(raw[0::2]) / sum(nt[0::2]),
    }
    got = metric_means(metrics)
    assert set(got) == set(expected)
    for k, e in expected.items():
        check_close(got[k], e, 1e-12, 1e-14, what=k)
    assert 0 < got["rewards/accuracies"] < 1  # the data has both outcomes, so the metric is exercised


@pytest.mark.parametrize("name", ["dpo", "cpo", "simpo", "orpo"])
def test_ties_are_not_accurate(name):
    b = make_batch("equal")
    _, metrics = build_objective(name)(stats_of(b), counts_for(b))
    assert float(metrics["rewards/accuracies"][0]) == 0.0 and float(metrics["rewards/accuracies"][1]) == 8.0


def test_dpo_no_nll_metric_without_rpo():
    b = make_batch("random")
    _, metrics = build_objective("dpo", rpo_alpha=None)(stats_of(b), counts_for(b))
    assert "nll_loss" not in metrics


# ---------------------------------------------------------------- bco_pair running mean
def step_rewards_mean(b, beta=0.1):
    lr = [p - r for p, r in zip(mpl(b["logps"]), mpl(b["ref_logps"]))]
    return sum(beta * x for x in lr) / len(lr)


def test_bco_pair_running_mean_across_steps_and_ranks():
    beta = 0.1
    ranks = [build_objective("dpo", loss_type="bco_pair", rpo_alpha=None) for _ in range(2)]
    batches = [make_batch("random", seed=s) for s in (10, 11, 12)]
    step_means = []
    for step, b in enumerate(batches):
        delta = sum(step_means) / len(step_means) if step_means else M(0)
        expected = dpo_ref(mpl(b["logps"]), mpl(b["ref_logps"]), mpl(b["num_tokens"]), loss_types=["bco_pair"],
                           rpo_alpha=None, delta=delta)
        counts, total = counts_for(b), 0.0
        leaf = b["logps"].clone().requires_grad_(True)
        # rank r holds pairs r, r+2, ... as two micro-batches of 2 pairs each
        for r, obj in enumerate(ranks):
            pairs = list(range(r, 8, 2))
            for mb in (pairs[:2], pairs[2:]):
                idx = torch.tensor([2 * p + k for p in mb for k in (0, 1)])
                total = total + obj(stats_of(b, idx, dtype=torch.float64, grad_of=leaf), counts)[0]
        check_close(total, expected, 1e-12, what=f"step {step}")
        # trainer: all-reduce the partial sums, then every rank commits the same global value
        summed = sum(obj.state_partial_sums() for obj in ranks)
        for obj in ranks:
            obj.update_state(summed)
        step_means.append(step_rewards_mean(b, beta))
    for obj in ranks:
        assert obj.state_dict()["bco_steps"] == 3
        check_close(obj.state_dict()["bco_sum"], sum(step_means), 1e-12)


def test_bco_pair_guard_eval_and_state_dict():
    b = make_batch("random", seed=13)
    obj = build_objective("dpo", loss_type="bco_pair")
    counts = counts_for(b)
    obj(stats_of(b, grad_of=b["logps"].float().requires_grad_(True)), counts)
    with pytest.raises(RuntimeError, match="update_state"):  # a second step without commit
        obj(stats_of(b, grad_of=b["logps"].float().requires_grad_(True)), counts)
    # eval forwards (no grad) do not feed the running mean
    obj2 = build_objective("dpo", loss_type="bco_pair")
    with torch.no_grad():
        for _ in range(3):
            obj2(stats_of(b), counts)
    assert float(obj2.state_partial_sums()[1]) == 0.0
    # state round-trip
    obj3 = build_objective("dpo", loss_type="bco_pair")
    obj3.load_state_dict({"bco_sum": 0.7, "bco_steps": 2})
    expected = dpo_ref(mpl(b["logps"]), mpl(b["ref_logps"]), mpl(b["num_tokens"]), loss_types=["bco_pair"], delta=M("0.35"))
    check_close(obj3(stats_of(b, dtype=torch.float64), counts)[0], expected, 1e-12)
    assert build_objective("dpo").state_partial_sums() is None and build_objective("dpo").state_dict() == {}
    # a step with non-finite rewards is dropped from the running mean (with a warning)
    with pytest.warns(UserWarning, match="non-finite"):
        obj3.update_state(torch.tensor([float("nan"), 16.0], dtype=torch.float64))
    assert obj3.state_dict() == {"bco_sum": 0.7, "bco_steps": 2}


# ---------------------------------------------------------------- KTO
def test_kto_kl_reference_point():
    b = make_batch("random", seed=20)
    kl = [p - r for p, r in zip(mpl(b["kl_logps"]), mpl(b["ref_kl_logps"]))]
    expected = max(M(0), sum(kl) / len(kl))
    assert expected > 0
    check_close(z0_of(b, torch.float64), expected, 1e-12)
    # partial sums over two halves add up to the whole
    (s1, c1), (s2, c2) = (kl_partial_sums(stats_of(b, torch.arange(0, 8), torch.float64)),
                          kl_partial_sums(stats_of(b, torch.arange(8, 16), torch.float64)))
    check_close(kl_reference_point(s1 + s2, c1 + c2), expected, 1e-12)
    # negative mean clamps to 0
    b["ref_kl_logps"] = b["kl_logps"] + 1.0
    assert float(z0_of(b)) == 0.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_matches_reference(kind, loss_type):
    b = make_batch(kind, seed=21)
    kw = dict(beta=0.2, desirable_weight=1.3, undesirable_weight=0.7, loss_type=loss_type)
    obj = build_objective("kto", **kw)
    for dtype, rtol in ((torch.float32, fp32_tol(kind)), (torch.float64, 1e-12)):
        z0 = z0_of(b, dtype)
        expected = kto_ref(mpl(b["logps"]), mpl(b["ref_logps"]), b["labels"].tolist(), float(z0), beta=0.2, dw=1.3,
                           uw=0.7, loss_type=loss_type)
        loss, _ = obj(stats_of(b, dtype=dtype, z0=z0), counts_for(b, paired=False))
        check_close(loss, expected, rtol, 1e-7, what=f"{kind}/{dtype}")
    ref, labels = mpl(b["ref_logps"]), b["labels"].tolist()
    if kind in ("random", "neg"):
        z0 = z0_of(b, torch.float64)
        check_grad(obj, b, lambda x: kto_ref(x, ref, labels, float(z0), beta=0.2, dw=1.3, uw=0.7, loss_type=loss_type),
                   z0=z0)


def test_kto_metrics():
    b = make_batch("random", seed=22)
    z0 = z0_of(b, torch.float64)
    _, metrics = build_objective("kto", beta=0.1)(stats_of(b, dtype=torch.float64, z0=z0), counts_for(b, False))
    pol, ref, lab = mpl(b["logps"]), mpl(b["ref_logps"]), b["labels"].tolist()
    pos = [i for i, x in enumerate(lab) if x]
    neg = [i for i, x in enumerate(lab) if not x]
    expected = {
        "rewards/chosen": sum(M("0.1") * (pol[i] - ref[i]) for i in pos) / len(pos),
        "rewards/rejected": sum(M("0.1") * (pol[i] - ref[i]) for i in neg) / len(neg),
        "logps/chosen": sum(pol[i] for i in pos) / len(pos),
        "logps/rejected": sum(pol[i] for i in neg) / len(neg),
        "kl": M(float(z0)),
    }
    got = metric_means(metrics)
    assert set(got) == set(expected)
    for k, e in expected.items():
        check_close(got[k], e, 1e-12, what=k)
    assert float(metrics["rewards/chosen"][1]) == len(pos)


def test_kto_needs_kl_reference():
    b = make_batch("random")
    with pytest.raises(ValueError, match="kl_reference"):
        build_objective("kto")(stats_of(b), counts_for(b, False))


def test_kto_check_weight_ratio():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_weight_ratio(100, 100, 1.0, 1.0)  # ratio 1: fine
        check_weight_ratio(100, 100, 4 / 3, 1.0)  # ratio 4/3: fine (inclusive)
        check_weight_ratio(100, 80, 1.0, 1.0)  # 1.25
    for args in ((100, 100, 1.0, 1.5), (100, 50, 1.0, 1.0), (10, 100, 1.0, 1.0), (0, 10, 1.0, 1.0)):
        with pytest.warns(UserWarning, match="desirable"):
            check_weight_ratio(*args)


# ---------------------------------------------------------------- CPO / SimPO / ORPO / RM / SFT
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_cpo_matches_reference(loss_type, kind):
    b = make_batch(kind, seed=30)
    obj = build_objective("cpo", loss_type=loss_type, beta=0.1, cpo_alpha=0.7, label_smoothing=0.1)
    f = lambda x: cpo_ref(x, mpl(b["num_tokens"]), loss_type=loss_type, beta=0.1, alpha=0.7, ls=0.1)  # noqa: E731
    for dtype, rtol in ((torch.float32, fp32_tol(kind)), (torch.float64, 1e-12)):
        check_close(obj(stats_of(b, dtype=dtype), counts_for(b))[0], f(mpl(b["logps"])), rtol, 1e-6, what=str(dtype))
    if kind in ("random", "neg"):
        check_grad(obj, b, f)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_simpo_matches_reference(loss_type, kind):
    b = make_batch(kind, seed=31)
    obj = build_objective("simpo", loss_type=loss_type, beta=2.5, simpo_gamma=1.4, cpo_alpha=0.3)
    assert obj.cfg.gamma_beta_ratio == pytest.approx(1.4 / 2.5)
    f = lambda x: cpo_ref(x, mpl(b["num_tokens"]), loss_type=loss_type, beta=2.5, alpha=0.3, gamma=1.4)  # noqa: E731
    for dtype, rtol in ((torch.float32, fp32_tol(kind)), (torch.float64, 1e-12)):
        check_close(obj(stats_of(b, dtype=dtype), counts_for(b))[0], f(mpl(b["logps"])), rtol, 1e-6, what=str(dtype))
    if kind in ("random", "neg"):
        check_grad(obj, b, f)


def test_simpo_paper_form_and_defaults():
    """beta*logits == beta/|y_w| log pi_w - beta/|y_l| log pi_l - gamma (paper Eq. 6), alpha 0 = plain SimPO."""
    obj = build_objective("simpo", cpo_alpha=0.0)
    assert (obj.cfg.beta, obj.cfg.simpo_gamma, build_objective("simpo").cfg.cpo_alpha) == (2.0, 1.0, 1.0)
    st = SequenceStats(logps=torch.tensor([-2.0, -9.0], dtype=torch.float64), num_tokens=torch.tensor([4, 3]))
    loss, _ = obj(st, GlobalCounts(num_pairs=1, num_chosen_tokens=4))
    paper = -lsig(M(2) * M(-2) / 4 - M(2) * M(-9) / 3 - M(1))
    check_close(loss, paper, 1e-14)


def test_cpo_simpo_metrics():
    b = make_batch("random", seed=32)
    pol, nt = mpl(b["logps"]), mpl(b["num_tokens"])
    P = len(pol) // 2
    for name, kw, norm, beta in (("cpo", {}, False, M("0.1")), ("cpo", {"loss_type": "ipo"}, True, M("0.1")),
                                 ("simpo", {}, True, M(2))):
        _, metrics = build_objective(name, **kw)(stats_of(b, dtype=torch.float64), counts_for(b))
        lp = [p / n for p, n in zip(pol, nt)] if norm else pol
        expected = {
            "rewards/chosen": beta * sum(lp[0::2]) / P,
            "rewards/rejected": beta * sum(lp[1::2]) / P,
            "rewards/accuracies": M(sum(1 for i in range(P) if lp[2 * i] > lp[2 * i + 1])) / P,
            "rewards/margins": beta * (sum(lp[0::2]) - sum(lp[1::2])) / P,
            "logps/chosen": sum(lp[0::2]) / P,
            "logps/rejected": sum(lp[1::2]) / P,
            "nll_loss": -sum(pol[0::2]) / sum(nt[0::2]),
        }
        got = metric_means(metrics)
        assert set(got) == set(expected), name
        for k, e in expected.items():
            check_close(got[k], e, 1e-12, 1e-14, what=f"{name}{kw}:{k}")


@pytest.mark.parametrize("kind", KINDS)
def test_orpo_default_nll_covers_prompt_and_response_like_trl(kind):
    """TRL's ORPOTrainer labels are the input ids: its NLL is the token mean over the chosen
    prompt AND response; the odds ratio still uses response-only average log-probs."""
    b = make_batch(kind, seed=41)
    obj = build_objective("orpo", beta=0.25)
    assert obj.cfg.nll_tokens == "prompt_and_response"
    nt, snt = mpl(b["num_tokens"]), mpl(b["seq_num_tokens"])

    def f_seq(seq):  # the loss as a function of the whole-sequence sums
        return orpo_ref(mpl(b["logps"]), nt, beta=0.25, nll=-sum(seq[0::2]) / sum(snt[0::2]))[0]

    for dtype, rtol in ((torch.float32, fp32_tol(kind)), (torch.float64, 1e-12)):
        loss, metrics = obj(stats_of(b, dtype=dtype), counts_for(b))
        check_close(loss, f_seq(mpl(b["seq_logps"])), rtol, 1e-6, what=str(dtype))
    check_close(metric_means(metrics)["nll_loss"], -sum(mpl(b["seq_logps"])[0::2]) / sum(snt[0::2]), 1e-12)
    # The response-only option gives another value on the same batch (the option is live).
    other, _ = build_objective("orpo", beta=0.25, nll_tokens="response")(stats_of(b, dtype=torch.float64),
                                                                          counts_for(b))
    assert abs(float(other) - float(f_seq(mpl(b["seq_logps"])))) > 1e-3
    if kind in ("random", "neg", "len1"):
        check_grad(obj, b, f_seq, field="seq_logps")


@pytest.mark.parametrize("kind", KINDS)
def test_orpo_matches_reference(kind):
    b = make_batch(kind, seed=40)
    obj = build_objective("orpo", beta=0.25, nll_tokens="response")
    nt = mpl(b["num_tokens"])
    f = lambda x: orpo_ref(x, nt, beta=0.25)[0]  # noqa: E731
    for dtype, rtol in ((torch.float32, fp32_tol(kind)), (torch.float64, 1e-12)):
        check_close(obj(stats_of(b, dtype=dtype), counts_for(b))[0], f(mpl(b["logps"])), rtol, 1e-6, what=str(dtype))
    if kind in ("random", "neg", "len1"):
        check_grad(obj, b, f)
    # metrics
    _, metrics = obj(stats_of(b, dtype=torch.float64), counts_for(b))
    _, ratio, log_odds = orpo_ref(mpl(b["logps"]), nt, beta=0.25)
    got = metric_means(metrics)
    check_close(got["log_odds_ratio"], sum(ratio) / len(ratio), 1e-12)
    check_close(got["log_odds_chosen"], sum(log_odds) / len(log_odds), 1e-12, 1e-14)
    avg = [p / n for p, n in zip(mpl(b["logps"]), nt)]
    check_close(got["rewards/chosen"], M("0.25") * sum(avg[0::2]) / len(ratio), 1e-12)
    check_close(got["nll_loss"], -sum(mpl(b["logps"])[0::2]) / sum(nt[0::2]), 1e-12)


def test_log1mexp_accuracy():
    xs = [-1e-30, -1e-12, -1e-6, -0.3, -math.log(2) + 1e-9, -math.log(2) - 1e-9, -1.0, -20.0, -50.0, -800.0, -1e4]
    x = torch.tensor(xs, dtype=torch.float64, requires_grad=True)
    y = log1mexp(x)
    y.sum().backward()
    for xi, yi, gi in zip(xs, y.tolist(), x.grad.tolist()):
        e = mp.log(1 - mp.exp(M(xi)))
        check_close(yi, e, 1e-14, 1e-300, what=f"log1mexp({xi})")
        de = -mp.exp(M(xi)) / (1 - mp.exp(M(xi)))  # d/dx log(1 - e^x)
        check_close(gi, de, 1e-12, 1e-300, what=f"grad log1mexp({xi})")
    # TRL's naive log1p(-exp(x)) loses everything near 0; ours does not.
    assert float(log1mexp(torch.tensor(-1e-30, dtype=torch.float64))) == pytest.approx(math.log(1e-30), rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("margin,coef", [(False, None), (True, None), (True, 0.01), (False, 0.05)])
def test_rm_matches_reference(kind, margin, coef):
    b = make_batch(kind, seed=50)
    obj = build_objective("rm", center_rewards_coefficient=coef)
    margins = mpl(b["margins"]) if margin else None

    def run(dtype):
        st = stats_of(b, dtype=dtype)
        st.margins = st.margins if margin else None
        return obj(st, counts_for(b))

    f = lambda x: rm_ref(x, margins, coef)  # noqa: E731
    tol = 1e-5 if kind != "neg" else 1e-3  # (r_c + r_r)^2 ~ 4e8 in fp32
    for dtype, rtol in ((torch.float32, tol), (torch.float64, 1e-12)):
        check_close(run(dtype)[0], f(mpl(b["rewards"])), rtol, 1e-6, what=str(dtype))
    if kind == "random":
        leaf = b["rewards"].clone().requires_grad_(True)
        st = stats_of(b, dtype=torch.float64)
        st.rewards, st.margins = leaf, (st.margins if margin else None)
        obj(st, counts_for(b))[0].backward()
        for a, e in zip(leaf.grad.tolist(), fd_grad(f, mpl(b["rewards"]))):
            check_close(a, e, 1e-8, 1e-12)
    if kind == "equal":
        assert float(run(torch.float64)[1]["rewards/accuracies"][0]) == 0.0  # ties are not accurate
    _, metrics = run(torch.float64)
    r = mpl(b["rewards"])
    got = metric_means(metrics)
    check_close(got["rewards/margins"], sum(r[0::2]) / 8 - sum(r[1::2]) / 8, 1e-10, 1e-12)
    check_close(got["rewards/chosen"], sum(r[0::2]) / 8, 1e-12, 1e-14)


@pytest.mark.parametrize("kind", KINDS)
def test_sft_matches_reference(kind):
    b = make_batch(kind, seed=60)
    obj = build_objective("sft")
    f = lambda x: sft_ref(x, mpl(b["num_tokens"]))  # noqa: E731
    loss, metrics = obj(stats_of(b, dtype=torch.float64), counts_for(b, False))
    check_close(loss, f(mpl(b["logps"])), 1e-12)
    check_close(metric_means(metrics)["nll_loss"], f(mpl(b["logps"])), 1e-12)
    check_grad(obj, b, f)


# ---------------------------------------------------------------- split invariance
SPLIT_CASES = [
    ("dpo", dict(loss_type="sigmoid")),
    ("dpo", dict(loss_type=["ipo", "sft"], loss_weights=[1.0, 0.3])),
    ("dpo", dict(loss_type=["hinge", "nca_pair", "apo_down", "exo_pair", "sppo_hard", "robust", "apo_zero", "discopop",
                            "bco_pair"], label_smoothing=0.1)),
    ("kto", dict(desirable_weight=1.2)),
    ("cpo", dict(loss_type="ipo")),
    ("cpo", dict(loss_type="sigmoid")),
    ("simpo", dict()),
    ("orpo", dict()),
    ("orpo", dict(nll_tokens="response")),
    ("rm", dict(center_rewards_coefficient=0.01)),
    ("sft", dict()),
]


def _run_split(name, kw, b, groups):
    """Sum of contributions over `groups` (lists of row indices; each group one micro-batch),
    the summed metrics, and d loss / d (logps or rewards) of the whole batch."""
    obj = build_objective(name, **kw)
    counts = counts_for(b, obj.paired)
    field = "rewards" if name == "rm" else "logps"
    leaf = b[field].clone().requires_grad_(True)
    z0 = z0_of(b, torch.float64) if name == "kto" else None
    total, msum = 0.0, {}
    for idx in groups:
        st = stats_of(b, torch.tensor(idx), torch.float64, z0=z0)
        setattr(st, field, leaf[torch.tensor(idx)])
        loss, metrics = obj(st, counts)
        total = total + loss
        for k, (s, c) in metrics.items():
            s0, c0 = msum.get(k, (0.0, 0.0))
            msum[k] = (s0 + s, c0 + c)
    total.backward()
    return total.detach(), leaf.grad, {k: float(s) / float(c) for k, (s, c) in msum.items()}


@pytest.mark.parametrize("name,kw", SPLIT_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SPLIT_CASES)])
def test_micro_batch_and_dp_invariance(name, kw):
    b = make_batch("random", P=8, seed=70)
    rows = list(range(16))
    chunks = lambda k: [rows[i:i + 16 // k] for i in range(0, 16, 16 // k)]  # noqa: E731  pairs stay together
    whole, g_whole, m_whole = _run_split(name, kw, b, [rows])
    # two DP "ranks": pairs 0,2,4,6 on rank 0 and 1,3,5,7 on rank 1, each as two micro-batches
    rank = lambda r: [2 * p + k for p in range(r, 8, 2) for k in (0, 1)]  # noqa: E731
    dp2 = [rank(0)[:4], rank(0)[4:], rank(1)[:4], rank(1)[4:]]
    for groups in (chunks(2), chunks(4), dp2):
        total, grad, metrics = _run_split(name, kw, b, groups)
        torch.testing.assert_close(total, whole, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, g_whole, rtol=1e-12, atol=1e-15)
        assert metrics.keys() == m_whole.keys()
        for k in metrics:
            assert metrics[k] == pytest.approx(m_whole[k], rel=1e-12, abs=1e-14), k


# ---------------------------------------------------------------- registry and configs
def test_registry():
    assert available_objectives() == ["cpo", "dpo", "grpo", "kto", "orpo", "ppo", "rloo", "rm", "sft", "simpo"]
    expect = {"dpo": (True, True, "paired"), "kto": (False, True, "kto"), "cpo": (True, False, "paired"),
              "orpo": (True, False, "paired"), "simpo": (True, False, "paired"), "rm": (True, False, "paired"),
              "sft": (False, False, "sft")}
    for name, (paired, needs_ref, kind) in expect.items():
        obj = build_objective(name)
        assert (obj.name, obj.paired, obj.needs_reference, obj.data_kind) == (name, paired, needs_ref, kind)
        assert isinstance(obj.cfg, objective_config_cls(name))
    with pytest.raises(ValueError, match="available"):
        build_objective("ppo_clip")
    with pytest.raises(ValueError, match="betaa"):
        build_objective("dpo", betaa=0.1)
    with pytest.raises(TypeError):  # keyword-only configs
        objective_config_cls("dpo")(0.1)
    defaults = {"kto": dict(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0),
                "cpo": dict(beta=0.1, cpo_alpha=1.0, loss_type="sigmoid"),
                "orpo": dict(beta=0.1), "rm": dict(center_rewards_coefficient=None),
                "dpo": dict(beta=0.1, rpo_alpha=1.0, label_smoothing=0.0, discopop_tau=0.05, loss_weights=None)}
    for name, d in defaults.items():
        cfg = build_objective(name).cfg
        assert {k: getattr(cfg, k) for k in d} == d, name


@pytest.mark.parametrize("name,kw,field", [
    ("dpo", dict(loss_type="sigmoidd"), "loss_type"),
    ("dpo", dict(loss_type=["sigmoid", "nope"]), "loss_type"),
    ("dpo", dict(loss_type=[]), "loss_type"),
    ("dpo", dict(loss_type=["sigmoid", "sigmoid"]), "loss_type"),
    ("dpo", dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "loss_weights"),
    ("dpo", dict(loss_weights=[float("nan")]), "loss_weights"),
    ("dpo", dict(beta=0.0), "beta"),
    ("dpo", dict(label_smoothing=0.5), "label_smoothing"),
    ("dpo", dict(rpo_alpha=-1.0), "rpo_alpha"),
    ("dpo", dict(discopop_tau=0.0), "discopop_tau"),
    ("kto", dict(undesirable_weight=-1.0), "undesirable_weight"),
    ("kto", dict(loss_type="sigmoid"), "loss_type"),
    ("cpo", dict(loss_type="simpo"), "loss_type"),
    ("cpo", dict(cpo_alpha=-0.1), "cpo_alpha"),
    ("simpo", dict(loss_type="ipo"), "loss_type"),
    ("simpo", dict(simpo_gamma=-1.0), "simpo_gamma"),
    ("orpo", dict(beta=-0.1), "beta"),
    ("rm", dict(center_rewards_coefficient=-0.1), "center_rewards_coefficient"),
])
def test_config_validation(name, kw, field):
    with pytest.raises(ValueError, match=field) as err:
        build_objective(name, **kw)
    if field == "loss_type" and name == "dpo" and kw["loss_type"] not in ([], ["sigmoid", "sigmoid"]):
        for valid in DPO_LOSS_TYPES:  # the message lists every valid loss type
            assert valid in str(err.value)


def test_missing_inputs_and_counts():
    b = make_batch("random")
    st = stats_of(b)
    st.ref_logps = None
    with pytest.raises(ValueError, match="ref_logps"):
        build_objective("dpo")(st, counts_for(b))
    with pytest.raises(ValueError, match="num_pairs"):
        build_objective("dpo")(stats_of(b), GlobalCounts(num_chosen_tokens=10))
    with pytest.raises(ValueError, match="num_chosen_tokens"):
        build_objective("orpo", nll_tokens="response")(stats_of(b), GlobalCounts(num_pairs=8))
    with pytest.raises(ValueError, match="num_chosen_seq_tokens"):
        build_objective("orpo")(stats_of(b), GlobalCounts(num_pairs=8, num_chosen_tokens=10))
    st = stats_of(b)
    st.seq_logps = None
    with pytest.raises(ValueError, match="seq_logps"):
        build_objective("orpo")(st, counts_for(b))
    with pytest.raises(ValueError, match="even length"):
        build_objective("cpo")(stats_of(b, torch.arange(3)), counts_for(b))
