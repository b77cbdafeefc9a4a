"""Fallback quantization (reference twin of ``qtrain.kernels.fallback``; METHODS.md § Fallback).

``quantize_fallback(x [M, K] float, tau [] fp32, block_k=128, group_rows=128) -> (q [M, K] int8,
scale [M, nk] fp32, q2 [M, K] int8, scale2 [M, nk] fp32, flags [⌈M/128⌉, nk] bool, tile_absmax [⌈M/128⌉, nk] fp32)``
with ``nk = ⌈K/block_k⌉``:

* ``q, scale`` — :func:`qtrain.quant.blockwise.quantize_blockwise` of ``x`` in ``1 × block_k`` blocks;
* ``tile_absmax`` — absmax of each tile of ``group_rows`` rows × ``block_k`` columns (NaN propagates);
* ``flags = tile_absmax > tau`` — the tiles that fall back; ``tau < 0`` means "not set yet": every tile does;
* ``q2, scale2`` — the residual ``r = x − scale·q`` (fp32: one product, one difference, no fused multiply-add)
  quantized in ``1 × block_k`` blocks; ``scale2`` is 0 outside flagged tiles, and ``q2`` there is unspecified
  (this reference writes 0; kernels leave it unwritten), so ``x ≈ scale·q + scale2·q2`` everywhere.

``quantize_fallback_sr(x, tau, block_k, seed [1] int64, group_rows)``: the same with the first term rounded
stochastically (:func:`qtrain.quant.blockwise.quantize_blockwise_sr`: unbiased, for gradients); the residual of a
flagged tile is that of the stochastically rounded codes, rounded to nearest (its error ≤ ``scale2 / 2`` ≤
``scale / 254``). Scales, flags and tile absmax are bit for bit those of :func:`quantize_fallback`; the kernel twin
agrees in distribution (another uniform stream), and bit for bit in the residual of its own codes.

``fallback_block_gemm(q, scale, q2, scale2, flags, b [N, K] int8, b_scale [⌈N/rb⌉, nk], b_rows, block_k, bias,
out_dtype) -> [M, N]``::

    out = Σ_j (q_j·b_jᵀ)·scale[:, j]·b_scale[n // rb, j]
        + Σ_j flags[m // 128, j]·(q2_j·b_jᵀ)·scale2[:, j]·b_scale[n // rb, j]

— the block-scaled GEMM (:mod:`qtrain.quant.block_gemm`) with a second term on the flagged tiles only.

``update_threshold(tau, tile_absmax, policy)`` is the per-layer controller of an adaptive
:class:`~qtrain.recipes.Fallback`: ``tau ← ema·tau + (1 − ema)·quantile(tile_absmax, 1 − target)`` in place
(set directly while ``tau < 0``), on the device, with no host synchronization.
"""
from __future__ import annotations

import torch

from qtrain.quant.block_gemm import block_sum_fp64, check_block_gemm_args
from qtrain.quant.blockwise import quantize_blockwise, quantize_blockwise_sr
from qtrain.quant.core import check_2d, check_float
from qtrain.recipes import Fallback

GROUP_ROWS = 128


def check_tau(tau: torch.Tensor) -> None:
    if not isinstance(tau, torch.Tensor) or tau.dtype != torch.float32 or tau.numel() != 1:
        raise ValueError(f"tau must be a one-element fp32 tensor, got {tau!r:.80}")


