"""Row-wise INT8 quantization kernel (twin of :mod:`qtrain.quant.rowwise`).

``quantize_rowwise(x [M, K] float) -> (q [M, K] int8 contiguous, scale [M] fp32)``: one scale per row, RTN,
bit-exact with the reference. Any strides (the kernel reads through them; no copy), bf16/fp16/fp32 input.

Rows up to ``_MAX_ONE_PASS_K`` long are read once in one power-of-two tile. Longer rows are read twice in
chunks (absmax, then quantize; the second read mostly hits L2). Measured on the H100
(``benchmarks/logs/2026-11-25-h100/rowwise-sweep.log``): register-resident tiles wider than 4096 lose occupancy
and run at 42–56 % of copy bandwidth, while the two-pass loop reaches 70–75 %; the chunk width follows K.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from qtrain.kernels._common import abs_bits, check_device, interpreting, quantize_rtn_rows, scale_from_bits
from qtrain.quant.core import check_2d, check_float

_MAX_ONE_PASS_K = 4096


@triton.jit
def _quantize_tile(x_row, q_row, k0, cols, K, stride_xk, rmask, scale):
    mask = rmask[:, None] & ((k0 + cols)[None, :] < K)
    x = tl.load(x_row + (k0 + cols)[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
    tl.store(q_row + (k0 + cols)[None, :], quantize_rtn_rows(x, scale), mask=mask)


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
        tl.store(q_row + cols[None, :], quantize_rtn_rows(x, scale), mask=mask)
    else:
        amax = tl.zeros([BLOCK_M], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            mask = rmask[:, None] & ((k0 + cols)[None, :] < K)
            x = tl.load(x_row + (k0 + cols)[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(abs_bits(x), axis=1))
        scale = scale_from_bits(amax)
        for k0 in range(0, K, BLOCK_K):
            _quantize_tile(x_row, q_row, k0, cols, K, stride_xk, rmask, scale)
    tl.store(s_ptr + rows, scale, mask=rmask)


class LaunchConfig(NamedTuple):
    block_m: int
    block_k: int
    one_pass: bool
    num_warps: int


def launch_config(M: int, K: int) -> LaunchConfig:
    """Tiles for an [M, K] input: one pass up to 4096, then 2048/4096/8192-wide chunks (H100 sweep's best);
    ~4k elements per program on the GPU, larger tiles when interpreting."""
    if K <= _MAX_ONE_PASS_K:
        block_k, one_pass = triton.next_power_of_2(K), True
    else:
        block_k, one_pass = (2048 if K < 8192 else 4096 if K <= 16384 else 8192), False
    target = 65536 if interpreting() else 4096
    block_m = max(1, min(target // block_k, triton.next_power_of_2(M)))
    tile = block_m * block_k
    warps = 8 if tile >= 4096 else 4
    return LaunchConfig(block_m, block_k, one_pass, warps)


def quantize_rowwise(x: torch.Tensor, config: LaunchConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``config`` overrides :func:`launch_config` (benchmarks sweep it): powers of two, covering K in one pass."""
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
    c = config or launch_config(M, K)
    if c.one_pass and c.block_k < K:
        raise ValueError(f"one-pass config {c} does not cover rows of {K} elements")
    _rowwise_kernel[(triton.cdiv(M, c.block_m),)](
        x, q, scale, M, K, x.stride(0), x.stride(1),
        BLOCK_M=c.block_m, BLOCK_K=c.block_k, ONE_PASS=c.one_pass, num_warps=c.num_warps)
    return q, scale
