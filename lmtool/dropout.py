"""Dropout that is cheap on a CPU.

PyTorch's CPU dropout draws a Bernoulli number for every unit, which costs far more than the multiply it feeds:
for the default character model's (32, 128, 512) activations it was most of the time dropout took in a
training step (`python bench/dropout.py`). Here each unit's keep-or-drop decision is a uniform 16-bit number,
four of them cut from one 64-bit draw, so p is rounded to a multiple of 1/65536 (0.2 becomes 0.19999695); the
units kept are scaled by 1 / (1 - that p), so the layer's expected output is exactly its input, as with
PyTorch's. Other devices keep F.dropout, which is one fused kernel there. Draws come from PyTorch's default
generator, so a seed (and a resumed run's saved generator state) fixes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Devices where lmtool draws its own dropout masks (bench/dropout.py empties it to time PyTorch's instead).
FAST_DEVICES = {"cpu"}
LEVELS = 1 << 16  # the keep-or-drop decision's resolution
MIN_KEPT_LEVELS = 256  # keep rates below 256/65536 (p above 0.996) use F.dropout


def fast_dropout_applies(p: float, device: torch.device) -> bool:
    """Whether `dropout` draws its own masks for rate p on this device (else it is F.dropout)."""
    # near p = 1 the few levels kept would round the keep rate too coarsely
    return device.type in FAST_DEVICES and 0 < round(p * LEVELS) <= LEVELS - MIN_KEPT_LEVELS


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Zero each unit of x with probability p (rounded to a multiple of 1/65536 on a CPU) and scale the others
    by 1 / (1 - p), when training; x itself otherwise."""
    if not training or p == 0:
        return x
    if not fast_dropout_applies(p, x.device):
        return F.dropout(x, p, True)
    dropped_levels = round(p * LEVELS)
    words = (x.numel() + 3) // 4
    # 64 random bits per draw, viewed as four signed 16-bit numbers, each uniform over [-32768, 32767]
    lanes = torch.randint(-(2**63), 2**63 - 1, (words,), dtype=torch.int64, device=x.device).view(torch.int16)
    keep = (lanes[: x.numel()] >= dropped_levels - LEVELS // 2).view(x.shape)
    scale = LEVELS / (LEVELS - dropped_levels)
    if x.dtype == torch.float32:  # one multiply by a scaled 0/1 mask (the backward pass multiplies by the same)
        return x * keep.to(x.dtype).mul_(scale)
    # in bf16 a scale rounded into the mask would bias every unit the same way: round each product instead
    return (x * keep.to(x.dtype)).mul_(scale)
