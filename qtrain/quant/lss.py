"""Bit splitting (BS) and leverage-score sampling (LSS) of the output gradient, the backward of the INT4 recipe
(METHODS.md § INT4 training). Pure PyTorch reference; randomness from an explicit generator; no host
synchronization (static shapes) unless asked to gather (:func:`lss_dgrad`).

Bit splitting, :func:`bit_split` ``(dy [M, N] float, generator, per_row=False) -> (hi [M, N] int8, lo [M, N]
int8, s [] fp32 — or [M] per row)``::

    s  = 196 / (2·max|dY|)                   (1.0 for an all-zero dY; NaN when dY holds NaN/Inf)
                                             (per_row: max over each row, one s per token)
    hi = clamp(round(dY·s / 14), −7, 7)      (RTN, half to even)
    lo = clamp(SR(dY·s − 14·hi), −7, 7)      (SR: floor(v + u), u ~ U[0, 1))
    dY ≈ (14·hi + lo) / s                    (~8 bits: |error| < 1/s; E[lo] = dY·s − 14·hi exactly)

Both parts are INT4 values in ``[-7, 7]`` stored in int8. **Decision** (the clamps): METHODS.md clamps both parts
to ``[-6, 6]``, which clips ``|dY·s|`` above 90 (the top 8 % of the range) and biases every residual in
``(6, 7]`` — a seventh of them — by up to one low step: a deterministic error that averaging draws does not
remove, small with one scale per tensor (only near-maximal entries clip) but hitting each token's largest entries
with one scale per row. INT4's full range ``[-7, 7]`` holds both parts with no clipping (``|dY·s| ≤ 98``, so
``|hi| ≤ 7`` and the residual lies in ``[-7, 7]``): the split is unbiased. **Decision** (``per_row``, a
recipe's ``row`` granularity for dY): METHODS.md's one scale per tensor leaves the gradient of most tokens in the
low part alone — on gradients whose rows differ in scale (a token's gradient norm spreads over orders of
magnitude) 99.7 % of the entries have ``|dY·s| < 7`` and the split's relative error is ~27 %, against ~2 % with
one scale per row (``tests/quant/test_int4_reference.py``); a row scale factors out of dgrad's sum and rides on
the per-row weights of wgrad's, so it costs neither GEMM anything. :func:`split_stacked` returns the same parts as
one ``[2M, N]`` tensor, the stack ``[hi; lo]`` the functions below take (``bit_split``'s ``hi`` and ``lo`` are
its two halves).

Leverage-score sampling keeps row ``i`` of the ``2M`` stacked rows ``[14·hi; lo]`` (row ``i < M`` is ``hi`` of
token ``i`` with weight 14, row ``M + i`` is ``lo`` with weight 1) with probability ``p_i``:

* :func:`leverage_probabilities` ``(c [..., n] ≥ 0, budget) -> p [..., n] fp32``: ``p_i = min(1, λ·c_i)`` with
  ``λ`` such that ``Σ p = min(budget, #{c_i > 0})`` along the last dim (rows at the cap are kept surely, the rest
  renormalized); ``p_i = 0`` where ``c_i = 0`` (such a row contributes nothing, so dropping it keeps the estimate
  unbiased).
* **Decision** (METHODS.md: ``p ∝ ‖row‖``): a row's norm is that of its contribution, ``14·‖hi_i‖`` or
  ``‖lo_i‖`` (:func:`stacked_norms`) — the variance-minimizing choice; ``dgrad`` uses ``c_i = ‖row_i‖``,
  ``wgrad`` ``c_i = ‖row_i‖·‖X_i‖`` (X the quantized Hadamard-transformed input of the token).
* :func:`sample_rows` ``(p, generator) -> keep bool``: ``keep_i = u_i < p_i`` (independent draws).

Kept rows are scaled by ``w_i/(p_i·s)`` (:func:`stacked_scales` ``(p, keep, s) -> scale [2M]``, 0 on dropped
rows), so each estimate is unbiased (over the sampling; the SR of ``lo`` is unbiased too):
``E[Σ_kept (w_i / p_i)·row_i ⊗ …] = Σ_i w_i·row_i ⊗ …``.

* :func:`lss_dgrad` ``(codes [2M, N] int8, scale, b [K, N] int8, b_scale [] fp32) -> [M, K] fp32``: ``dY·B``
  estimated over the kept rows: one GEMM over the ``2M`` rows, then each token's ``hi`` and ``lo`` rows summed
  (``gather``: the GEMM over the kept rows only, the same numbers);
* :func:`lss_wgrad` ``(codes [2M, N] int8, scale, x [M, K] codes, x_scale [] fp32) -> [N, K] fp32``: ``dYᵀ·X``
  estimated over the kept rows of the reduced (token) dim (on CUDA a bf16 GEMM: BF16 training's precision).

``gemm`` arguments take ``int8_gemm``'s contract (``a [R, N] int8, b [K, N] int8, a_scale [R], b_scale []``,
``bias``, ``out_dtype``) — the layer passes ``qtrain.ops.int4_gemm``; the default is this package's reference.
"""
from __future__ import annotations

