"""INT8 data-flow kernels: norm + quantize and activation + quantize, INT8 blocks in and out (twin of
:mod:`qtrain.quant.dataflow`: same names, same contracts).

Norms: each program owns ``TM`` rows (a multiple of ``r``) and walks the features in ``c``-wide chunks — one
pass for ``Σx²`` (RMSNorm) or two for the mean and the centred ``Σ(x − mean)²`` (LayerNorm), then one that
normalizes, takes each ``r × c`` block's absmax and writes the INT8 codes and scales; the INT8 input is read
2–3 times, nothing 16-bit is written. Activations: each program owns a ``[TM, c]`` output tile (SwiGLU reads
the gate at column ``j`` and the up projection at ``F + j`` of the ``[M, 2F]`` input, each with its block's
scale; ``quantize_swiglu``/``quantize_gelu``: the same tiles from float ``h``, its blocks quantized and stored on the
way in). Activation backward: the same ``[TM, c]`` tiles, INT8 ``h`` and INT8 gradient in, fp32 ``dh`` out (for
SwiGLU both halves of the tile's columns). ``r`` and ``c`` are powers of two.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qtrain.kernels._common import (abs_bits, check_device, interpreting, quantize_rtn_rows, round_to_bf16,
                                   scale_from_bits)
from qtrain.quant.dataflow import (_check_backward, _check_norm_backward, _check_out_dtype, check_int8_blocks,
                                  check_quantize_act, check_vector)


@triton.jit
def _deq_chunk(q_ptr, s_ptr, rows, cols, rmask, K, nkb, kb, R: tl.constexpr):
    mask = rmask[:, None] & (cols[None, :] < K)
    q = tl.load(q_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=mask, other=0).to(tl.float32)
    s = tl.load(s_ptr + (rows // R) * nkb + kb, mask=rmask, other=0.0)
    return q * s[:, None], mask


@triton.jit
def _store_blocks(y, yq_ptr, ys_ptr, rows, cols, mask, K, n_block_rows, nkb, pid_m, kb,
                  R: tl.constexpr, C: tl.constexpr, TM: tl.constexpr):
    """Quantize the fp32 ``[TM, C]`` tile ``y`` in ``R × C`` blocks (RTN) and store codes and scales; returns the
    dequantized tile (``q · scale``, as a reader of the stored blocks computes it)."""
    y = tl.where(mask, y, 0.0)
    bits = tl.reshape(abs_bits(y), [TM // R, R, C])
    scale = scale_from_bits(tl.max(tl.max(bits, axis=2), axis=1))
    row_scale = tl.reshape(tl.broadcast_to(scale[:, None], [TM // R, R]), [TM])
    q = quantize_rtn_rows(y, row_scale)
    tl.store(yq_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], q, mask=mask)
    brow = pid_m * (TM // R) + tl.arange(0, TM // R)
    tl.store(ys_ptr + brow * nkb + kb, scale, mask=brow < n_block_rows)
    return q.to(tl.float32) * row_scale[:, None]


@triton.jit
def _moments(xq_ptr, xs_ptr, rows, rmask, K, nkb, eps, R: tl.constexpr, C: tl.constexpr, TM: tl.constexpr,
             LAYERNORM: tl.constexpr):
    """Per row ``(mean, rstd)`` of the INT8 ``x``: one pass for ``Σx²`` (RMSNorm: mean 0) or two for the mean and
    the centred ``Σ(x − mean)²`` (LayerNorm)."""
    acc = tl.zeros([TM], dtype=tl.float32)
    for kb in range(0, nkb):
        cols = kb * C + tl.arange(0, C)
        x, mask = _deq_chunk(xq_ptr, xs_ptr, rows, cols, rmask, K, nkb, kb, R)
        if LAYERNORM:
            acc += tl.sum(x, axis=1)
        else:
            acc += tl.sum(x * x, axis=1)
    if LAYERNORM:
        mean = tl.math.div_rn(acc, tl.full([TM], K, tl.float32).to(tl.float32))
        acc2 = tl.zeros([TM], dtype=tl.float32)
        for kb in range(0, nkb):
            cols = kb * C + tl.arange(0, C)
            x, mask = _deq_chunk(xq_ptr, xs_ptr, rows, cols, rmask, K, nkb, kb, R)
            d = tl.where(mask, x - mean[:, None], 0.0)
            acc2 += tl.sum(d * d, axis=1)
        var = tl.math.div_rn(acc2, tl.full([TM], K, tl.float32))
    else:
        mean = tl.zeros([TM], dtype=tl.float32)
        var = tl.math.div_rn(acc, tl.full([TM], K, tl.float32))
    rstd = tl.math.div_rn(tl.full([TM], 1.0, tl.float32), tl.sqrt_rn(var + eps))
    return mean, rstd


@triton.jit
def _norm_kernel(xq_ptr, xs_ptr, w_ptr, b_ptr, yq_ptr, ys_ptr, M, K, nkb, n_block_rows, eps,
                 R: tl.constexpr, C: tl.constexpr, TM: tl.constexpr, LAYERNORM: tl.constexpr,
                 HAS_BIAS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * TM + tl.arange(0, TM)
    rmask = rows < M
    mean, rstd = _moments(xq_ptr, xs_ptr, rows, rmask, K, nkb, eps, R, C, TM, LAYERNORM)
    for kb in range(0, nkb):
        cols = kb * C + tl.arange(0, C)
        x, mask = _deq_chunk(xq_ptr, xs_ptr, rows, cols, rmask, K, nkb, kb, R)
        w = tl.load(w_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        y = (x - mean[:, None]) * rstd[:, None] * w[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)[None, :]
        _store_blocks(y, yq_ptr, ys_ptr, rows, cols, mask, K, n_block_rows, nkb, pid, kb, R, C, TM)


@triton.jit
def _block_scales(s_ptr, rows, cols, rmask, mask, first_col, nkb, R: tl.constexpr, C: tl.constexpr,
                  ALIGNED: tl.constexpr):
    """The ``[TM, C]`` tile's scales of the ``r × C`` blocks of columns ``cols`` (``first_col + j``): one load per
    row where the tile starts on a block boundary (``ALIGNED``: its columns lie in one block), else per element."""
    if ALIGNED:
        s = tl.load(s_ptr + (rows // R) * nkb + first_col // C, mask=rmask, other=0.0)[:, None]
    else:
        s = tl.load(s_ptr + (rows // R)[:, None] * nkb + (cols // C)[None, :], mask=mask, other=0.0)
    return s


@triton.jit
def _act_kernel(hq_ptr, hs_ptr, aq_ptr, as_ptr, M, F, K_in, nkb_in, nkb_out, n_block_rows,
                R: tl.constexpr, C: tl.constexpr, TM: tl.constexpr, SWIGLU: tl.constexpr,
                UP_ALIGNED: tl.constexpr):
    """``UP_ALIGNED``: ``F`` is a multiple of ``C`` (the up half's tiles start on block boundaries too)."""
    pid_m, kb = tl.program_id(0), tl.program_id(1)
    rows = pid_m * TM + tl.arange(0, TM)
    cols = kb * C + tl.arange(0, C)
    rmask = rows < M
    mask = rmask[:, None] & (cols[None, :] < F)
    rows64 = rows[:, None].to(tl.int64) * K_in
    g = tl.load(hq_ptr + rows64 + cols[None, :], mask=mask, other=0).to(tl.float32) * \
        _block_scales(hs_ptr, rows, cols, rmask, mask, kb * C, nkb_in, R, C, True)
    if SWIGLU:
        ucols = cols + F
        u = tl.load(hq_ptr + rows64 + ucols[None, :], mask=mask, other=0).to(tl.float32) * \
            _block_scales(hs_ptr, rows, ucols, rmask, mask, kb * C + F, nkb_in, R, C, UP_ALIGNED)
        a = g * _sigmoid(g) * u
    else:
        a = _gelu(g)
    _store_blocks(a, aq_ptr, as_ptr, rows, cols, mask, F, n_block_rows, nkb_out, pid_m, kb, R, C, TM)


@triton.jit
def _gelu(g):
    """tanh GELU of fp32 ``g`` with one exp (``tanh`` from ``e^(−2|u|)``, no overflow)."""
    inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
    e = tl.exp(-2.0 * tl.abs(inner))
    t = (1.0 - e) / (1.0 + e)
    return 0.5 * g * (1.0 + tl.where(inner >= 0, t, -t))


@triton.jit
def _quantize_act_kernel(h_ptr, hq_ptr, hs_ptr, aq_ptr, as_ptr, M, F, K_in, stride_hm, nkb_in, nkb_out,
                         n_block_rows, R: tl.constexpr, C: tl.constexpr, TM: tl.constexpr, SWIGLU: tl.constexpr):
    """:func:`_act_kernel` on float ``h``: the tile's ``R × C`` blocks of ``h`` (gate and, for SwiGLU, up at
    ``F + j``; ``F % C == 0``) quantized and stored as ``hq``/``hs``, their dequantized values into the
    activation, as the two-op path computes them."""
    pid_m, kb = tl.program_id(0), tl.program_id(1)
    rows = pid_m * TM + tl.arange(0, TM)
    cols = kb * C + tl.arange(0, C)
    mask = (rows < M)[:, None] & (cols[None, :] < F)
    rows64 = rows[:, None].to(tl.int64) * stride_hm
    g = tl.load(h_ptr + rows64 + cols[None, :], mask=mask, other=0).to(tl.float32)
    g = _store_blocks(g, hq_ptr, hs_ptr, rows, cols, mask, K_in, n_block_rows, nkb_in, pid_m, kb, R, C, TM)
    if SWIGLU:
        u = tl.load(h_ptr + rows64 + (cols + F)[None, :], mask=mask, other=0).to(tl.float32)
        u = _store_blocks(u, hq_ptr, hs_ptr, rows, cols + F, mask, K_in, n_block_rows, nkb_in, pid_m, kb + F // C,
                          R, C, TM)
        a = g * _sigmoid(g) * u
    else:
        a = _gelu(g)
    _store_blocks(a, aq_ptr, as_ptr, rows, cols, mask, F, n_block_rows, nkb_out, pid_m, kb, R, C, TM)


@triton.jit
def _sigmoid(x):
    """One division: ``1/(1 + e)`` and ``e·1/(1 + e)`` with ``e = exp(−|x|)`` (no overflow)."""
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    return tl.where(x >= 0, r, e * r)


@triton.jit
def _act_bwd_kernel(hq_ptr, hs_ptr, gq_ptr, gs_ptr, dh_ptr, M, F, K_in, nkb_in, nkb_g,
                    R: tl.constexpr, C: tl.constexpr, TM: tl.constexpr, SWIGLU: tl.constexpr, BF16: tl.constexpr,
                    UP_ALIGNED: tl.constexpr):
    """``dh`` of the activation for the ``[TM, C]`` tile of output columns ``cols`` (SwiGLU: gate ``cols`` and
    up ``F + cols`` of ``h`` and ``dh``); ``BF16``: ``dh`` stored rounded to bf16; ``UP_ALIGNED`` as in
    :func:`_act_kernel`."""
    pid_m, kb = tl.program_id(0), tl.program_id(1)
    rows = pid_m * TM + tl.arange(0, TM)
    cols = kb * C + tl.arange(0, C)
    rmask = rows < M
    mask = rmask[:, None] & (cols[None, :] < F)
    rows_in = rows[:, None].to(tl.int64) * K_in
    g = tl.load(gq_ptr + rows[:, None].to(tl.int64) * F + cols[None, :], mask=mask, other=0).to(tl.float32) * \
        _block_scales(gs_ptr, rows, cols, rmask, mask, kb * C, nkb_g, R, C, True)
    h = tl.load(hq_ptr + rows_in + cols[None, :], mask=mask, other=0).to(tl.float32) * \
        _block_scales(hs_ptr, rows, cols, rmask, mask, kb * C, nkb_in, R, C, True)
    if SWIGLU:
        ucols = cols + F
        u = tl.load(hq_ptr + rows_in + ucols[None, :], mask=mask, other=0).to(tl.float32) * \
            _block_scales(hs_ptr, rows, ucols, rmask, mask, kb * C + F, nkb_in, R, C, UP_ALIGNED)
        sig = _sigmoid(h)
        tl.store(dh_ptr + rows_in + cols[None, :], _out(g * u * sig * (1.0 + h * (1.0 - sig)), BF16), mask=mask)
        tl.store(dh_ptr + rows_in + ucols[None, :], _out(g * (h * sig), BF16), mask=mask)
    else:
        inner = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        s, sn = _sigmoid(2.0 * inner), _sigmoid(-2.0 * inner)          # ½(1 + tanh), ½(1 − tanh)
        d = s + 2.0 * h * s * sn * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * h * h)
        tl.store(dh_ptr + rows_in + cols[None, :], _out(g * d, BF16), mask=mask)


