"""Tensor-wise INT8 quantization kernel emitting both orientations (twin of :mod:`qtrain.quant.tensorwise`).

``quantize_tensorwise(w [N, K] float) -> (q [N, K] int8, qt [K, N] int8, scale [] fp32)``: one scale, RTN,
bit-exact with the reference; ``qt`` is ``q.t()`` stored contiguous. Two launches: an absmax pass (one atomic
integer max of ``|w|``'s bits per tile, NaN-propagating) and a quantize pass that writes each tile twice,
as is and transposed. Any strides, bf16/fp16/fp32 input.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qtrain.kernels._common import abs_bits, check_device, divisor, interpreting, quantize_rtn, scale_from_bits
from qtrain.quant.core import check_2d, check_float


@triton.jit
def _amax_kernel(w_ptr, amax_ptr, N, K, stride_n, stride_k, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    w = tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_n + rk[None, :] * stride_k, mask=mask, other=0.0)
    tl.atomic_max(amax_ptr, tl.max(tl.max(abs_bits(w.to(tl.float32)), axis=1), axis=0))


@triton.jit
def _quant_kernel(w_ptr, amax_ptr, q_ptr, qt_ptr, s_ptr, N, K, stride_n, stride_k,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    scale = scale_from_bits(tl.load(amax_ptr))
    w = tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_n + rk[None, :] * stride_k, mask=mask, other=0.0)
    w = w.to(tl.float32)
    d, inv, pre = divisor(scale)                                    # the tensor's one scale
    q = quantize_rtn(w, tl.full(w.shape, d, tl.float32), tl.full(w.shape, inv, tl.float32),
                     tl.full(w.shape, pre, tl.float32))
    tl.store(q_ptr + rn[:, None].to(tl.int64) * K + rk[None, :], q, mask=mask)
    tl.store(qt_ptr + rk[:, None].to(tl.int64) * N + rn[None, :], tl.trans(q), mask=tl.trans(mask))
    if (pid_n == 0) & (pid_k == 0):
        tl.store(s_ptr, scale)


def quantize_tensorwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_float(w)
    check_2d(w)
    check_device(w)
    N, K = w.shape
    q = torch.empty((N, K), dtype=torch.int8, device=w.device)
    qt = torch.empty((K, N), dtype=torch.int8, device=w.device)
    scale = torch.empty((), dtype=torch.float32, device=w.device)
    if w.numel() == 0:
        return q, qt, scale.fill_(1.0)
    amax = torch.zeros((), dtype=torch.int32, device=w.device)
    bn, bk = (128, 256) if interpreting() else (64, 256)
    _amax_kernel[(triton.cdiv(N, bn), triton.cdiv(K, bk))](
        w, amax, N, K, w.stride(0), w.stride(1), BLOCK_N=bn, BLOCK_K=bk, num_warps=8)
    bn, bk = (128, 256) if interpreting() else (64, 64)
    _quant_kernel[(triton.cdiv(N, bn), triton.cdiv(K, bk))](
        w, amax, q, qt, scale, N, K, w.stride(0), w.stride(1), BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
    return q, qt, scale
