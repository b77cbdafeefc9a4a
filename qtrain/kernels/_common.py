"""Shared Triton helpers for the quantize kernels (the rules of :mod:`qtrain.quant.core`)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

TL_OUT = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(x: torch.Tensor) -> None:
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got device {x.device}")


@triton.jit
def load_tile(x_ptr, M, K, stride_m, stride_k, TM: tl.constexpr, TK: tl.constexpr):
    """The ``[TM, TK]`` tile of the 2-D ``x [M, K]`` (any strides) at ``(program_id(0), program_id(1))``, as fp32
    (0 outside ``x``): ``(rows, cols, mask, x)``."""
    rows = tl.program_id(0) * TM + tl.arange(0, TM)
    cols = tl.program_id(1) * TK + tl.arange(0, TK)
    mask, x = load_at(x_ptr, M, K, stride_m, stride_k, rows, cols)
    return rows, cols, mask, x


@triton.jit
def load_at(x_ptr, M, K, stride_m, stride_k, rows, cols):
    """``x[rows, cols]`` of the 2-D ``x [M, K]`` (any strides) as fp32, 0 outside ``x``: ``(mask, x)``."""
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_m + cols[None, :] * stride_k, mask=mask, other=0)
    return mask, x.to(tl.float32)


@triton.jit
def abs_bits(x):
    """|x| of an fp32 tensor as int32 bits. Non-negative floats order like their bits, and every NaN with its
    sign cleared sorts above +Inf, so an integer max of these is the absmax with NaN propagated."""
    return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def scale_from_bits(amax_bits):
    """fp32 scale from absmax bits: ``absmax / 127`` (IEEE), exactly 1.0 where absmax is 0."""
    amax = amax_bits.to(tl.float32, bitcast=True)
    scale = tl.math.div_rn(amax, tl.full(amax.shape, 127.0, tl.float32))
    return tl.where(amax_bits == 0, 1.0, scale)


# The GPU computes ``tl.fma`` with one rounding; Triton's interpreter as a product and a sum (two), which the exact
# division of :func:`quantize_rtn` cannot use: there it divides with ``div_rn`` (the same quotients).
FUSED_FMA = tl.constexpr(not interpreting())


@triton.jit
def divisor(scale):
    """``(d, inv, pre)`` of fp32 ``scale`` (any shape; > 0, Inf or NaN) for :func:`quantize_rtn`: ``pre`` is 2⁶⁴
    where ``scale < 2⁻¹⁰⁰`` (its reciprocal would overflow) and 1 elsewhere, ``d = scale·pre`` (exact) and
    ``inv = 1/d`` correctly rounded — computed once per block, broadcast over its elements."""
    pre = tl.where(scale < 7.888609052210118e-31, 18446744073709551616.0, 1.0)
    d = scale * pre
    return d, tl.math.div_rn(tl.full(d.shape, 1.0, tl.float32), d), pre


@triton.jit
def quantize_rtn(x, scale, inv=None, pre=None):
    """fp32 ``x / scale`` (IEEE) → int8: NaN → 0, clamp to ±127, round half to even. With ``(scale, inv, pre)``
    from :func:`divisor` (broadcast like ``x``) the quotient ``(x·pre)/d`` — the same IEEE quotient — comes
    from two multiplies and two fused multiply-adds instead of a divide per element: ``q₀ = x'·inv``,
    ``r = fma(−q₀, d, x')`` (exact), ``q = fma(r, inv, q₀)``, correctly rounded by Markstein's theorem (``inv``
    correctly rounded, ``q₀`` within an ulp; ``pre`` and ``|x'/d| ≤ 127`` keep every step in the normal range).
    Where the FMAs give NaN from finite ``x`` — ``d`` 0 (an absmax whose /127 underflows) or Inf — ``q₀ = x'·inv``
    is the quotient's value (±Inf, 0, NaN as ``x'/d``). tests/kernels/test_exact_division.py replays these steps in
    exact arithmetic against IEEE division on millions of adversarial quotients and the edge cases; the GPU tests
    check the kernels bit for bit."""
    if inv is None:
        v = tl.math.div_rn(x, scale)
    else:
        xs = x * pre
        if FUSED_FMA:
            q0 = xs * inv
            v = tl.fma(tl.fma(-q0, scale, xs), inv, q0)
            v = tl.where(v != v, q0, v)     # d = 0 (inv = Inf) or d = Inf (inv = 0): q₀ is x'/d's value
        else:
            v = tl.math.div_rn(xs, scale)
    v = tl.where(v != v, 0.0, v)
    v = tl.minimum(tl.maximum(v, -127.0), 127.0)
    return int8_of_rounded(v + 12582912.0)


@triton.jit
def quantize_rtn_rows(x, scale):
    """:func:`quantize_rtn` of ``x [R, C]`` with one scale per row (``scale [R]``), its :func:`divisor` taken
    once per row."""
    d, inv, pre = divisor(scale)
    return quantize_rtn(x, tl.broadcast_to(d[:, None], x.shape), tl.broadcast_to(inv[:, None], x.shape),
                        tl.broadcast_to(pre[:, None], x.shape))


@triton.jit
def int8_of_rounded(t):
    """int8 ``RNE(w)`` from ``t = w + 1.5·2²³`` (fp32, ``|w| ≤ 127.5``): the add rounds ``w`` to an integer and
    leaves it in the low bits of ``t``'s mantissa, so the low byte of its bits is the two's-complement code — no
    float→int conversion (F2I runs at 1/8 of the FMA rate on Hopper)."""
    return t.to(tl.int32, bitcast=True).to(tl.int8)


@triton.jit
def round_to_bf16(x):
    """fp32 rounded to the nearest bf16 value (ties to even), still in fp32, so the cast that follows is exact.
    The GPU's cast rounds the same way; Triton's interpreter truncates, and this keeps both bit-exact."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of program ``pid`` in grouped order: GROUP_M row tiles share each column tile while
    it sits in L2."""
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * grid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = min(grid_m - first_m, GROUP_M)
    return first_m + (pid % group_size) % rows_in_group, (pid % group_size) // rows_in_group
