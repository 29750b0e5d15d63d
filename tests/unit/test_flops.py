"""mcore_align.flops against an independent count: torch's FlopCounterMode on the HF model.

FlopCounterMode counts every matmul the HF Qwen2 model executes (eager attention, so the
scores are two batched matmuls it can see) in forward and backward. It counts what a
dense kernel does: the full s x s score matrix, masked or not, so the formula is asked
for ``causal=False`` here. Neither side counts softmax, norms, RoPE, SiLU or biases
(addmm counts as its mm); embedding look-ups are gathers. So the two must agree to
float rounding, not just "a few percent"."""
from __future__ import annotations

import pytest
import torch

from mcore_align.flops import micro_batch_lengths, peak_tflops, step_flops, throughput
from mcore_align.models.families import spec_from_hf_config
from mcore_align.models.spec import read_hf_config
from mcore_align.models.tiny import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    d = make_tiny_model(tmp_path_factory.mktemp("flops") / "m", "qwen2", num_layers=2, hidden_size=64,
                        ffn_hidden_size=160, num_heads=4, num_kv_heads=2, vocab_size=512)
    model = AutoModelForCausalLM.from_pretrained(str(d), attn_implementation="eager", dtype=torch.float32)
    return spec_from_hf_config(read_hf_config(d)), model


def _counted(model, batches, backward=True) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        for tokens in batches:
            out = model(input_ids=tokens)
            if backward:
                out.logits.float().logsumexp(-1).sum().backward()
    return fc.get_total_flops()


def test_packed_sequences_match_flop_counter(tiny):
    spec, model = tiny
    lengths = [7, 13, 29, 1]
    # A packed row attends within each sequence: the independent count runs each alone.
    batches = [torch.randint(0, spec.vocab_size, (1, s)) for s in lengths]
    want = _counted(model, batches)
    got = step_flops(spec, lengths, causal=False).model_flops
    assert got == pytest.approx(want, rel=1e-9), (got, want)
    # Packing is not the same as one long sequence: the score term differs.
    assert step_flops(spec, [sum(lengths)], causal=False).model_flops > got


def test_padded_batch_and_forward_only(tiny):
    spec, model = tiny
    batch = [torch.randint(0, spec.vocab_size, (3, 16))]  # B=3 rows of S=16
    assert step_flops(spec, [16] * 3, causal=False).model_flops == pytest.approx(_counted(model, batch), rel=1e-9)
    fwd = _counted(model, batch, backward=False)
    assert step_flops(spec, [16] * 3, causal=False, backward=False).model_flops == pytest.approx(fwd, rel=1e-9)
    # The reference is one forward more.
    with_ref = step_flops(spec, [16] * 3, causal=False, reference=True)
    assert with_ref.model_flops == pytest.approx(_counted(model, batch) + fwd, rel=1e-9)


def test_hand_count_and_switches():
    from mcore_align.models.spec import ModelSpec

    spec = ModelSpec(family="qwen2", num_layers=1, hidden_size=4, ffn_hidden_size=6, num_attention_heads=2,
                     num_query_groups=1, head_dim=2, vocab_size=10, max_position_embeddings=64, rope_theta=1e4)
    # One sequence of 3 tokens, forward only, by hand:
    #   QKV 2*4*(4+2+2)=64, O 2*4*4=32, MLP 6*4*6=144 -> 240 per token -> 720
    #   scores causal: 2 * (2*2) * 3 * 4 = 96 ; dense: 4 * 4 * 9 = 144 ; head 2*4*10*3 = 240
    f = step_flops(spec, [3], backward=False)
    assert (f.layers_dense, f.attention_scores, f.head) == (720, 96, 240)
    assert step_flops(spec, [3], causal=False, backward=False).attention_scores == 144
    full = step_flops(spec, [3], recompute_granularity="full", fused_head=True)
    assert full.model_flops == 3 * (720 + 96 + 240)
    assert full.recompute == 720 + 96 + 240  # layers once more + the head's chunks
    lora = step_flops(spec, [3], lora_rank=2, lora_targets=["linear_qkv"])
    assert lora.layers_dense == 2 * 720  # frozen base: forward + input grads only
    assert lora.lora == 3 * (2 * 2 * (4 + 8) * 3)
    assert step_flops(spec, [3], head="value", backward=False).head == 2 * 4 * 3
    with pytest.raises(ValueError, match="unknown LoRA target"):
        step_flops(spec, [3], lora_rank=2, lora_targets=["q_proj"])


def test_peak_throughput_and_lengths():
    assert peak_tflops("NVIDIA H200") == 989.0 and peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H200", 700.0) == 700.0 and peak_tflops("some cpu") is None
    with pytest.raises(ValueError, match="peak_tflops"):
        peak_tflops("H100", 0.0)
    t = throughput(8e15, 2.0, 4, 1000.0)
    assert t["tflops_per_gpu"] == pytest.approx(1000.0) and t["mfu"] == pytest.approx(1.0)

    class MB:
        cu_seqlens = torch.tensor([0, 8, 12], dtype=torch.int32)

    assert micro_batch_lengths([MB(), MB()]) == [8, 4, 8, 4]


def test_step_metrics_reads_config(tiny):
    """The log-row helper: switches from the RunConfig, peak from train.peak_tflops."""
    from types import SimpleNamespace

    from mcore_align.algorithms import build_objective
    from mcore_align.config import build_config
    from mcore_align.flops import step_flops_for_config, step_metrics

    spec, _ = tiny
    cfg = build_config({"model": {"load": "x"}, "data": {"dataset": ["y"]}},
                       ["peak_tflops=100", "tensor_model_parallel_size=2", "recompute_granularity=full"])
    obj = build_objective("dpo")

    class MB:
        cu_seqlens = torch.tensor([0, 40, 64], dtype=torch.int32)

    tr = SimpleNamespace(spec=spec, cfg=cfg, objective=obj, rt=SimpleNamespace(is_cpu=True))
    m = step_metrics(tr, SimpleNamespace(micro_batches=[MB()]), 1e-6)
    f = step_flops_for_config(spec, cfg, obj, [40, 24])
    assert f.reference > 0 and f.recompute > 0  # DPO co-resident reference; full recompute
    assert m["tflops_per_gpu"] == pytest.approx(f.model_flops / 1e-6 / 2 / 1e12)
    assert m["mfu"] == pytest.approx(m["tflops_per_gpu"] / 100) and m["hfu"] > m["mfu"]
    with pytest.raises(ValueError, match="train.peak_tflops"):
        build_config({"model": {"load": "x"}, "data": {"dataset": ["y"]}}, ["peak_tflops=0"])


def test_console_line_shows_throughput_in_megatron_words():
    from mcore_align.trainer.reporting import training_line

    line = training_line(3, 10, {"loss": 0.5, "step_time": 1.0, "tflops_per_gpu": 412.345, "mfu": 0.4169, "hfu": 0.5})
    assert "throughput per GPU (TFLOP/s/GPU): 412.3" in line and "MFU: 41.7%" in line
    assert "tflops_per_gpu:" not in line and "hfu:" not in line  # not repeated as objective metrics
    assert "throughput" not in training_line(3, 10, {"loss": 0.5})  # CPU rows without the columns
