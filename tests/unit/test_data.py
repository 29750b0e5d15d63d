"""Data pipeline tests. Expected token ids come from `tokenizer.apply_chat_template` (or a
plain `tokenizer(...)` call) computed here from the raw records, never from the pipeline."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mcore_align.data import (ROLE_CHOSEN, ROLE_KL, ROLE_REJECTED, ROLE_UNPAIRED, DataConfig, build_data,
                              plan_bins, required_pad_multiple)
from mcore_align.models.tiny_tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {s: build_tiny_tokenizer(root / s, s) for s in ("chatml", "llama3", "llama2")}


def _ids(x):
    return list(x["input_ids"] if not isinstance(x, list) else x)


def chat_ids(tok, msgs, gen=False):
    return _ids(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen))


def sequences(gb):
    """{(pair_index, role): (tokens, target positions, labels ok)} over all micro-batches."""
    out = {}
    for mb in gb.micro_batches:
        flat_t, flat_l, flat_m = mb.tokens.reshape(-1), mb.labels.reshape(-1), mb.loss_mask.reshape(-1)
        flat_p = mb.position_ids.reshape(-1)
        for i in range(mb.num_sequences):
            a, n = int(mb.cu_seqlens[i]), int(mb.seq_lengths[i])
            t = flat_t[a:a + n].tolist()
            # labels[t] = tokens[t+1] inside the sequence, 0 at the last real token.
            assert flat_l[a:a + n - 1].tolist() == t[1:]
            assert int(flat_l[a + n - 1]) == 0 and flat_m[a + n - 1:int(mb.cu_seqlens[i + 1])].sum() == 0
            assert flat_p[a:int(mb.cu_seqlens[i + 1])].tolist() == list(range(int(mb.cu_seqlens[i + 1]) - a))
            targets = {k + 1 for k in torch.nonzero(flat_m[a:a + n]).flatten().tolist()}
            assert int(mb.num_loss_tokens[i]) == len(targets)
            out[(int(mb.pair_index[i]), int(mb.seq_role[i]))] = (t, targets)
    return out


def write_jsonl(path: Path, recs) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def cfg_(tmp_path, ds, **kw):
    kw.setdefault("max_length", 8192)
    kw.setdefault("max_tokens_per_micro_batch", 2 * kw["max_length"])
    return DataConfig(dataset=ds, cache_dir=str(tmp_path / "cache"), **kw)


# ---- tiny tokenizer ----------------------------------------------------------------
def test_tiny_tokenizer_styles(toks, tmp_path):
    from transformers import AutoTokenizer

    for style, tok in toks.items():
        assert len(tok) == 512
        build_tiny_tokenizer(tmp_path / style, style)
        again = AutoTokenizer.from_pretrained(tmp_path / style)  # the saved folder loads offline
        assert again.chat_template == tok.chat_template and len(again) == 512
    msgs = [{"role": "user", "content": "héllo 😀"}, {"role": "assistant", "content": "ok"}]
    l3 = toks["llama3"]
    text = l3.apply_chat_template(msgs, tokenize=False)
    # The Llama 3 trap, reproduced: template has BOS and the post-processor adds one.
    assert _ids(l3(text))[:2] == [l3.bos_token_id] * 2
    assert chat_ids(l3, msgs).count(l3.bos_token_id) == 1
    assert l3.decode(chat_ids(l3, msgs)) == text  # byte-level: any UTF-8 round-trips
    assert toks["chatml"].bos_token_id is None and toks["chatml"].eos_token == "<|im_end|>"


# ---- token level on real data --------------------------------------------------------
def _sharegpt_msgs(rec):
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    return [{"role": role[t["from"]], "content": t["value"]} for t in rec["conversations"]]


@pytest.mark.parametrize("style", ["llama3", "chatml"])
def test_real_dpo_tokens_match_chat_template(shared_data, toks, tmp_path, style):
    tok = toks[style]
    raw = json.loads((shared_data / "dpo_en_demo.json").read_text())
    cfg = cfg_(tmp_path, [str(shared_data / "dpo_en_demo.json")], max_length=16384)
    data = build_data(cfg, tok, "paired", global_batch_size=32, pad_multiple=8)
    assert data.report["formats"] == {str(shared_data / "dpo_en_demo.json"): "sharegpt"}
    assert data.report["records_kept"] == len(raw) == 300  # nothing dropped at 16384
    gb = next(data.train)
    seqs = sequences(gb)
    assert gb.num_pairs == 32 and len(seqs) == 64
    n_multi = n_system = 0
    for p, rid in enumerate(gb.record_ids):
        rec = raw[rid]
        prompt = _sharegpt_msgs(rec)
        n_multi += sum(m["role"] == "assistant" for m in prompt) > 0
        n_system += prompt[0]["role"] == "system"
        prompt_ids = chat_ids(tok, prompt, gen=True)
        for role, key in ((ROLE_CHOSEN, "chosen"), (ROLE_REJECTED, "rejected")):
            full = chat_ids(tok, prompt + [{"role": "assistant", "content": rec[key]["value"]}])
            got, targets = seqs[(p, role)]
            assert got == full
            assert full[:len(prompt_ids)] == prompt_ids
            assert targets == set(range(len(prompt_ids), len(full)))
            if style == "llama3":
                assert got[0] == tok.bos_token_id and got.count(tok.bos_token_id) == 1
        c, r = seqs[(p, ROLE_CHOSEN)][0], seqs[(p, ROLE_REJECTED)][0]
        assert c[:len(prompt_ids)] == r[:len(prompt_ids)]
    assert n_multi and n_system  # the sampled batch covers multi-turn and system prompts
    for mb in gb.micro_batches:  # chosen first, rejected right after it
        roles, pidx = mb.seq_role.tolist(), mb.pair_index.tolist()
        assert roles == [0, 1] * (len(roles) // 2) and pidx[::2] == pidx[1::2]
        assert (mb.cu_seqlens % 8 == 0).all() and mb.cu_seqlens.dtype == torch.int32


def test_real_kto_and_alpaca(shared_data, toks, tmp_path):
    tok = toks["chatml"]
    raw = json.loads((shared_data / "kto_en_demo.json").read_text())
    data = build_data(cfg_(tmp_path, [str(shared_data / "kto_en_demo.json")], max_length=16384), tok, "kto",
                      global_batch_size=8)
    assert data.report["records_kept"] == len(raw)  # so record ids index `raw`
    gb = next(data.train)
    seqs = sequences(gb)
    labels = [raw[r]["label"] for r in gb.record_ids]
    assert gb.num_desirable == sum(labels) and gb.num_undesirable == 8 - sum(labels)
    for p, rid in enumerate(gb.record_ids):
        msgs = raw[rid]["messages"]
        got, targets = seqs[(p, ROLE_UNPAIRED)]
        prompt_ids = chat_ids(tok, msgs[:-1], gen=True)
        assert got == chat_ids(tok, msgs) and targets == set(range(len(prompt_ids), len(got)))
        # KL sequence: this prompt + the previous example's completion.
        prev = raw[gb.record_ids[(p - 1) % 8]]["messages"]
        prev_full, prev_prompt = chat_ids(tok, prev), chat_ids(tok, prev[:-1], gen=True)
        kl, kl_t = seqs[(p, ROLE_KL)]
        assert kl == prompt_ids + prev_full[len(prev_prompt):]
        assert kl_t == set(range(len(prompt_ids), len(kl)))
    for mb in gb.micro_batches:
        assert mb.kto_label[mb.seq_role == ROLE_KL].tolist() == mb.kto_label[mb.seq_role == ROLE_UNPAIRED].tolist()
    raw = json.loads((shared_data / "alpaca_en_demo.json").read_text())
    data = build_data(cfg_(tmp_path, [str(shared_data / "alpaca_en_demo.json") + "#50"]), tok, "sft",
                      global_batch_size=4)
    assert data.report["records_read_total"] == 50 and data.report["formats"]
    gb = next(data.train)
    assert gb.num_tokens == sum(len(t) for t, ts in sequences(gb).values() for t in [ts])


# ---- generated records of every format ---------------------------------------------------
SYS, Q1, A1, Q2 = "You are terse.", "What is 2+2?", "4.", "And 3+3?"
GOOD, BAD = "It is 6.", "Maybe 7?"
MULTI = [{"role": "system", "content": SYS}, {"role": "user", "content": Q1},
         {"role": "assistant", "content": A1}, {"role": "user", "content": Q2}]
PAIRED_FORMATS = {
    "swift": {"system": SYS, "history": [[Q1, A1]], "query": Q2, "response": GOOD, "rejected_response": BAD},
    "messages": {"messages": MULTI + [{"role": "assistant", "content": GOOD}], "rejected_response": BAD},
    "trl": {"prompt": MULTI, "chosen": [{"role": "assistant", "content": GOOD}],
            "rejected": [{"role": "assistant", "content": BAD}]},
    "trl_implicit": {"chosen": MULTI + [{"role": "assistant", "content": GOOD}],
                     "rejected": MULTI + [{"role": "assistant", "content": BAD}]},
    "sharegpt": {"conversations": [{"from": "system", "value": SYS}, {"from": "human", "value": Q1},
                                   {"from": "gpt", "value": A1}, {"from": "human", "value": Q2}],
                 "chosen": {"from": "gpt", "value": GOOD}, "rejected": {"from": "gpt", "value": BAD}},
}


@pytest.mark.parametrize("style", ["chatml", "llama3", "llama2"])
@pytest.mark.parametrize("fmt", sorted(PAIRED_FORMATS))
def test_paired_formats_multiturn_system(toks, tmp_path, fmt, style):
    tok = toks[style]
    path = write_jsonl(tmp_path / "d.jsonl", [PAIRED_FORMATS[fmt]] * 2)
    data = build_data(cfg_(tmp_path, [path], max_length=256), tok, "paired", global_batch_size=2)
    assert data.report["formats"] == {path: fmt}
    seqs = sequences(next(data.train))
    prompt_ids = chat_ids(tok, MULTI, gen=True)
    for role, ans in ((ROLE_CHOSEN, GOOD), (ROLE_REJECTED, BAD)):
        full = chat_ids(tok, MULTI + [{"role": "assistant", "content": ans}])
        got, targets = seqs[(0, role)]
        assert got == full and targets == set(range(len(prompt_ids), len(full)))


def test_all_assistant_turns(toks, tmp_path):
    tok = toks["chatml"]
    path = write_jsonl(tmp_path / "d.jsonl", [PAIRED_FORMATS["messages"]])
    data = build_data(cfg_(tmp_path, [path], max_length=256, train_on_all_assistant_turns=True), tok, "sft",
                      global_batch_size=1)
    got, targets = sequences(next(data.train))[(0, ROLE_UNPAIRED)]
    first = set(range(len(chat_ids(tok, MULTI[:2], gen=True)), len(chat_ids(tok, MULTI[:3]))))
    last = set(range(len(chat_ids(tok, MULTI, gen=True)), len(got)))
    assert targets == first | last
    assert tok.decode([got[k] for k in sorted(first)]) == A1 + "<|im_end|>\n"


def test_plain_text_trl_and_kto_and_sft_formats(toks, tmp_path):
    tok = toks["llama3"]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q: hi\nA:", "chosen": " hello", "rejected": " bye"}] * 2)
    seqs = sequences(next(build_data(cfg_(tmp_path, [path]), tok, "paired", global_batch_size=2).train))
    for role, ans in ((ROLE_CHOSEN, " hello"), (ROLE_REJECTED, " bye")):
        expect = _ids(tok("Q: hi\nA:" + ans)) + [tok.eos_token_id]  # raw text, BOS once, EOS appended
        n_prompt = len(_ids(tok("Q: hi\nA:")))
        assert seqs[(0, role)] == (expect, set(range(n_prompt, len(expect))))
    msgs = [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1}]
    kto = {
        "swift": {"query": Q1, "response": A1, "label": True},
        "messages": {"messages": msgs, "label": False},
        "trl_kto": {"prompt": msgs[:1], "completion": msgs[1:], "label": True},
    }
    sft = {"alpaca": {"instruction": "What is", "input": "2+2?", "output": A1},
           "swift": {"query": Q1, "response": A1}, "messages": {"messages": msgs}}
    tok = toks["chatml"]
    for kind, table in (("kto", kto), ("sft", sft)):
        for fmt, rec in table.items():
            path = write_jsonl(tmp_path / f"{kind}_{fmt}.jsonl", [rec, rec])
            data = build_data(cfg_(tmp_path, [path]), tok, kind, global_batch_size=2)
            assert data.report["formats"] == {path: fmt}
            got, targets = sequences(next(data.train))[(0, ROLE_UNPAIRED)]
            q = "What is\n2+2?" if fmt == "alpaca" else Q1
            full = chat_ids(tok, [{"role": "user", "content": q}, msgs[1]])
            n_prompt = len(chat_ids(tok, [{"role": "user", "content": q}], gen=True))
            assert got == full and targets == set(range(n_prompt, len(full)))
    path = write_jsonl(tmp_path / "prompt.jsonl", [{"prompt": msgs[:1]}, {"prompt": msgs[:1]}])
    got, targets = sequences(next(build_data(cfg_(tmp_path, [path]), tok, "prompt", global_batch_size=2).train))[(0, 2)]
    assert got == chat_ids(tok, msgs[:1], gen=True) and targets == set()


# ---- packing, padding, DP ------------------------------------------------------------
def _pair_records(n, seed=0):
    rng = np.random.default_rng(seed)
    words = "the cat model answer question story data helps with good".split()
    say = lambda k: " ".join(rng.choice(words, size=k))  # noqa: E731
    return [{"query": say(int(rng.integers(1, 20))), "response": say(int(rng.integers(1, 40))),
             "rejected_response": say(int(rng.integers(1, 40)))} for _ in range(n)]


def test_packed_equals_padded_and_dp_sharding(toks, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", _pair_records(64))
    tok = toks["chatml"]
    per_rank = {}
    for packing in (True, False):
        for rank in (0, 1):
            cfg = cfg_(tmp_path, [path], max_length=256, max_tokens_per_micro_batch=600, packing=packing,
                       micro_batch_size=2)
            gb = next(build_data(cfg, tok, "paired", dp_rank=rank, dp_size=2, global_batch_size=16,
                                 pad_multiple=4).train)
            per_rank[packing, rank] = gb
            for mb in gb.micro_batches:
                assert mb.tokens.shape[0] == (1 if packing else mb.num_sequences)
                assert mb.max_seqlen == int((mb.cu_seqlens[1:] - mb.cu_seqlens[:-1]).max())
    for packing in (True, False):
        a, b = per_rank[packing, 0], per_rank[packing, 1]
        assert len(a.micro_batches) == len(b.micro_batches) > 1  # same micro-batch count on every rank
        pa = {p for mb in a.micro_batches for p in mb.pair_index.tolist()}
        pb = {p for mb in b.micro_batches for p in mb.pair_index.tolist()}
        assert not pa & pb and pa | pb == set(range(16))
        assert a.counts_dict() == b.counts_dict() and a.num_pairs == 16
    for mb in per_rank[True, 0].micro_batches:
        assert mb.tokens.shape[1] <= 600
        assert mb.packed_seq_params().qkv_format == "thd"
    both = lambda k: {**sequences(per_rank[k, 0]), **sequences(per_rank[k, 1])}  # noqa: E731
    assert both(True) == both(False)
    gb = per_rank[True, 0]
    loss_tokens = sum(int(mb.loss_mask.sum()) for r in (0, 1) for mb in per_rank[True, r].micro_batches)
    assert gb.num_tokens == loss_tokens


def test_plan_bins_and_pad_multiple():
    rng = np.random.default_rng(0)
    sizes = rng.integers(10, 500, size=37)
    for dp in (1, 2, 3, 8):
        plan = plan_bins(sizes, 1000, dp)
        assert len({len(r) for r in plan}) == 1
        units = sorted(u for r in plan for b in r for u in b)
        assert units == list(range(37))
        assert all(sizes[b].sum() <= 1000 for r in plan for b in r)
    # FFD reaches the lower bound here: 37 units, ceil(sum/cap) bins.
    assert len(plan_bins(sizes, 1000, 1)[0]) == -(-int(sizes.sum()) // 1000)
    with pytest.raises(ValueError, match="cannot give each of 4 DP ranks"):
        plan_bins(sizes[:3], 1000, 4)
    # Units too large to share a bin: nothing can be split, ranks differ by one micro-batch.
    plan = plan_bins(np.array([600, 700, 800]), 1000, 2)
    assert sorted(len(r) for r in plan) == [1, 2]
    assert sorted(u for r in plan for b in r for u in b) == [0, 1, 2]
    assert required_pad_multiple(1, 1, False) == 1
    assert required_pad_multiple(4, 1, True) == 4
    assert required_pad_multiple(4, 2, False) == 4
    assert required_pad_multiple(2, 3, True) == 6
    # SP + CP: a rank keeps L / CP tokens of each sequence, and TP must divide them.
    assert required_pad_multiple(4, 2, True) == 8
    for tp, cp in ((2, 2), (4, 2), (2, 3), (8, 4)):
        m = required_pad_multiple(tp, cp, True)
        assert m % (2 * cp) == 0 and (m // cp) % tp == 0, (tp, cp, m)


def test_resume_and_epochs(toks, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", _pair_records(20))
    cfg = cfg_(tmp_path, [path], max_length=256, val_fraction=0.2)
    mk = lambda: build_data(cfg, toks["chatml"], "paired", global_batch_size=3)  # noqa: E731
    a = mk()
    assert a.report["train_records"] == 16 and a.report["eval_records"] == 4
    first = [next(a.train).record_ids for _ in range(7)]  # 5 batches per epoch: crosses an epoch
    assert sorted(sum(first[:5], [])) != sorted(sum(first[5:], []))  # epoch 2 reshuffled
    assert len(set(sum(first[:5], []))) == 15
    state = a.train.state_dict()
    after = [next(a.train) for _ in range(4)]
    b = mk()
    assert [next(b.train).record_ids for _ in range(2)] == first[:2]  # deterministic from scratch
    b.train.load_state_dict(json.loads(json.dumps(state)))  # state survives JSON
    again = [next(b.train) for _ in range(4)]
    assert [g.record_ids for g in again] == [g.record_ids for g in after]
    assert sequences(again[0]) == sequences(after[0])
    assert (again[0].epoch, again[0].step_in_epoch) == (after[0].epoch, after[0].step_in_epoch) == (1, 2)
    evals = sum((g.record_ids for g in a.eval), [])
    assert len(evals) == 4 and not set(evals) & set(sum(first, []))


def test_cache_reused_and_atomic(toks, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", _pair_records(8))
    cfg = cfg_(tmp_path, [path], max_length=256)
    a = build_data(cfg, toks["chatml"], "paired", global_batch_size=2)
    import mcore_align.data.store as store_mod

    def boom(*a, **k):
        raise AssertionError("re-tokenized although the cache exists")
    monkeypatch.setattr(store_mod, "build_store", boom)
    b = build_data(cfg, toks["chatml"], "paired", global_batch_size=2)
    assert a.report["cache_dir"] == b.report["cache_dir"]
    assert [p.name for p in (tmp_path / "cache").iterdir() if ".tmp" in p.name] == []
    # Different settings or tokenizer -> different cache entry.
    with pytest.raises(AssertionError, match="re-tokenized"):
        build_data(cfg, toks["llama3"], "paired", global_batch_size=2)


def test_truncation_strategies(toks, tmp_path):
    recs = _pair_records(30, seed=1)
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    tok = toks["chatml"]
    kept = {}
    for strat in ("delete", "truncation_left", "right"):
        cfg = cfg_(tmp_path, [path], max_length=64, truncation_strategy=strat)
        data = build_data(cfg, tok, "paired", global_batch_size=2)
        rep = data.report
        assert rep["records_read_total"] == 30 and rep["records_kept"] + rep["dropped_total"] == 30
        assert rep["token_lengths"]["sequence"]["max"] <= 64
        kept[strat] = rep
    assert kept["delete"]["dropped"]["too_long"] > 0
    assert kept["truncation_left"]["warnings"]["truncated_left"] > 0
    assert kept["right"]["warnings"]["truncated_right"] > 0
    assert kept["delete"]["records_kept"] < kept["right"]["records_kept"]


# ---- bad input ---------------------------------------------------------------------------
def _build(tmp_path, tok, text_or_recs, kind="paired", name="bad.jsonl", **kw):
    p = tmp_path / name
    if isinstance(text_or_recs, bytes):
        p.write_bytes(text_or_recs)
    else:
        write_jsonl(p, text_or_recs)
    return build_data(cfg_(tmp_path, [str(p)], **kw), tok, kind, global_batch_size=1)


def test_bad_input_messages(toks, tmp_path):
    tok = toks["chatml"]
    good = {"query": "q", "response": "a", "rejected_response": "b"}
    line = json.dumps(good).encode() + b"\n"
    with pytest.raises(ValueError, match=r"bad.jsonl:3: malformed JSON"):
        _build(tmp_path, tok, line * 2 + b'{"query": "q", \n')
    with pytest.raises(ValueError, match=r"bad.json:2: malformed JSON"):
        _build(tmp_path, tok, b'[\n{"query": }]', name="bad.json")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid UTF-8"):
        _build(tmp_path, tok, line + b'{"query": "\xff\xfe"}\n')
    with pytest.raises(ValueError, match=r"missing field 'rejected_response' .*detected format 'swift'"):
        _build(tmp_path, tok, [good, {"query": "q", "response": "a"}])
    with pytest.raises(ValueError, match=r"field 'response' must be str, got int .*'swift'"):
        _build(tmp_path, tok, [{**good, "response": 3}])
    with pytest.raises(ValueError, match=r"the chosen response is empty"):
        _build(tmp_path, tok, [{**good, "response": "  "}])
    with pytest.raises(ValueError, match=r"field 'label' must be a boolean .*'yes'"):
        _build(tmp_path, tok, [{"messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "a"}], "label": "yes"}], kind="kto")
    with pytest.raises(ValueError, match=r"lone|UTF-8"):
        _build(tmp_path, tok, b'{"query": "q", "response": "\\ud800", "rejected_response": "b"}\n')
    with pytest.raises(ValueError, match=r"cannot detect the dataset format"):
        _build(tmp_path, tok, [{"foo": 1}])
    # skip mode: every problem counted by reason (identical pairs are always dropped).
    recs = (line + b'{"query": "\xff"}\n' + json.dumps({"query": "q", "response": "a"}).encode() + b"\n"
            + json.dumps({**good, "response": ""}).encode() + b"\n"
            + json.dumps({**good, "rejected_response": "a"}).encode() + b"\n")
    rep = _build(tmp_path, tok, recs, on_bad_record="skip").report
    assert rep["dropped"] == {"non_utf8": 1, "missing_field": 1, "empty_response": 1, "identical_chosen_rejected": 1}
    assert rep["warnings"] == {} and rep["records_kept"] == 1


def test_config_validation_and_report_file(toks, tmp_path):
    with pytest.raises(ValueError, match="truncation_strategy"):
        DataConfig(dataset=["x"], truncation_strategy="middle")
    with pytest.raises(ValueError, match="list of strings"):
        DataConfig(dataset="x.jsonl")
    with pytest.raises(ValueError, match="dataset_format"):
        DataConfig(dataset=["x"], dataset_format="csv")
    path = write_jsonl(tmp_path / "d.jsonl", _pair_records(8))
    with pytest.raises(ValueError, match="cannot hold one paired unit"):
        build_data(cfg_(tmp_path, [path], max_length=256, max_tokens_per_micro_batch=300), toks["chatml"],
                   "paired", global_batch_size=2)
    out = tmp_path / "rep" / "data_report.json"
    build_data(cfg_(tmp_path, [path], max_length=256), toks["chatml"], "paired", global_batch_size=2,
               report_path=out)
    rep = json.loads(out.read_text())
    assert rep["records_kept"] == 8 and 0 < rep["packing"]["efficiency_real_over_slots"] <= 1


def test_reward_margin_column_reaches_the_micro_batch(toks, tmp_path):
    """TRL's optional `margin` column: per pair, on both its sequences; NaN where absent; the
    RM step turns it into per-pair margins in pair order (0 for pairs without one)."""
    from mcore_align.trainer.step import _pair_margins

    recs = _pair_records(6)
    margins = [0.5, None, 2.0, -1.0, 3, None]
    for r, m in zip(recs, margins):
        if m is not None:
            r["margin"] = m
    path = write_jsonl(tmp_path / "m.jsonl", recs)
    data = build_data(cfg_(tmp_path, [path]), toks["chatml"], "paired", global_batch_size=6)
    gb = next(data.train)
    want = {i: (float("nan") if m is None else float(m)) for i, m in enumerate(margins)}
    for mb in gb.micro_batches:
        recs_of = [gb.record_ids[int(p)] for p in mb.pair_index]
        got = mb.margin.tolist()
        for rid, g in zip(recs_of, got):
            w = want[rid]
            assert (np.isnan(w) and np.isnan(g)) or g == w, (rid, g, w)
        pm = _pair_margins(mb, torch.device("cpu"))
        chosen_recs = [gb.record_ids[int(p)] for p, r in zip(mb.pair_index, mb.seq_role) if int(r) == 0]
        expect = torch.tensor([0.0 if np.isnan(want[r]) else want[r] for r in chosen_recs])
        if all(np.isnan(want[r]) for r in chosen_recs):
            assert pm is None
        else:
            torch.testing.assert_close(pm, expect)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**_pair_records(1)[0], "margin": "big"}])
    with pytest.raises(Exception, match=r"bad\.jsonl.*'margin' must be a finite number"):
        build_data(cfg_(tmp_path, [bad]), toks["chatml"], "paired", global_batch_size=1)


def test_waiting_ranks_poll_the_filesystem(tmp_path):
    """Non-zero local ranks wait for the cache on disk (no collective timeout), and stop with
    rank 0's error when it leaves its failure note."""
    import threading

    from mcore_align.data.store import _wait_for_cache

    out, failed = tmp_path / "cache" / "key", tmp_path / "cache" / "key.failed-1-host"
    failed.parent.mkdir(parents=True)
    failed.write_text("ValueError: data.jsonl:3: malformed JSON")
    with pytest.raises(RuntimeError, match="local rank 0 failed.*data.jsonl:3"):
        _wait_for_cache(out, failed, poll_s=0.01)
    failed.unlink()

    def finish():
        out.mkdir()
        (out / "meta.json").write_text("{}")

    timer = threading.Timer(0.2, finish)
    timer.start()
    _wait_for_cache(out, failed, poll_s=0.01)  # returns once meta.json exists
    timer.join()
    assert (out / "meta.json").exists()


