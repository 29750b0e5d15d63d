"""Chat templating and tokenization of `Example`s into sequences with loss targets.

Token ids are exactly `tokenizer.apply_chat_template(conversation, tokenize=True)` of the
whole conversation: the template is rendered to text and tokenized with
`add_special_tokens=False`, which is what `apply_chat_template` does. Templates that
already contain `bos_token` (Llama 3) therefore get one BOS, not two.

Which tokens are scored is decided on characters, not on re-tokenized pieces: the
response is the text between the rendered prompt (with the generation prompt) and the
rendered full conversation, and a token is a target when its character span overlaps
that range (offsets from the fast tokenizer). Worked example (chatml):

    prompt text  "<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n"   (52 chars)
    full text    prompt text + "Hello!<|im_end|>\\n"                        (69 chars)
    target chars [52, 69) -> tokens "Hello", "!", "<|im_end|>", "\\n" are targets

A `Sequence` keeps `target[k] = 1` when token k is a response token; the micro-batch
later shifts it by one (`loss_mask[t] = target[t + 1]`, the position that predicts it).
"""
from __future__ import annotations

import bisect
import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np

from .formats import REJECTED_FIELD, BadRecord, DroppedRecord, Example

log = logging.getLogger(__name__)
_PAD_REPORTED: set = set()


def padding_id(tokenizer) -> int:
    """The token id that fills padded positions: the tokenizer's pad token, else EOS, else 0.

    Padded positions are masked out of attention (separate packed segments) and of every
    loss, so the id only has to be a valid row of the embedding; the fallbacks are logged
    (once per tokenizer) because they are not what the tokenizer declares.
    """
    name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        pad, why = int(tokenizer.eos_token_id), "padding with the EOS id"
    else:
        pad, why = 0, "and no EOS token either: padding with id 0"
    if (name, pad) not in _PAD_REPORTED:
        _PAD_REPORTED.add((name, pad))
        log.warning("tokenizer %s has no pad token; %s %d (padded positions are masked out of attention "
                    "and loss)", name, why, pad)
    return pad

RESPONSE_FIELD = {"sharegpt": "chosen", "messages": "messages", "swift": "response", "alpaca": "output",
                  "trl": "chosen", "trl_implicit": "chosen", "trl_kto": "completion", "prompt": "completion",
                  "rlaif_v": "chosen"}


@dataclass
class Rendered:
    """Text of one sequence and the character ranges whose tokens are targets."""

    text: str
    add_special_tokens: bool
    spans: list[tuple[int, int]]
    """Target character ranges; the last one is the final response (if any)."""
    prompt_chars: int
    """Length of the prompt text (the final response starts here)."""
    append_eos: bool


@dataclass
class TokenizedRecord:
    """One record after tokenization and truncation: 1 or 2 sequences sharing a prompt."""

    tokens: list[np.ndarray]
    """Per sequence int32 token ids (chosen first, then rejected)."""
    targets: list[np.ndarray]
    """Per sequence uint8: 1 where the token is a scored response token."""
    prompt_len: int
    """Number of leading tokens shared by all sequences (the prompt)."""
    label: int
    """KTO label: 1 desirable, 0 undesirable, -1 none."""


