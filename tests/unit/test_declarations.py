"""Objectives declare what they consume; the shared code never names one (STYLE.md rule 3)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from mcore_align.algorithms import available_objectives
from mcore_align.algorithms.base import Objective, objective_class, register_objective

ROOT = Path(__file__).resolve().parents[2] / "mcore_align"
# The step, the setup, the loop, configuration, checkpoints, export and model code: none of
# them may branch on an objective or tag code with one ("[RM]", "[KTO]", "[LoRA]").
SHARED = ["trainer", "config", "checkpoint", "models", "ops", "parallel", "data"]


def test_shared_code_never_names_an_objective():
    names = "|".join(available_objectives())
    # Data kinds ("paired", "kto", "sft") are the data pipeline's own enumeration: `kind == "kto"`
    # there is a data format, not an objective.
    branch = re.compile(rf"""(rlhf_type\s*[!=]=|(?<!kind )==\s*["']({names})["']|\[(RM|KTO|LoRA|DPO|SFT)\])""")
    offenders = []
    for part in SHARED:
        for f in sorted((ROOT / part).rglob("*.py")):
            for i, line in enumerate(f.read_text().splitlines(), 1):
                if branch.search(line):
                    offenders.append(f"{f.relative_to(ROOT.parent)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_declarations_of_the_seed_objectives():
    dpo, kto, rm = objective_class("dpo"), objective_class("kto"), objective_class("rm")
    assert dpo.needs_reference and dpo.paired and dpo.head == "lm" and "ref_logps" in dpo.inputs
    assert kto.needs_reference and not kto.paired and kto.data_kind == "kto"
    assert {"kl_logps", "ref_kl_logps", "kl_reference", "labels"} <= kto.inputs
    assert rm.head == "value" and not rm.needs_reference and rm.inputs == {"rewards", "margins"}
    for name in ("sft", "cpo", "orpo", "simpo"):
        assert not objective_class(name).needs_reference, name


@dataclass(kw_only=True)
class _Cfg:
    pass


def _declare(**attrs):
    base = {"name": "x_test_objective", "config_cls": _Cfg, "data_kind": "paired", "inputs": {"logps"}}
    return type("X", (Objective,), {**base, **attrs})


@pytest.mark.parametrize("attrs, message", [
    ({"inputs": {"logps", "not_a_field"}}, "unknown inputs"),
    ({"head": "value"}, "head and rewards input disagree"),
    ({"inputs": {"rewards"}}, "head and rewards input disagree"),
    ({"head": "value", "inputs": {"rewards", "ref_logps"}}, "X"),
    ({"inputs": {"logps", "labels"}}, "need data_kind 'kto'"),
    ({"data_kind": "kto", "inputs": {"logps", "kl_reference"}}, "go together"),
    ({"head": "policy"}, "head 'policy'"),
])
def test_inconsistent_declarations_are_refused_at_registration(attrs, message):
    with pytest.raises(AssertionError, match=message):
        register_objective(_declare(**attrs))
    assert "x_test_objective" not in available_objectives()


def test_reference_need_is_derived_from_the_inputs():
    cls = register_objective(_declare(name="x_test_ref", inputs={"logps", "num_tokens", "ref_logps"}))
    try:
        assert cls.needs_reference and cls.paired
    finally:
        from mcore_align.algorithms import base

        base._REGISTRY.pop("x_test_ref")
