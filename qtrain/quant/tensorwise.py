"""Tensor-wise INT8 quantization emitting both orientations (reference twin of ``qtrain.kernels.tensorwise``).

``quantize_tensorwise(w [N, K] float) -> (q [N, K] int8, qt [K, N] int8, scale [] fp32)``: one scale for the
tensor, RTN; ``qt`` is ``q.t()`` stored contiguous (Hopper's 8-bit MMA wants each operand contiguous along the
reduced dim, so dgrad's ``dY·W`` consumes ``qt``).
"""
from __future__ import annotations

import torch

from qtrain.quant.core import check_2d, check_float, round_scaled, scale_from_absmax

QMAX = 127


def quantize_tensorwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_float(w)
    check_2d(w)
    wf = w.float()
    scale = scale_from_absmax(wf.abs().amax() if w.numel() else wf.new_zeros(()), QMAX)
    q = round_scaled(wf / scale, QMAX).contiguous()
    return q, q.t().contiguous(), scale
