"""Learned step size quantization (LSQ, Esser et al. 2020), per tensor, as the INT4 recipe uses it
(METHODS.md § INT4 training). Pure PyTorch reference.

For ``x`` fp32 and a step ``s > 0`` (fp32, one element), with ``qmax = 7`` (range ``[-7, 7]``):

* forward: ``v = x / s``, ``q = round_half_even(clamp(v, −qmax, qmax))``, ``x̂ = q·s``;
* init (first batch): ``s₀ = 2·mean|x| / √qmax`` (:func:`lsq_init`; ``1.0`` for an all-zero ``x``);
* backward, given ``g = ∂L/∂x̂``: straight-through estimator masked outside the clip range,
  ``∂L/∂x = g·[|v| ≤ qmax]``; step gradient ``∂L/∂s = gs · Σ g·r`` with ``r = q − v`` inside the range and
  ``r = q`` (``±qmax``) outside, and the gradient scale ``gs = 1/√(numel·qmax)`` (:func:`lsq_grad_scale`).

:func:`lsq_quantize` gives ``q``, the in-range mask and ``r`` from one division; :func:`lsq_backward` the two
gradients; :func:`fake_quantize_lsq` is the autograd-aware ``x ↦ x̂`` the tests compare the layer against.
:func:`hq_search` calibrates the Hadamard quantizer: the LSQ init steps and the fprop error of each Hadamard block.
"""
from __future__ import annotations

import math

import torch

from qtrain.quant.hadamard import QMAX4, fwht_stage, inv_sqrt, pad_k, quantize_step


def lsq_init(x: torch.Tensor, qmax: int = QMAX4) -> torch.Tensor:
    """fp32 ``[]`` initial step ``2·mean|x|/√qmax`` (``1.0`` where ``x`` is all zero or empty)."""
    m = x.float().abs().mean() if x.numel() else x.new_zeros((), dtype=torch.float32)
    s = 2.0 * m / math.sqrt(qmax)
    return torch.where(s > 0, s, torch.ones_like(s)).float()


MSE_RATIOS = torch.arange(0.10, 1.2001, 0.02, dtype=torch.float64).float()     # mse_step's candidates, × RMS


def mse_step(t: torch.Tensor, qmax: int = QMAX4, rows: int = 4096) -> torch.Tensor:
    """fp32 ``[]``: the step ``s = c·rms(t)`` with the least ``‖t − s·round(clamp(t/s, ±qmax))‖²`` over ``c`` in
    0.10, 0.12, … 1.20 (over the first ``rows`` rows of the 2-D ``t``; ``1.0`` where those are all zero). On unit
    Gaussian data with ``qmax`` 7 that is ``c`` 0.35 (18.9 dB SQNR) where :func:`lsq_init` gives 0.60 (15.2 dB);
    Laplace 0.49, Student-t(3) 0.72."""
    t = t[:rows].float()
    rms = t.pow(2).mean().sqrt() if t.numel() else t.new_zeros(())
    if not bool(rms > 0) or not bool(torch.isfinite(rms)):
        return lsq_init(t, qmax)
    errs = torch.stack([(quantize_step(t, c * rms, qmax).float() * (c * rms) - t).pow(2).sum()
                        for c in MSE_RATIOS.tolist()])
    return (MSE_RATIOS[int(torch.argmin(errs))] * rms).float()


def lsq_grad_scale(numel: int, qmax: int = QMAX4) -> float:
    """``1/√(numel·qmax)``: the LSQ gradient scale of a step shared by ``numel`` values."""
    return 1.0 / math.sqrt(max(numel, 1) * qmax)