def test_images_are_counted_not_dropped_silently(toks, tmp_path):
    """ms-swift records with `images`: the text pipeline keeps the text and reports how many
    records carried images it does not use."""
    recs = _pair_records(4)
    recs[1]["images"] = ["a.jpg"]
    recs[3]["images"] = ["b.jpg", "c.jpg"]
    path = write_jsonl(tmp_path / "img.jsonl", recs)
    data = build_data(cfg_(tmp_path, [path]), toks["chatml"], "paired", global_batch_size=2)
    assert data.report["records_kept"] == 4
    assert data.report["warnings"].get("images_ignored") == 2


def test_truncation_keeps_the_right_tokens(toks, tmp_path):
    """Token level, against apply_chat_template: `truncation_left` drops the same leading prompt
    tokens from chosen and rejected (the longer side ends at max_length) and keeps both
    responses whole; `right` keeps the prompt whole and cuts each response's tail."""
    from mcore_align.data.loader import load_or_build_store

    tok = toks["chatml"]
    prompt = [{"role": "user", "content": " ".join(["question"] * 60)}]
    rec = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "a good long answer " * 3}],
           "rejected": [{"role": "assistant", "content": "no"}]}
    path = write_jsonl(tmp_path / "t.jsonl", [rec])
    p_ids = chat_ids(tok, prompt, gen=True)
    full = {k: chat_ids(tok, prompt + rec[k]) for k in ("chosen", "rejected")}
    assert all(f[:len(p_ids)] == p_ids for f in full.values())
    longest = max(len(f) for f in full.values())
    L = longest - 20  # cut 20 tokens: less than the prompt, more than the rejected response
    assert len(p_ids) > 20 and len(full["chosen"]) - len(p_ids) > 20
    for strat in ("truncation_left", "right"):
        cfg = cfg_(tmp_path, [path], max_length=L, truncation_strategy=strat)
        store = load_or_build_store(cfg, tok, "paired")
        got = {k: store.seq(int(store.rec_seq[0, i])) for i, k in enumerate(("chosen", "rejected"))}
        for k, (tokens, targets) in got.items():
            if strat == "truncation_left":
                cut = longest - L
                want = full[k][cut:]
                n_resp = len(full[k]) - len(p_ids)  # the whole response survives
            else:
                want = full[k][:L]
                n_resp = min(len(full[k]), L) - len(p_ids)
            assert tokens.tolist() == want, (strat, k)
            assert targets.tolist() == [0] * (len(want) - n_resp) + [1] * n_resp, (strat, k)
            assert len(tokens) <= L


