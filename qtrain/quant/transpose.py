"""Reference for the INT8 transpose: ``transpose_int8(q [M, N] int8) -> q.t().contiguous() [N, M] int8``.

The transposed operands of the GEMMs (``Wᵀ`` for dgrad, ``Xᵀ``/``dYᵀ`` for wgrad with square blocks) are copies
of already quantized codes; the kernel twin (:mod:`qtrain.kernels.transpose`) makes them at copy bandwidth where
PyTorch's strided int8 copy runs at a fraction of it.
"""
from __future__ import annotations

import torch

from qtrain.quant.core import check_2d


def check_int8_2d(q: torch.Tensor) -> None:
    if q.dtype != torch.int8:
        raise TypeError(f"transpose_int8 takes int8 codes, got {q.dtype}")
    check_2d(q)


def transpose_int8(q: torch.Tensor) -> torch.Tensor:
    check_int8_2d(q)
    return q.t().contiguous()
