"""HF -> megatron -> HF round trips (bitwise) and strict handling of bad input.

Conversions run in this process (a world of one, CPU mode), like the tools do.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mcore_align.checkpoint import (
    CheckpointError,
    convert_hf_to_mcore,
    convert_mcore_to_hf,
    read_model_spec,
)
from mcore_align.checkpoint import hf_to_mcore
from mcore_align.models.families import spec_from_hf_config
from mcore_align.models.spec import read_hf_config
from mcore_align.models.tiny import make_tiny_model


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
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        "llama": make_tiny_model(root / "llama", "llama"),
        "mistral": make_tiny_model(root / "mistral", "mistral"),
        "qwen2": make_tiny_model(root / "qwen2", "qwen2", max_shard_size="60KB"),  # sharded + index
        "qwen3": make_tiny_model(root / "qwen3", "qwen3"),
        "qwen2_tied": make_tiny_model(root / "qwen2_tied", "qwen2", tie_word_embeddings=True),
    }


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3", "qwen2_tied"])
def test_round_trip_is_bitwise(hf_models, tmp_path, name):
    hf = hf_models[name]
    convert_hf_to_mcore(hf, tmp_path / "mc", dtype="fp32")
    assert read_model_spec(tmp_path / "mc") == spec_from_hf_config(read_hf_config(hf))
    assert (tmp_path / "mc" / "tokenizer" / "tokenizer.json").exists()
    convert_mcore_to_hf(tmp_path / "mc", tmp_path / "back", max_shard_size="60KB" if name == "qwen2" else "5GB")
    assert_same_tensors(hf_tensors(hf), hf_tensors(tmp_path / "back"))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "back" / f).read_bytes() == (hf / f).read_bytes(), f
    if name == "qwen2":
        assert (tmp_path / "back" / "model.safetensors.index.json").exists()
        assert len(list((tmp_path / "back").glob("model-*-of-*.safetensors"))) > 1


def test_export_writes_generation_config_when_the_source_had_none(hf_models, tmp_path):
    from transformers import GenerationConfig

    hf = tmp_path / "hf"
    shutil.copytree(hf_models["llama"], hf)
    (hf / "generation_config.json").unlink()
    convert_hf_to_mcore(hf, tmp_path / "mc")
    convert_mcore_to_hf(tmp_path / "mc", tmp_path / "back")
    gen = GenerationConfig.from_pretrained(tmp_path / "back")
    cfg = json.loads((hf / "config.json").read_text())
    assert (gen.bos_token_id, gen.eos_token_id) == (cfg["bos_token_id"], cfg["eos_token_id"])


def test_bf16_path_and_export_loads_in_transformers(hf_models, tmp_path):
    from transformers import AutoModelForCausalLM

    hf = hf_models["qwen3"]
    convert_hf_to_mcore(hf, tmp_path / "mc", dtype="bf16")
    assert json.loads((tmp_path / "mc" / "model_spec.json").read_text())["dtype"] == "bfloat16"
    convert_mcore_to_hf(tmp_path / "mc", tmp_path / "back")
    want = {k: v.to(torch.bfloat16) for k, v in hf_tensors(hf).items()}
    assert_same_tensors(want, hf_tensors(tmp_path / "back"))
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == "bfloat16"
    # fp32 export of the bf16 checkpoint, loaded by transformers: same logits as the
    # bf16-rounded original (megatron keeps RMSNorm weights in fp32 in a bf16 model,
    # so the checkpoint holds those unrounded).
    convert_mcore_to_hf(tmp_path / "mc", tmp_path / "back32", dtype="fp32")
    tokens = torch.randint(0, 512, (2, 16))
    ref = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "norm" not in n:
                p.copy_(p.to(torch.bfloat16).float())
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "back32").eval()
        torch.testing.assert_close(got(tokens).logits, ref(tokens).logits, rtol=0, atol=1e-5)


def test_export_of_training_save_dir_with_extra_head(hf_models, tmp_path):
    """A trainer-style save ({"model": ..., other state}, iter_* + latest file) exports,
    and a registered extra head (the RM value head) lands in its own file, replacing the LM head."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from mcore_align.checkpoint import load_model_weights, write_checkpoint_extras
    from mcore_align.checkpoint.layout import init_single_process
    from mcore_align.models.provider import ModelOptions, build_model

    hf = hf_models["llama"]
    convert_hf_to_mcore(hf, tmp_path / "mc")
    spec = read_model_spec(tmp_path / "mc")
    runtime = init_single_process()
    (model,) = build_model(spec, runtime, opts=ModelOptions(core_attention="megatron"))
    load_model_weights([model], tmp_path / "mc")
    value_head = torch.randn(1, spec.hidden_size)
    it = tmp_path / "save" / "iter_0000010"
    it.mkdir(parents=True)
    dist_checkpointing.save({
        "model": model.sharded_state_dict(),
        "value_head": ShardedTensor.from_rank_offsets("value_head.weight", value_head, replica_id=0),
        "iteration": 10,
    }, str(it))
    (tmp_path / "save" / "latest_checkpointed_iteration.txt").write_text("10")
    write_checkpoint_extras(tmp_path / "save", spec, torch.float32, tmp_path / "mc")
    convert_mcore_to_hf(tmp_path / "save", tmp_path / "back")
    # [RM] a checkpoint with a value head is a reward model: the backbone is exported
    # without the LM head (the value head replaces it), the head goes to its own file.
    expected = {k: v for k, v in hf_tensors(hf).items() if k != "lm_head.weight"}
    assert_same_tensors(expected, load_file(tmp_path / "back" / "model.safetensors"))
    assert torch.equal(load_file(tmp_path / "back" / "value_head.safetensors")["value_head.weight"], value_head)


