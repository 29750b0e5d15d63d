#!/usr/bin/env python
"""Rollout generation speed: megatron-core's KV-cache static engine vs no-cache recompute.

    .venv/bin/python benchmarks/bench_rollout.py [--hidden 256 --layers 4 --batch 8 --prompt-len 32]

One process (TP=PP=1, CPU execution mode), a random-init Qwen2-style model converted with the
project's converter. Both paths decode greedily from the same equal-length prompts and must
produce the same tokens (checked). "recompute" runs the plain full forward over the whole
sequence for every new token (what generation without a KV cache costs); "kv cache" is
``mcore_align.rollout``'s megatron backend (prefill once, then one token per step).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, nargs="+", default=[32, 128])
    a = p.parse_args()

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29617")
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)
    import torch

    from mcore_align.checkpoint import convert_hf_to_mcore, load_model_weights, read_model_spec
    from mcore_align.models.provider import build_model
    from mcore_align.models.tiny import make_tiny_model
    from mcore_align.parallel import ParallelConfig, initialize
    from mcore_align.rollout import SamplingParams, build_rollout_engine

    with tempfile.TemporaryDirectory() as tmp:
        make_tiny_model(Path(tmp) / "hf", "qwen2", hidden_size=a.hidden, num_layers=a.layers,
                        ffn_hidden_size=a.hidden * 4, num_heads=8, num_kv_heads=2, vocab_size=a.vocab, init_std=0.1)
        convert_hf_to_mcore(Path(tmp) / "hf", Path(tmp) / "mc", dtype="fp32")
        rt = initialize(ParallelConfig(), device="cpu")
        spec = read_model_spec(Path(tmp) / "mc")
        chunks = build_model(spec, rt)
        load_model_weights(chunks, Path(tmp) / "mc")
    model = chunks[0].eval()
    engine = build_rollout_engine("megatron", chunks=chunks, runtime=rt, vocab_size=spec.vocab_size)
    g = torch.Generator().manual_seed(0)
    prompts_BS = torch.randint(3, a.vocab, (a.batch, a.prompt_len), generator=g)

    def recompute(n: int) -> torch.Tensor:
        seq = prompts_BS.clone()
        with torch.no_grad():
            for _ in range(n):
                pos = torch.arange(seq.shape[1])[None].expand_as(seq)
                logits = model(seq, pos, attention_mask=None)  # [B, S, V], causal, no cache
                seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return seq[:, a.prompt_len:]

    print(f"model: qwen2-style, hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}; batch {a.batch}, "
          f"prompt {a.prompt_len} tokens; torch threads {torch.get_num_threads()}; greedy")
    print("| new tokens | path | seconds | generated tokens/s | speed-up |")
    print("|---:|---|---:|---:|---:|")
    for n in a.new_tokens:
        engine.generate(prompts_BS[:1].tolist(), SamplingParams(temperature=0, response_length=4))  # warm-up
        t = time.perf_counter()
        ref = recompute(n)
        t_re = time.perf_counter() - t
        t = time.perf_counter()
        out = engine.generate(prompts_BS.tolist(), SamplingParams(temperature=0, response_length=n))
        t_kv = time.perf_counter() - t
        assert torch.equal(out.response_ids_BT, ref), "KV-cache and recompute greedy decodes differ"
        toks = a.batch * n
        print(f"| {n} | recompute (no cache) | {t_re:.2f} | {toks / t_re:.0f} | 1.00x |")
        print(f"| {n} | kv cache (megatron static engine) | {t_kv:.2f} | {toks / t_kv:.0f} | {t_re / t_kv:.2f}x |")


if __name__ == "__main__":
    main()
