"""Fallback quantization kernels (twin of :mod:`qtrain.quant.fallback`, same contracts).

``quantize_fallback``: one program per tile of 128 rows × ``block_k`` columns, read once: row-block scales and
INT8 codes, the tile's absmax and flag (``absmax > tau``, every tile while ``tau < 0``), and — only on a flagged
tile — the residual's scales and codes (unflagged tiles leave ``q2`` unwritten and write ``scale2 = 0``).
Bit-exact with the reference; multiply-add contraction is off so the residual rounds like the reference's.
Any input strides (a transposed view quantizes the transpose: ``dYᵀ`` for the weight gradient).
``quantize_fallback_sr``: the first term by stochastic rounding with the block quantizer's Philox uniforms
(:func:`qtrain.kernels.blockwise.quantize_sr`; a flagged tile's second pass redraws the same uniforms, so its
residual is that of the stored codes) — scales, flags, tile absmax bit for bit the reference's, codes in
distribution.

``fallback_block_gemm``: the block-scaled GEMM with the second MMA issued only for flagged tiles, reusing the rhs
tile already loaded — on Hopper, for calls :func:`qtrain.kernels.block_gemm.use_gluon` admits, the
warp-specialized Gluon kernel (:mod:`qtrain.kernels.block_gemm_gluon`), else the Triton kernel
(:mod:`qtrain.kernels.block_gemm`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qtrain.kernels import block_gemm as _block_gemm
from qtrain.kernels._common import (abs_bits, check_device, divisor, interpreting, load_at, quantize_rtn_rows,
                                   scale_from_bits)
from qtrain.kernels.blockwise import quantize_sr, sr_uniforms
from qtrain.quant.blockwise import check_seed
from qtrain.quant.fallback import GROUP_ROWS, check_fallback_args, check_fallback_gemm_args


@triton.jit
def _chunk(x_ptr, M, K, stride_xm, stride_xk, rows, cols):
    """fp32 ``x[rows, cols]`` (0 outside ``x``), its mask and each row's absmax bits."""
    mask, x = load_at(x_ptr, M, K, stride_xm, stride_xk, rows, cols)
    return x, mask, tl.max(abs_bits(x), axis=1)


@triton.jit
def _codes(x, scale, seed, rows, pid_k, nk, SR: tl.constexpr, TM: tl.constexpr, C: tl.constexpr):
    """The first term's int8 codes of a ``[TM, C]`` chunk (one scale per row): RTN, or with ``SR`` stochastic
    rounding with the uniforms of the chunk's position (the same on every call)."""
    if SR:
        _, inv, pre = divisor(scale)
        return quantize_sr(x * pre[:, None], tl.broadcast_to(inv[:, None], x.shape),
                           sr_uniforms(seed, rows, pid_k, nk, TM, C))
    return quantize_rtn_rows(x, scale)


@triton.jit
def _fallback_quant_kernel(x_ptr, tau_ptr, seed_ptr, q_ptr, s_ptr, q2_ptr, s2_ptr, flag_ptr, tmax_ptr, M, K,
                           stride_xm, stride_xk, nk, GR: tl.constexpr, C: tl.constexpr, TM: tl.constexpr,
                           SR: tl.constexpr):
    """The tile of ``GR`` rows × ``C`` columns at ``(pid_m, pid_k)`` in ``[TM, C]`` chunks: pass 1 stores each
    chunk's codes and scales and keeps the tile's absmax; pass 2, on a flagged tile only, reloads the chunks (from
    L2), recomputes their codes and stores the residual's. Chunks keep registers low enough for several programs
    per SM (one ``[128, 128]`` tile in registers took 165 registers a thread: one program per SM, latency-bound).
    ``SR``: the first term by stochastic rounding from ``seed``."""
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    cols = pid_k * C + tl.arange(0, C)
    if SR:
        seed = tl.load(seed_ptr)
    else:
        seed = 0
    tile_bits = tl.zeros([TM], tl.int32)
    for r0 in tl.range(0, GR, TM):
        rows = pid_m * GR + r0 + tl.arange(0, TM)
        x, mask, row_bits = _chunk(x_ptr, M, K, stride_xm, stride_xk, rows, cols)
        scale = scale_from_bits(row_bits)
        tl.store(q_ptr + rows[:, None].to(tl.int64) * K + cols[None, :],
                 _codes(x, scale, seed, rows, pid_k, nk, SR, TM, C), mask=mask)
        tl.store(s_ptr + rows * nk + pid_k, scale, mask=rows < M)
        tile_bits = tl.maximum(tile_bits, row_bits)

    tmax = tl.max(tile_bits, axis=0).to(tl.float32, bitcast=True)
    tau = tl.load(tau_ptr)
    flag = (tmax > tau) | (tau < 0)
    tl.store(tmax_ptr + pid_m * nk + pid_k, tmax)
    tl.store(flag_ptr + pid_m * nk + pid_k, flag.to(tl.uint8))
    if flag:
        for r0 in tl.range(0, GR, TM):
            rows = pid_m * GR + r0 + tl.arange(0, TM)
            x, mask, row_bits = _chunk(x_ptr, M, K, stride_xm, stride_xk, rows, cols)
            scale = scale_from_bits(row_bits)
            resid = x - _codes(x, scale, seed, rows, pid_k, nk, SR, TM, C).to(tl.float32) * scale[:, None]
            scale2 = scale_from_bits(tl.max(abs_bits(resid), axis=1))
            tl.store(q2_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], quantize_rtn_rows(resid, scale2),
                     mask=mask)
            tl.store(s2_ptr + rows * nk + pid_k, scale2, mask=rows < M)
    else:
        rows = pid_m * GR + tl.arange(0, GR)
        tl.store(s2_ptr + rows * nk + pid_k, tl.zeros([GR], tl.float32), mask=rows < M)


