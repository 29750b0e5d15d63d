"""2-rank cases for mcore_align.rollout's megatron backend (one torchrun launch).

References are independent of the generation path: the no-cache greedy decode and the
recomputed log-probs use a plain training-style forward (``checkpoint.verify.megatron_logits``:
megatron's pipeline schedule, full sequence, no KV cache) repeated token by token.
The pytest side (tests/distributed/test_rollout_dist.py) makes and converts the tiny model.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mcore_align.checkpoint import load_model_weights, read_model_spec
from mcore_align.checkpoint.verify import megatron_logits
from mcore_align.models.provider import ModelOptions, build_model
from mcore_align.parallel import ParallelConfig, initialize
from mcore_align.rollout import SamplingParams, build_rollout_engine

CKPT = Path(os.environ.get("MA_ROLLOUT_CKPT", "/nonexistent"))
# Different lengths, so megatron's loop prefills to the shortest and feeds the rest token by token.
PROMPTS = [[11, 12, 13], [21, 22, 23, 24, 25, 26, 27], [31, 32, 33, 34, 35], [41, 42, 43, 44], [5, 6, 7, 8, 9, 10, 11, 12, 13]]
T = 10
_GREEDY_TP1: dict = {}


def teardown_case():
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def _setup(tp: int = 1, pp: int = 1, load: bool = True, **opts):
    teardown_case()
    rt = initialize(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), device="cpu")
    spec = read_model_spec(CKPT)
    chunks = build_model(spec, rt, opts=ModelOptions(**opts))
    if load:
        load_model_weights(chunks, CKPT)
    return rt, spec, chunks


def _engine(rt, spec, chunks, batch_size: int = 64):
    return build_rollout_engine("megatron", chunks=chunks, runtime=rt, vocab_size=spec.vocab_size,
                                pad_token_id=0, local_rollout_forward_batch_size=batch_size)


def _last_stage_src(rt) -> int:
    pp = rt.pgs.pp
    return dist.get_process_group_ranks(pp)[pp.size() - 1]


def _full_logits(chunks, rt, seq: list[int]) -> torch.Tensor:
    """[S, V] float32 logits of a plain full forward, on every rank (broadcast from the last stage)."""
    logits = megatron_logits(chunks, torch.tensor([seq]), rt)
    out = logits[0].contiguous() if logits is not None else torch.empty(len(seq), read_model_spec(CKPT).vocab_size)
    if rt.pgs.pp.size() > 1:
        dist.broadcast(out, src=_last_stage_src(rt), group=rt.pgs.pp)
    return out


def _recompute_greedy(chunks, rt, prompt, n_new, stop_ids=()):
    """Greedy decode without a KV cache: argmax of a full forward over the whole sequence, repeated.
    Returns (tokens, top-2 logit gap at each step)."""
    seq, gaps = list(prompt), []
    for _ in range(n_new):
        last = _full_logits(chunks, rt, seq)[-1]
        top2 = last.topk(2).values
        gaps.append(float(top2[0] - top2[1]))
        seq.append(int(last.argmax()))
        if seq[-1] in stop_ids:
            break
    return seq[len(prompt):], gaps


def _check_greedy(tp: int, pp: int) -> list[list[int]]:
    rt, spec, chunks = _setup(tp, pp)
    refs = [_recompute_greedy(chunks, rt, p, T) for p in PROMPTS]
    # The comparison is well posed only if no step is a near-tie.
    assert min(min(g) for _, g in refs) > 1e-4, [g for _, g in refs]
    ref_tokens = [r for r, _ in refs]
    # Two stop ids taken from the reference itself: prompt 0 stops at its 4th token, prompt 1 at its 6th
    # (or earlier if the id appears before); the others stop wherever the ids occur, if at all.
    stops = (ref_tokens[0][3], ref_tokens[1][5])
    expected = []
    for r in ref_tokens:
        cut = next((i + 1 for i, t in enumerate(r) if t in stops), len(r))
        expected.append(r[:cut])
    for bs in (64, 2):  # one batch, and three batches of <= 2
        out = _engine(rt, spec, chunks, batch_size=bs).generate(PROMPTS, SamplingParams(
            temperature=0.0, response_length=T, stop_token_ids=stops))
        got = [out.response_ids_BT[i, :int(out.response_lengths_B[i])].tolist() for i in range(len(PROMPTS))]
        assert got == expected, (tp, pp, bs, got, expected)
        assert out.eos_B.tolist() == [len(e) < T or e[-1] in stops for e in expected]
        assert (out.response_ids_BT[~out.response_mask_BT] == 0).all()  # pad after the end
    # Without stop ids: the full T tokens, equal to the reference.
    out = _engine(rt, spec, chunks).generate(PROMPTS, SamplingParams(temperature=0.0, response_length=T))
    assert out.response_ids_BT.tolist() == ref_tokens and not out.eos_B.any()
    assert out.response_lengths_B.tolist() == [T] * len(PROMPTS)
    # Every rank of the model-parallel group holds the same tokens.
    gathered = [torch.empty_like(out.response_ids_BT) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, out.response_ids_BT)
    assert all(torch.equal(g, gathered[0]) for g in gathered)
    return ref_tokens


def case_greedy_kv_cache_equals_recompute_tp1():
    _GREEDY_TP1["tokens"] = _check_greedy(1, 1)


def case_greedy_kv_cache_equals_recompute_tp2():
    tokens = _check_greedy(2, 1)
    assert tokens == _GREEDY_TP1["tokens"]  # sharding does not change the greedy decode


def case_greedy_kv_cache_equals_recompute_pp2():
    tokens = _check_greedy(1, 2)
    assert tokens == _GREEDY_TP1["tokens"]


def _check_sampled_logprobs(tp: int, pp: int, temperature: float = 1.0, **params) -> None:
    rt, spec, chunks = _setup(tp, pp)
    out = _engine(rt, spec, chunks, batch_size=3).generate(
        PROMPTS, SamplingParams(temperature=temperature, response_length=T, seed=5, **params))
    assert out.logprob_temperature == temperature
    worst = 0.0
    for i, p in enumerate(PROMPTS):
        n = int(out.response_lengths_B[i])
        resp = out.response_ids_BT[i, :n].tolist()
        seq = p + resp
        # Training-style: full forward, logits / temperature, log_softmax in float64, next-token gather.
        logp = F.log_softmax(_full_logits(chunks, rt, seq).double() / temperature, dim=-1)
        ref = logp[len(p) - 1:len(seq) - 1].gather(-1, torch.tensor(resp)[:, None])[:, 0]
        worst = max(worst, float((ref - out.logprobs_BT[i, :n].double()).abs().max()))
        assert (out.logprobs_BT[i, n:] == 0).all()
    assert worst < 1e-4, worst
    # Model-parallel peers sample the same tokens (same seed, same gathered/broadcast logits).
    mp = rt.pgs.tp if tp > 1 else rt.pgs.pp
    if mp.size() > 1:
        parts = [torch.empty_like(out.response_ids_BT) for _ in range(mp.size())]
        dist.all_gather(parts, out.response_ids_BT, group=mp)
        assert torch.equal(parts[0], parts[1])


def case_sampled_logprobs_match_training_forward_tp1():
    _check_sampled_logprobs(1, 1)


def case_sampled_logprobs_match_training_forward_tp2_top_p_temperature():
    _check_sampled_logprobs(2, 1, temperature=0.7, top_p=0.9)


def case_sampled_logprobs_match_training_forward_pp2_top_k_temperature():
    _check_sampled_logprobs(1, 2, temperature=1.3, top_k=20)


def case_top_k_samples_lie_in_top_k():
    rt, spec, chunks = _setup()
    out = _engine(rt, spec, chunks).generate(PROMPTS, SamplingParams(temperature=0.7, top_k=3, response_length=T, seed=1))
    for i, p in enumerate(PROMPTS):
        resp = out.response_ids_BT[i].tolist()
        logits = _full_logits(chunks, rt, p + resp)[len(p) - 1:len(p) + T - 1]  # [T, V] predicting resp
        top3 = logits.topk(3, dim=-1).indices
        assert all(resp[t] in top3[t].tolist() for t in range(T)), (i, resp, top3)


def case_seeds():
    """Same seed: same samples; another seed: other samples; DP ranks: different streams."""
    rt, spec, chunks = _setup()  # TP=1: the two ranks are data-parallel
    eng = _engine(rt, spec, chunks)
    a = eng.generate(PROMPTS, SamplingParams(response_length=T, seed=3)).response_ids_BT
    b = eng.generate(PROMPTS, SamplingParams(response_length=T, seed=3)).response_ids_BT
    c = eng.generate(PROMPTS, SamplingParams(response_length=T, seed=4)).response_ids_BT
    assert torch.equal(a, b) and not torch.equal(a, c)
    parts = [torch.empty_like(a) for _ in range(2)]
    dist.all_gather(parts, a)
    assert not torch.equal(parts[0], parts[1])


def case_model_state_restored_with_fused_head():
    """A training-mode policy built with the fused log-prob head (it returns hidden states)
    generates the same greedy tokens and is left in training mode with the fused head."""
    from mcore_align.models.heads import emits_hidden_states

    rt, spec, chunks = _setup(fused_logprobs=True)
    chunks[0].train()
    out = _engine(rt, spec, chunks).generate(PROMPTS, SamplingParams(temperature=0.0, response_length=T))
    assert out.response_ids_BT.tolist() == _GREEDY_TP1["tokens"]
    assert chunks[0].training and emits_hidden_states(chunks[0])
    # Outputs are ordinary tensors (not inference-mode ones): usable as training inputs.
    assert not out.response_ids_BT.is_inference() and not out.logprobs_BT.is_inference()


def case_refusals():
    rt, spec, chunks = _setup()
    eng = _engine(rt, spec, chunks)
    for params, msg in ((SamplingParams(top_k=5, top_p=0.9), "either top_k or top_p"),):
        try:
            eng.generate(PROMPTS, params)
        except ValueError as e:
            assert msg in str(e), e
        else:
            raise AssertionError("not refused")
    for prompts, msg in (([[1, 2], []], "prompt 1 is empty"), ([[1, 10**6]], "outside")):
        try:
            eng.generate(prompts, SamplingParams())
        except ValueError as e:
            assert msg in str(e), e
        else:
            raise AssertionError("not refused")
    rt, spec, chunks = _setup(load=False, head="value")
    try:
        _engine(rt, spec, chunks)
    except ValueError as e:
        assert "value head" in str(e)
    else:
        raise AssertionError("value head not refused")