def _check_text(s: str, what: str, loc: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRecord("non_utf8", f"{loc}: {what} is not valid UTF-8 text ({e.reason})") from None


class Templater:
    """Renders examples with the tokenizer's chat template (or as raw text)."""

    def __init__(self, tokenizer, train_on_all_assistant_turns: bool):
        self.tok = tokenizer
        self.all_turns = train_on_all_assistant_turns
        self.eos_id = tokenizer.eos_token_id

    def _chat(self, msgs: list[dict], gen: bool) -> str:
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    def render(self, ex: Example, response: str | None, loc: str) -> Rendered:
        if isinstance(ex.prompt, str):
            # TRL plain text: raw continuation, BOS from the tokenizer, EOS appended.
            text = ex.prompt + (response or "")
            spans = [(len(ex.prompt), len(text))] if response is not None else []
            return Rendered(text, True, spans, len(ex.prompt), response is not None and self.eos_id is not None)
        if self.tok.chat_template is None:
            raise ValueError("the tokenizer has no chat_template; conversational data needs one")
        prompt_text = self._chat(ex.prompt, gen=True)
        if response is None:
            return Rendered(prompt_text, False, [], len(prompt_text), False)
        full = self._chat(ex.prompt + [{"role": "assistant", "content": response}], gen=False)
        if not full.startswith(prompt_text):
            raise ValueError(f"{loc}: the chat template renders the prompt (with generation prompt) as text "
                             "that is not a prefix of the full conversation; cannot locate the response")
        spans = []
        if self.all_turns:
            for i, m in enumerate(ex.prompt):
                if m["role"] != "assistant" or i == 0:
                    continue
                s, e = len(self._chat(ex.prompt[:i], gen=True)), len(self._chat(ex.prompt[: i + 1], gen=False))
                assert full[:e] == self._chat(ex.prompt[: i + 1], gen=False), "template is not prefix-stable"
                spans.append((s, e))
        spans.append((len(prompt_text), len(full)))
        return Rendered(full, False, spans, len(prompt_text), False)


def _check_turn_order(prompt: list[dict[str, str]], fmt: str, loc: str) -> None:
    """The prompt must read [system], user, assistant, user, ..., user: at most one system
    turn and only first, then strictly alternating turns that start and end with the user
    (the response that follows is the assistant's). Chat templates assume this; many
    (Llama 2, Mistral) raise on anything else, the others render nonsense silently.

    Example: [system, user, user] -> "turn 2 is 'user' where 'assistant' is expected"."""
    roles = [m["role"] for m in prompt]
    start = 1 if roles[:1] == ["system"] else 0
    problem = None
    for i in range(start, len(roles)):
        want = "user" if (i - start) % 2 == 0 else "assistant"
        if roles[i] != want:
            problem = f"turn {i} is '{roles[i]}' where '{want}' is expected"
            break
    else:
        if roles[-1] != "user":
            problem = f"the prompt ends with '{roles[-1]}' instead of 'user' before the response"
    if problem is not None:
        raise BadRecord("roles_out_of_order", f"{loc}: roles out of order: {problem} (roles {roles}; "
                        f"expected [system], user, assistant, ..., user; detected format '{fmt}')")


def _targets(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """uint8 [L]: 1 where token k's character span overlaps a target range [s, e).

    Token offsets are non-decreasing, so each range maps to one run of tokens found by
    bisection: first token ending after s, up to the first token starting at/after e."""
    tgt = np.zeros(len(offsets), dtype=np.uint8)
    for s, e in spans:
        lo = bisect.bisect_right(offsets, s, key=lambda o: o[1])
        hi = bisect.bisect_left(offsets, e, key=lambda o: o[0])
        tgt[lo:hi] = 1
    return tgt


class RecordTokenizer:
    """Turns a chunk of examples into `TokenizedRecord`s, applying `max_length`.

    Counters (`dropped`, `warnings`, `truncated`) feed the data report.
    """

    def __init__(self, tokenizer, objective_kind: str, max_length: int, truncation_strategy: str,
                 train_on_all_assistant_turns: bool):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("the data pipeline needs a fast (Rust) tokenizer for character offsets")
        self.tok = tokenizer
        self.kind = objective_kind
        self.max_length = max_length
        self.strategy = truncation_strategy
        self.templater = Templater(tokenizer, train_on_all_assistant_turns)
        self.dropped: Counter = Counter()
        self.warnings: Counter = Counter()
        self.image_token_id: int | None = None
        """Vision models: a truncation that removes any image token drops the record
        (``image_cut_by_truncation``): features and placeholders must match one to one."""

    def responses(self, ex: Example, fmt: str, loc: str) -> list[str | None]:
        """The responses to tokenize for this objective, after validating the example.

        Raises `BadRecord` for malformed records (an error, or skipped and counted, by
        `on_bad_record`) and `DroppedRecord` for usable-looking records without training
        signal (always dropped and counted)."""
        if isinstance(ex.prompt, list) and not any(m["role"] == "user" for m in ex.prompt):
            raise BadRecord("empty_prompt", f"{loc}: the prompt has no user turn (detected format '{fmt}')")
        if isinstance(ex.prompt, list):
            _check_turn_order(ex.prompt, fmt, loc)
            if any(m["role"] == "user" and not m["content"].strip() for m in ex.prompt):
                raise DroppedRecord("empty_user_turn", f"{loc}: a user turn is empty (detected format '{fmt}')")
        if isinstance(ex.prompt, str):
            _check_text(ex.prompt, "prompt", loc)
        else:
            for m in ex.prompt:
                _check_text(m["content"], f"a {m['role']} turn", loc)
        if self.kind == "prompt":
            return [None]
        if ex.chosen is None:
            raise BadRecord("missing_field", f"{loc}: missing field '{RESPONSE_FIELD[fmt]}' (the response; "
                            f"detected format '{fmt}')")
        out = [ex.chosen]
        if self.kind == "paired":
            if ex.rejected is None:
                raise BadRecord("missing_field", f"{loc}: missing field '{REJECTED_FIELD[fmt]}' (paired "
                                f"objectives need a rejected response; detected format '{fmt}')")
            out.append(ex.rejected)
        if self.kind == "kto" and ex.label is None:
            raise BadRecord("missing_field", f"{loc}: missing field 'label' (KTO needs a boolean label; "
                            f"detected format '{fmt}')")
        for name, r in zip(("chosen", "rejected"), out):
            _check_text(r, f"the {name} response", loc)
            if not r.strip():
                raise BadRecord("empty_response", f"{loc}: the {name} response is empty (detected format '{fmt}')")
        if len(out) == 2 and out[0] == out[1]:
            # chosen == rejected: the pair's log-ratio difference is 0 for any policy, so it
            # has no gradient and only dilutes the batch.
            raise DroppedRecord("identical_chosen_rejected", f"{loc}: the chosen and rejected responses are "
                                f"identical (detected format '{fmt}')")
        return out

    def tokenize(self, rendered: list[list[Rendered]]) -> list[TokenizedRecord | None]:
        """Tokenize records (each a list of 1-2 rendered sequences); None = dropped (counted)."""
        flat = [r for rec in rendered for r in rec]
        ids: list = [None] * len(flat)
        offs: list = [None] * len(flat)
        for special in (False, True):  # one batched call per add_special_tokens value
            sel = [i for i, r in enumerate(flat) if r.add_special_tokens == special]
            if not sel:
                continue
            # The Rust tokenizer directly: same ids as `tokenizer(...)`, without the
            # per-token Python conversion of transformers' wrapper.
            encs = self.tok.backend_tokenizer.encode_batch([flat[i].text for i in sel], add_special_tokens=special)
            for j, i in enumerate(sel):
                ids[i], offs[i] = encs[j].ids, encs[j].offsets
        out, k = [], 0
        for rec in rendered:
            seqs = []
            for r in rec:
                tok = np.asarray(ids[k], dtype=np.int32)
                tgt = _targets(offs[k], r.spans)
                # Prompt = tokens before the first one touching the final response.
                plen = (bisect.bisect_right(offs[k], r.prompt_chars, key=lambda o: o[1]) if r.spans
                        else len(tok))
                if r.append_eos:
                    tok, tgt = np.append(tok, np.int32(self.tok.eos_token_id)), np.append(tgt, np.uint8(1))
                seqs.append((tok, tgt, plen))
                k += 1
            out.append(self._finish(seqs, rec))
        return out

    def _finish(self, seqs, rec: list[Rendered]) -> TokenizedRecord | None:
        # Shared prompt = common prefix of the sequences' prompt parts. They differ only
        # when BPE merges across the prompt/response boundary (rare; counted).
        plen = min(p for _, _, p in seqs)
        for tok, _, p in seqs[1:]:
            common = np.flatnonzero(tok[:plen] != seqs[0][0][:plen])
            if len(common):
                plen = int(common[0])
        if any(p != plen for _, _, p in seqs):
            self.warnings["prompt_boundary_merged"] += 1
        toks = [t for t, _, _ in seqs]
        tgts = [g for _, g, _ in seqs]
        longest = max(len(t) for t in toks)
        if longest > self.max_length:
            before = [int((t == self.image_token_id).sum()) for t in toks] if self.image_token_id is not None else None
            warned = self.warnings.copy()
            cut = self._truncate(toks, tgts, plen, longest)
            if cut[0] is None:
                return None
            if before is not None and before != [int((t == self.image_token_id).sum()) for t in cut[0]]:
                self.dropped["image_cut_by_truncation"] += 1
                self.warnings = warned  # dropped, not truncated
                return None
            toks, tgts, plen = cut
        return TokenizedRecord(toks, tgts, plen, -1)

    def _truncate(self, toks, tgts, plen, longest):
        L = self.max_length
        if self.strategy == "delete":
            self.dropped["too_long"] += 1
            return None, None, None
        if self.strategy == "truncation_left":
            cut = longest - L
            # Keep at least one prompt token so the first response token has a predictor
            # (prompt-only sequences simply keep their last max_length tokens).
            if self.kind != "prompt" and cut >= plen:
                self.dropped["too_long_after_truncation"] += 1
                return None, None, None
            self.warnings["truncated_left"] += 1
            return [t[cut:] for t in toks], [g[cut:] for g in tgts], max(plen - cut, 0)
        # "right": keep the prompt whole, cut each response at the end.
        if self.kind != "prompt" and plen >= L:
            self.dropped["prompt_too_long"] += 1
            return None, None, None
        self.warnings["truncated_right"] += 1
        return [t[:L] for t in toks], [g[:L] for g in tgts], min(plen, L)