def launch_config(block_k: int, group_rows: int = GROUP_ROWS) -> tuple[int, int]:
    """``(TM, num_warps)``: ``[TM, block_k]`` chunks of ~4k elements (the whole tile under the interpreter)."""
    if interpreting():
        return group_rows, 4
    return max(1, min(group_rows, 4096 // block_k)), 4


def quantize_fallback(x: torch.Tensor, tau: torch.Tensor, block_k: int = 128, group_rows: int = GROUP_ROWS,
                      config: tuple[int, int] | None = None):
    """``config``: ``(TM, num_warps)`` instead of :func:`launch_config`'s (benchmarks)."""
    return _launch(x, tau, block_k, group_rows, None, config)


def quantize_fallback_sr(x: torch.Tensor, tau: torch.Tensor, block_k: int, seed: torch.Tensor,
                         group_rows: int = GROUP_ROWS, config: tuple[int, int] | None = None):
    check_seed(seed)
    return _launch(x, tau, block_k, group_rows, seed, config)


def _launch(x, tau, block_k, group_rows, seed, config):
    check_fallback_args(x, tau, block_k, group_rows)
    check_device(x)
    if tau.device != x.device:
        raise ValueError(f"tau is on {tau.device} but x on {x.device}")
    M, K = x.shape
    nk, gm = -(-K // block_k), -(-M // group_rows)
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    q2 = torch.empty((M, K), dtype=torch.int8, device=x.device)
    scale = torch.empty((M, nk), dtype=torch.float32, device=x.device)
    scale2 = torch.empty((M, nk), dtype=torch.float32, device=x.device)
    flags = torch.empty((gm, nk), dtype=torch.bool, device=x.device)
    tmax = torch.empty((gm, nk), dtype=torch.float32, device=x.device)
    if M == 0 or K == 0:
        return q, scale.fill_(1.0), q2, scale2.zero_(), flags, tmax
    tm, warps = config or launch_config(block_k, group_rows)
    if group_rows % tm or tm & (tm - 1):
        raise ValueError(f"fallback chunk rows {tm} must be a power of two dividing group_rows = {group_rows}")
    if seed is not None:
        seed = seed.reshape(1).to(device=x.device, dtype=torch.int64)
    _fallback_quant_kernel[(gm, nk)](x, tau, seed if seed is not None else tau, q, scale, q2, scale2,
                                     flags.view(torch.uint8), tmax, M, K, x.stride(0), x.stride(1), nk,
                                     GR=group_rows, C=block_k, TM=tm, SR=seed is not None, num_warps=warps,
                                     enable_fp_fusion=False)
    return q, scale, q2, scale2, flags, tmax


def fallback_block_gemm(a: torch.Tensor, a_scale: torch.Tensor, a2: torch.Tensor, a2_scale: torch.Tensor,
                        flags: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, b_rows: int,
                        block_k: int = 128, bias: torch.Tensor | None = None,
                        out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    check_fallback_gemm_args(a, a_scale, a2, a2_scale, flags, b, b_scale, b_rows, block_k, bias, out_dtype)
    if _block_gemm.use_gluon(a, b, 1, b_rows, block_k, out_dtype):
        from qtrain.kernels import block_gemm_gluon

        if block_gemm_gluon.supported(a, b, 1, b_rows, block_k, out_dtype, a2=a2):
            return block_gemm_gluon.launch(a, b, a_scale.contiguous(), b_scale.contiguous(), b_rows,
                                           bias.contiguous() if bias is not None else None, out_dtype,
                                           a2, a2_scale.contiguous(), flags.contiguous(), block_k=block_k)
    return _block_gemm.launch(a, b, a_scale, b_scale, 1, b_rows, block_k, bias, out_dtype,
                              fallback=(a2, a2_scale, flags))
