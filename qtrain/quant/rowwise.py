"""Row-wise INT8 quantization (reference twin of ``qtrain.kernels.rowwise``).

``quantize_rowwise(x [M, K] float) -> (q [M, K] int8 contiguous, scale [M] fp32)``, one scale per row, RTN,
with the rules of :mod:`qtrain.quant.core`.
"""
from __future__ import annotations

import torch

from qtrain.quant.core import check_2d, check_float, round_scaled, scale_from_absmax

QMAX = 127


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_float(x)
    check_2d(x)
    xf = x.float()
    scale = scale_from_absmax(xf.abs().amax(dim=1) if x.shape[1] else xf.new_zeros(x.shape[0]), QMAX)
    q = round_scaled(xf / scale[:, None], QMAX)
    return q.contiguous(), scale