# ---- data problems: counted by reason, summarised on the console ------------------------
def _trl(prompt, chosen="good answer", rejected="bad answer", **extra):
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], **extra}


U = lambda s: {"role": "user", "content": s}  # noqa: E731
A = lambda s: {"role": "assistant", "content": s}  # noqa: E731
S = lambda s: {"role": "system", "content": s}  # noqa: E731


def test_roles_out_of_order_are_an_error_naming_the_line_or_counted_when_skipped(toks, tmp_path):
    """A conversation must be [system], user, assistant, user, ..., user before the response.
    Default policy: a clear error with file:line; `on_bad_record=skip`: dropped and counted."""
    tok = toks["chatml"]
    good = _trl([S("be brief"), U("hi"), A("hello"), U("how are you")])
    bad = [
        _trl([U("a"), U("b")]),                  # two user turns in a row
        _trl([A("hello"), U("hi")]),             # assistant before any user turn
        _trl([U("a"), S("late system"), U("b")]),  # system not first
        _trl([U("a"), A("b")]),                  # the prompt ends with the assistant
    ]
    for rec in bad:
        with pytest.raises(ValueError, match=rf"bad\.jsonl:2: roles out of order"):
            _build(tmp_path, tok, [good, rec])
    rep = _build(tmp_path, tok, [good, *bad, good], on_bad_record="skip").report
    assert rep["dropped"] == {"roles_out_of_order": 4} and rep["records_kept"] == 2
    # ShareGPT (LLaMA-Factory): two human turns before the chosen/rejected answers.
    sg = {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}],
          "chosen": {"from": "gpt", "value": "c"}, "rejected": {"from": "gpt", "value": "d"}}
    sg_good = {**sg, "conversations": sg["conversations"][:1]}
    with pytest.raises(ValueError, match=r"sg\.jsonl:2: roles out of order"):
        _build(tmp_path, tok, [sg_good, sg], name="sg.jsonl")