@triton.jit
def _out(v, BF16: tl.constexpr):
    """fp32 ``v`` as stored: rounded to bf16 (ties to even, as the reference's cast) where ``BF16``."""
    if BF16:
        v = round_to_bf16(v).to(tl.bfloat16)
    return v


@triton.jit
def _norm_bwd_kernel(xq_ptr, xs_ptr, w_ptr, gq_ptr, gs_ptr, dx_ptr, dwp_ptr, dbp_ptr, M, K, nkb, eps,
                     R: tl.constexpr, C: tl.constexpr, TM: tl.constexpr, LAYERNORM: tl.constexpr):
    """dx of the program's ``TM`` rows and its partial sums over them of ``g·x̂`` (and ``g``) per feature."""
    pid = tl.program_id(0)
    rows = pid * TM + tl.arange(0, TM)
    rmask = rows < M
    mean, rstd = _moments(xq_ptr, xs_ptr, rows, rmask, K, nkb, eps, R, C, TM, LAYERNORM)
    dot = tl.zeros([TM], dtype=tl.float32)                            # Σ_k g·w·x̂
    gsum = tl.zeros([TM], dtype=tl.float32)                           # Σ_k g·w (LayerNorm)
    for kb in range(0, nkb):
        cols = kb * C + tl.arange(0, C)
        x, mask = _deq_chunk(xq_ptr, xs_ptr, rows, cols, rmask, K, nkb, kb, R)
        g, _ = _deq_chunk(gq_ptr, gs_ptr, rows, cols, rmask, K, nkb, kb, R)
        gw = g * tl.load(w_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)[None, :]
        dot += tl.sum(gw * tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0), axis=1)
        if LAYERNORM:
            gsum += tl.sum(gw, axis=1)
    kf = tl.full([TM], K, tl.float32)
    dot = tl.math.div_rn(dot, kf)
    if LAYERNORM:
        gsum = tl.math.div_rn(gsum, kf)
    for kb in range(0, nkb):
        cols = kb * C + tl.arange(0, C)
        x, mask = _deq_chunk(xq_ptr, xs_ptr, rows, cols, rmask, K, nkb, kb, R)
        g, _ = _deq_chunk(gq_ptr, gs_ptr, rows, cols, rmask, K, nkb, kb, R)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        gw = g * tl.load(w_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)[None, :]
        if LAYERNORM:
            gw = gw - gsum[:, None]
        dx = rstd[:, None] * (gw - xhat * dot[:, None])
        tl.store(dx_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], dx, mask=mask)
        tl.store(dwp_ptr + pid * K + cols, tl.sum(g * xhat, axis=0), mask=cols < K)
        if LAYERNORM:
            tl.store(dbp_ptr + pid * K + cols, tl.sum(g, axis=0), mask=cols < K)


