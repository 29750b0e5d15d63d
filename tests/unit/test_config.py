"""Configuration: YAML + dotted overrides, unknown keys with "did you mean", the shipped
example configs, and the cross-section checks."""
from __future__ import annotations

import pytest

from mcore_align.config import build_config, load_config, resolve_key
from tests.conftest import ROOT

BASE = {"model": {"load": "/ckpt"}, "data": {"dataset": ["/d.jsonl"]}}


def test_bare_and_dotted_keys_resolve_to_their_section():
    assert resolve_key("beta") == ("algo.params", "beta")
    assert resolve_key("algo.beta") == ("algo.params", "beta")
    assert resolve_key("tensor_model_parallel_size") == ("parallel", "tensor_model_parallel_size")
    assert resolve_key("learning_rate") == ("optim", "learning_rate")
    assert resolve_key("max_length") == ("data", "max_length")
    assert resolve_key("rlhf_type") == ("algo", "rlhf_type")
    assert resolve_key("sft_type") == ("model", "train_type")  # ms-swift's older name


def test_overrides_win_and_values_are_typed():
    cfg = build_config({**BASE, "optim": {"learning_rate": "1e-5"}},
                       ["beta=0.25", "train.global_batch_size=16", "loss_type=[sigmoid, sft]",
                        "loss_weights=[1.0, 0.5]", "rpo_alpha=null", "optim.learning_rate=2e-6", "sequence_parallel=true",
                        "tensor_model_parallel_size=2", "data.val_dataset=[/v.jsonl]"])
    assert cfg.algo.params == {"beta": 0.25, "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5],
                               "rpo_alpha": None}
    assert cfg.optim.learning_rate == 2e-6 and isinstance(cfg.optim.learning_rate, float)
    assert cfg.train.global_batch_size == 16
    assert cfg.parallel.sequence_parallel is True and cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.data.val_dataset == ["/v.jsonl"]


@pytest.mark.parametrize("override, message", [
    ("bta=0.1", "did you mean beta"),
    ("learning_rat=1e-5", "did you mean learning_rate"),
    ("optim.learnig_rate=1e-5", "did you mean learning_rate"),
    ("optimm.learning_rate=1e-5", "did you mean optim"),
    ("seed=3", "ambiguous"),
    ("beta", "not key=value"),
    ("desirable_weight=2.0", "unknown dpo hyperparameter 'desirable_weight'"),
    ("loss_type=sigmod", "sigmod"),
    ("rlhf_type=dpoo", "unknown"),
    ("context_parallel_size=2", "packing"),
])
def test_bad_keys_and_values_are_named(override, message):
    extra = ["data.packing=false"] if override.startswith("context_parallel") else []
    with pytest.raises(ValueError, match=message):
        build_config(BASE, [override, *extra])


def test_required_keys_and_exclusive_options():
    with pytest.raises(ValueError, match="model.load"):
        build_config({"data": {"dataset": ["/d"]}})
    with pytest.raises(ValueError, match="data.dataset"):
        build_config({"model": {"load": "/ckpt"}})
    with pytest.raises(ValueError, match="bf16 and fp16"):
        build_config(BASE, ["bf16=true", "fp16=true"])
    with pytest.raises(ValueError, match="val_dataset or val_fraction"):
        build_config(BASE, ["val_fraction=0.1", "val_dataset=[/v.jsonl]"])
    with pytest.raises(ValueError, match="lora.*rlhf_type=rm"):
        build_config(BASE, ["train_type=lora", "rlhf_type=rm"])
    with pytest.raises(ValueError, match="sequence_parallel=True needs tensor_model_parallel_size > 1"):
        build_config(BASE, ["sequence_parallel=true"])


@pytest.mark.parametrize("path", sorted((ROOT / "examples" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_load_with_their_objective(path):
    cfg = load_config(path, ["model.load=/ckpt", "data.dataset=[/d.jsonl]"])
    cfg.algo.objective_config()
    stem = path.stem.split("_")[0]
    assert cfg.algo.rlhf_type == stem, (path.name, cfg.algo.rlhf_type)


def test_yaml_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  load: /ckpt\ndata: [unclosed\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*line"):
        load_config(bad)
