"""Block-wise INT8 quantization (reference twin of ``qtrain.kernels.blockwise``).

``quantize_blockwise(x [M, K] float, r, c) -> (q [M, K] int8 contiguous, scale [⌈M/r⌉, ⌈K/c⌉] fp32)``: one
scale per ``r × c`` block (ragged edge blocks cover what is left), RTN, with the rules of
:mod:`qtrain.quant.core`. ``(1, 128)`` blocks are the per-token-group scales of activations and gradients,
``(128, 128)`` those of weights, ``(32, 32)`` Jetfire's.
"""
from __future__ import annotations

import torch

from qtrain.quant.core import quantize
from qtrain.recipes import block


def check_block(r: int, c: int) -> None:
    if not (isinstance(r, int) and isinstance(c, int) and r >= 1 and c >= 1):
        raise ValueError(f"block (r, c) must be two positive ints, got ({r!r}, {c!r})")


def quantize_blockwise(x: torch.Tensor, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    check_block(r, c)
    q, scale = quantize(x, block(r, c))
    return q.contiguous(), scale
