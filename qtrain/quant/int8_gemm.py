"""Scaled INT8 GEMM (reference twin of ``qtrain.kernels.int8_gemm``).

``int8_gemm(a [M, K] int8, b [N, K] int8, a_scale [M] fp32, b_scale [] or [N] fp32, bias [N] | None,
out_dtype) -> [M, N] out_dtype``::

    acc = Σ_k a[m, k]·b[n, k]                    (exact, int32)
    out = float32(acc) · a_scale[m] · b_scale[n] (+ float32(bias[n]))   → out_dtype

Both operands are contiguous along the reduced dim K. K = 0 is an empty sum, still scaled: ``acc = 0``, so
``out = 0·a_scale·b_scale (+ bias)`` — NaN wherever a scale is NaN or ±Inf — in every twin.
"""
from __future__ import annotations

import torch

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CHUNK = 1024  # 127·127·1024 < 2^24: every fp32 partial sum of a chunk is an exact integer


def check_int8_gemm_args(a, b, a_scale, b_scale, bias, out_dtype) -> None:
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8_gemm operands must be int8, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"int8_gemm wants a [M, K] and b [N, K], got {tuple(a.shape)} and {tuple(b.shape)}")
    M, N = a.shape[0], b.shape[0]
    if a_scale.dtype != torch.float32 or tuple(a_scale.shape) != (M,):
        raise ValueError(f"a_scale must be fp32 [M]={M}, got {a_scale.dtype} {tuple(a_scale.shape)}")
    if b_scale.dtype != torch.float32 or tuple(b_scale.shape) not in ((), (N,)):
        raise ValueError(f"b_scale must be fp32 [] or [N]={N}, got {b_scale.dtype} {tuple(b_scale.shape)}")
    check_epilogue_args("int8_gemm", (a, b, a_scale, b_scale), N, bias, out_dtype)


def check_epilogue_args(op: str, tensors: tuple, N: int, bias, out_dtype) -> None:
    """What every scaled GEMM checks alike: bias ``[N]``, an output dtype of :data:`OUT_DTYPES`, one device."""
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must be [N]={N}, got {tuple(bias.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    devs = {t.device for t in tensors + ((bias,) if bias is not None else ())}
    if len(devs) != 1:
        raise ValueError(f"{op} operands are on different devices: {sorted(map(str, devs))}")


def int_mm_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b.T`` for int8 ``a [M, K]``, ``b [N, K]`` → int32 ``[M, N]``.

    On the CPU: fp32 matmuls over K-chunks of 1024 (each exact), summed in int64. Elsewhere: fp64.
    """
    if a.device.type != "cpu":
        return (a.double() @ b.double().t()).to(torch.int32)
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.int64, device=a.device)
    for k in range(0, a.shape[1], _CHUNK):
        out += (a[:, k:k + _CHUNK].float() @ b[:, k:k + _CHUNK].float().t()).to(torch.int64)
    return out.to(torch.int32)


def int8_gemm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    check_int8_gemm_args(a, b, a_scale, b_scale, bias, out_dtype)
    out = int_mm_exact(a, b).float() * a_scale[:, None] * b_scale
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)
