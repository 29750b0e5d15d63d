"""Mixture of Experts families: HF -> megatron -> HF round trips (bitwise), logits equal
transformers at world size 1, fused on-disk experts, and the bad-input errors.

Conversions and forward passes run in this process (a world of one, CPU mode), like the
tools do. The multi-rank layouts (EP=2, TP=2+SP, TP=2 x EP=2) are in
tests/distributed/test_moe_dist.py.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mcore_align.checkpoint import convert_hf_to_mcore, convert_mcore_to_hf, read_model_spec
from mcore_align.models.families import spec_from_hf_config
from mcore_align.models.moe import check_moe_layout
from mcore_align.models.spec import read_hf_config
from mcore_align.models.tiny import make_tiny_model
from mcore_align.parallel import ParallelConfig

TOL = 1e-4  # relative to the logit scale (fp32)

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1}

# name -> (family, HF config overrides)
MODELS = {
    "qwen3_moe": ("qwen3_moe", {}),  # norm_topk_prob=True, every layer MoE
    # norm_topk_prob=False (the other router convention); layer 0 dense (mlp_only_layers).
    "qwen3_moe_nonorm": ("qwen3_moe", {"norm_topk_prob": False, "mlp_only_layers": [0]}),
    "mixtral": ("mixtral", {}),
    # Shared expert with sigmoid gate; decoder_sparse_step=2: layer 0 dense, layer 1 MoE.
    "qwen2_moe": ("qwen2_moe", {"decoder_sparse_step": 2}),
    # MLA (K head 24, V head 12), sigmoid routing + e_score_correction_bias, 4 groups (2 used),
    # routed_scaling_factor, shared expert, layer 0 dense; interleaved rope, q_lora_rank 32.
    "deepseek_v3": ("deepseek_v3", {}),
    # rotate-half rope (rope rows permuted at conversion), no q compression, YaRN (mscale 1/1).
    "deepseek_v3_yarn": ("deepseek_v3", {"rope_interleave": False, "q_lora_rank": None, "max_position_embeddings": 64,
                                         "rope_parameters": {**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}}),
    # softmax routing without renormalisation, group_limited_greedy (group max), YaRN mscale 0.707.
    "deepseek_v2": ("deepseek_v2", {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                                    "max_position_embeddings": 64,
                                    "rope_parameters": {**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}}),
}


def hf_tensors(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    for name, (family, overrides) in MODELS.items():
        make_tiny_model(root / name / "hf", family, hf_overrides=overrides)
        convert_hf_to_mcore(root / name / "hf", root / name / "mc", dtype="fp32")
    return root


def test_router_conventions_and_layer_patterns():
    def spec(family, **over):
        cfg = {"architectures": [], "model_type": family, "num_hidden_layers": 4, "hidden_size": 64,
               "intermediate_size": 96, "num_attention_heads": 4, "vocab_size": 512,
               "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, **over}
        return spec_from_hf_config(cfg)

    # Qwen: softmax -> top-k -> renormalise == megatron top-k on logits -> softmax (pre_softmax False)
    assert spec("qwen3_moe", norm_topk_prob=True).moe_router_pre_softmax is False
    assert spec("qwen3_moe", norm_topk_prob=False).moe_router_pre_softmax is True
    assert spec("qwen3_moe").moe_layer_pattern == (1, 1, 1, 1)
    assert spec("qwen3_moe", mlp_only_layers=[0, 3]).moe_layer_pattern == (0, 1, 1, 0)
    assert spec("qwen2_moe", decoder_sparse_step=2).moe_layer_pattern == (0, 1, 0, 1)
    s = spec("qwen2_moe", shared_expert_intermediate_size=80)
    assert (s.moe_shared_expert_intermediate_size, s.moe_shared_expert_gate) == (80, True)
    m = spec("mixtral", num_local_experts=8, num_experts=None)
    assert (m.num_moe_experts, m.moe_ffn_hidden_size, m.moe_router_pre_softmax) == (8, 96, False)
    assert m.moe_layer_pattern == (1, 1, 1, 1)


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_is_bitwise(converted, tmp_path, name):
    hf, mc = converted / name / "hf", converted / name / "mc"
    assert read_model_spec(mc) == spec_from_hf_config(read_hf_config(hf))
    convert_mcore_to_hf(mc, tmp_path / "back")
    back = hf_tensors(tmp_path / "back")
    assert_same_tensors(hf_tensors(hf), back)
    # Per-expert names on disk, as transformers writes them.
    assert any(".experts.3." in k for k in back), sorted(back)[:8]


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_equal_transformers_at_world_size_1(converted, name):
    from mcore_align.checkpoint.layout import init_single_process
    from mcore_align.checkpoint.verify import verify_checkpoint

    res = verify_checkpoint(converted / name / "hf", converted / name / "mc", init_single_process(),
                            seq_len=24, batch=2)
    assert res.ok(TOL), f"{name}: {res}"


def test_wrong_router_convention_is_detected(converted, tmp_path):
    """The parity check can fail: flipping moe_router_pre_softmax in model_spec.json changes
    the logits far beyond the tolerance (same weights, other routing convention)."""
    import shutil

    from mcore_align.checkpoint.layout import init_single_process
    from mcore_align.checkpoint.verify import verify_checkpoint

    mc = tmp_path / "mc"
    shutil.copytree(converted / "qwen3_moe" / "mc", mc)
    doc = json.loads((mc / "model_spec.json").read_text())
    assert doc["model_spec"]["moe_router_pre_softmax"] is False
    doc["model_spec"]["moe_router_pre_softmax"] = True
    (mc / "model_spec.json").write_text(json.dumps(doc))
    res = verify_checkpoint(converted / "qwen3_moe" / "hf", mc, init_single_process(), seq_len=24, batch=2)
    assert not res.ok(1e-2), res


def test_fused_expert_tensors_on_disk(converted, tmp_path):
    """A checkpoint holding transformers' in-memory layout (gate_up_proj [E, 2F, H],
    down_proj [E, H, F]) converts to the same megatron weights; export writes per-expert names."""
    import shutil

    src = converted / "qwen3_moe" / "hf"
    per_expert = hf_tensors(src)
    hf = tmp_path / "fused"
    shutil.copytree(src, hf)
    fused, n_exp = {}, 4
    for k, v in per_expert.items():
        if ".mlp.experts." not in k:
            fused[k] = v
    for i in range(2):
        p = f"model.layers.{i}.mlp.experts."
        fused[p + "gate_up_proj"] = torch.stack([
            torch.cat([per_expert[f"{p}{e}.gate_proj.weight"], per_expert[f"{p}{e}.up_proj.weight"]])
            for e in range(n_exp)])
        fused[p + "down_proj"] = torch.stack([per_expert[f"{p}{e}.down_proj.weight"] for e in range(n_exp)])
    save_file(fused, hf / "model.safetensors", metadata={"format": "pt"})
    convert_hf_to_mcore(hf, tmp_path / "mc", dtype="fp32")
    convert_mcore_to_hf(tmp_path / "mc", tmp_path / "back")
    assert_same_tensors(per_expert, hf_tensors(tmp_path / "back"))


# -- bad input -----------------------------------------------------------------------------
def _cfg(converted, name="qwen3_moe") -> dict:
    return read_hf_config(converted / name / "hf")


@pytest.mark.parametrize("over, message", [
    ({"router_jitter_noise": 0.1}, "router_jitter_noise=0.1 is not supported"),
    ({"num_experts_per_tok": 5}, r"num_experts_per_tok=5 must be in \[1, num_experts=4\]"),
    ({"scoring_func": "sigmoid"}, "router setting scoring_func='sigmoid' is not supported"),
    ({"mlp_only_layers": [7]}, r"mlp_only_layers \[7\] outside \[0, 2\)"),
    ({"attention_bias": True}, "attention_bias=True .* not supported for qwen3_moe"),
])
def test_unsupported_config_is_refused(converted, over, message):
    with pytest.raises(ValueError, match=message):
        spec_from_hf_config({**_cfg(converted), **over})


def test_mixtral_jitter_is_refused(converted):
    with pytest.raises(ValueError, match="router_jitter_noise=0.01 is not supported"):
        spec_from_hf_config({**_cfg(converted, "mixtral"), "router_jitter_noise": 0.01})


@pytest.mark.parametrize("layout, message", [
    (dict(expert_model_parallel_size=3), r"expert_model_parallel_size=3 must divide the number of experts \(4"),
    (dict(tensor_model_parallel_size=2), "MoE at tensor_model_parallel_size=2 needs sequence_parallel=True"),
    (dict(tensor_model_parallel_size=2, sequence_parallel=True, expert_tensor_parallel_size=5),
     "expert_tensor_parallel_size=5 must divide the expert hidden size 48"),
])
def test_bad_moe_layout_is_refused(converted, layout, message):
    spec = spec_from_hf_config(_cfg(converted))
    with pytest.raises(ValueError, match=message):
        check_moe_layout(spec, ParallelConfig(**layout))


def test_expert_parallel_on_a_dense_model_is_refused(tmp_path):
    spec = spec_from_hf_config(read_hf_config(make_tiny_model(tmp_path / "dense", "qwen2")))
    with pytest.raises(ValueError, match="expert_model_parallel_size=2 needs a MoE model; qwen2 has no experts"):
        check_moe_layout(spec, ParallelConfig(expert_model_parallel_size=2))


@pytest.mark.parametrize("layout, message", [
    (dict(expert_model_parallel_size=0), "expert_model_parallel_size must be >= 1, got 0"),
    (dict(expert_tensor_parallel_size=0), "expert_tensor_parallel_size must be >= 1 or None, got 0"),
])
def test_parallel_config_expert_sizes(layout, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**layout)


def test_expert_layout_must_divide_the_world():
    from mcore_align.checkpoint.layout import init_single_process
    from mcore_align.parallel import initialize

    init_single_process()  # a world of one
    with pytest.raises(ValueError, match=r"world size 1 is not divisible by expert_tensor_parallel_size x "
                                         r"expert_model_parallel_size x pipeline_model_parallel_size = 2"):
        initialize(ParallelConfig(expert_model_parallel_size=2), device="cpu")


def test_bad_fused_expert_shape_is_named(converted, tmp_path):
    import shutil

    hf = tmp_path / "bad"
    shutil.copytree(converted / "qwen3_moe" / "hf", hf)
    t = {k: v for k, v in hf_tensors(hf).items() if "layers.0.mlp.experts." not in k}
    t["model.layers.0.mlp.experts.gate_up_proj"] = torch.zeros(3, 96, 64)
    t["model.layers.0.mlp.experts.down_proj"] = torch.zeros(3, 64, 48)
    save_file(t, hf / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"fused expert tensor 'model.layers.0.mlp.experts.gate_up_proj' "
                                         r"has shape \[3, 96, 64\], expected \[4, ., .\]"):
        convert_hf_to_mcore(hf, tmp_path / "mc")


def test_aux_loss_is_off_by_default_and_configurable(converted):
    from mcore_align.models.provider import ModelOptions, transformer_config

    spec = read_model_spec(converted / "qwen3_moe" / "mc")
    off = transformer_config(spec, ParallelConfig(), ModelOptions(), cpu=True)
    assert (off.moe_router_load_balancing_type, off.moe_aux_loss_coeff) == ("none", 0.0)
    on = transformer_config(spec, ParallelConfig(), ModelOptions(moe_aux_loss_coeff=1e-3), cpu=True)
    assert (on.moe_router_load_balancing_type, on.moe_aux_loss_coeff) == ("aux_loss", 1e-3)
    with pytest.raises(ValueError, match="moe_aux_loss_coeff must be >= 0, got -1"):
        transformer_config(spec, ParallelConfig(), ModelOptions(moe_aux_loss_coeff=-1), cpu=True)


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen3_moe_nonorm", "qwen2_moe", "deepseek_v3", "deepseek_v3_yarn",
                                  "deepseek_v2"])
def test_gradients_equal_transformers_autograd(converted, name):
    """Backward through router, experts and shared expert: megatron's parameter gradients
    (mapped to HF names by the adapter) equal transformers' autograd for the same loss,
    sum(logits * W) with a fixed random W. HF holds experts fused in memory:
    ``mlp.experts.gate_up_proj[e]`` = [gate_e; up_e], ``down_proj[e]`` = down_e."""
    import re

    from transformers import AutoModelForCausalLM

    from mcore_align.checkpoint import load_model_weights
    from mcore_align.checkpoint.layout import init_single_process
    from mcore_align.models.adapter import adapter_for
    from mcore_align.models.provider import ModelOptions, build_model

    mc, hf_dir = converted / name / "mc", converted / name / "hf"
    spec = read_model_spec(mc)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, spec.vocab_size, (2, 24), generator=gen)
    w = torch.randn(2, 24, spec.vocab_size, generator=gen)

    (model,) = build_model(spec, init_single_process(), opts=ModelOptions(core_attention="megatron"))
    load_model_weights([model], mc)
    model.train()
    (model(tokens, torch.arange(24)[None], attention_mask=None) * w).sum().backward()

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).train()
    (hf(tokens).logits * w).sum().backward()
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}

    def hf_grad(n: str) -> torch.Tensor:
        if n in hf_grads:
            return hf_grads[n]
        m = re.fullmatch(r"(.*\.experts\.)(\d+)\.(gate_proj|up_proj|down_proj)\.weight", n)
        assert m, n
        e, which = int(m.group(2)), m.group(3)
        if which == "down_proj":
            return hf_grads[m.group(1) + "down_proj"][e]
        gate, up = hf_grads[m.group(1) + "gate_up_proj"][e].chunk(2)
        return gate if which == "gate_proj" else up

    adapter = adapter_for(spec)
    compared = 0
    for pname, p in model.named_parameters():
        for n, g in adapter.to_hf(pname, p.grad).items():
            ref = hf_grad(n)
            scale = ref.abs().max().clamp_min(1e-12)
            assert (g - ref).abs().max() / scale < 1e-4, (n, ((g - ref).abs().max() / scale).item())
            compared += 1
    # Every HF tensor but the buffers (DeepSeek-V3's e_score_correction_bias: no gradient).
    buffers = [n for n in adapter.hf_names() if n.endswith("e_score_correction_bias")]
    assert compared == len(adapter.hf_names()) - len(buffers)
    assert any(".experts." in n for n in adapter.hf_names()) and any("mlp.gate.weight" in n for n in adapter.hf_names())


def test_lora_on_expert_linears_is_refused_attention_only_works(converted):
    from mcore_align.checkpoint.layout import init_single_process
    from mcore_align.models.lora import PRESETS, LoRAConfig, apply_lora
    from mcore_align.models.provider import ModelOptions, build_model

    spec = read_model_spec(converted / "qwen2_moe" / "mc")
    rt = init_single_process()
    opts = ModelOptions(core_attention="megatron", transformer_impl="local")
    with pytest.raises(ValueError,
                       match=r"LoRA on MoE expert linears is not supported \(decoder.layers.1.mlp.experts"):
        apply_lora(build_model(spec, rt, opts=opts), LoRAConfig(targets=PRESETS["ALL"]), seed=0)
    adapted = apply_lora(build_model(spec, rt, opts=opts), LoRAConfig(), seed=0)
    assert adapted and all("self_attention" in n for n in adapted), adapted


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3"])  # softmax; sigmoid + expert bias + groups
def test_aux_loss_runs_on_cpu_and_reaches_the_router(converted, name):
    """moe_aux_loss_coeff > 0 trains without CUDA and adds a gradient through the routers:
    the last layer's experts (downstream of every router's aux loss) get the same gradients
    as without it, its router does not."""
    from mcore_align.checkpoint import load_model_weights
    from mcore_align.checkpoint.layout import init_single_process
    from mcore_align.models.provider import ModelOptions, build_model

    mc = converted / name / "mc"
    spec, rt = read_model_spec(mc), init_single_process()
    tokens = torch.randint(0, spec.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    grads = []
    for coeff in (0.0, 1e-2):
        (model,) = build_model(spec, rt, opts=ModelOptions(core_attention="megatron", moe_aux_loss_coeff=coeff))
        load_model_weights([model], mc)
        model.train()
        model(tokens, torch.arange(24)[None], attention_mask=None).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    router = "decoder.layers.1.mlp.router.weight"
    assert not torch.allclose(grads[0][router], grads[1][router])
    expert = "decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight"
    torch.testing.assert_close(grads[0][expert], grads[1][expert])


def test_router_load_metrics_count_the_routers_top_k(converted):
    """RouterLoad (the moe/load_imbalance metrics of metrics.jsonl) against an independent
    recount: top-k of the router logits (input @ W^T in float64) from each router's input;
    forward passes without gradients or in eval mode are not counted."""
    from mcore_align.checkpoint import load_model_weights
    from mcore_align.checkpoint.layout import init_single_process
    from mcore_align.models.moe import RouterLoad
    from mcore_align.models.provider import ModelOptions, build_model

    mc = converted / "qwen3_moe" / "mc"
    spec, rt = read_model_spec(mc), init_single_process()
    (model,) = build_model(spec, rt, opts=ModelOptions(core_attention="megatron"))
    load_model_weights([model], mc)
    load = RouterLoad([model])
    ref = {}

    def recount(router, args):
        logits = args[0].reshape(-1, args[0].shape[-1]).double() @ router.weight.double().T  # [T, E]
        top = logits.topk(spec.moe_router_topk, dim=-1).indices.flatten()
        ref[router.layer_number] = ref.get(router.layer_number, 0) + torch.bincount(top, minlength=4).double()

    for layer in model.decoder.layers:
        layer.mlp.router.register_forward_pre_hook(recount)
    tokens = torch.randint(0, spec.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(2):  # counts add up over the micro-batches of a step
        model(tokens, torch.arange(48)[None], attention_mask=None).sum().backward()
    counted = dict(ref)
    with torch.no_grad():
        model(tokens, torch.arange(48)[None], attention_mask=None)
    model.eval()
    model(tokens, torch.arange(48)[None], attention_mask=None)
    got = load.metrics(torch.device("cpu"))
    imb = [float(c.max() / c.mean()) for c in counted.values()]
    assert got["moe/load_imbalance"] == pytest.approx(sum(imb) / len(imb), rel=1e-12)
    assert got["moe/load_imbalance_max"] == pytest.approx(max(imb), rel=1e-12)
    assert 1.0 <= got["moe/load_imbalance"] <= 2.0
    assert load.metrics(torch.device("cpu")) == {}  # reset after each read
