"""User reward functions for online RLHF: ``reward_funcs=my_module:my_fn,other.mod:fn2``.

Each function is called once per batch, like TRL's GRPO reward functions::

    fn(prompts=[...], completions=[...], **columns) -> list of B numbers

``prompts`` / ``completions`` are the decoded texts (B each); ``columns`` are the records' other
dataset columns, each a list of B values. Several functions are summed with weights
(``reward_weights``, default 1 each). Every failure names the function: not importable, not
callable, raising, a wrong number of values, a non-number, NaN or inf.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch


@dataclass(frozen=True)
class RewardFunc:
    name: str
    """The spec it was loaded from, ``module:function`` (used in errors and metric names)."""
    fn: Callable
    weight: float = 1.0


def _import(spec: str) -> Callable:
    if spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"reward function {spec!r}: expected 'module:function' or 'path/to/file.py:function'")
    mod_name, fn_name = spec.split(":")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise FileNotFoundError(f"no such file: {path}")
            mspec = importlib.util.spec_from_file_location(f"mcore_align_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(mspec)
            mspec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - any import failure is reported with the spec
        raise ImportError(f"reward function {spec!r}: cannot import {mod_name!r}: {type(e).__name__}: {e}") from e
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise ImportError(f"reward function {spec!r}: module {mod_name!r} has no attribute {fn_name!r}")
    if not callable(fn):
        raise TypeError(f"reward function {spec!r}: {fn_name!r} is a {type(fn).__name__}, not a function")
    return fn


def load_reward_funcs(specs: str | Sequence[str], weights: Sequence[float] | None = None) -> list[RewardFunc]:
    """``specs``: a list, or one comma-separated string; ``weights``: one per function or None."""
    if isinstance(specs, str):
        specs = [s.strip() for s in specs.split(",") if s.strip()]
    if not specs:
        raise ValueError("reward_funcs is empty; give at least one 'module:function'")
    if weights is not None and len(weights) != len(specs):
        raise ValueError(f"reward_weights has {len(weights)} values for {len(specs)} reward functions {list(specs)}")
    ws = [float(w) for w in weights] if weights is not None else [1.0] * len(specs)
    return [RewardFunc(s, _import(s), w) for s, w in zip(specs, ws)]


def compute_rewards(funcs: Sequence[RewardFunc], prompts: list[str], completions: list[str],
                    columns: dict[str, list] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(scores_B, per_function)``: the weighted sum ``[B]`` (float32) and each function's raw
    values ``{name: [B]}`` (for ``rewards/<name>`` metrics)."""
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} completions")
    columns = columns or {}
    for k, v in columns.items():
        if k in ("prompts", "completions"):
            raise ValueError(f"dataset column {k!r} clashes with the reward function argument of that name")
        if len(v) != n:
            raise ValueError(f"column {k!r} has {len(v)} values for {n} completions")
    total = torch.zeros(n, dtype=torch.float64)
    per_fn = {}
    for f in funcs:
        try:
            out = f.fn(prompts=prompts, completions=completions, **columns)
        except Exception as e:
            raise RuntimeError(f"reward function {f.name!r} raised {type(e).__name__}: {e}") from e
        if isinstance(out, torch.Tensor):
            out = out.detach().flatten().tolist()
        try:
            out = list(out)
        except TypeError:
            raise TypeError(f"reward function {f.name!r} returned a {type(out).__name__}; "
                            f"expected a list of {n} numbers") from None
        if len(out) != n:
            raise ValueError(f"reward function {f.name!r} returned {len(out)} values for {n} completions")
        vals = []
        for i, v in enumerate(out):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"reward function {f.name!r} returned {v!r} ({type(v).__name__}) for completion {i}; "
                                "expected a number")
            if not math.isfinite(v):
                raise ValueError(f"reward function {f.name!r} returned {v} for completion {i} "
                                 f"(prompt {prompts[i][:60]!r}); rewards must be finite")
            vals.append(float(v))
        t = torch.tensor(vals, dtype=torch.float64)
        per_fn[f.name] = t.float()
        total += f.weight * t
    return total.float(), per_fn
