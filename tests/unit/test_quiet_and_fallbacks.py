"""The fallbacks that used to be silent: the warnings filter (specific library messages only),
the Transformer Engine choice (model.transformer_impl) and the pad-token fallbacks."""
from __future__ import annotations

import json
import logging
import sys
import warnings

import pytest

from mcore_align.models.provider import ModelOptions, select_transformer_impl
from mcore_align.parallel import quiet


# -- warnings: known library noise by module + message, nothing else -------------------------
def _shown(env_verbose: bool, monkeypatch, *emitted) -> list[str]:
    """Messages that get through after quiet_library_warnings(), each emitted as if by `module`."""
    if env_verbose:
        monkeypatch.setenv("MCORE_ALIGN_VERBOSE", "1")
    else:
        monkeypatch.delenv("MCORE_ALIGN_VERBOSE", raising=False)
    fsdp = logging.getLogger("megatron.core.distributed.fsdp")
    monkeypatch.setattr(fsdp, "level", fsdp.level)  # restored after the test
    with warnings.catch_warnings(record=True) as seen:  # also restores the filter list
        warnings.simplefilter("always")
        quiet.quiet_library_warnings()
        for category, module, message in emitted:
            warnings.warn_explicit(message, category, f"{module.replace('.', '/')}.py", 1, module=module)
    return [str(w.message) for w in seen]


NOISE = [
    (UserWarning, "megatron.core.models.backends", "Apex is not installed. Falling back to Torch Norm"),
    (UserWarning, "megatron.core.optimizer", "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."),
    (FutureWarning, "megatron.core.dist_checkpointing.strategies.torch",
     "`load_state_dict` is deprecated and will be removed in future versions. Please use `load` instead."),
    (FutureWarning, "mcore_align.parallel.cpu_mode", "Please use DTensor instead and we are deprecating ShardedTensor."),
]
UNRELATED = [
    (FutureWarning, "transformers.tokenization_utils_base", "`foo` is deprecated and will be removed in v5"),
    (FutureWarning, "mcore_align.trainer.trainer", "something changes in the future"),
    (UserWarning, "torch.distributed.checkpoint", "Falling back to a slower path"),
    (UserWarning, "mcore_align.data.loader", "Apex is not installed. Falling back to Torch Norm"),  # not megatron's
]


def test_quiet_hides_only_the_known_library_messages(monkeypatch):
    shown = _shown(False, monkeypatch, *NOISE, *UNRELATED)
    assert shown == [m for _, _, m in UNRELATED]
    assert logging.getLogger("megatron.core.distributed.fsdp").getEffectiveLevel() == logging.WARNING


def test_verbose_shows_everything(monkeypatch):
    shown = _shown(True, monkeypatch, *NOISE, *UNRELATED)
    assert shown == [m for _, _, m in NOISE + UNRELATED]


# -- model.transformer_impl ------------------------------------------------------------------
@pytest.fixture
def fake_te(tmp_path, monkeypatch):
    """Install a fake `transformer_engine` package on sys.path; its __init__ is the given source."""
    def install(init_source: str):
        pkg = tmp_path / "transformer_engine"
        pkg.mkdir()
        (pkg / "__init__.py").write_text(init_source)
        (pkg / "pytorch.py").write_text("")
        monkeypatch.syspath_prepend(str(tmp_path))

    for name in [m for m in sys.modules if m.split(".")[0] == "transformer_engine"] or ["transformer_engine"]:
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield install
    for name in [m for m in sys.modules if m.split(".")[0] == "transformer_engine"]:
        del sys.modules[name]  # never leave the fake behind for megatron's own TE probes


def test_local_and_lora_and_cpu_choose_the_local_spec_and_say_why():
    assert select_transformer_impl(ModelOptions(transformer_impl="local"), cpu=False) == \
        (False, "model.transformer_impl=local")
    use_te, why = select_transformer_impl(ModelOptions(lora=True), cpu=False)
    assert not use_te and "LoRA" in why
    use_te, why = select_transformer_impl(ModelOptions(), cpu=True)
    assert not use_te and "CPU execution mode" in why