def test_empty_user_turns_and_identical_pairs_are_dropped_and_counted(toks, tmp_path):
    """Whatever `on_bad_record` says: a pair whose chosen equals its rejected carries no
    preference signal, and a record with an empty user turn is not a usable prompt."""
    tok = toks["chatml"]
    recs = [_trl([U("q1")]), _trl([U("   ")]), _trl([U(""), A("x"), U("q")]),
            _trl([U("q2")], chosen="same", rejected="same"), _trl([U("q3")], chosen="a", rejected="a"),
            _trl([U("q4")])]
    for policy in ("error", "skip"):
        rep = _build(tmp_path, tok, recs, on_bad_record=policy).report
        assert rep["dropped"] == {"empty_user_turn": 2, "identical_chosen_rejected": 2}, policy
        assert rep["records_kept"] == 2 and rep["dropped_total"] == 4
        assert "identical_chosen_rejected" not in rep["warnings"]


def test_console_summary_lists_drops_and_oddities(toks, tmp_path, caplog):
    """One WARNING block on rank 0 (the default log level shows it): kept, dropped by reason
    with a first location, and oddities such as ignored images."""
    import logging

    recs = [_trl([U("q1")]), _trl([U("q2")], chosen="same", rejected="same"), _trl([U("q3")], images=["a.jpg"]),
            _trl([U("q4")], images=["b.jpg"]), _trl([U("q5")])]
    with caplog.at_level(logging.WARNING):
        _build(tmp_path, toks["chatml"], recs)
    blocks = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING and "data summary" in r.getMessage()]
    assert len(blocks) == 1, [r.getMessage() for r in caplog.records]
    text = blocks[0]
    assert "5 records read, 4 kept, 1 dropped" in text, text
    assert re.search(r"identical_chosen_rejected\s+1\b.*bad\.jsonl:2", text), text
    assert re.search(r"images_ignored\s+2\b", text), text
    # A clean dataset still gets its one-line summary, with nothing listed.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _build(tmp_path, toks["chatml"], [_trl([U("a")]), _trl([U("b")])], name="clean.jsonl")
    blocks = [r.getMessage() for r in caplog.records if "data summary" in r.getMessage()]
    assert len(blocks) == 1 and "2 records read, 2 kept, 0 dropped" in blocks[0], blocks
    assert "identical" not in blocks[0]