# -- bad input ---------------------------------------------------------------------------
@pytest.fixture
def hf_copy(hf_models, tmp_path):
    dst = tmp_path / "hf"
    shutil.copytree(hf_models["qwen2"], dst)  # sharded: model-0000i-of-0000n + index
    return dst


def _rewrite_shard_of(hf: Path, tensor: str, edit) -> Path:
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    f = hf / index["weight_map"][tensor]
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})
    return f


def test_unknown_architecture_lists_supported(hf_copy, tmp_path):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"GPTNeoXForCausalLM.*supported families: llama.*qwen3"):
        convert_hf_to_mcore(hf_copy, tmp_path / "out")


def test_missing_shard_names_file(hf_copy, tmp_path):
    victim = sorted(hf_copy.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name}.*missing"):
        convert_hf_to_mcore(hf_copy, tmp_path / "out")


def test_corrupt_shard_names_file(hf_copy, tmp_path):
    victim = sorted(hf_copy.glob("model-*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated download
    with pytest.raises(CheckpointError, match=f"{victim.name}: cannot read safetensors shard"):
        convert_hf_to_mcore(hf_copy, tmp_path / "out")


def test_missing_tensor_is_named(hf_copy, tmp_path):
    name = "model.layers.1.self_attn.k_proj.bias"
    _rewrite_shard_of(hf_copy, name, lambda t: t.pop(name))
    index = json.loads((hf_copy / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    (hf_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"missing tensors: \['{name}'\]"):
        convert_hf_to_mcore(hf_copy, tmp_path / "out")


def test_unexpected_tensor_is_named(hf_copy, tmp_path):
    name = "model.layers.0.mlp.gate_proj.weight"
    f = _rewrite_shard_of(hf_copy, name, lambda t: t.update({"model.layers.0.self_attn.rotary.inv_freq": torch.ones(4)}))
    index = json.loads((hf_copy / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.self_attn.rotary.inv_freq"] = f.name
    (hf_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*model\.layers\.0\.self_attn\.rotary\.inv_freq"):
        convert_hf_to_mcore(hf_copy, tmp_path / "out")


def test_wrong_shape_is_named(hf_copy, tmp_path):
    name = "model.layers.1.mlp.down_proj.weight"
    _rewrite_shard_of(hf_copy, name, lambda t: t.update({name: t[name][:, :-1].contiguous()}))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' has shape \[64, 159\], expected \[64, 160\]"):
        convert_hf_to_mcore(hf_copy, tmp_path / "out")


def test_non_empty_output_needs_overwrite(hf_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_hf_to_mcore(hf_models["qwen3"], out)
    assert (out / "keep.txt").exists()
    convert_hf_to_mcore(hf_models["qwen3"], out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "metadata.json").exists()
    with pytest.raises(FileExistsError):
        convert_mcore_to_hf(out, out)


def test_interrupted_conversion_leaves_nothing_complete(hf_models, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_get = hf_to_mcore._OneParamCache.get

    def failing_get(self, name):
        calls["n"] += 1
        if calls["n"] == 5:  # the 5th tensor written: some files are already on disk
            raise RuntimeError("simulated crash mid-write")
        return real_get(self, name)

    monkeypatch.setattr(hf_to_mcore._OneParamCache, "get", failing_get)
    with pytest.raises(RuntimeError, match="simulated crash"):
        convert_hf_to_mcore(hf_models["qwen3"], tmp_path / "out")
    assert calls["n"] == 5
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # the temporary sibling is gone too
