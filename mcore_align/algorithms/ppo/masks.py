"""Response masks and masked statistics in TRL's padding conventions.

Responses are right-padded to ``T``; ``lengths_B`` counts the response tokens (the stop token
included). TRL's ``sequence_lengths`` is the index of the last valid token, ``lengths_B - 1``.
Worked example, T = 5, lengths = [3, 5]::

    idx                  0 1 2 3 4
    padding_mask    [0]  . . . x x      idx >= length       (log-probs, policy loss)
    padding_mask_p1 [0]  . . . . x      idx >= length + 1   (values, value loss: one more)
    padding_mask    [1]  . . . . .
"""
from __future__ import annotations

import torch


def padding_masks(lengths_B: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(padding_mask_BT, padding_mask_p1_BT)``, bool, True at padding (see module docstring)."""
    if lengths_B.dim() != 1:
        raise ValueError(f"lengths_B must be 1-D [B], got shape {tuple(lengths_B.shape)}")
    if ((lengths_B < 1) | (lengths_B > T)).any():
        raise ValueError(f"response lengths must be in [1, {T}], got {lengths_B.tolist()}")
    idx_BT = torch.arange(T, device=lengths_B.device)[None, :]
    last_B1 = (lengths_B - 1)[:, None]  # TRL's sequence_lengths
    return idx_BT > last_B1, idx_BT > last_B1 + 1


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is True (``[]``)."""
    return (values * mask).sum() / mask.sum()


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of ``values`` where ``mask`` is True (TRL's Bessel correction)."""
    n = mask.sum()
    if n < 2:
        raise ValueError(f"masked variance needs at least 2 valid positions, got {int(n)} "
                         "(a larger batch gives whitening something to work with)")
    mean = masked_mean(values, mask)
    return masked_mean((values - mean) ** 2, mask) * n / (n - 1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True) -> torch.Tensor:
    """``(values - mean) * rsqrt(var + 1e-8)`` over the masked positions; ``shift_mean=False``
    adds the mean back (rewards keep their level). Values outside the mask are transformed too;
    callers zero them."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean
