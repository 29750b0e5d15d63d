"""Value head pieces that need no process group: last-token pooling, head selection, init."""
from __future__ import annotations

import torch

from mcore_align.algorithms.base import objective_class
from mcore_align.models.heads import ValueHead, sequence_rewards


def test_sequence_rewards_picks_last_real_token_packed():
    # Packed, pad_multiple 4: lengths 5 and 3 -> cu_seqlens [0, 8, 12] (docstring example).
    values_BS1 = torch.arange(12, dtype=torch.float32).reshape(1, 12, 1)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]])
    r = sequence_rewards(values_BS1, pos, torch.tensor([5, 3]), torch.tensor([0, 8, 12], dtype=torch.int32))
    assert r.tolist() == [4.0, 10.0]


def test_sequence_rewards_padded_layout_and_gradient():
    # Padded [B=2, S=4]: lengths 2 and 4 -> flat indices 1 and 7.
    values = torch.randn(2, 4, 1, requires_grad=True)
    pos = torch.arange(4).repeat(2, 1)
    r = sequence_rewards(values, pos, torch.tensor([2, 4]), torch.tensor([0, 4, 8], dtype=torch.int32))
    torch.testing.assert_close(r, torch.stack([values[0, 1, 0], values[1, 3, 0]]))
    r.sum().backward()
    expect = torch.zeros(2, 4, 1)
    expect[0, 1] = expect[1, 3] = 1
    assert torch.equal(values.grad, expect)


def test_value_head_is_fp32_deterministic_and_linear():
    a = ValueHead(8, init_std=0.02, sequence_parallel=False, tp_group=None)
    b = ValueHead(8, init_std=0.02, sequence_parallel=False, tp_group=None)
    assert a.weight.dtype == torch.float32 and a.weight.shape == (1, 8)
    assert torch.equal(a.weight, b.weight)  # same on every rank: replicated over TP
    h_SBH = torch.randn(3, 2, 8, dtype=torch.bfloat16)
    v, bias = a(h_SBH)
    assert bias is None and v.dtype == torch.float32
    torch.testing.assert_close(v, h_SBH.float() @ a.weight.t())


def test_only_rm_uses_the_value_head():
    assert objective_class("rm").head == "value"
    for name in ("sft", "dpo", "kto", "cpo", "orpo", "simpo"):
        assert objective_class(name).head == "lm"
