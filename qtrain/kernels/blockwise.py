"""Block-wise INT8 quantization kernel (twin of :mod:`qtrain.quant.blockwise`).

``quantize_blockwise(x [M, K] float, r, c) -> (q [M, K] int8 contiguous, scale [⌈M/r⌉, ⌈K/c⌉] fp32)``: one
scale per ``r × c`` block, RTN, bit-exact with the reference. Each program quantizes a ``[TM, c]`` tile —
``TM / r`` blocks stacked along M, ~4k elements or one block if larger — read once: absmax per block, then
quantize. ``r`` and ``c`` are powers of two (``c`` ≤ 1024). Any strides (a transposed view gives the blocks of
the transpose, e.g. ``(128, 1)`` token blocks of an activation for the weight gradient), bf16/fp16/fp32 input.

``requantize_blockwise_t(q, scale, r_in, c_in, r, c)``: the blocks of ``dequantize(q, scale)ᵀ`` straight from
the INT8 codes (no float copy), bit-exact with the reference.

``quantize_blockwise_sr(x, r, c, seed [1] int tensor)``: the same scales (bit-exact), stochastic rounding
``floor(v + u)`` of ``v = x · (1/scale)`` with 16-bit uniforms ``u`` from Philox (``tl.randint4x``,
:data:`PHILOX_ROUNDS` rounds, eight uniforms per call: grouped along a tile's columns, or down its rows for a
transposed view) — the twin of the reference's SR in distribution (unbiased to within 2⁻¹⁷ of a step, every code
within one step of ``x / scale``), not bit for bit: the uniforms are another stream.

``quantize_blockwise_sr_dual(x [M, N], c, seed) -> (q, s, qt [N, M], st)``: the 1×c SR blocks of ``x`` and of
``xᵀ`` (c-token blocks, ``qt`` contiguous) from one read of ``x``: each program loads a ``[TM, c]`` tile (TM a
multiple of c), takes both absmaxes and stores both codes (``qt`` through ``tl.trans``). ``(q, s)`` are bit for bit
``quantize_blockwise_sr(x, 1, c, seed)``'s; ``qt``'s uniforms come from the Philox counters with the high offset
word 1 (the first direction's is 0), so the two roundings are independent. ``c`` a power of two ≤ 256.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qtrain.kernels._common import (abs_bits, check_device, divisor, int8_of_rounded, interpreting, load_tile,
                                   quantize_rtn, scale_from_bits)
from qtrain.quant.blockwise import check_block, check_requantize_args, check_seed
from qtrain.quant.core import check_2d, check_float

MAX_C = 1024
MAX_C_DUAL = 256
# Philox-4×32 rounds per call: 7 pass TestU01's BigCrush (Salmon et al. 2011, "Parallel random numbers: as easy as
# 1, 2, 3"; 10, Triton's default, adds a safety margin for general use). Rounding needs unbiased, uncorrelated
# uniforms, which the distributional tests check; 7 rounds cut the generator's instructions by 30 %.
PHILOX_ROUNDS = tl.constexpr(7)


@triton.jit
def quantize_sr(x, inv_scale, f):
    """fp32 ``x · inv_scale`` → int8 by stochastic rounding ``floor(v + u)`` with ``f = 1 + u``
    (:func:`sr_uniforms`); callers pass ``x·pre`` and ``inv`` of :func:`~qtrain.kernels._common.divisor` (a
    subnormal scale's reciprocal would overflow):
    NaN → 0, ``v`` clamped to ±127, then ``RNE(v + (f − 1.5))`` by the magic-number add (``f − 1.5`` is exact and
    ``u`` sits half a grid step off the grid ends, so no sum ties and ``floor(v + u)`` = that RNE). A multiply by
    the block's reciprocal scale instead of an IEEE divide, and no float↔int conversions: the kernel was bound by
    instruction issue, not memory (H200)."""
    v = x * inv_scale
    v = tl.where(v != v, 0.0, v)
    v = tl.minimum(tl.maximum(v, -127.0), 127.0)
    return int8_of_rounded((v + (f - 1.5)) + 12582912.0)


@triton.jit
def _u16(r, shift: tl.constexpr):
    """``1 + (k + ½)/2¹⁶`` in (1, 2) for the 16 bits ``k`` of ``r`` at ``shift``, assembled as fp32 bits (``k`` in
    the top 16 mantissa bits, ½ in the next): two integer ops instead of an int→float conversion."""
    r = r.to(tl.uint32, bitcast=True)
    if shift >= 7:
        m = (r >> (shift - 7)) & 0x7FFF80
    else:
        m = (r << (7 - shift)) & 0x7FFF80
    return (m | 0x3F800040).to(tl.float32, bitcast=True)


@triton.jit
def sr_uniforms(seed, rows, pid_k, n_block_cols, TM: tl.constexpr, C: tl.constexpr, STREAM: tl.constexpr = 0):
    """``[TM, C]`` fp32 ``1 + u`` for the tile of rows ``rows`` and block column ``pid_k``: 16-bit uniforms
    ``u = (k + ½)/2¹⁶``, eight per Philox call (``tl.randint4x`` with :data:`PHILOX_ROUNDS` rounds at the tile's
    8-column group index). 16 bits are plenty for rounding: ``P(round up) = frac(v)`` to within 2⁻¹⁷ of a step;
    one 32-bit ``tl.rand`` per element made the kernel compute-bound (15–20 % of copy bandwidth, H200).
    ``tl.rand`` per element where ``C < 8``. ``STREAM``: the high 32 bits of the Philox offsets (another stream of
    the same seed, e.g. a second rounding of the same elements)."""
    if C >= 8:
        groups = pid_k * (C // 8) + tl.arange(0, C // 8)
        off = rows[:, None] * (n_block_cols * (C // 8)) + groups[None, :]
        if STREAM != 0:
            off = off.to(tl.int64) + (STREAM << 32)
        r0, r1, r2, r3 = tl.randint4x(seed, off, PHILOX_ROUNDS)
        return tl.reshape(_eight(r0, r1, r2, r3), [TM, C])
    else:
        cols = pid_k * C + tl.arange(0, C)
        off = rows[:, None] * (n_block_cols * C) + cols[None, :]
        if STREAM != 0:
            off = off.to(tl.int64) + (STREAM << 32)
        return tl.rand(seed, off, PHILOX_ROUNDS) + 1.0


@triton.jit
def _uniforms_down(seed, pid_m, cols, n_row_groups, TM: tl.constexpr, C: tl.constexpr):
    """:func:`sr_uniforms` for a tile read down its columns (a transposed view: rows are the contiguous dim): one
    Philox call for 8 consecutive rows of one column, at counter ``col · n_row_groups + row group``, so each
    thread's uniforms lie along the rows it loaded (grouped along columns they had to cross threads through
    shared memory: 24 of the transposed kernel's 43 shared-memory stores). ``TM`` a multiple of 8."""
    groups = pid_m * (TM // 8) + tl.arange(0, TM // 8)
    r0, r1, r2, r3 = tl.randint4x(seed, cols[None, :] * n_row_groups + groups[:, None], PHILOX_ROUNDS)
    return tl.reshape(tl.permute(tl.reshape(_eight(r0, r1, r2, r3), [TM // 8, C, 8]), (0, 2, 1)), [TM, C])


@triton.jit
def _eight(r0, r1, r2, r3):
    """The eight 16-bit uniforms (as ``1 + u``) of one Philox call's four words, joined along three new last dims
    (``[..., 2, 2, 2]``)."""
    return tl.join(tl.join(tl.join(_u16(r0, 0), _u16(r0, 16)), tl.join(_u16(r1, 0), _u16(r1, 16))),
                   tl.join(tl.join(_u16(r2, 0), _u16(r2, 16)), tl.join(_u16(r3, 0), _u16(r3, 16))))


@triton.jit
def _rows_of(v, R: tl.constexpr, TM: tl.constexpr, C: tl.constexpr):
    """The ``[TM // R]`` per-block values ``v`` broadcast over their ``R × C`` blocks of a ``[TM, C]`` tile."""
    return tl.broadcast_to(tl.reshape(tl.broadcast_to(v[:, None], [TM // R, R]), [TM])[:, None], [TM, C])


@triton.jit
def _blockwise_kernel(x_ptr, q_ptr, s_ptr, seed_ptr, xs_ptr, M, K, stride_xm, stride_xk, stride_sm, stride_sk,
                      n_block_rows, n_block_cols, R: tl.constexpr, C: tl.constexpr, TM: tl.constexpr,
                      SR: tl.constexpr, XR: tl.constexpr, XC: tl.constexpr, SCALED_INPUT: tl.constexpr,
                      DOWN: tl.constexpr = False):
    """``SR``: stochastic rounding with uniforms from ``seed`` (:func:`sr_uniforms`, or :func:`_uniforms_down`
    with ``DOWN``: ``x`` a transposed view); else round to nearest.
    ``SCALED_INPUT``: ``x`` holds int8 codes whose value is ``x[i, j] · xs[i // XR, j // XC]`` (fp32); where a
    tile's rows lie in one scale row (``XR`` a multiple of ``TM``, as for the transposed INT8 X of wgrad) the
    scales are loaded once per column, not per element (a per-element gather of 4-byte scales cost more than
    the 1-byte codes)."""
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rows, cols, mask, x = load_tile(x_ptr, M, K, stride_xm, stride_xk, TM, C)
    if SCALED_INPUT:
        if XR % TM == 0:            # masked elements stay 0 (0 · an Inf scale would be NaN in the absmax)
            xs = tl.where(mask, tl.load(xs_ptr + ((pid_m * TM) // XR) * stride_sm + (cols // XC) * stride_sk,
                                        mask=cols < K, other=0.0)[None, :], 0.0)
        else:
            xs = tl.load(xs_ptr + (rows // XR)[:, None].to(tl.int64) * stride_sm + (cols // XC)[None, :] * stride_sk,
                         mask=mask, other=0.0)
        x = x * xs
    bits = tl.reshape(abs_bits(x), [TM // R, R, C])
    scale = scale_from_bits(tl.max(tl.max(bits, axis=2), axis=1))                     # [TM // R]
    d, inv, pre = divisor(scale)
    if SR:
        if DOWN:
            u = _uniforms_down(tl.load(seed_ptr), pid_m, cols, tl.cdiv(M, 8), TM, C)
        else:
            u = sr_uniforms(tl.load(seed_ptr), rows, pid_k, n_block_cols, TM, C)
        q = quantize_sr(x * _rows_of(pre, R, TM, C), _rows_of(inv, R, TM, C), u)
    else:
        q = quantize_rtn(x, _rows_of(d, R, TM, C), _rows_of(inv, R, TM, C), _rows_of(pre, R, TM, C))
    tl.store(q_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], q, mask=mask)
    brow = pid_m * (TM // R) + tl.arange(0, TM // R)
    tl.store(s_ptr + brow * n_block_cols + pid_k, scale, mask=brow < n_block_rows)


@triton.jit
def _blockwise_sr_dual_kernel(x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, seed_ptr, M, N, stride_xm, stride_xn,
                              n_block_rows, n_block_cols, C: tl.constexpr, TM: tl.constexpr):
    """The ``[TM, C]`` tile at ``(pid_m, pid_n)``: its ``TM`` row blocks (1×C, into ``q``/``s``) and its
    ``TM / C · C`` column blocks (C×1, into ``qt``/``st`` transposed: ``qt[n, m]``, ``st[n, m // C]``)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows, cols, mask, x = load_tile(x_ptr, M, N, stride_xm, stride_xn, TM, C)
    bits = abs_bits(x)
    seed = tl.load(seed_ptr)
    scale = scale_from_bits(tl.max(bits, axis=1))                                      # [TM]
    _, inv, pre = divisor(scale)
    q = quantize_sr(x * pre[:, None], tl.broadcast_to(inv[:, None], x.shape),
                    sr_uniforms(seed, rows, pid_n, n_block_cols, TM, C))
    tl.store(q_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], q, mask=mask)
    tl.store(s_ptr + rows * n_block_cols + pid_n, scale, mask=rows < M)
    scale_t = scale_from_bits(tl.max(tl.reshape(bits, [TM // C, C, C]), axis=1))     # [TM // C, C]
    col_scale = tl.reshape(tl.broadcast_to(scale_t[:, None, :], [TM // C, C, C]), [TM, C])
    _, inv_t, pre_t = divisor(col_scale)
    qt = quantize_sr(x * pre_t, inv_t, sr_uniforms(seed, rows, pid_n, n_block_cols, TM, C, 1))
    tl.store(qt_ptr + cols[:, None].to(tl.int64) * M + rows[None, :], tl.trans(qt),
             mask=(cols[:, None] < N) & (rows[None, :] < M))
    brow = pid_m * (TM // C) + tl.arange(0, TM // C)
    tl.store(st_ptr + cols[None, :] * n_block_rows + brow[:, None], scale_t,
             mask=(brow[:, None] < n_block_rows) & (cols[None, :] < N))


def quantize_blockwise(x: torch.Tensor, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x, r, c, None)


def quantize_blockwise_sr(x: torch.Tensor, r: int, c: int, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_seed(seed)
    return _launch(x, r, c, seed)


def requantize_blockwise_t(q: torch.Tensor, scale: torch.Tensor, r_in: int, c_in: int, r: int,
                           c: int) -> tuple[torch.Tensor, torch.Tensor]:
    check_requantize_args(q, scale, r_in, c_in)
    check_device(q)
    # element (i, j) of qᵀ is q[j, i], whose scale is scale[j // r_in, i // c_in] = scaleᵀ[i // c_in, j // r_in]
    return _launch(q.t(), r, c, None, (scale.t(), c_in, r_in))


def quantize_blockwise_sr_dual(x: torch.Tensor, c: int, seed: torch.Tensor, config: tuple[int, int] | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``config``: ``(TM, num_warps)`` instead of :func:`dual_launch_config`'s (TM a power of two ≥ ``c``)."""
    check_seed(seed)
    check_float(x)
    check_2d(x)
    check_block(1, c)
    check_device(x)
    if c & (c - 1) or c > MAX_C_DUAL:
        raise ValueError(f"the dual SR blockwise kernel takes a power-of-two c ≤ {MAX_C_DUAL}, got {c}; use the "
                         "reference (qtrain.ops backend 'reference') for others")
    M, N = x.shape
    nbm, nbn = -(-M // c), -(-N // c)
    q = torch.empty((M, N), dtype=torch.int8, device=x.device)
    s = torch.empty((M, nbn), dtype=torch.float32, device=x.device)
    qt = torch.empty((N, M), dtype=torch.int8, device=x.device)
    st = torch.empty((N, nbm), dtype=torch.float32, device=x.device)
    if M == 0 or N == 0:
        return q, s.fill_(1.0), qt, st.fill_(1.0)
    tm, warps = config or dual_launch_config(M, c)
    if tm % c or tm & (tm - 1):
        raise ValueError(f"dual blockwise tile rows {tm} must be a power of two and a multiple of c = {c}")
    seed = seed.reshape(1).to(device=x.device, dtype=torch.int64)
    _blockwise_sr_dual_kernel[(triton.cdiv(M, tm), nbn)](x, q, s, qt, st, seed, M, N, x.stride(0), x.stride(1),
                                                         nbm, nbn, C=c, TM=tm, num_warps=warps)
    return q, s, qt, st


def dual_launch_config(M: int, c: int) -> tuple[int, int]:
    """``(TM, num_warps)`` of the dual kernel's default tiling: ``[TM, c]`` tiles of ~8k elements, at least one
    ``c × c`` tile (16k for c = 128, 64k for c = 256); 16 warps from 16k elements (the single SR kernel spilled
    registers at 16k-element tiles with 4 warps and ran 10× slower; not yet measured for this kernel)."""
    target = 65536 if interpreting() else 8192
    tm = max(c, min(target // c, triton.next_power_of_2(M)))
    return tm, 16 if tm * c >= 16384 else 8 if tm * c >= 8192 else 4


def launch_config(M: int, r: int, c: int, transposed: bool = False, elem_size: int = 4) -> tuple[int, int]:
    """``(TM, num_warps)`` of the default tiling: ``[TM, c]`` tiles of ~4k elements (one block if larger), 8 warps
    from 8k elements — except on a transposed view (``x``'s rows contiguous) with ``c`` ≥ 256, measured on the
    H200 (``benchmarks/results/2026-12-02-h200-blockwise-sweep-256.md``): 16-bit input in 32-row tiles (64 bytes
    down each column, 8k elements) and INT8 codes (the re-blocking of saved X) with 4 warps, 7-9 % and 15-19 %
    faster than the general rule. A two-pass kernel reading such tiles in 4k-element chunks was slower there in
    every case and was dropped."""
    target = 65536 if interpreting() else 4096
    tm = max(r, min(target // c, triton.next_power_of_2(M)))
    if transposed and c >= 256 and not interpreting():
        if elem_size == 2 and r == 1:
            return min(32, triton.next_power_of_2(M)), 4
        if elem_size == 1:
            return tm, 4
    return tm, 8 if tm * c >= 8192 else 4


def _launch(x, r, c, seed, input_scale=None, config=None):
    """``config``: ``(TM, num_warps)`` instead of :func:`launch_config`'s (benchmarks/blockwise_sweep.py)."""
    if input_scale is None:
        check_float(x)
    check_2d(x)
    check_block(r, c)
    check_device(x)
    if r & (r - 1) or c & (c - 1) or c > MAX_C:
        raise ValueError(f"the blockwise kernel takes power-of-two blocks with c ≤ {MAX_C}, got ({r}, {c}); "
                         "use the reference (qtrain.ops backend 'reference') for others")
    M, K = x.shape
    nr, nc = -(-M // r), -(-K // c)
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    scale = torch.empty((nr, nc), dtype=torch.float32, device=x.device)
    if M == 0 or K == 0:
        return q, scale.fill_(1.0)
    transposed = x.stride(0) == 1 and x.stride(1) != 1
    tm, warps = config or launch_config(M, r, c, transposed, x.element_size())
    if tm % r or tm & (tm - 1):
        raise ValueError(f"blockwise tile rows {tm} must be a power of two and a multiple of r = {r}")
    if seed is not None:
        seed = seed.reshape(1).to(device=x.device, dtype=torch.int64)
    xs, xr, xc = input_scale if input_scale is not None else (scale, 1, 1)
    _blockwise_kernel[(triton.cdiv(M, tm), nc)](x, q, scale, seed if seed is not None else scale, xs, M, K,
                                                x.stride(0), x.stride(1), xs.stride(0), xs.stride(1), nr, nc,
                                                R=r, C=c, TM=tm, SR=seed is not None, XR=xr, XC=xc,
                                                SCALED_INPUT=input_scale is not None, num_warps=warps,
                                                DOWN=seed is not None and transposed and tm % 8 == 0)
    return q, scale
