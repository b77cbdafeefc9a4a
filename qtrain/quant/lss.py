"""Bit splitting (BS) and leverage-score sampling (LSS) of the output gradient, the backward of the INT4 recipe
(METHODS.md § INT4 training). Pure PyTorch reference; randomness from an explicit generator.

Bit splitting, :func:`bit_split` ``(dy [M, N] float, generator) -> (hi [M, N] int8, lo [M, N] int8, s [] fp32)``::

    s  = 196 / (2·max|dY|)                   (1.0 for an all-zero dY; NaN when dY holds NaN/Inf)
    hi = clamp(round(dY·s / 14), −6, 6)      (RTN, half to even)
    lo = clamp(SR(dY·s − 14·hi), −6, 6)      (SR: floor(v + u), u ~ U[0, 1))
    dY ≈ (14·hi + lo) / s                    (~8 bits: |error| ≤ 1/s where |dY·s| ≤ 90)

Both parts are INT4 values in ``[-6, 6]`` stored in int8. The formula clips ``|dY·s|`` above 90 (the top
8 % of the range, only near-maximal entries) to 90 — as METHODS.md gives it.

Leverage-score sampling stacks the parts into ``2M`` rows ``[14·hi; lo]`` (row ``i < M`` is ``hi`` of token
``i`` with weight 14, row ``M + i`` is ``lo`` with weight 1) and keeps row ``i`` with probability ``p_i``:

* :func:`leverage_probabilities` ``(c [n] ≥ 0, budget) -> p [n] fp32``: ``p_i = min(1, λ·c_i)`` with ``λ`` such
  that ``Σ p = min(budget, #{c_i > 0})`` (rows at the cap are kept surely, the rest renormalized); ``p_i = 0``
  where ``c_i = 0`` (such a row contributes nothing, so dropping it keeps the estimate unbiased).
* **Decision** (METHODS.md: ``p ∝ ‖row‖``): a row's norm is that of its contribution, ``14·‖hi_i‖`` or
  ``‖lo_i‖`` — the variance-minimizing choice; ``dgrad`` uses ``c_i = ‖row_i‖``, ``wgrad``
  ``c_i = ‖row_i‖·‖X_i‖`` (X the quantized Hadamard-transformed input of the token).
* :func:`sample_rows` ``(p, generator) -> keep [n] bool``: ``keep_i = u_i < p_i``.

Kept rows are scaled by ``1/p_i``, so each estimate is unbiased (over the sampling; the SR of ``lo`` is
unbiased too): ``E[Σ_kept (w_i / p_i)·row_i ⊗ …] = Σ_i w_i·row_i ⊗ …``.

* :func:`lss_dgrad` ``(hi, lo, s, b [K, N] int8, b_scale [] fp32, keep, p) -> [M, K] fp32``: ``dY·B`` estimated
  over the kept rows (each output row is one token's row: kept rows run the GEMM, dropped ones are zero);
* :func:`lss_wgrad` ``(hi, lo, s, x [M, K] int8, x_scale [] fp32, keep, p) -> [N, K] fp32``: ``dYᵀ·X``
  estimated over the kept rows of the reduced (token) dim.

``gemm`` arguments take ``int8_gemm``'s contract (``a [R, N] int8, b [K, N] int8, a_scale [R], b_scale []``,
``bias``, ``out_dtype``) — the layer passes ``qtrain.ops.int4_gemm``; the default is this package's reference.
"""
from __future__ import annotations

import torch

from qtrain.quant.core import check_2d, check_float
from qtrain.quant.int8_gemm import int8_gemm

HI_WEIGHT = 14
SPLIT_MAX = 6


