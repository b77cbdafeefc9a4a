"""Fused block-Hadamard transform + INT4 quantization (twin of :mod:`qtrain.quant.hadamard`, same contracts).

One program per tile of ``BM`` rows × one Hadamard block of ``b`` columns: the tile is read once (any strides,
bf16/fp16/fp32, zero beyond ``K``), transformed in registers by the same butterfly as the reference
(``log2(b)`` stages of ``(u + v, u − v)``, then ``·1/√b``), and written as fp32 (:func:`block_hadamard`) or as
INT4 codes in int8 with a per-tensor step (:func:`hadamard_quantize_int4`: ``x/step`` with IEEE division, NaN →
0, clamp ±7, round half to even). Bit-exact with the reference: multiply-add contraction is off.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qtrain.kernels._common import check_device, interpreting, load_tile
from qtrain.quant.core import check_2d, check_float
from qtrain.quant.hadamard import check_hadamard_block, check_step, inv_sqrt


@triton.jit
def _hadamard_kernel(x_ptr, step_ptr, out_ptr, M, K, KP, stride_m, stride_k, inv,
                     B: tl.constexpr, LOG_B: tl.constexpr, BM: tl.constexpr, QUANTIZE: tl.constexpr):
    rows, cols, _, x = load_tile(x_ptr, M, K, stride_m, stride_k, BM, B)
    for s in tl.static_range(LOG_B):
        v = tl.permute(tl.reshape(x, [BM, B >> (s + 1), 2, 1 << s]), [0, 1, 3, 2])
        u, w = tl.split(v)
        v = tl.permute(tl.join(u + w, u - w), [0, 1, 3, 2])
        x = tl.reshape(v, [BM, B])
    x = x * inv
    out_offs = rows[:, None].to(tl.int64) * KP + cols[None, :]
    out_mask = (rows[:, None] < M) & (cols[None, :] < KP)
    if QUANTIZE:
        step = tl.load(step_ptr)
        q = tl.math.div_rn(x, tl.full(x.shape, 1.0, tl.float32) * step)
        q = tl.where(q != q, 0.0, q)
        q = tl.minimum(tl.maximum(q, -7.0), 7.0)
        q = (q + 12582912.0) - 12582912.0
        tl.store(out_ptr + out_offs, q.to(tl.int8), mask=out_mask)
    else:
        tl.store(out_ptr + out_offs, x, mask=out_mask)


def _launch(x: torch.Tensor, b: int, step: torch.Tensor | None) -> torch.Tensor:
    check_float(x)
    check_2d(x)
    check_hadamard_block(b)
    check_device(x)
    M, K = x.shape
    KP = -(-K // b) * b
    out = torch.empty((M, KP), dtype=torch.int8 if step is not None else torch.float32, device=x.device)
    if out.numel() == 0:
        return out
    if step is not None:
        check_step(step)
        if step.device != x.device:
            raise ValueError(f"step is on {step.device} but x on {x.device}")
    bm = 64 if interpreting() else max(1, 4096 // b)
    _hadamard_kernel[(triton.cdiv(M, bm), KP // b)](
        x, step if step is not None else out, out, M, K, KP, x.stride(0), x.stride(1), inv_sqrt(b),
        B=b, LOG_B=b.bit_length() - 1, BM=bm, QUANTIZE=step is not None, num_warps=4, enable_fp_fusion=False)
    return out


def block_hadamard(x: torch.Tensor, b: int) -> torch.Tensor:
    return _launch(x, b, None)


def hadamard_quantize_int4(x: torch.Tensor, b: int, step: torch.Tensor) -> torch.Tensor:
    check_step(step)
    return _launch(x, b, step.reshape(()).contiguous())
