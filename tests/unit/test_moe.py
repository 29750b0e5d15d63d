"""Mixture of Experts families: HF -> megatron -> HF round trips (bitwise), logits equal
transformers at world size 1, fused on-disk experts, and the bad-input errors.

Conversions and forward passes run in this process (a world of one, CPU mode), like the
tools do. The multi-rank layouts (EP=2, TP=2+SP, TP=2 x EP=2) are in
tests/distributed/test_moe_dist.py.
"""
import json
import re
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
    from mcore_align.checkpoint.layout import init_single_process
    from mcore_align.models.moe_aux import GlobalBatchAuxLoss
    from mcore_align.models.provider import ModelOptions, build_model, transformer_config

    spec = read_model_spec(converted / "qwen3_moe" / "mc")
    off = transformer_config(spec, ParallelConfig(), ModelOptions(), cpu=True)
    assert (off.moe_router_load_balancing_type, off.moe_aux_loss_coeff) == ("none", 0.0)
    # On: megatron's own aux-loss types stay off; the policy's routers get models/moe_aux.py's.
    on = transformer_config(spec, ParallelConfig(), ModelOptions(moe_aux_loss_coeff=1e-3), cpu=True)
    assert (on.moe_router_load_balancing_type, on.moe_aux_loss_coeff) == ("none", 0.0)
    rt, opts = init_single_process(), ModelOptions(core_attention="megatron", moe_aux_loss_coeff=1e-3)
    assert GlobalBatchAuxLoss.of(build_model(spec, rt, opts=opts)).coeff == 1e-3
    assert GlobalBatchAuxLoss.of(build_model(spec, rt, role="reference", opts=opts)) is None
    assert GlobalBatchAuxLoss.of(build_model(spec, rt, opts=ModelOptions(core_attention="megatron"))) is None
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