def bit_split(dy: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hi, lo, s)`` of ``dy`` (see the module docstring)."""
    check_float(dy, "dY")
    check_2d(dy, "dY")
    v = dy.float()
    amax = v.abs().amax() if v.numel() else v.new_zeros(())
    s = torch.full_like(amax, 196.0) / (2.0 * amax)
    s = torch.where(amax == 0, torch.ones_like(s), s)
    s = torch.where(torch.isfinite(amax), s, torch.full_like(s, float("nan")))
    v = v * s
    v = torch.where(torch.isnan(v), torch.zeros_like(v), v)
    hi = torch.round(v / HI_WEIGHT).clamp(-SPLIT_MAX, SPLIT_MAX)
    u = torch.rand(v.shape, generator=generator, device=v.device, dtype=torch.float32)
    lo = torch.floor(v - HI_WEIGHT * hi + u).clamp(-SPLIT_MAX, SPLIT_MAX)
    return hi.to(torch.int8), lo.to(torch.int8), s


def split_dequantize(hi: torch.Tensor, lo: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """fp32 ``(14·hi + lo) / s``."""
    return (HI_WEIGHT * hi.float() + lo.float()) / s


def row_weights(M: int, device) -> torch.Tensor:
    """fp32 ``[2M]``: 14 for the ``hi`` rows, 1 for the ``lo`` rows of the stack."""
    return torch.cat((torch.full((M,), float(HI_WEIGHT), device=device), torch.ones(M, device=device)))


def stacked_norms(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """fp32 ``[2M]``: the norms of the stacked contribution rows ``[14·hi; lo]``."""
    return torch.cat((HI_WEIGHT * hi.float().norm(dim=1), lo.float().norm(dim=1)))


def leverage_probabilities(c: torch.Tensor, budget: float) -> torch.Tensor:
    """fp32 ``p [n]``: ``min(1, λ·c)`` with ``Σp = min(budget, #{c > 0})`` (no host synchronization)."""
    c = c.float()
    n = c.numel()
    if n == 0:
        return c.clone()
    cs, _ = torch.sort(c, descending=True)
    tail = cs.flip(0).cumsum(0).flip(0)                               # Σ_{j ≥ k} cs_j
    k = torch.arange(n, device=c.device, dtype=torch.float32)
    lam = (budget - k) / tail
    ok = (budget - k > 0) & (tail > 0) & (lam * cs <= 1)
    first = torch.argmax(ok.to(torch.int32))                          # fewest rows at the cap
    lam = torch.where(ok.any(), lam[first], torch.full_like(lam[0], float("inf")))
    return torch.where(c > 0, torch.clamp(lam * c, max=1.0), torch.zeros_like(c))


def sample_rows(p: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """bool ``keep [n]``: ``u < p`` with ``u ~ U[0, 1)`` from ``generator``."""
    u = torch.rand(p.shape, generator=generator, device=p.device, dtype=torch.float32)
    return u < p


def _ref_gemm(a, b, a_scale, b_scale, bias=None, out_dtype=torch.float32):
    return int8_gemm(a, b, a_scale, b_scale, bias, out_dtype)


def lss_dgrad(hi: torch.Tensor, lo: torch.Tensor, s: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
              keep: torch.Tensor, p: torch.Tensor, gemm=_ref_gemm, gather: bool = True) -> torch.Tensor:
    """fp32 ``[M, K]`` unbiased estimate of ``((14·hi + lo)/s) @ (b·b_scale)ᵀ`` over the kept stacked rows.

    ``gather``: run the GEMM on the kept rows only (a host synchronization for their count; what eager
    does); otherwise on all rows with zero scales on the dropped ones (the same numbers; static shapes, for
    ``torch.compile``)."""
    M = hi.shape[0]
    w = row_weights(M, hi.device)
    scale = w / (p.clamp_min(torch.finfo(torch.float32).tiny) * s)     # 14/(p·s) or 1/(p·s)
    scale = torch.where(keep, scale, torch.zeros_like(scale))
    out = None
    for part, sc in ((hi, scale[:M]), (lo, scale[M:])):
        if gather:
            idx = keep[:M].nonzero().squeeze(1) if part is hi else keep[M:].nonzero().squeeze(1)
            r = gemm(part.index_select(0, idx), b, sc.index_select(0, idx).contiguous(), b_scale, None,
                     torch.float32)
            term = torch.zeros(M, b.shape[0], dtype=torch.float32, device=hi.device).index_add_(0, idx, r)
        else:
            term = gemm(part, b, sc.contiguous(), b_scale, None, torch.float32)
        out = term if out is None else out + term
    return out


def lss_wgrad(hi: torch.Tensor, lo: torch.Tensor, s: torch.Tensor, x: torch.Tensor, x_scale: torch.Tensor,
              keep: torch.Tensor, p: torch.Tensor, gather: bool = True) -> torch.Tensor:
    """fp32 ``[N, K]`` unbiased estimate of ``((14·hi + lo)/s)ᵀ @ (x·x_scale)`` over the kept stacked rows of
    the reduced (token) dim. The per-row weights ``1/p`` lie along the reduced dim, which an integer GEMM
    cannot scale: the kept INT4 codes are multiplied in fp32 (exact products, fp32 sums)."""
    M = hi.shape[0]
    w = row_weights(M, hi.device)
    scale = w / (p.clamp_min(torch.finfo(torch.float32).tiny) * s)
    scale = torch.where(keep, scale, torch.zeros_like(scale))
    codes = torch.cat((hi, lo))
    rows = torch.cat((torch.arange(M, device=hi.device),) * 2)
    if gather:
        idx = keep.nonzero().squeeze(1)
        codes, rows, scale = codes.index_select(0, idx), rows.index_select(0, idx), scale.index_select(0, idx)
    a = codes.float() * scale[:, None]
    return (a.t() @ x.index_select(0, rows).float()) * x_scale.reshape(()).float()
