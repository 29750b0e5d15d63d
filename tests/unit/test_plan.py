"""The memory planner's pure parts: parameter counts against HF models (an independent count),
byte arithmetic by hand, the layout search and the CLI. The comparison with the bytes of
built megatron models and optimizers is tests/distributed/test_plan_dist.py."""
from __future__ import annotations

import json

import pytest

from mcore_align.plan import GiB, Layout, main, plan, read_spec, search, stage_params


@pytest.mark.parametrize("family,tie", [("qwen2", False), ("llama", True), ("qwen3", False)])
def test_parameter_count_matches_hf_model(tmp_path, family, tie):
    from transformers import AutoModelForCausalLM

    from mcore_align.models.tiny import make_tiny_model

    d = make_tiny_model(tmp_path / family, family, num_layers=3, hidden_size=48, ffn_hidden_size=80, num_heads=4,
                        num_kv_heads=2, vocab_size=320, tie_word_embeddings=tie)
    hf = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(d)).parameters())
    spec = read_spec(d)
    assert sum(stage_params(spec, Layout(), 0)) == hf
    # TP=2 shards everything but the norms (and q/k norm); stages add up to the whole model
    # (+ a tied embedding's copy on the last stage when PP > 1).
    pp2 = Layout(pp=3)
    total = sum(stage_params(spec, pp2, s)[0] for s in range(3))
    assert total == hf + (320 * 48 if tie else 0)


def test_bytes_by_hand():
    from mcore_align.models.spec import ModelSpec

    spec = ModelSpec(family="llama", num_layers=2, hidden_size=8, ffn_hidden_size=16, num_attention_heads=2,
                     num_query_groups=1, head_dim=4, vocab_size=32, max_position_embeddings=64, rope_theta=1e4)
    # layer: qkv 8*(2+2)*4=128, proj 8*8=64, fc1 8*32=256, fc2 16*8=128, norms 16 -> 592
    # model: 2*592 + embedding 256 + final norm 8 + output 256 = 1704
    p = plan(spec, Layout(dtype="bf16", dp=4, distributed_optimizer=True, reference="co_resident"))
    st = p.stages[0]
    assert st.params == 1704
    assert (st.weights, st.grads, st.optimizer, st.reference) == (2 * 1704, 4 * 1704, 12 * 1704 / 4, 2 * 1704)
    fp32 = plan(spec, Layout(dtype="fp32", reference=None)).stages[0]
    assert (fp32.weights, fp32.grads, fp32.optimizer, fp32.reference) == (4 * 1704, 4 * 1704, 8 * 1704, 0)
    lora = plan(spec, Layout(lora_rank=2, lora_targets=("linear_qkv",))).stages[0]
    # qkv adapter: A [2, 8] + B [16, 2] = 48 per layer
    assert lora.trained_params == 96 and lora.reference == 0 and lora.grads == 4 * 96
    pre = plan(spec, Layout(reference="precompute"))
    assert pre.stages[0].reference == 0 and pre.precompute_peak > pre.stages[0].total - pre.stages[0].activations
    # Recompute keeps less; more tokens keep more.
    assert plan(spec, Layout(recompute="full")).stages[0].activations < st.activations
    assert plan(spec, Layout(tokens_per_micro_batch=16384)).stages[0].activations > st.activations


def test_search_and_errors():
    spec = read_spec("examples/model_configs/qwen2.5-7b.json")
    found = search(spec, 8, 80.0, Layout())
    assert found and all(p.peak <= (80 * 0.9 - 2) * GiB and p.layout.gpus == 8 for p in found)
    assert not search(spec, 1, 24.0, Layout())  # 7B full DPO on one 24 GiB GPU: nothing fits
    with pytest.raises(ValueError, match="must divide heads"):
        plan(spec, Layout(tp=3))
    with pytest.raises(ValueError, match="num_layers"):
        plan(spec, Layout(pp=3))


def test_cli(tmp_path, capsys):
    assert main(["--model", "examples/model_configs/llama3-70b.json", "--tp", "8", "--pp", "4", "--dp", "1",
                 "--recompute", "full", "--sequence-parallel"]) == 0
    out = capsys.readouterr().out
    assert "TP=8 PP=4" in out and "| 3 |" in out and "peak" in out
    assert main(["--model", "examples/model_configs/qwen2.5-7b.json", "--gpus", "8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and rows[0]["layout"]["tp"] * rows[0]["layout"]["dp"] * rows[0]["layout"]["pp"] == 8


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen3_moe_nonorm", "mixtral", "qwen2_moe", "deepseek_v3",
                                  "deepseek_v3_yarn"])
def test_moe_parameter_count_matches_hf_model(tmp_path, name):
    """MoE families (router, experts, shared expert + gate, dense layers of a mixed stack)
    against transformers' count; at EP=2 each rank holds the non-expert parameters and
    half of the experts."""
    from transformers import AutoModelForCausalLM

    from mcore_align.models.tiny import make_tiny_model
    from mcore_align.plan import stage_layer_params
    from tests.unit.test_moe import MODELS

    family, overrides = MODELS[name]
    d = make_tiny_model(tmp_path / name, family, hf_overrides=overrides)
    hf = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(d)).parameters())
    spec = read_spec(d)
    assert sum(stage_params(spec, Layout(), 0)) == hf
    dense, experts = stage_layer_params(spec, Layout(), 0)
    assert experts > 0
    ep2 = Layout(ep=2, dp=2)
    assert stage_params(spec, ep2, 0)[0] == hf - experts // 2
    # Optimizer state, fp32 + distributed optimizer: dense part over DP=2, experts over
    # expert-DP = 2 / (ETP 1 x EP 2 x PP 1) = 1.
    p = plan(spec, Layout(ep=2, dp=2, dtype="fp32", distributed_optimizer=True)).stages[0]
    assert p.optimizer == 8 * ((hf - experts) / 2 + experts // 2)


def test_moe_layout_errors_and_search():
    spec = read_spec("benchmarks/configs/qwen3-30b-a3b.json")
    assert spec.num_moe_experts == 128 and spec.moe_router_topk == 8
    with pytest.raises(ValueError, match="EP=3 must divide the number of experts 128"):
        plan(spec, Layout(ep=3, dp=3))
    with pytest.raises(ValueError, match="needs sequence_parallel"):
        plan(spec, Layout(tp=2, dp=4, ep=8, etp=1))
    with pytest.raises(ValueError, match="on a dense model"):
        plan(read_spec("examples/model_configs/qwen2.5-7b.json"), Layout(ep=2, dp=2))
    # ~30.5B parameters in all, ~29B of them in experts (Qwen3-30B-A3B's model card: 30.5B).
    total = sum(stage_params(spec, Layout(), 0))
    assert 30.0e9 < total < 31.0e9, total
    # Full DPO (bf16, co-resident reference) on 8 GPUs: ETP x EP x PP = 8 leaves an expert-DP of 1,
    # so each rank keeps Adam state for 1/8 of the ~29B expert parameters (~43 GiB): nothing fits
    # 80 GiB; 141 GiB (H200) fits with EP; LoRA on attention fits 80 GiB.
    assert not search(spec, 8, 80.0, Layout(dtype="bf16"))
    found = search(spec, 8, 141.0, Layout(dtype="bf16"))
    assert found and all(p.layout.ep > 1 and p.peak <= (141 * 0.9 - 2) * GiB for p in found), found
    assert search(spec, 8, 80.0, Layout(dtype="bf16", lora_rank=16, reference="co_resident"))
