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
    online = path.stem in ("ppo", "grpo")  # the scripts pass the reward (REWARD_MODEL / reward_funcs)
    cfg = load_config(path, ["model.load=/ckpt", "data.dataset=[/d.jsonl]",
                             *(["reward_funcs=mcore_align.rewards:even_token_fraction"] if online else [])])
    cfg.algo.objective_config()
    stem = path.stem.split("_")[0]
    assert cfg.algo.rlhf_type == stem, (path.name, cfg.algo.rlhf_type)


def test_yaml_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  load: /ckpt\ndata: [unclosed\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*line"):
        load_config(bad)


# -- every field gets its declared type (config/types.py) --------------------------------------
@pytest.mark.parametrize("override, message", [
    ("bf16=maybe", r"model\.bf16: expected a boolean \(true/false\), got 'maybe'"),
    ("packing=1", r"data\.packing: expected a boolean \(true/false\), got 1"),  # an int is not a bool
    ("train.train_iters=2.5", r"train\.train_iters: expected an integer or null, got 2\.5"),
    ("global_batch_size=true", r"train\.global_batch_size: expected an integer, got True"),  # bool is not an int
    ("tensor_model_parallel_size='2.5'", r"parallel\.tensor_model_parallel_size: expected an integer, got '2\.5'"),
    ("learning_rate=fast", r"optim\.learning_rate: expected a number, got 'fast'"),
    ("learning_rate=.nan", r"optim\.learning_rate: expected a number, got nan"),
    ("clip_grad=true", r"optim\.clip_grad: expected a number, got True"),
    ("model.load=3", r"model\.load: expected a string, got 3"),
    ("lora_target_modules=[linear_qkv, 3]", r"model\.lora_target_modules: .*item 1 \(3\)"),
    ("data.dataset=[/d.jsonl, 7]", r"data\.dataset: .*item 1 \(7\) is not a string"),
    ("beta=maybe", r"algo\.beta: expected a number, got 'maybe'"),
    ("rpo_alpha=true", r"algo\.rpo_alpha: expected a number or null, got True"),
    ("loss_type=3", r"algo\.loss_type: expected a string or a list of strings, got 3"),
    ("loss_weights=[1.0, x]", r"algo\.loss_weights: expected a list of numbers or null, .*item 1 \(.x.\)"),
])
def test_values_of_the_wrong_type_are_errors_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        build_config(BASE, [override])


def test_quoted_yaml_booleans_and_numeric_strings_take_the_declared_type(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text('model: {load: /ckpt, bf16: "false"}\n'
                    'data: {dataset: [/d.jsonl], packing: "false", max_length: "512"}\n'
                    'optim: {learning_rate: 1e-5, min_lr: "0"}\n'  # YAML 1.1 reads 1e-5 as a string
                    'train: {plot: "FALSE", progress_bar: "True", train_iters: 8.0, num_train_epochs: 2}\n'
                    'algo: {rlhf_type: dpo, beta: "0.25", rpo_alpha: 1}\n')
    cfg = load_config(path)
    assert cfg.model.bf16 is False and cfg.data.packing is False
    assert cfg.train.plot is False and cfg.train.progress_bar is True
    assert cfg.data.max_length == 512 and type(cfg.data.max_length) is int
    assert cfg.train.train_iters == 8 and type(cfg.train.train_iters) is int
    assert type(cfg.train.num_train_epochs) is float and type(cfg.optim.min_lr) is float
    assert cfg.optim.learning_rate == pytest.approx(1e-5)
    # the objective's hyperparameters are typed by its own Config dataclass, and kept typed
    assert cfg.algo.params == {"beta": 0.25, "rpo_alpha": 1.0} and type(cfg.algo.params["rpo_alpha"]) is float


def test_sections_and_params_must_be_mappings():
    with pytest.raises(ValueError, match=r"config section 'train': expected a mapping of keys, got \[1, 2\]"):
        build_config({**BASE, "train": [1, 2]})
    with pytest.raises(ValueError, match=r"algo\.params: expected a mapping of hyperparameters"):
        build_config({**BASE, "algo": {"params": [0.1]}})
    with pytest.raises(ValueError, match="expected a mapping of sections"):
        build_config(["model"])
    assert build_config({**BASE, "algo": None}).algo.rlhf_type == "dpo"


def test_direct_construction_is_typed_too():
    from mcore_align.config import ModelConfig, TrainConfig
    from mcore_align.data.config import DataConfig
    from mcore_align.parallel.runtime import ParallelConfig

    assert ModelConfig(load="/x", bf16="false").bf16 is False
    with pytest.raises(ValueError, match=r"train\.train_iters: expected an integer or null, got 2\.5"):
        TrainConfig(train_iters=2.5)
    with pytest.raises(ValueError, match=r"data\.packing: expected a boolean"):
        DataConfig(dataset=["/d"], packing="maybe")
    with pytest.raises(ValueError, match=r"parallel\.sequence_parallel: expected a boolean"):
        ParallelConfig(sequence_parallel="yes")


@pytest.mark.parametrize("rlhf_type", ["dpo", "kto", "cpo", "orpo", "simpo", "rm", "sft"])
def test_every_objective_config_is_typed(rlhf_type):
    import dataclasses
    import typing

    from mcore_align.algorithms import objective_config_cls

    cls = objective_config_cls(rlhf_type)
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if hint is float or hint == (float | None):
            cfg = build_config(BASE, [f"rlhf_type={rlhf_type}", f"algo.{f.name}='0.25'"])
            assert cfg.algo.params[f.name] == 0.25 and type(cfg.algo.params[f.name]) is float
            with pytest.raises(ValueError, match=rf"algo\.{f.name}: expected a number"):
                build_config(BASE, [f"rlhf_type={rlhf_type}", f"algo.{f.name}=maybe"])


# -- values validated where they are defined -------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("log_interval=0", r"train\.log_interval must be > 0, got 0"),
    ("max_consecutive_nan=0", r"train\.max_consecutive_nan must be > 0"),
    ("eval_iters=0", r"train\.eval_iters must be > 0"),
    ("eval_interval=0", r"train\.eval_interval must be > 0"),
    ("save_interval=-1", r"train\.save_interval must be > 0"),
    ("save_total_limit=0", r"train\.save_total_limit must be > 0"),
    ("train_iters=0", r"train\.train_iters must be > 0"),
    ("num_train_epochs=0", r"train\.num_train_epochs must be > 0"),
    ("exit_after_steps=0", r"train\.exit_after_steps must be > 0"),
    ("global_batch_size=0", r"train\.global_batch_size must be > 0"),
    ("train.device=gpu", r"train\.device must be one of"),
    ("lora_rank=0", r"model\.lora_rank must be > 0"),
    ("lora_alpha=0", r"model\.lora_alpha must be > 0"),
    ("lora_dropout=1.0", r"model\.lora_dropout must be in \[0.0, 1.0\)"),
    ("micro_batch_size=0", r"data\.micro_batch_size must be > 0"),
    ("adam_eps=0", r"optim\.adam_eps must be > 0"),
    ("adam_beta2=1.0", r"optim\.adam_beta2 must be in"),
    ("weight_decay=-0.1", r"optim\.weight_decay must be >= 0"),
    ("min_lr=1e-3", r"optim\.min_lr .* must not exceed optim\.learning_rate"),
    ("transformer_impl=te", r"model\.transformer_impl must be one of"),
])
def test_out_of_range_values_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        build_config(BASE, [override])


