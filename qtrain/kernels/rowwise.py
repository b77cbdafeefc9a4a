"""Row-wise INT8 quantization kernel (twin of :mod:`qtrain.quant.rowwise`).

``quantize_rowwise(x [M, K] float) -> (q [M, K] int8 contiguous, scale [M] fp32)``: one scale per row, RTN,
bit-exact with the reference. Any strides (the kernel reads through them; no copy), bf16/fp16/fp32 input.
Rows up to ``_MAX_BLOCK_K`` long are read once (one pass); longer rows are read twice in ``_LOOP_BLOCK_K``
chunks (absmax, then quantize; the second read mostly hits L2).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qtrain.kernels._common import abs_bits, check_device, interpreting, quantize_rtn, scale_from_bits
from qtrain.quant.core import check_2d, check_float

_MAX_BLOCK_K = 8192
_LOOP_BLOCK_K = 4096


@triton.jit
def _rowwise_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_xk,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    rmask = rows < M
    x_row = x_ptr + rows[:, None].to(tl.int64) * stride_xm
    q_row = q_ptr + rows[:, None].to(tl.int64) * K
    if ONE_PASS:
        mask = rmask[:, None] & (cols[None, :] < K)
        x = tl.load(x_row + cols[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
        scale = scale_from_bits(tl.max(abs_bits(x), axis=1))
        q = quantize_rtn(x, tl.broadcast_to(scale[:, None], x.shape))
        tl.store(q_row + cols[None, :], q, mask=mask)
    else:
        amax = tl.zeros([BLOCK_M], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            mask = rmask[:, None] & ((k0 + cols)[None, :] < K)
            x = tl.load(x_row + (k0 + cols)[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(abs_bits(x), axis=1))
        scale = scale_from_bits(amax)
        for k0 in range(0, K, BLOCK_K):
            mask = rmask[:, None] & ((k0 + cols)[None, :] < K)
            x = tl.load(x_row + (k0 + cols)[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
            q = quantize_rtn(x, tl.broadcast_to(scale[:, None], x.shape))
            tl.store(q_row + (k0 + cols)[None, :], q, mask=mask)
    tl.store(s_ptr + rows, scale, mask=rmask)


def _launch_params(M: int, K: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps): ~8k elements per program on the GPU, larger tiles when interpreting."""
    block_k = triton.next_power_of_2(max(K, 1))
    if block_k > _MAX_BLOCK_K:
        block_k = min(_LOOP_BLOCK_K, _MAX_BLOCK_K)
    target = 65536 if interpreting() else 4096
    block_m = max(1, min(target // block_k, triton.next_power_of_2(max(M, 1))))
    warps = 16 if block_m * block_k >= 16384 else 8 if block_m * block_k >= 4096 else 4
    return block_m, block_k, warps


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_float(x)
    check_2d(x)
    check_device(x)
    M, K = x.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    scale = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M == 0:
        return q, scale
    if K == 0:
        return q, scale.fill_(1.0)
    block_m, block_k, warps = _launch_params(M, K)
    _rowwise_kernel[(triton.cdiv(M, block_m),)](
        x, q, scale, M, K, x.stride(0), x.stride(1),
        BLOCK_M=block_m, BLOCK_K=block_k, ONE_PASS=block_k >= K, num_warps=warps)
    return q, scale
