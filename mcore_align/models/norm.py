"""RMSNorm for the local (non-TE) layer spec that also works with sequence parallelism.

megatron's ``WrappedTorchNorm`` refuses ``sequence_parallel`` (and Apex's fused norm may
be absent). With sequence parallelism each TP rank normalises its own slice of the
sequence, so the weight's gradient is partial: marking it ``sequence_parallel`` makes
megatron's ``finalize_model_grads`` all-reduce it over the TP group, exactly as it does
for Transformer Engine's norms. q/k norms are all-reduced by megatron by name.
"""
from __future__ import annotations

import torch


class TorchRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with megatron's norm constructor signature."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = bool(config.sequence_parallel)
