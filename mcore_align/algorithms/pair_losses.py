"""Per-pair preference losses on logits (one number per pair), shared by DPO and CPO/SimPO.

``logits`` is ``[P]``: DPO's (pol_c - pol_r) - (ref_c - ref_r), CPO's pol_c - pol_r, SimPO's
average-log-prob difference minus gamma / beta. Each returns per-pair losses ``[P]``; the
objectives sum them and divide by the global number of pairs.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

PairLoss = Callable[[Tensor, float, float], Tensor]
"""fn(logits [P], beta, label_smoothing) -> per-pair losses [P]."""


def sigmoid_pair_loss(logits: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """DPO, arXiv:2305.18290 Eq. (7); label_smoothing eps gives conservative DPO
    (Mitchell, "A note on DPO with noisy preferences", 2023)."""
    z = beta * logits
    return -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing


def hinge_pair_loss(logits: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """SLiC hinge, Zhao et al., arXiv:2305.10425; RSO, Liu et al., arXiv:2309.06657, Eq. (10)."""
    return torch.relu(1 - beta * logits)


def ipo_pair_loss(logits: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """IPO, Azar et al., arXiv:2310.12036, Eq. (17), beta = tau (callers pass length-normalised logits)."""
    return (logits - 1 / (2 * beta)) ** 2