import torch

from qtrain.quant.core import capture_safe, check_2d, check_float
from qtrain.quant.int8_gemm import int8_gemm

HI_WEIGHT = 14
SPLIT_MAX = 7


def split_stacked(dy: torch.Tensor, generator: torch.Generator, per_row: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes [2M, N] int8, s [] fp32 (per_row: [M]), norms [2M] fp32)``: the bit split of ``dy`` (module
    docstring), ``codes = [hi; lo]``, and the norms the sampling weighs rows by — :func:`stacked_norms` of
    ``codes``, per row divided by its ``s`` (rows of another scale compare in dY's units; a row whose ``s`` is NaN
    gets an infinite norm, so it is kept and its NaN reaches the GEMMs)."""
    check_float(dy, "dY")
    check_2d(dy, "dY")
    M, N = dy.shape
    v = dy.float()
    if per_row:
        amax = v.abs().amax(dim=1) if N else v.new_zeros((M,))           # NaN in a row that holds one
    elif v.numel():
        vmin, vmax = torch.aminmax(v)
        amax = torch.maximum(vmax, -vmin)                               # NaN if v holds one
    else:
        amax = v.new_zeros(())
    s = torch.where(amax == 0, 1.0, torch.div(98.0, amax))              # 196/(2·amax), the same fp32 value
    s = torch.where(amax < torch.inf, s, torch.nan)                      # NaN where amax is Inf or NaN
    v = torch.nan_to_num(v * (s[:, None] if per_row else s), nan=0.0)
    parts = torch.empty((2 * M, N), dtype=torch.float32, device=dy.device)
    hi, lo = parts[:M], parts[M:]
    torch.div(v, HI_WEIGHT, out=hi).round_().clamp_(-SPLIT_MAX, SPLIT_MAX)
    u = torch.rand(v.shape, generator=capture_safe(generator), device=v.device, dtype=torch.float32)
    torch.add(v, hi, alpha=-HI_WEIGHT, out=lo).add_(u).floor_().clamp_(-SPLIT_MAX, SPLIT_MAX)
    norms = _weigh_norms(parts.norm(dim=1))
    if per_row:
        norms = torch.nan_to_num(norms / torch.cat((s, s)), nan=torch.inf)
    return parts.to(torch.int8), s, norms


def bit_split(dy: torch.Tensor, generator: torch.Generator, per_row: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hi, lo, s)`` of ``dy`` (see the module docstring): the halves of :func:`split_stacked`."""
    codes, s, _ = split_stacked(dy, generator, per_row)
    M = dy.shape[0]
    return codes[:M], codes[M:], s


