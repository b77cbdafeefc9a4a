"""INT8 transpose kernel (twin of :mod:`qtrain.quant.transpose`): ``q [M, N]`` (any strides) → ``qᵀ [N, M]``
contiguous, bit for bit. Each program moves one ``[T, T]`` tile; Triton stages it through shared memory so that
both the loads and the stores are coalesced."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qtrain.kernels._common import check_device
from qtrain.quant.transpose import check_int8_2d

TILE = 128


@triton.jit
def _transpose_kernel(q_ptr, out_ptr, M, N, stride_m, stride_n, T: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * T + tl.arange(0, T)
    cols = pid_n * T + tl.arange(0, T)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    tile = tl.load(q_ptr + rows[:, None].to(tl.int64) * stride_m + cols[None, :] * stride_n, mask=mask)
    tl.store(out_ptr + cols[None, :].to(tl.int64) * M + rows[:, None], tile, mask=mask)


def transpose_int8(q: torch.Tensor) -> torch.Tensor:
    check_int8_2d(q)
    check_device(q)
    M, N = q.shape
    out = torch.empty((N, M), dtype=torch.int8, device=q.device)
    if out.numel():
        _transpose_kernel[(triton.cdiv(M, TILE), triton.cdiv(N, TILE))](q, out, M, N, q.stride(0), q.stride(1),
                                                                      T=TILE, num_warps=4)
    return out