@triton.jit
def _norm_bwd_rows_kernel(xq_ptr, xs_ptr, w_ptr, gq_ptr, gs_ptr, dx_ptr, dwp_ptr, dbp_ptr, M, K, nkb, eps,
                          R: tl.constexpr, C: tl.constexpr, NB: tl.constexpr, TM: tl.constexpr,
                          STEPS: tl.constexpr, LAYERNORM: tl.constexpr):
    """:func:`_norm_bwd_kernel` with whole rows in registers: ``STEPS`` groups of ``TM`` rows, each loaded once as
    ``[TM, NB, C]`` (``NB`` ≥ ⌈K/C⌉ blocks, a power of two; one scale per row and block) — no second and third
    pass over the features; the program's partial sums of ``g·x̂`` (and ``g``) per feature over its rows."""
    pid = tl.program_id(0)
    blocks = tl.arange(0, NB)
    cols = blocks[:, None] * C + tl.arange(0, C)[None, :]                         # [NB, C]
    cmask = cols < K
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :, :]
    kf = tl.full([TM], K, tl.float32)
    dw = tl.zeros([NB, C], dtype=tl.float32)
    db = tl.zeros([NB, C], dtype=tl.float32)
    for step in range(STEPS):
        rows = (pid * STEPS + step) * TM + tl.arange(0, TM)
        rmask = rows < M
        mask = rmask[:, None, None] & cmask[None, :, :]
        soff = (rows // R)[:, None] * nkb + blocks[None, :]
        smask = rmask[:, None] & (blocks < nkb)[None, :]
        off = rows[:, None, None].to(tl.int64) * K + cols[None, :, :]
        x = tl.where(mask, tl.load(xq_ptr + off, mask=mask, other=0).to(tl.float32)
                     * tl.load(xs_ptr + soff, mask=smask, other=0.0)[:, :, None], 0.0)
        g = tl.where(mask, tl.load(gq_ptr + off, mask=mask, other=0).to(tl.float32)
                     * tl.load(gs_ptr + soff, mask=smask, other=0.0)[:, :, None], 0.0)
        if LAYERNORM:
            mean = tl.math.div_rn(tl.sum(tl.sum(x, axis=2), axis=1), kf)
            x = tl.where(mask, x - mean[:, None, None], 0.0)
        var = tl.math.div_rn(tl.sum(tl.sum(x * x, axis=2), axis=1), kf)
        rstd = tl.math.div_rn(tl.full([TM], 1.0, tl.float32), tl.sqrt_rn(var + eps))
        xhat = x * rstd[:, None, None]
        gw = g * w
        dot = tl.math.div_rn(tl.sum(tl.sum(gw * xhat, axis=2), axis=1), kf)
        if LAYERNORM:
            gw = gw - tl.math.div_rn(tl.sum(tl.sum(gw, axis=2), axis=1), kf)[:, None, None]
        dx = rstd[:, None, None] * (gw - xhat * dot[:, None, None])
        tl.store(dx_ptr + off, dx, mask=mask)
        dw += tl.sum(g * xhat, axis=0)
        if LAYERNORM:
            db += tl.sum(g, axis=0)
    tl.store(dwp_ptr + pid * K + cols, dw, mask=cmask)
    if LAYERNORM:
        tl.store(dbp_ptr + pid * K + cols, db, mask=cmask)


# Tilings (`benchmarks/dataflow_ops.py sweep` times alternatives on a GPU). The norm backward keeps whole rows in
# registers up to NORM_BWD_ROW_ELEMS features (rounded up to a power of two of blocks), NORM_BWD_ROWS rows a
# program (each program adds up partial sums of dw over its rows); wider rows take the kernel that walks the
# features in three passes (profile, 7B shape: 269 µs a call for 8192×4096, ~4× its bytes' time; whole rows:
# 151 µs). The activation kernels take [TM, c] tiles of about ACT_TILE_ELEMS elements.
NORM_BWD_ROW_ELEMS = 8192
NORM_BWD_ROWS = 16
ACT_TILE_ELEMS = 4096


def _check_pow2(r, c):
    if r & (r - 1) or c & (c - 1) or c > 1024:
        raise ValueError(f"the data-flow kernels take power-of-two blocks with c ≤ 1024, got ({r}, {c}); use the "
                         "reference (qtrain.ops backend 'reference') for others")


def _tile_rows(r: int, c: int, M: int, elems: int, interp_elems: int = 65536) -> int:
    """Rows ``TM`` of a ``[TM, c]`` tile of about ``elems`` elements (``interp_elems`` under the interpreter),
    at least one block row ``r``, at most ``M`` rounded up to a power of two."""
    target = interp_elems if interpreting() else elems
    return max(r, min(max(1, target // c), triton.next_power_of_2(max(M, 1))))


def _norm(xq, xs, weight, bias, eps, r, c, layernorm):
    check_int8_blocks(xq, xs, r, c)
    check_vector(weight, xq.shape[1], "weight")
    check_vector(bias, xq.shape[1], "bias")
    check_device(xq)
    _check_pow2(r, c)
    M, K = xq.shape
    xq, xs = xq.contiguous(), xs.contiguous()
    yq = torch.empty((M, K), dtype=torch.int8, device=xq.device)
    ys = torch.empty(xs.shape, dtype=torch.float32, device=xq.device)
    if M == 0 or K == 0:
        return yq, ys.fill_(1.0)
    tm = _tile_rows(r, c, M, 4096, 16384)
    w = weight.contiguous()
    b = bias.contiguous() if bias is not None else w
    _norm_kernel[(triton.cdiv(M, tm),)](xq, xs, w, b, yq, ys, M, K, xs.shape[1], xs.shape[0], float(eps),
                                        R=r, C=c, TM=tm, LAYERNORM=layernorm, HAS_BIAS=bias is not None,
                                        num_warps=8 if tm * c >= 8192 else 4)
    return yq, ys


def rmsnorm_quantize(xq, xs, weight, eps: float, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _norm(xq, xs, weight, None, eps, r, c, False)


def layernorm_quantize(xq, xs, weight, bias, eps: float, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _norm(xq, xs, weight, bias, eps, r, c, True)


def _act(hq, hs, r, c, swiglu):
    check_int8_blocks(hq, hs, r, c)
    check_device(hq)
    _check_pow2(r, c)
    M, K_in = hq.shape
    if swiglu and K_in % 2:
        raise ValueError(f"swiglu_quantize wants [M, 2F] (gate | up), got {tuple(hq.shape)}")
    F = K_in // 2 if swiglu else K_in
    hq, hs = hq.contiguous(), hs.contiguous()
    nr, nkb = -(-M // r), -(-F // c)
    aq = torch.empty((M, F), dtype=torch.int8, device=hq.device)
    a_s = torch.empty((nr, nkb), dtype=torch.float32, device=hq.device)
    if M == 0 or F == 0:
        return aq, a_s.fill_(1.0)
    tm = _tile_rows(r, c, M, ACT_TILE_ELEMS)
    _act_kernel[(triton.cdiv(M, tm), nkb)](hq, hs, aq, a_s, M, F, K_in, hs.shape[1], nkb, nr,
                                           R=r, C=c, TM=tm, SWIGLU=swiglu, UP_ALIGNED=F % c == 0,
                                           num_warps=8 if tm * c >= 8192 else 4)
    return aq, a_s


def swiglu_quantize(hq, hs, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _act(hq, hs, r, c, True)


def _quantize_act(h, r, c, swiglu):
    check_quantize_act(h, r, c, swiglu)
    check_device(h)
    _check_pow2(r, c)
    M, K_in = h.shape
    F = K_in // 2 if swiglu else K_in
    if swiglu and F % c:
        raise ValueError(f"the fused quantize + SwiGLU kernel wants the up half on block boundaries (F = {F} a "
                         f"multiple of c = {c}); quantize h and call swiglu_quantize instead")
    h = h if h.stride(1) == 1 else h.contiguous()
    nr = -(-M // r)
    hq = torch.empty((M, K_in), dtype=torch.int8, device=h.device)
    hs = torch.empty((nr, -(-K_in // c)), dtype=torch.float32, device=h.device)
    aq = torch.empty((M, F), dtype=torch.int8, device=h.device)
    a_s = torch.empty((nr, -(-F // c)), dtype=torch.float32, device=h.device)
    if M == 0 or F == 0:
        return hq, hs.fill_(1.0), aq, a_s.fill_(1.0)
    tm = _tile_rows(r, c, M, ACT_TILE_ELEMS)
    _quantize_act_kernel[(triton.cdiv(M, tm), a_s.shape[1])](h, hq, hs, aq, a_s, M, F, K_in, h.stride(0),
                                                             hs.shape[1], a_s.shape[1], nr, R=r, C=c, TM=tm,
                                                             SWIGLU=swiglu, num_warps=8 if tm * c >= 8192 else 4)
    return hq, hs, aq, a_s


def quantize_swiglu(h, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _quantize_act(h, r, c, True)


def quantize_gelu(h, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _quantize_act(h, r, c, False)


def gelu_quantize(hq, hs, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _act(hq, hs, r, c, False)


def _act_backward(hq, hs, gq, gs, r, c, swiglu, out_dtype):
    _check_backward(hq, hs, gq, gs, r, c, swiglu)
    _check_out_dtype(out_dtype)
    check_device(hq)
    _check_pow2(r, c)
    M, K_in = hq.shape
    F = gq.shape[1]
    hq, hs, gq, gs = hq.contiguous(), hs.contiguous(), gq.contiguous(), gs.contiguous()
    dh = torch.empty((M, K_in), dtype=out_dtype, device=hq.device)
    if M == 0 or F == 0:
        return dh
    tm = _tile_rows(r, c, M, ACT_TILE_ELEMS)
    _act_bwd_kernel[(triton.cdiv(M, tm), -(-F // c))](hq, hs, gq, gs, dh, M, F, K_in, hs.shape[1], gs.shape[1],
                                                     R=r, C=c, TM=tm, SWIGLU=swiglu,
                                                     BF16=out_dtype == torch.bfloat16, UP_ALIGNED=F % c == 0,
                                                     num_warps=8 if tm * c >= 8192 else 4)
    return dh


def swiglu_backward(hq, hs, gq, gs, r: int, c: int, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return _act_backward(hq, hs, gq, gs, r, c, True, out_dtype)


def gelu_backward(hq, hs, gq, gs, r: int, c: int, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return _act_backward(hq, hs, gq, gs, r, c, False, out_dtype)


def _norm_backward(xq, xs, weight, bias, gq, gs, eps, r, c, layernorm):
    _check_norm_backward(xq, xs, weight, bias, gq, gs, r, c)
    check_device(xq)
    _check_pow2(r, c)
    M, K = xq.shape
    xq, xs, gq, gs = xq.contiguous(), xs.contiguous(), gq.contiguous(), gs.contiguous()
    dx = torch.empty((M, K), dtype=torch.float32, device=xq.device)
    nb = triton.next_power_of_2(max(1, -(-K // c)))
    rows_kernel = nb * c <= NORM_BWD_ROW_ELEMS
    if rows_kernel:        # whole rows in registers, ≥ NORM_BWD_ROWS rows a program
        tm = max(1, NORM_BWD_ROW_ELEMS // (nb * c))
        steps = max(1, NORM_BWD_ROWS // tm)
        grid = triton.cdiv(M, tm * steps)
    else:
        tm = _tile_rows(r, c, M, 2048, 16384)
        grid = triton.cdiv(M, tm)
    partial = torch.empty((2 if layernorm else 1, grid, K), dtype=torch.float32, device=xq.device)
    if M and K and rows_kernel:
        _norm_bwd_rows_kernel[(grid,)](xq, xs, weight.contiguous(), gq, gs, dx, partial[0], partial[-1], M, K,
                                       xs.shape[1], float(eps), R=r, C=c, NB=nb, TM=tm, STEPS=steps,
                                       LAYERNORM=layernorm, num_warps=8 if tm * nb * c >= 8192 else 4)
    elif M and K:
        _norm_bwd_kernel[(grid,)](xq, xs, weight.contiguous(), gq, gs, dx, partial[0], partial[-1], M, K,
                                  xs.shape[1], float(eps), R=r, C=c, TM=tm, LAYERNORM=layernorm,
                                  num_warps=8 if tm * c >= 8192 else 4)
    sums = partial.sum(1)                                         # [2 or 1, K]: deterministic, no atomics
    return dx, sums[0], (sums[1] if layernorm and bias is not None else None)


def rmsnorm_backward(xq, xs, weight, gq, gs, eps: float, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _norm_backward(xq, xs, weight, None, gq, gs, eps, r, c, False)[:2]


def layernorm_backward(xq, xs, weight, bias, gq, gs, eps: float, r: int, c: int) -> tuple:
    return _norm_backward(xq, xs, weight, bias, gq, gs, eps, r, c, True)