def _lora_model(converted, name: str, targets: str):
    """World-size-1 megatron model of ``name`` with LoRA (r=4, alpha=8) on ``targets`` and
    random non-zero adapters: (spec, model, {global module name: LoRA})."""
    from mcore_align.checkpoint import load_model_weights
    from mcore_align.checkpoint.layout import init_single_process
    from mcore_align.models.lora import LoRAConfig, apply_lora, global_module_name, lora_modules, resolve_target_modules
    from mcore_align.models.provider import ModelOptions, build_model

    mc = converted / name / "mc"
    spec = read_model_spec(mc)
    (model,) = build_model(spec, init_single_process(), opts=ModelOptions(core_attention="megatron",
                                                                          transformer_impl="local"))
    load_model_weights([model], mc)
    cfg = LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=resolve_target_modules(targets))
    apply_lora([model], cfg, seed=0)
    gen = torch.Generator().manual_seed(2)
    loras = {}
    for local, lora in lora_modules(model):
        with torch.no_grad():
            lora.A.copy_(torch.randn(lora.A.shape, generator=gen) * 0.3)
            lora.B.copy_(torch.randn(lora.B.shape, generator=gen) * 0.3)
        loras[global_module_name(model, local)] = lora
    return spec, cfg, model, loras


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_expert_lora_equals_peft_logits_and_autograd(converted, name):
    """LoRA on every linear (routed experts; Qwen2-MoE also its shared expert and dense layer 0)
    with random adapters. The PEFT form of the adapters (``peft_state``: fused experts through
    ``target_parameters``) loaded into the transformers model by peft itself gives megatron's
    logits, and peft's autograd gives megatron's gradient for every adapter factor (q/k/v and
    gate/up share one A in megatron: the sum of PEFT's copies' gradients)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from mcore_align.checkpoint.lora_export import EXPERT_MODULE, hf_adapters, peft_expert_tensors, peft_state

    spec, cfg, model, loras = _lora_model(converted, name, "ALL")
    experts = [g for g in loras if EXPERT_MODULE.match(g)]
    assert len(experts) == 2 * spec.num_moe_experts * sum(spec.moe_layer_pattern), sorted(loras)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, spec.vocab_size, (2, 24), generator=gen)
    w = torch.randn(2, 24, spec.vocab_size, generator=gen)
    model.train()
    logits = model(tokens, torch.arange(24)[None], attention_mask=None)
    (logits * w).sum().backward()

    state, kwargs = peft_state(spec, cfg, {g: (l.A.detach(), l.B.detach()) for g, l in loras.items()})
    assert kwargs["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"], kwargs
    assert not {"gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"} & set(kwargs["target_modules"]) or \
        name == "qwen2_moe", kwargs  # qwen2_moe: the shared expert and the dense layer 0
    hf = AutoModelForCausalLM.from_pretrained(converted / name / "hf", dtype=torch.float32)
    peft_model = get_peft_model(hf, LoraConfig(**kwargs))
    # Exactly the tensors (names, shapes) peft creates for this config.
    own = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    assert own == {f"base_model.model.{k}": tuple(v.shape) for k, v in state.items()}
    set_peft_model_state_dict(peft_model, {f"base_model.model.{k}": v for k, v in state.items()})
    peft_model.train()
    ref = peft_model(tokens).logits
    scale = ref.abs().max()
    assert (logits - ref).abs().max() / scale < 1e-4
    (ref * w).sum().backward()
    grads = {n.replace(".default", ""): p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    grads = {n[len("base_model.model."):]: g for n, g in grads.items()}

    def close(got, want, what):
        err = (got - want).abs().max() / want.abs().max().clamp_min(1e-6)
        assert err < 1e-4, (what, err.item())

    checked = set()
    for g, lora in loras.items():
        if g in experts:
            continue
        parts = hf_adapters(spec, {g: (lora.A.grad, lora.B.grad)})
        close(sum(grads[f"{n}.lora_A.weight"] for n in parts), lora.A.grad, g + " A")
        for n, (_, B_part) in parts.items():
            close(B_part, grads[f"{n}.lora_B.weight"], n + " B")
            checked |= {f"{n}.lora_A.weight", f"{n}.lora_B.weight"}
    fused, _ = peft_expert_tensors({g: (loras[g].A.grad, loras[g].B.grad) for g in experts}, spec.num_moe_experts)
    for k, want in fused.items():
        close(want, grads[k], k)
        checked.add(k)
    assert checked == set(grads), sorted(set(grads) ^ checked)
    assert all(g.abs().max() > 0 for g in fused.values())


def test_expert_lora_attributes_and_peft_refusal(converted):
    """Expert adapters carry their base weight's reduction attribute and are named by global
    expert index; attention-only LoRA still works; and the PEFT form is refused where peft
    cannot hold it: Qwen3-MoE with a dense MLP layer (mlp_only_layers) and adapters on it,
    whose gate_proj peft would rewrite to the fused expert parameter."""
    from mcore_align.checkpoint.lora_export import peft_state

    spec, cfg, model, loras = _lora_model(converted, "qwen3_moe_nonorm", "ALL")
    fc1 = loras["decoder.layers.1.mlp.experts.local_experts.3.linear_fc1"]
    base_w = model.decoder.layers[1].mlp.experts.local_experts[3].linear_fc1.weight
    assert fc1.expert and fc1.A.allreduce == fc1.B.allreduce == getattr(base_w, "allreduce", True)
    assert "decoder.layers.0.mlp.linear_fc1" in loras and not loras["decoder.layers.0.mlp.linear_fc1"].expert
    message = (r"model.layers.0.mlp.down_proj.*rewrites target_modules \['down_proj', 'gate_proj', 'up_proj'\] "
               r"of model_type 'qwen3_moe'.*--lora merged")
    with pytest.raises(ValueError, match=message):
        peft_state(spec, cfg, {g: (l.A, l.B) for g, l in loras.items()})
    spec, cfg, model, loras = _lora_model(converted, "qwen3_moe_nonorm", "DEFAULT")
    assert loras and all("self_attention" in n for n in loras), sorted(loras)
    _, kwargs = peft_state(spec, cfg, {g: (l.A, l.B) for g, l in loras.items()})
    assert kwargs["target_modules"] == ["k_proj", "q_proj", "v_proj"] and "target_parameters" not in kwargs


def _switch_loss_f64(router_logits, coeff: float, k: int) -> torch.Tensor:
    """Switch load-balancing loss of the tokens in ``router_logits`` ({layer: [T, E]} float64),
    by hand: coeff * sum_layers E * sum_e f_e P_e, f_e = (tokens with e in their top-k) / (k T),
    P_e = mean softmax score of e."""
    total = 0
    for logits_TE in router_logits.values():
        t, e = logits_TE.shape
        p_TE = torch.softmax(logits_TE, -1)
        f_E = torch.zeros(e, dtype=p_TE.dtype).index_add_(
            0, p_TE.topk(k, -1).indices.flatten(), torch.ones(t * k, dtype=p_TE.dtype)) / (k * t)
        total = total + e * (f_E * p_TE.mean(0)).sum()
    return coeff * total


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe"])
def test_aux_loss_gradient_is_the_global_batch_switch_loss(converted, name):
    """models/moe_aux.py: two micro-batches of different tokens (the second padded, with
    megatron's padding_mask): counting pass, then a training pass whose only loss is the aux
    loss. Its gradients (mapped to HF names) and reported value equal autograd of the Switch
    loss over the union of both micro-batches' real tokens, computed in float64 from
    transformers' router logits. The per-micro-batch loss (megatron's ``aux_loss``, token-
    weighted) has other gradients: the check tells them apart."""
    from transformers import AutoModelForCausalLM

    from mcore_align.checkpoint import load_model_weights
    from mcore_align.checkpoint.layout import init_single_process
    from mcore_align.models.adapter import adapter_for
    from mcore_align.models.moe_aux import GlobalBatchAuxLoss
    from mcore_align.models.provider import ModelOptions, build_model

    coeff = 0.1
    mc, hf_dir = converted / name / "mc", converted / name / "hf"
    spec = read_model_spec(mc)
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, spec.vocab_size, (1, n), generator=gen) for n in (20, 28)]
    pad = 4  # the second micro-batch carries 4 padding positions at its end
    mbs = [(seqs[0], None), (torch.cat([seqs[1], torch.zeros(1, pad, dtype=torch.long)], 1),
                             torch.arange(28 + pad)[None] >= 28)]

    (model,) = build_model(spec, init_single_process(),
                           opts=ModelOptions(core_attention="megatron", moe_aux_loss_coeff=coeff))
    load_model_weights([model], mc)
    model.train()
    aux = GlobalBatchAuxLoss.of([model])

    def fwd(tokens, pad_mask):
        return model(tokens, torch.arange(tokens.shape[1])[None], attention_mask=None, padding_mask=pad_mask)

    with pytest.raises(RuntimeError, match="without the global expert loads"):
        fwd(*mbs[0])
    with torch.no_grad(), aux.counting():
        for mb in mbs:
            fwd(*mb)
    aux.reduce_counts(torch.device("cpu"))
    model.zero_grad()
    for mb in mbs:
        (fwd(*mb) * 0).sum().backward()  # only the aux loss has a gradient
    value = aux.metrics(torch.device("cpu"))["moe/aux_loss"]

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64, experts_implementation="eager").train()
    outs = [hf(s, output_router_logits=True) for s in seqs]
    moe_layers = [i for i, f in enumerate(spec.moe_layer_pattern) if f]
    per_mb = [dict(zip(moe_layers, o.router_logits)) for o in outs]
    union = {i: torch.cat([d[i] for d in per_mb]) for i in moe_layers}
    ref_loss = _switch_loss_f64(union, coeff, spec.moe_router_topk)
    assert value == pytest.approx(float(ref_loss), rel=1e-5)
    ref_grads = torch.autograd.grad(ref_loss, list(hf.parameters()), allow_unused=True, retain_graph=True)
    names = [n for n, _ in hf.named_parameters()]
    # megatron's aux_loss: each micro-batch's own loads, weighted by its share of the tokens
    t = [s.shape[1] for s in seqs]
    mb_loss = sum(_switch_loss_f64(d, coeff, spec.moe_router_topk) * n / sum(t) for d, n in zip(per_mb, t))
    mb_grads = torch.autograd.grad(mb_loss, list(hf.parameters()), allow_unused=True)

    def by_name(grads):
        return {n: (g if g is not None else torch.zeros_like(p)) for n, g, p in zip(names, grads, hf.parameters())}

    ref, mb = by_name(ref_grads), by_name(mb_grads)
    expert = re.compile(r"(.*\.experts\.)(\d+)\.(gate_proj|up_proj|down_proj)\.weight")

    def hf_grad(grads, n: str) -> torch.Tensor:
        if n in grads:
            return grads[n]
        m = expert.fullmatch(n)
        e, which = int(m.group(2)), m.group(3)
        if which == "down_proj":
            return grads[m.group(1) + "down_proj"][e]
        gate, up = grads[m.group(1) + "gate_up_proj"][e].chunk(2)
        return gate if which == "gate_proj" else up

    adapter, compared, router_gap = adapter_for(spec), 0, 0.0
    for pname, p in model.named_parameters():
        for n, g in adapter.to_hf(pname, p.grad).items():
            r = hf_grad(ref, n).float()
            scale = r.abs().max().clamp_min(1e-12)
            assert (g - r).abs().max() <= 1e-4 * scale + 1e-9, (n, ((g - r).abs().max() / scale).item())
            if n.endswith("gate.weight") and "shared_expert" not in n:  # the routers
                router_gap = max(router_gap, float((hf_grad(mb, n).float() - r).abs().max() / scale))
            compared += 1
    assert compared == len(adapter.hf_names())
    assert router_gap > 1e-2, router_gap  # the per-micro-batch loss would fail this test


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