def split_dequantize(hi: torch.Tensor, lo: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """fp32 ``(14·hi + lo) / s`` (``s`` [] or one per row)."""
    return (HI_WEIGHT * hi.float() + lo.float()) / (s[:, None] if s.dim() else s)


def stacked_norms(codes: torch.Tensor) -> torch.Tensor:
    """fp32 ``[2M]``: the norms of the stacked contribution rows ``[14·hi; lo]`` of ``codes = [hi; lo]``."""
    return _weigh_norms(codes.float().norm(dim=1))


def _weigh_norms(n: torch.Tensor) -> torch.Tensor:
    """``n [2M]`` row norms of ``[hi; lo]`` with the ``hi`` half times 14, in place."""
    n[:n.shape[0] // 2].mul_(HI_WEIGHT)
    return n


def leverage_probabilities(c: torch.Tensor, budget: float) -> torch.Tensor:
    """fp32 ``p [..., n]``: ``min(1, λ·c)`` with ``Σp = min(budget, #{c > 0})`` along the last dim (no host
    synchronization)."""
    c = c.float()
    n = c.shape[-1]
    if c.numel() == 0:
        return c.clone()
    # ascending; at position j the k = n − 1 − j larger rows are at the cap and tail[j] sums the others
    cs, _ = torch.sort(c, dim=-1)
    tail = cs.cumsum(-1)
    room = budget - torch.arange(n - 1, -1, -1, device=c.device, dtype=torch.float32)      # budget − k
    lam = room / tail
    ok = (room > 0) & (tail > 0) & (lam * cs <= 1)
    first = torch.argmax(torch.where(ok, room, -torch.inf), dim=-1, keepdim=True)     # fewest rows at the cap
    lam = torch.where(ok.any(-1, keepdim=True), lam.gather(-1, first), torch.inf)
    return torch.where(c > 0, torch.clamp(lam * c, max=1.0), 0.0)


def sample_rows(p: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """bool ``keep`` like ``p``: ``u < p`` with ``u ~ U[0, 1)`` from ``generator``."""
    u = torch.rand(p.shape, generator=capture_safe(generator), device=p.device, dtype=torch.float32)
    return u < p


def stacked_scales(p: torch.Tensor, keep: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """fp32 like ``p [..., 2M]``: ``14/(p·s)`` on the kept ``hi`` rows, ``1/(p·s)`` on the kept ``lo`` rows, 0 on
    the dropped ones — the per-row scales :func:`lss_dgrad` and :func:`lss_wgrad` take (``s`` [] or [M]: a
    token's ``hi`` and ``lo`` rows share its ``s``)."""
    M = p.shape[-1] // 2
    d = p.clamp_min(torch.finfo(torch.float32).tiny) * (torch.cat((s, s)) if s.dim() else s)
    scale = torch.cat((torch.div(float(HI_WEIGHT), d[..., :M]), torch.div(1.0, d[..., M:])), dim=-1)
    return torch.where(keep, scale, 0.0)


def _ref_gemm(a, b, a_scale, b_scale, bias=None, out_dtype=torch.float32):
    return int8_gemm(a, b, a_scale, b_scale, bias, out_dtype)


def lss_dgrad(codes: torch.Tensor, scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, gemm=_ref_gemm,
              gather: bool = False) -> torch.Tensor:
    """fp32 ``[M, K]`` unbiased estimate of ``((14·hi + lo)/s) @ (b·b_scale)ᵀ`` over the kept stacked rows of
    ``codes = [hi; lo]`` (``scale``: their :func:`stacked_scales`): one GEMM over all ``2M`` rows (the dropped
    ones scaled by 0; static shapes), then ``hi`` row + ``lo`` row per token. ``gather``: the GEMM over the rows
    of nonzero scale only (the same numbers, half the GEMM at the default budget, but a host synchronization for
    their count)."""
    M = codes.shape[0] // 2
    if gather:
        idx = scale.nonzero().squeeze(1)
        r = gemm(codes.index_select(0, idx), b, scale.index_select(0, idx), b_scale, None, torch.float32)
        out = torch.zeros(M, b.shape[0], dtype=torch.float32, device=codes.device)
        return out.index_put_((torch.remainder(idx, M),), r, accumulate=True)
    r = gemm(codes, b, scale, b_scale, None, torch.float32)
    return r[:M] + r[M:]


def lss_wgrad(codes: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, x_scale: torch.Tensor,
              tensor_cores: bool | None = None) -> torch.Tensor:
    """fp32 ``[N, K]`` unbiased estimate of ``((14·hi + lo)/s)ᵀ @ (x·x_scale)`` over the kept stacked rows of
    ``codes = [hi; lo]`` (``scale``: their :func:`stacked_scales`; ``x``: integer codes, any dtype). The per-row
    weights ``1/p`` lie along the reduced dim, which an integer GEMM cannot scale: each token's scaled ``hi`` and
    ``lo`` rows are summed into one fp32 row, then one GEMM over the ``M`` tokens.

    ``tensor_cores`` (default: on CUDA tensors) runs that GEMM as BF16 training's wgrad does — bf16 operands
    (``x``'s small integer codes are exact in bf16), fp32 accumulation, a bf16 result — on the tensor cores: an
    fp32 GEMM runs on the CUDA cores at ~1/10 of that speed (it was ~40 % of an INT4 step at 7B widths). Else
    fp32 throughout (the CPU, where bf16 GEMMs are slow)."""
    M, N = codes.shape[0] // 2, codes.shape[1]
    a = (codes.float() * scale[:, None]).view(2, M, N).sum(0)
    if a.is_cuda if tensor_cores is None else tensor_cores:
        g = (a.bfloat16().t() @ x.bfloat16()).float()
    else:
        g = a.t() @ x.float()
    return g * x_scale.reshape(()).float()