def test_failure_notes_do_not_accumulate(toks, tmp_path, monkeypatch):
    """Local rank 0's failure note (read by the node's waiting ranks) is removed once the error
    has been raised, and notes left behind by killed launches are swept on the next one."""
    import os
    import time

    import torch.distributed as dist

    from mcore_align.data.store import load_or_build_store

    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    cache = tmp_path / "cache"
    cache.mkdir()
    stale = cache / "0123abcd.failed-77-otherhost"  # a note from a launch that was killed
    stale.write_text("old")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    fresh = cache / "4567ef.failed-78-otherhost"  # maybe still being read by another launch
    fresh.write_text("new")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "chosen": "y"}])
    created = not dist.is_initialized()  # another test of this process may have started a 1-rank world
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="missing field 'rejected'"):
            load_or_build_store(cfg_(tmp_path, [bad]), toks["chatml"], "paired")
    finally:
        if created:
            dist.destroy_process_group()
    assert sorted(p.name for p in cache.iterdir() if ".failed-" in p.name) == [fresh.name]


def test_prompt_records_keep_their_other_columns(tmp_path, toks):
    """Prompt data (online objectives): every other top-level column of a record is kept in the
    cache, in record order, for the reward functions; the text fields are not repeated there."""
    from mcore_align.data.store import load_or_build_store

    recs = [{"prompt": f"Question {i}?", "answer": str(i * i), "meta": {"level": i % 3}} for i in range(5)]
    path = write_jsonl(tmp_path / "prompts.jsonl", recs)
    store = load_or_build_store(cfg_(tmp_path, [path]), toks["chatml"], "prompt")
    assert store.num_records == 5
    assert [store.record_columns(r) for r in range(5)] == [{"answer": str(i * i), "meta": {"level": i % 3}}
                                                          for i in range(5)]
    paired = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "x": 1}])
    assert load_or_build_store(cfg_(tmp_path, [paired]), toks["chatml"], "paired").record_columns(0) == {}