def tile_absmax(x: torch.Tensor, block_k: int, group_rows: int = GROUP_ROWS) -> torch.Tensor:
    """fp32 ``[⌈M/group_rows⌉, ⌈K/block_k⌉]`` absmax of each tile (ragged edge tiles cover what is left)."""
    M, K = x.shape
    gm, nk = -(-M // group_rows), -(-K // block_k)
    padded = torch.zeros(gm * group_rows, nk * block_k, dtype=torch.float32, device=x.device)
    padded[:M, :K] = x.float().abs()
    return padded.view(gm, group_rows, nk, block_k).amax(dim=(1, 3))


def expand_tiles(t: torch.Tensor, M: int, group_rows: int = GROUP_ROWS) -> torch.Tensor:
    """A per-tile ``[⌈M/group_rows⌉, nk]`` tensor as per-row-block ``[M, nk]``."""
    return t.repeat_interleave(group_rows, 0)[:M]


def check_fallback_args(x: torch.Tensor, tau: torch.Tensor, block_k: int, group_rows: int) -> None:
    check_float(x)
    check_2d(x)
    check_tau(tau)
    if group_rows != GROUP_ROWS:
        raise ValueError(f"fallback group_rows must be {GROUP_ROWS}, got {group_rows}")
    if block_k not in (32, 64, 128, 256):
        raise ValueError(f"fallback block_k must be one of 32, 64, 128, 256, got {block_k}")


def quantize_fallback(x: torch.Tensor, tau: torch.Tensor, block_k: int = 128, group_rows: int = GROUP_ROWS):
    check_fallback_args(x, tau, block_k, group_rows)
    return _with_residual(x, tau, block_k, group_rows, *quantize_blockwise(x, 1, block_k))


def quantize_fallback_sr(x: torch.Tensor, tau: torch.Tensor, block_k: int, seed: torch.Tensor,
                         group_rows: int = GROUP_ROWS):
    check_fallback_args(x, tau, block_k, group_rows)
    return _with_residual(x, tau, block_k, group_rows, *quantize_blockwise_sr(x, 1, block_k, seed))


def _with_residual(x, tau, block_k, group_rows, q, scale):
    """The outputs of :func:`quantize_fallback` given the first term's ``(q, scale)``."""
    M, K = x.shape
    tmax = tile_absmax(x, block_k, group_rows)
    flags = (tmax > tau.reshape(())) | (tau.reshape(()) < 0)
    s_full = scale.repeat_interleave(block_k, 1)[:, :K]
    resid = x.float() - q.float() * s_full
    q2, scale2 = quantize_blockwise(resid, 1, block_k)
    row_flags = expand_tiles(flags, M, group_rows)
    scale2 = torch.where(row_flags, scale2, torch.zeros_like(scale2))
    q2 = torch.where(row_flags.repeat_interleave(block_k, 1)[:, :K], q2, torch.zeros_like(q2))
    return q, scale, q2, scale2, flags, tmax


def check_fallback_gemm_args(a, a_scale, a2, a2_scale, flags, b, b_scale, b_rows, block_k, bias, out_dtype):
    check_block_gemm_args(a, b, a_scale, b_scale, 1, b_rows, block_k, bias, out_dtype)
    if a2.dtype != torch.int8 or a2.shape != a.shape:
        raise ValueError(f"the residual operand must be int8 {list(a.shape)}, got {a2.dtype} {list(a2.shape)}")
    if a2_scale.dtype != torch.float32 or a2_scale.shape != a_scale.shape:
        raise ValueError(f"the residual scale must be fp32 {list(a_scale.shape)}, got {a2_scale.dtype} "
                         f"{list(a2_scale.shape)}")
    want = (-(-a.shape[0] // GROUP_ROWS), a_scale.shape[1])
    if flags.dtype not in (torch.bool, torch.uint8) or tuple(flags.shape) != want:
        raise ValueError(f"flags must be bool/uint8 {list(want)} (one per {GROUP_ROWS}-row × {block_k} tile), "
                         f"got {flags.dtype} {list(flags.shape)}")


def fallback_block_gemm(a: torch.Tensor, a_scale: torch.Tensor, a2: torch.Tensor, a2_scale: torch.Tensor,
                        flags: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, b_rows: int,
                        block_k: int = 128, bias: torch.Tensor | None = None,
                        out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    check_fallback_gemm_args(a, a_scale, a2, a2_scale, flags, b, b_scale, b_rows, block_k, bias, out_dtype)
    M, K = a.shape
    mask = expand_tiles(flags.bool(), M).repeat_interleave(block_k, 1)[:, :K]
    a2 = torch.where(mask, a2, torch.zeros_like(a2))               # unflagged residual bytes are never read
    out = (block_sum_fp64(a, b, a_scale, b_scale, 1, b_rows, block_k)
           + block_sum_fp64(a2, b, a2_scale, b_scale, 1, b_rows, block_k))
    if bias is not None:
        out = out + bias.double()
    return out.to(out_dtype)


@torch.no_grad()
def update_threshold(tau: torch.Tensor, tile_absmax: torch.Tensor, policy: Fallback) -> None:
    """Move the per-layer threshold ``tau`` (in place) toward the ``1 − target`` quantile of ``tile_absmax``;
    a fixed ``policy.threshold`` is written as is."""
    check_tau(tau)
    if policy.threshold is not None:
        tau.fill_(policy.threshold)
        return
    if tile_absmax.numel() == 0:
        return
    q = nanquantile(tile_absmax.flatten().float(), 1.0 - policy.target).reshape(tau.shape)
    tau.copy_(torch.where(tau < 0, q, policy.ema * tau + (1.0 - policy.ema) * q))


def nanquantile(v: torch.Tensor, p: float) -> torch.Tensor:
    """``torch.nanquantile(v, p)`` (linear interpolation) of a 1-D fp32 ``v``, bit for bit, as a 0-D tensor, from
    tensor ops only: one sort, the ranks as ATen computes them (fp32 ``p·(n − 1)``, ``n`` the non-NaN count, negative
    → 0), two gathers and ``lerp``. ``torch.nanquantile`` itself does not trace under ``torch.compile`` in torch
    2.11 (a data-dependent ``aten.equal``; its fake kernel calls ``numel()`` on symbolic sizes); all NaN gives NaN."""
    s = torch.sort(v).values                                                   # NaN last
    rank = torch.full((), p, dtype=torch.float32, device=v.device) * ((~torch.isnan(v)).sum() - 1)
    rank = rank.clamp_min(0.0)
    below, above = rank.long(), rank.ceil().long()
    return torch.lerp(s.gather(0, below.reshape(1)), s.gather(0, above.reshape(1)), rank - below).reshape(())


def fallback_ratio(flags: torch.Tensor) -> torch.Tensor:
    """Share of tiles that fell back, as a 0-D fp32 tensor on the flags' device."""
    return flags.float().mean() if flags.numel() else torch.zeros((), device=flags.device)
