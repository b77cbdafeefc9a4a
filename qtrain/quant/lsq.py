"""Learned step size quantization (LSQ, Esser et al. 2020), per tensor, as the INT4 recipe uses it
(METHODS.md § INT4 training). Pure PyTorch reference.

For ``x`` fp32 and a step ``s > 0`` (fp32, one element), with ``qmax = 7`` (range ``[-7, 7]``):

* forward: ``v = x / s``, ``q = round_half_even(clamp(v, −qmax, qmax))``, ``x̂ = q·s``;
* init (first batch): ``s₀ = 2·mean|x| / √qmax`` (:func:`lsq_init`; ``1.0`` for an all-zero ``x``);
* backward, given ``g = ∂L/∂x̂``: straight-through estimator masked outside the clip range,
  ``∂L/∂x = g·[|v| ≤ qmax]``; step gradient ``∂L/∂s = gs · Σ g·r`` with ``r = q − v`` inside the range and
  ``r = q`` (``±qmax``) outside, and the gradient scale ``gs = 1/√(numel·qmax)`` (:func:`lsq_grad_scale`).

:func:`lsq_backward` computes those two gradients; :func:`fake_quantize_lsq` is the autograd-aware
``x ↦ x̂`` the tests compare the layer against.
"""
from __future__ import annotations

import math

import torch

from qtrain.quant.hadamard import QMAX4, quantize_step


def lsq_init(x: torch.Tensor, qmax: int = QMAX4) -> torch.Tensor:
    """fp32 ``[]`` initial step ``2·mean|x|/√qmax`` (``1.0`` where ``x`` is all zero or empty)."""
    m = x.float().abs().mean() if x.numel() else x.new_zeros((), dtype=torch.float32)
    s = 2.0 * m / math.sqrt(qmax)
    return torch.where(s > 0, s, torch.ones_like(s)).float()


def lsq_grad_scale(numel: int, qmax: int = QMAX4) -> float:
    """``1/√(numel·qmax)``: the LSQ gradient scale of a step shared by ``numel`` values."""
    return 1.0 / math.sqrt(max(numel, 1) * qmax)


def lsq_residual(x: torch.Tensor, step: torch.Tensor, qmax: int = QMAX4) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inside bool, r fp32)`` of fp32 ``x`` with step ``step``: ``inside = |x/s| ≤ qmax``, ``r = ∂x̂/∂s``
    (``q − v`` inside, ``q`` outside)."""
    v = x.float() / step.reshape(()).float()
    q = quantize_step(x.float(), step, qmax).float()
    inside = v.abs() <= qmax
    return inside, torch.where(inside, q - v, q)


def lsq_backward(x: torch.Tensor, step: torch.Tensor, grad: torch.Tensor, numel: int | None = None,
                 qmax: int = QMAX4) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∂L/∂x fp32 like x, ∂L/∂s fp32 [])`` from ``grad = ∂L/∂x̂`` (see the module docstring); ``numel`` is
    the count of values sharing the step (default ``x.numel()``; a zero-padded ``x`` passes the unpadded one)."""
    inside, r = lsq_residual(x, step, qmax)
    g = grad.float()
    gs = lsq_grad_scale(x.numel() if numel is None else numel, qmax)
    return torch.where(inside, g, torch.zeros_like(g)), (g * r).sum() * gs


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
