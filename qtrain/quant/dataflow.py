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
* ``gelu_quantize(hq [M, F], hs, r, c) -> (aq, as)``: ``a = gelu(h)`` with the tanh approximation (GPT-2).

Contract with the kernels: the same scales up to fp32 rounding (relative 1e-5: the norms' row reductions sum in
another order and the kernel's transcendental functions differ in the last bits), codes within one step, and
all but a few codes equal.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from qtrain.quant.blockwise import check_block, quantize_blockwise


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
