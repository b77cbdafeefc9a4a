"""INT8 data flow: the ops between linear layers take INT8 blocks in and give INT8 blocks out (Jetfire; reference
twin of ``qtrain.kernels.dataflow``).

Every tensor is ``[M, K]`` (tokens × features) int8 with fp32 block scales ``[⌈M/r⌉, ⌈K/c⌉]`` in ``(r, c)``
blocks (:func:`qtrain.quant.blockwise.quantize_blockwise`); input and output use the same ``(r, c)``. Each op
dequantizes in fp32 (``q.float() · scale``), computes in fp32 and quantizes its output RTN:

* ``rmsnorm_quantize(xq, xs, weight [K], eps, r, c) -> (yq, ys)``: ``y = x · rsqrt(mean(x²) + eps) · weight``
  (LLaMA's RMSNorm);
* ``layernorm_quantize(xq, xs, weight [K], bias [K] | None, eps, r, c) -> (yq, ys)``:
  ``y = (x − mean) · rsqrt(var + eps) · weight + bias`` (biased variance, as ``nn.LayerNorm``);
* ``swiglu_quantize(hq [M, 2F], hs, r, c) -> (aq [M, F], as)``: ``a = silu(gate) · up`` with ``gate, up =
  h.chunk(2, -1)`` (the fused gate/up projection's output);
* ``gelu_quantize(hq [M, F], hs, r, c) -> (aq, as)``: ``a = gelu(h)`` with the tanh approximation (GPT-2);
* ``quantize_swiglu(h [M, 2F] float, r, c)``, ``quantize_gelu(h [M, F] float, r, c) -> (hq, hs, aq, as)``: ``h``
  quantized (:func:`~qtrain.quant.blockwise.quantize_blockwise`) and the activation of those blocks — the two ops
  in one (the kernel reads ``h`` once; SwiGLU's ``F`` a multiple of ``c`` there).

Backward of the activations, for Jetfire's INT8 output gradient (dgrad ``out='int8_blocks'``): INT8 ``h`` (saved
by the forward) and INT8 ``g`` in, fp32 ``dh`` out (:func:`activation_vjp` on the dequantized inputs):

* ``swiglu_backward(hq [M, 2F], hs, gq [M, F], gs, r, c) -> dh [M, 2F] fp32``;
* ``gelu_backward(hq [M, F], hs, gq [M, F], gs, r, c) -> dh [M, F] fp32``.

and of the norms, INT8 ``x`` (the residual input, saved) and INT8 ``g`` in (:func:`norm_vjp`):

* ``rmsnorm_backward(xq, xs, weight, gq, gs, eps, r, c) -> (dx [M, K] fp32, dweight [K] fp32)``;
* ``layernorm_backward(xq, xs, weight, bias | None, gq, gs, eps, r, c) -> (dx, dweight, dbias | None)``.

Contract with the kernels: the same scales up to fp32 rounding (relative 1e-5: the norms' row reductions sum in
another order and the kernel's transcendental functions differ in the last bits), codes within one step, and
all but a few codes equal; the backward ops' outputs within 1e-5 of their largest magnitude (fp32 arithmetic in
another order, other transcendental functions).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qtrain.quant.blockwise import check_block, quantize_blockwise
from qtrain.quant.core import check_2d, check_float


def check_int8_blocks(q: torch.Tensor, s: torch.Tensor, r: int, c: int, what: str = "input") -> None:
    check_block(r, c)
    if q.dtype != torch.int8 or q.dim() != 2:
        raise TypeError(f"{what} must be 2-D int8 [M, K], got {q.dtype} {tuple(q.shape)}")
    want = (-(-q.shape[0] // r), -(-q.shape[1] // c))
    if s.dtype != torch.float32 or tuple(s.shape) != want:
        raise ValueError(f"{what} scales must be fp32 {list(want)} ({r}×{c} blocks), got {s.dtype} {list(s.shape)}")


def check_vector(v: torch.Tensor | None, k: int, what: str) -> None:
    if v is not None and (v.dim() != 1 or v.shape[0] != k or not v.dtype.is_floating_point):
        raise ValueError(f"{what} must be a float vector [{k}], got {v.dtype} {tuple(v.shape)}")


def dequantize_blocks(q: torch.Tensor, s: torch.Tensor, r: int, c: int) -> torch.Tensor:
    """fp32 ``q · scale`` of an ``(r, c)``-block quantized tensor."""
    M, K = q.shape
    return q.float() * s.repeat_interleave(r, 0)[:M].repeat_interleave(c, 1)[:, :K]


def rmsnorm_quantize(xq, xs, weight, eps: float, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    check_int8_blocks(xq, xs, r, c)
    check_vector(weight, xq.shape[1], "weight")
    x = dequantize_blocks(xq, xs, r, c)
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return quantize_blockwise(y, r, c)


def layernorm_quantize(xq, xs, weight, bias, eps: float, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    check_int8_blocks(xq, xs, r, c)
    check_vector(weight, xq.shape[1], "weight")
    check_vector(bias, xq.shape[1], "bias")
    x = dequantize_blocks(xq, xs, r, c)
    mean = x.mean(-1, keepdim=True)
    xc = x - mean
    y = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    if bias is not None:
        y = y + bias.float()
    return quantize_blockwise(y, r, c)


def swiglu_quantize(hq, hs, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    check_int8_blocks(hq, hs, r, c)
    if hq.shape[1] % 2:
        raise ValueError(f"swiglu_quantize wants [M, 2F] (gate | up), got {tuple(hq.shape)}")
    gate, up = dequantize_blocks(hq, hs, r, c).chunk(2, dim=-1)
    return quantize_blockwise(F.silu(gate) * up, r, c)


def gelu_quantize(hq, hs, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    check_int8_blocks(hq, hs, r, c)
    return quantize_blockwise(F.gelu(dequantize_blocks(hq, hs, r, c), approximate="tanh"), r, c)


def check_quantize_act(h: torch.Tensor, r: int, c: int, swiglu: bool) -> None:
    check_float(h)
    check_2d(h)
    check_block(r, c)
    if swiglu and h.shape[1] % 2:
        raise ValueError(f"quantize_swiglu wants h [M, 2F] (gate | up), got {tuple(h.shape)}")


def quantize_swiglu(h, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_quantize_act(h, r, c, True)
    hq, hs = quantize_blockwise(h, r, c)
    return (hq, hs, *swiglu_quantize(hq, hs, r, c))


def quantize_gelu(h, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_quantize_act(h, r, c, False)
    hq, hs = quantize_blockwise(h, r, c)
    return (hq, hs, *gelu_quantize(hq, hs, r, c))


def activation_vjp(kind: str, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """fp32 ``dh`` of ``kind`` (``'swiglu'``: ``silu(gate)·up`` of ``h = [gate | up]``; ``'gelu'``: tanh GELU)
    for the output gradient ``g``; explicit (no autograd), so that torch.compile traces it."""
    h, g = h.float(), g.float()
    if kind == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        return torch.cat((g * up * sig * (1 + gate * (1 - sig)), g * silu), dim=-1)
    # with t = tanh(u): ½(1 + t) = σ(2u) and ½(1 − t²) = 2·σ(2u)·σ(−2u), free of the cancellation of 1 ± t near
    # saturation (CPU's vectorized tanh returns ±1 there already)
    c = math.sqrt(2.0 / math.pi)
    u = c * (h + 0.044715 * h.pow(3))
    s, sn = torch.sigmoid(2 * u), torch.sigmoid(-2 * u)
    return g * (s + 2 * h * s * sn * c * (1 + 3 * 0.044715 * h * h))


def _check_backward(hq, hs, gq, gs, r: int, c: int, swiglu: bool) -> None:
    check_int8_blocks(hq, hs, r, c, "h")
    check_int8_blocks(gq, gs, r, c, "gradient")
    f = hq.shape[1] // 2 if swiglu else hq.shape[1]
    if (swiglu and hq.shape[1] % 2) or gq.shape != (hq.shape[0], f):
        want = "[M, 2F] (gate | up) and a gradient [M, F]" if swiglu else "h and a gradient of the same shape"
        raise ValueError(f"{'swiglu' if swiglu else 'gelu'}_backward wants {want}, got h {tuple(hq.shape)} and "
                         f"gradient {tuple(gq.shape)}")


def _check_out_dtype(out_dtype) -> None:
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"activation backward out_dtype must be torch.float32 or torch.bfloat16, got {out_dtype}")


def swiglu_backward(hq, hs, gq, gs, r: int, c: int, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    _check_backward(hq, hs, gq, gs, r, c, True)
    _check_out_dtype(out_dtype)
    return activation_vjp("swiglu", dequantize_blocks(hq, hs, r, c), dequantize_blocks(gq, gs, r, c)).to(out_dtype)


def gelu_backward(hq, hs, gq, gs, r: int, c: int, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    _check_backward(hq, hs, gq, gs, r, c, False)
    _check_out_dtype(out_dtype)
    return activation_vjp("gelu", dequantize_blocks(hq, hs, r, c), dequantize_blocks(gq, gs, r, c)).to(out_dtype)


def norm_vjp(kind: str, x, w, b, eps: float, g) -> tuple:
    """fp32 ``(dx, dw, db)`` of RMSNorm (``kind`` ``'rms'``) or LayerNorm (``'ln'``) for the output gradient
    ``g``; explicit (no autograd), so that torch.compile traces it; ``db`` None for RMSNorm or without a bias."""
    x, g, w = x.float(), g.float(), w.float()
    gw = g * w
    if kind == "rms":
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        xhat = x * r
        dx = r * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))
        return dx, (g * xhat).sum(0), None
    mu = x.mean(-1, keepdim=True)
    r = torch.rsqrt((x - mu).pow(2).mean(-1, keepdim=True) + eps)
    xhat = (x - mu) * r
    dx = r * (gw - gw.mean(-1, keepdim=True) - xhat * (gw * xhat).mean(-1, keepdim=True))
    return dx, (g * xhat).sum(0), (g.sum(0) if b is not None else None)


def _check_norm_backward(xq, xs, weight, bias, gq, gs, r: int, c: int) -> None:
    check_int8_blocks(xq, xs, r, c, "x")
    check_int8_blocks(gq, gs, r, c, "gradient")
    if gq.shape != xq.shape:
        raise ValueError(f"the norm backward wants x and its gradient of one shape, got {tuple(xq.shape)} and "
                         f"{tuple(gq.shape)}")
    check_vector(weight, xq.shape[1], "weight")
    check_vector(bias, xq.shape[1], "bias")


def rmsnorm_backward(xq, xs, weight, gq, gs, eps: float, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_norm_backward(xq, xs, weight, None, gq, gs, r, c)
    dx, dw, _ = norm_vjp("rms", dequantize_blocks(xq, xs, r, c), weight, None, eps, dequantize_blocks(gq, gs, r, c))
    return dx, dw


def layernorm_backward(xq, xs, weight, bias, gq, gs, eps: float, r: int, c: int) -> tuple:
    _check_norm_backward(xq, xs, weight, bias, gq, gs, r, c)
    return norm_vjp("ln", dequantize_blocks(xq, xs, r, c), weight, bias, eps, dequantize_blocks(gq, gs, r, c))