def test_transformer_engine_chosen_but_unusable_is_an_error():
    with pytest.raises(ValueError, match="transformer_engine cannot be used with LoRA"):
        select_transformer_impl(ModelOptions(transformer_impl="transformer_engine", lora=True), cpu=False)
    with pytest.raises(ValueError, match="transformer_engine needs CUDA"):
        select_transformer_impl(ModelOptions(transformer_impl="transformer_engine"), cpu=True)
    with pytest.raises(ValueError, match="transformer_impl must be one of"):
        select_transformer_impl(ModelOptions(transformer_impl="te"), cpu=False)


class _HideTE:
    """A meta-path finder that makes `transformer_engine` absent, as on a machine without it."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] == "transformer_engine":
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


def test_not_installed_te(fake_te, monkeypatch):
    monkeypatch.setattr(sys, "meta_path", [_HideTE(), *sys.meta_path])
    assert select_transformer_impl(ModelOptions(), cpu=False) == \
        (False, "transformer_impl=auto: Transformer Engine is not installed")
    with pytest.raises(RuntimeError, match="transformer_impl=transformer_engine, but Transformer Engine is not installed"):
        select_transformer_impl(ModelOptions(transformer_impl="transformer_engine"), cpu=False)


def test_broken_te_install_is_reported_not_swallowed(fake_te):
    fake_te("raise OSError('libcudart.so.12: cannot open shared object file')\n")
    use_te, why = select_transformer_impl(ModelOptions(), cpu=False)
    assert not use_te
    assert why == ("transformer_impl=auto: Transformer Engine is installed but does not import: "
                   "OSError: libcudart.so.12: cannot open shared object file")
    with pytest.raises(RuntimeError, match="transformer_engine, but .*does not import: OSError: libcudart"):
        select_transformer_impl(ModelOptions(transformer_impl="transformer_engine"), cpu=False)


def test_working_te_is_chosen_by_auto(fake_te):
    fake_te("")
    assert select_transformer_impl(ModelOptions(), cpu=False) == (True, "transformer_impl=auto: Transformer Engine imports")
    assert select_transformer_impl(ModelOptions(transformer_impl="transformer_engine"), cpu=False)[0] is True


# -- pad-token fallbacks ---------------------------------------------------------------------
class _Tok:
    def __init__(self, pad, eos, name):
        self.pad_token_id, self.eos_token_id, self.name_or_path = pad, eos, name


def test_pad_token_fallbacks_are_logged(caplog):
    from mcore_align.data.tokenization import padding_id

    with caplog.at_level(logging.WARNING, logger="mcore_align.data.tokenization"):
        assert padding_id(_Tok(5, 2, "tok-a")) == 5
        assert not caplog.records
        assert padding_id(_Tok(None, 2, "tok-b")) == 2
        assert "tokenizer tok-b has no pad token; padding with the EOS id 2" in caplog.text
        assert padding_id(_Tok(None, None, "tok-c")) == 0
        assert "tokenizer tok-c has no pad token; and no EOS token either: padding with id 0" in caplog.text


def test_sequence_classification_export_says_where_the_pad_id_came_from(tmp_path, caplog):
    import torch
    from safetensors.torch import save_file

    from mcore_align.checkpoint.heads import write_sequence_classification
    from mcore_align.models.heads import VALUE_HEAD_FILE, VALUE_HEAD_KEY

    save_file({VALUE_HEAD_KEY: torch.zeros(1, 4)}, tmp_path / VALUE_HEAD_FILE)
    save_file({"model.norm.weight": torch.ones(4)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}))
    with caplog.at_level(logging.WARNING, logger="mcore_align.checkpoint.heads"):
        write_sequence_classification(tmp_path)  # no tokenizer files: AutoTokenizer fails
    assert "the exported tokenizer does not load" in caplog.text
    assert "pad_token_id is taken from config.json: None" in caplog.text
    assert "no pad token id (tokenizer and config.json have none)" in caplog.text
