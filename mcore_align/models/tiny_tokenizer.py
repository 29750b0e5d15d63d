"""Tiny byte-level BPE tokenizers with real chat templates, built offline in ~1 s.

Tests and the tiny end-to-end models need a tokenizer that behaves like the real
ones in the ways that break data pipelines (special tokens, the chat template, where
BOS comes from), without network access. `build_tiny_tokenizer` trains a byte-level
BPE on a generated English corpus and saves it so `AutoTokenizer.from_pretrained(dir)`
works offline.

Styles (each copies the real family's pre-tokenizer regex, special tokens and template):

- ``chatml`` (Qwen2/Qwen3): ``<|im_start|>role\\n...<|im_end|>\\n``; no BOS at all;
  eos ``<|im_end|>``, pad ``<|endoftext|>``; an optional default system turn
  (Qwen2.5 adds "You are a helpful assistant."; Qwen3 adds none).
- ``llama3`` (Llama-3-Instruct): the post-processor prepends ``<|begin_of_text|>``
  AND the template starts with ``bos_token``, exactly like the real tokenizer, so
  ``tokenizer(apply_chat_template(..., tokenize=False))`` has a doubled BOS while
  ``apply_chat_template(..., tokenize=True)`` (add_special_tokens=False) has one.
  eos ``<|eot_id|>``; no pad token (like the real one).
- ``llama2`` (Llama-2-chat): ``<s>[INST] ... [/INST] answer </s>``; BOS from the
  post-processor and from the template per user turn; pad none.

Departures from the real tokenizers: the vocabulary is tiny (default 512 including
specials), and llama2 is byte-level BPE rather than sentencepiece.
"""
from __future__ import annotations

import itertools
import random
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# Pre-tokenizer regexes of the real families (Qwen2 splits digits one by one,
# Llama 3 in groups of up to three).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and messages[0]['role'] != 'system' and default_system %}"
    "{{- '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Verbatim Meta-Llama-3-8B-Instruct template (note `| trim` and `bos_token`).
_LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Verbatim Llama-2-chat template.
_LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

_STYLES = {
    "chatml": dict(
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        split=_QWEN2_SPLIT, template=_CHATML_TEMPLATE, bos=None,
        eos="<|im_end|>", pad="<|endoftext|>", post_bos=False,
    ),
    "llama3": dict(
        specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>", "<|finetune_right_pad_id|>"],
        split=_LLAMA3_SPLIT, template=_LLAMA3_TEMPLATE, bos="<|begin_of_text|>",
        eos="<|eot_id|>", pad=None, post_bos=True,
    ),
    "llama2": dict(
        specials=["<unk>", "<s>", "</s>"],
        split=_LLAMA3_SPLIT, template=_LLAMA2_TEMPLATE, bos="<s>",
        eos="</s>", pad=None, post_bos=True, unk="<unk>",
    ),
}

_SUBJECTS = ["The cat", "A model", "My friend", "The teacher", "This answer", "Our team",
             "The river", "A student", "The assistant", "Every user", "The city", "Your code"]
_VERBS = ["explains", "describes", "finds", "writes", "helps with", "learns", "prefers",
          "chooses", "builds", "reads", "answers", "improves"]
_OBJECTS = ["the question", "a short story", "the best response", "three examples",
            "the history of science", "a simple recipe", "the weather today", "two numbers",
            "a helpful summary", "the python function", "good and bad answers", "the data"]
_ENDINGS = [".", "!", "?", " quickly.", " in 2024.", ", and then stops.", " with care.",
            " because it is useful.", " (see page 12).", ": yes, no, maybe."]
_EXTRA = ["Hello, how are you?", "I'm fine, thanks!", "What's 12 + 30? It's 42.",
          "Translate 'hello' into French: bonjour.", "Write a poem about the sea.",
          "def add(a, b):\n    return a + b\n", "Sure! Here is a list:\n1. one\n2. two\n",
          "Café, naïve, résumé — UTF-8 text works.", "Yes.", "No, that is not correct."]


def _corpus(seed: int = 0, n: int = 600) -> list[str]:
    """Deterministic generated English sentences (no network)."""
    rng = random.Random(seed)
    combos = list(itertools.product(_SUBJECTS, _VERBS, _OBJECTS))
    rng.shuffle(combos)
    lines = [f"{s} {v} {o}{rng.choice(_ENDINGS)}" for s, v, o in combos[:n]]
    return lines + _EXTRA * 5


def build_tiny_tokenizer(
    out_dir: str | Path, style: str = "chatml", vocab_size: int = 512, *,
    default_system: str | None = None,
) -> PreTrainedTokenizerFast:
    """Train a tiny byte-level BPE tokenizer of `style` and save it to `out_dir`.

    Args:
        out_dir: folder written with `save_pretrained`; `AutoTokenizer.from_pretrained`
            loads it offline.
        style: "chatml" (Qwen2/3), "llama3" or "llama2"; see the module docstring.
        vocab_size: total size including the 256 byte symbols and the special tokens.
        default_system: chatml only: system prompt the template inserts when the
            conversation has none (Qwen2.5 uses "You are a helpful assistant.").

    Returns the loaded `PreTrainedTokenizerFast` (``len(tok) == vocab_size`` as long
    as the corpus yields enough merges; it does for vocab_size <= ~1500).
    """
    if style not in _STYLES:
        raise ValueError(f"unknown tokenizer style {style!r}; choose from {sorted(_STYLES)}")
    if default_system is not None and style != "chatml":
        raise ValueError("default_system is only supported by the chatml style")
    spec = _STYLES[style]
    if vocab_size < 256 + len(spec["specials"]) + 1:
        raise ValueError(f"vocab_size {vocab_size} too small for a byte-level BPE")

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(spec["split"]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=spec["specials"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=1,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if spec["post_bos"]:
        # Like the real Llama tokenizers: BOS from the post-processor.
        bos = spec["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
            special_tokens=[(bos, tok.token_to_id(bos))],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    template = spec["template"]
    if style == "chatml":
        # Bake the default system prompt into the template (Qwen2.5 style) or drop it.
        template = ("{%- set default_system = " + repr(default_system) + " %}" if default_system
                    else "{%- set default_system = none %}") + template
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec["bos"], eos_token=spec["eos"], pad_token=spec["pad"],
        unk_token=spec.get("unk"), additional_special_tokens=[],
        clean_up_tokenization_spaces=False, model_max_length=1 << 20,
    )
    hf.chat_template = template
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    return hf