def test_transformer_engine_with_lora_is_refused_at_config_time():
    with pytest.raises(ValueError, match="transformer_impl=transformer_engine cannot be used with train_type=lora"):
        build_config(BASE, ["train_type=lora", "transformer_impl=transformer_engine"])
    assert build_config(BASE, ["train_type=lora"]).model.transformer_impl == "auto"


# -- the layout against the checkpoint's model (check_layout) ----------------------------------
def _spec(**kw):
    from mcore_align.models.spec import ModelSpec

    base = dict(family="llama", num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                num_query_groups=2, head_dim=16, vocab_size=512, max_position_embeddings=2048, rope_theta=1e4)
    return ModelSpec(**{**base, **kw})


@pytest.mark.parametrize("overrides, spec_kw, message", [
    (["pipeline_model_parallel_size=8"], {}, r"pipeline_model_parallel_size=8 is larger than the 4 transformer layers"),
    (["pipeline_model_parallel_size=3"], {}, r"4 transformer layers .* do not split evenly over .*size=3"),
    (["pipeline_model_parallel_size=2", "virtual_pipeline_model_parallel_size=3"], {"num_layers": 8},
     r"4 layers per pipeline rank .*parallel.virtual_pipeline_model_parallel_size=3"),
    (["tensor_model_parallel_size=2"], {"vocab_size": 513}, r"vocab_size=513 .*parallel.tensor_model_parallel_size=2"),
    (["tensor_model_parallel_size=4"], {"num_query_groups": 2}, r"num_key_value_heads=2 .*=4"),
])
def test_layout_that_cannot_split_the_model_is_refused(overrides, spec_kw, message):
    from mcore_align.config import check_layout

    cfg = build_config(BASE, overrides)
    with pytest.raises(ValueError, match=message):
        check_layout(cfg, _spec(**spec_kw))


def test_layout_that_splits_passes_and_long_max_length_warns(caplog):
    from mcore_align.config import check_layout

    check_layout(build_config(BASE, ["pipeline_model_parallel_size=2", "virtual_pipeline_model_parallel_size=2",
                                     "tensor_model_parallel_size=2", "max_length=2048"]), _spec(num_layers=8))
    check_layout(build_config(BASE, ["max_length=4096"]), _spec(), rank=1)  # warnings on rank 0 only
    assert not caplog.records
    with caplog.at_level("WARNING", logger="mcore_align.config.layout"):
        check_layout(build_config(BASE, ["max_length=4096"]), _spec())
    assert "data.max_length=4096 is above the model's max_position_embeddings=2048" in caplog.text


@pytest.mark.parametrize("value, hint, expected", [
    ("true", bool, True), ("False", bool, False), (8.0, int, 8), ("16", int, 16), ("1e3", int, 1000),
    ("99999999999999999999", int, 99999999999999999999), (3, float, 3.0), ("1e-5", float, 1e-5),
    (None, int | None, None), ("sigmoid", str | list[str], "sigmoid"), (("a", "b"), str | list[str], ["a", "b"]),
    ([1, "2.5"], list[float] | None, [1.0, 2.5]),
])
def test_type_rules_accept(value, hint, expected):
    from mcore_align.config.types import convert_value

    out = convert_value(value, hint, "s.k")
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize("value, hint", [
    ("maybe", bool), ("yes", bool), (1, bool), (None, bool), (True, int), (2.5, int), ("2.5", int),
    (True, float), ("fast", float), (float("nan"), float), ("inf", float), (10**400, float), (3, str),
    ("a", list[str]), ([1], list[str]), (3, str | list[str]), ([0.1], dict),
])
def test_type_rules_refuse_naming_the_key(value, hint):
    from mcore_align.config.types import convert_value

    with pytest.raises(ValueError, match=r"^s\.k: expected "):
        convert_value(value, hint, "s.k")
