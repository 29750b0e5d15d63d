"""Independent float64 references for the objectives, from `transformers` forward passes.

Each formula is written out here (not calling mcore_align.algorithms) from the papers / TRL,
with the hyperparameters of tests/distributed/workers/algorithms_worker.py::ALGOS. Values are
float64 tensors, differentiable w.r.t. the HF model's parameters (and an RM value head) when
the statistics are computed with ``grad=True``, so the same code gives step-1 losses and
step-1 gradient norms.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def load_hf64(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()


def sequence_stats(model, batch, value_head=None, grad: bool = False) -> list[dict]:
    """Per sequence of a dumped global batch (``micro_batches`` as dicts): role, pair index,
    KTO label, the float64 sum of target log-probs over loss tokens and their count (or, with
    ``value_head`` [1, H], the reward: the head on the final hidden state of the last token).

    All sequences go through one forward pass, right-padded to the longest: the model is
    causal, so a real token never attends to the padding after it."""
    seqs = []  # (tokens [n], labels [n], loss mask [n], row metadata)
    for mb in batch["micro_batches"]:
        tok, lab, mask = (mb[k].reshape(-1) for k in ("tokens", "labels", "loss_mask"))
        cu, lens = mb["cu_seqlens"].tolist(), mb["seq_lengths"].tolist()
        for i, n in enumerate(lens):
            a = cu[i]
            seqs.append((tok[a:a + n], lab[a:a + n], mask[a:a + n].bool(),
                         {"role": int(mb["seq_role"][i]), "pair": int(mb["pair_index"][i]),
                          "label": bool(mb["kto_label"][i])}))
    longest = max(len(t) for t, *_ in seqs)
    ids_NS = torch.zeros(len(seqs), longest, dtype=torch.long)
    for j, (t, *_) in enumerate(seqs):
        ids_NS[j, :len(t)] = t
    rows = []
    with contextlib.nullcontext() if grad else torch.no_grad():
        if value_head is not None:
            h_NSH = model.model(ids_NS).last_hidden_state
            out = [(h_NSH[j, len(t) - 1] @ value_head[0].to(h_NSH.dtype), 1.0) for j, (t, *_) in enumerate(seqs)]
        else:
            logp_NSV = F.log_softmax(model(ids_NS).logits.double(), -1)
            out = []
            for j, (t, lab, m, _) in enumerate(seqs):
                lp_S = logp_NSV[j, :len(t)].gather(-1, lab[:, None])[:, 0]
                # Also every predicted token, prompt included (positions 0..n-2): TRL's ORPO NLL.
                out.append((lp_S[m].sum(), float(m.sum()), lp_S[:len(t) - 1].sum(), float(len(t) - 1)))
    for o, (*_, meta) in zip(out, seqs):
        row = {**meta, "sum": o[0], "count": o[1]}
        if len(o) == 4:
            row.update(seq_sum=o[2], seq_count=o[3])
        rows.append(row)
    return rows


def _pairs(rows):
    """(chosen sums, rejected sums, chosen counts, rejected counts), each [P] in pair order."""
    by = {}
    for r in rows:
        by.setdefault(r["pair"], {})[r["role"]] = r
    keys = sorted(by)
    sums = lambda role: torch.stack([torch.as_tensor(by[k][role]["sum"], dtype=torch.float64) for k in keys])  # noqa: E731
    cnts = lambda role: torch.tensor([by[k][role]["count"] for k in keys], dtype=torch.float64)  # noqa: E731
    return sums(0), sums(1), cnts(0), cnts(1)


def _role_sums(rows, role):
    return torch.stack([torch.as_tensor(r["sum"], dtype=torch.float64) for r in rows if r["role"] == role])


def expected_loss(algo: str, rows, ref_rows=None) -> torch.Tensor:
    """The objective (a float64 scalar) from per-sequence stats; ``ref_rows``: the reference
    model's stats of the same sequences (None: the reference is the policy, as at step 1).
    Reference values are detached: the reference is frozen."""
    ls = F.logsigmoid
    ref_rows = [{**r, "sum": torch.as_tensor(r["sum"]).detach()} for r in (ref_rows or rows)]
    if algo == "sft":
        return -torch.stack([torch.as_tensor(r["sum"]) for r in rows]).sum() / sum(r["count"] for r in rows)
    if algo == "kto":  # beta 0.1, weights 1 (KTO paper Sec. 3.2, TRL's kto_loss)
        beta = 0.1
        pol, ref = _role_sums(rows, 2), _role_sums(ref_rows, 2)
        # The KL pass is a no-grad forward of the policy: detached.
        kl_pol, kl_ref = _role_sums(rows, 3).detach(), _role_sums(ref_rows, 3)
        assert len(kl_pol) == len(pol)
        z0 = (kl_pol - kl_ref).mean().clamp(min=0.0)  # detached reference point, clamped at 0
        lab = torch.tensor([r["label"] for r in rows if r["role"] == 2])
        logr = pol - ref
        per = torch.where(lab, 1 - torch.sigmoid(beta * (logr - z0)), 1 - torch.sigmoid(beta * (z0 - logr)))
        return per.mean()
    pc, pr, nc, nr = _pairs(rows)
    if algo == "rm":
        return -ls(pc - pr).mean()
    nll = -pc.sum() / nc.sum()  # token-mean NLL of the chosen responses
    if algo == "dpo":  # beta 0.1, rpo_alpha 1.0
        rc, rr, _, _ = _pairs(ref_rows)
        return -ls(0.1 * ((pc - rc) - (pr - rr))).mean() + 1.0 * nll
    if algo == "cpo":  # beta 0.1, cpo_alpha 1.0
        return -ls(0.1 * (pc - pr)).mean() + 1.0 * nll
    ac, ar = pc / nc, pr / nr
    if algo == "orpo":  # beta 0.1; TRL's ORPOTrainer: the NLL over the chosen prompt AND response
        chosen = [r for r in rows if r["role"] == 0]
        nll_seq = -torch.stack([torch.as_tensor(r["seq_sum"]) for r in chosen]).sum() / sum(r["seq_count"] for r in chosen)
        log_odds = (ac - ar) - (torch.log1p(-torch.exp(ac)) - torch.log1p(-torch.exp(ar)))
        return nll_seq - 0.1 * ls(log_odds).mean()
    if algo == "simpo":  # beta 2.0, gamma 1.0, cpo_alpha 1.0
        return -ls(2.0 * (ac - ar) - 1.0).mean() + 1.0 * nll
    raise AssertionError(algo)


def step1_grad_norm(hf_dir, algo: str, batch) -> float:
    """||d loss / d theta||_2 in float64 over every trainable parameter at step 1 (the policy
    is the reference): all HF weights, and for the RM the value head (``batch["value_head"]``)."""
    model = load_hf64(hf_dir)
    head = None
    if algo == "rm":
        head = batch["value_head"].double().clone().requires_grad_(True)
    loss = expected_loss(algo, sequence_stats(model, batch, value_head=head, grad=True))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None] + ([head.grad] if head is not None else [])
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