def lsq_quantize(x: torch.Tensor, step: torch.Tensor, qmax: int = QMAX4, residual: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(q fp32, inside bool, r fp32 or None)`` of ``x`` with step ``step``: the codes of :func:`quantize_step`
    (as fp32), ``inside = |x/s| ≤ qmax`` (False where ``x/s`` is NaN) and, with ``residual``, ``r = ∂x̂/∂s``
    (``q − v`` inside, ``q`` outside)."""
    v = x.float() / step.reshape(()).float()
    vc = v.clamp(-qmax, qmax)
    inside = vc == v
    q = torch.round(torch.nan_to_num(vc, nan=0.0))
    return q, inside, torch.where(inside, q - v, q) if residual else None


def lsq_residual(x: torch.Tensor, step: torch.Tensor, qmax: int = QMAX4) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inside bool, r fp32)`` of :func:`lsq_quantize`."""
    _, inside, r = lsq_quantize(x, step, qmax)
    return inside, r


def lsq_backward(x: torch.Tensor, step: torch.Tensor, grad: torch.Tensor, numel: int | None = None,
                 qmax: int = QMAX4, parts: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                 scaled: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(∂L/∂x fp32 like x, ∂L/∂s fp32 [])`` from ``grad = ∂L/∂x̂`` (see the module docstring); ``numel`` is
    the count of values sharing the step (default ``x.numel()``; a zero-padded ``x`` passes the unpadded one).
    ``parts``: ``(inside, r)`` of :func:`lsq_quantize` already computed for ``x`` and ``step``; ``r`` None skips
    the step gradient (returned as None). ``scaled=False``: ``∂L/∂s`` without LSQ's gradient scale."""
    inside, r = parts if parts is not None else lsq_residual(x, step, qmax)
    g = grad.float()
    gx = torch.where(inside, g, 0.0)
    if r is None:
        return gx, None
    ds = (g * r).sum()
    return gx, ds * lsq_grad_scale(x.numel() if numel is None else numel, qmax) if scaled else ds


def hq_search(x: torch.Tensor, w: torch.Tensor, blocks: list[int], rows: int = 4096
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Hadamard quantizer's calibration over candidate ``blocks`` (increasing powers of two) for the product
    ``x [M, K] @ w [N, K]ᵀ``: ``(steps [n, 2] fp32, errors [n] fp64 or None)``. Row ``i`` of ``steps`` is
    ``(lsq_init(XH), lsq_init(WH))`` with ``H`` of order ``blocks[i]`` (on all of ``x``); ``errors[i]`` the
    relative error ``‖XWᵀ − Q(XH)Q(WH)ᵀ‖ / ‖XWᵀ‖`` (fp64) over the first ``rows`` rows of ``x`` (None for one
    block). The same numbers as :func:`~qtrain.quant.hadamard.block_hadamard`, :func:`quantize_step` and the
    exact integer GEMM give, but all blocks share one transform (block ``2b`` is block ``b`` plus one butterfly
    stage) and nothing is read back to the host."""
    top = blocks[-1]
    tx, tw = pad_k(x.float(), top), pad_k(w.float(), top)
    ref = None
    if len(blocks) > 1:
        ref = (x[:rows].float() @ w.float().t()).double()
        ref_norm = torch.linalg.vector_norm(ref).clamp_min(1e-300)
    steps, errors = [], []
    h = 1
    for b in blocks:
        while h < b:
            tx, tw = fwht_stage(tx, h), fwht_stage(tw, h)
            h *= 2
        kp = -(-x.shape[1] // b) * b
        xh, wh = tx[:, :kp] * inv_sqrt(b), tw[:, :kp] * inv_sqrt(b)
        sx, sw = lsq_init(xh), lsq_init(wh)
        steps.append(torch.stack((sx, sw)))
        if ref is not None:
            qx, qw = lsq_quantize(xh[:rows], sx, residual=False)[0], lsq_quantize(wh, sw, residual=False)[0]
            out = (qx @ qw.t()) * sx * sw                   # integer codes: exact in fp32 while 49·K < 2²⁴
            errors.append(torch.linalg.vector_norm(ref - out.double()) / ref_norm)
    return torch.stack(steps), torch.stack(errors).nan_to_num(math.inf, math.inf) if errors else None


class _FakeQuantizeLSQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, step, qmax):
        ctx.save_for_backward(x, step)
        ctx.qmax = qmax
        return quantize_step(x.float(), step, qmax).float() * step.reshape(()).float()

    @staticmethod
    def backward(ctx, g):
        x, step = ctx.saved_tensors
        gx, gs = lsq_backward(x, step, g, qmax=ctx.qmax)
        return gx.to(x.dtype), gs.reshape(step.shape).to(step.dtype), None


def fake_quantize_lsq(x: torch.Tensor, step: torch.Tensor, qmax: int = QMAX4) -> torch.Tensor:
    """fp32 ``x̂ = s·round(clamp(x/s))`` with the LSQ gradients to ``x`` and ``step``."""
    return _FakeQuantizeLSQ.apply(x, step, qmax)
