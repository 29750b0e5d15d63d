"""reward_funcs loader: import by 'module:function' or file path, weighted sum, clear errors."""
import math
import textwrap

import pytest
import torch

from mcore_align.algorithms.ppo.reward_funcs import compute_rewards, load_reward_funcs

MODULE = textwrap.dedent('''
    import math
    def length(prompts, completions, **kw):
        return [float(len(c)) for c in completions]
    def matches(prompts, completions, answer, **kw):
        return [1.0 if a in c else 0.0 for c, a in zip(completions, answer)]
    def short(prompts, completions, **kw):
        return [1.0]
    def nan(prompts, completions, **kw):
        return [0.0] + [math.nan] * (len(completions) - 1)
    def none(prompts, completions, **kw):
        return [None] * len(completions)
    def boom(prompts, completions, **kw):
        raise KeyError("answer")
    NOT_A_FN = 3
''')


@pytest.fixture
def mod(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


PROMPTS, COMPLETIONS = ["p0", "p1", "p2"], ["abc", "x", "hello 42"]


def test_weighted_sum_and_columns(mod):
    funcs = load_reward_funcs("my_rewards:length, my_rewards:matches", weights=[0.5, 2.0])
    scores, per = compute_rewards(funcs, PROMPTS, COMPLETIONS, {"answer": ["b", "y", "42"]})
    # By hand: 0.5 * [3, 1, 8] + 2 * [1, 0, 1]
    torch.testing.assert_close(scores, torch.tensor([3.5, 0.5, 6.0]))
    assert per["my_rewards:matches"].tolist() == [1.0, 0.0, 1.0]


def test_file_path_spec(mod):
    (f,) = load_reward_funcs([f"{mod / 'my_rewards.py'}:length"])
    assert compute_rewards([f], PROMPTS, COMPLETIONS)[0].tolist() == [3.0, 1.0, 8.0]


@pytest.mark.parametrize("spec, exc, msg", [
    ("no_such_module_xyz:fn", ImportError, r"reward function 'no_such_module_xyz:fn': cannot import"),
    ("my_rewards:missing", ImportError, r"'my_rewards:missing': module 'my_rewards' has no attribute 'missing'"),
    ("my_rewards:NOT_A_FN", TypeError, r"'my_rewards:NOT_A_FN': 'NOT_A_FN' is a int"),
    ("my_rewards", ValueError, r"expected 'module:function'"),
    ("/nonexistent/r.py:fn", ImportError, r"cannot import '/nonexistent/r.py'"),
])
def test_load_errors_name_the_function(mod, spec, exc, msg):
    with pytest.raises(exc, match=msg):
        load_reward_funcs(spec)


@pytest.mark.parametrize("name, exc, msg", [
    ("short", ValueError, r"'my_rewards:short' returned 1 values for 3 completions"),
    ("nan", ValueError, r"'my_rewards:nan' returned nan for completion 1"),
    ("none", TypeError, r"'my_rewards:none' returned None"),
    ("boom", RuntimeError, r"'my_rewards:boom' raised KeyError"),
])
def test_call_errors_name_the_function(mod, name, exc, msg):
    funcs = load_reward_funcs(f"my_rewards:{name}")
    with pytest.raises(exc, match=msg):
        compute_rewards(funcs, PROMPTS, COMPLETIONS)


def test_bad_weights_and_columns(mod):
    with pytest.raises(ValueError, match="reward_weights has 1 values for 2 reward functions"):
        load_reward_funcs("my_rewards:length,my_rewards:short", weights=[1.0])
    funcs = load_reward_funcs("my_rewards:length")
    with pytest.raises(ValueError, match="column 'answer' has 2 values for 3 completions"):
        compute_rewards(funcs, PROMPTS, COMPLETIONS, {"answer": ["a", "b"]})
    assert math.isclose(float(compute_rewards(funcs, PROMPTS, COMPLETIONS)[0].sum()), 12.0)
