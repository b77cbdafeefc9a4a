"""Dispatch: each quantized primitive runs its Triton kernel (``qtrain.kernels``) or its PyTorch reference
twin (``qtrain.quant``), both with one contract.

``auto`` (default) picks the kernel for CUDA tensors when Triton is importable, the reference otherwise.
``triton`` forces the kernels (on CPU tensors this needs ``TRITON_INTERPRET=1``, which is how CPU tests drive
them); ``reference`` forces the twins. Set it with :func:`set_backend` or the :func:`use_backend` context,
or the environment variable ``QTRAIN_BACKEND``.

The primitives are ``torch.library.custom_op`` s with fake (meta) implementations, so ``torch.compile`` sees
opaque, shape-checked ops.
"""
from __future__ import annotations

import contextlib
import importlib
import os

import torch

from qtrain import quant
from qtrain.quant.core import check_2d, check_float
from qtrain.quant.int8_gemm import check_int8_gemm_args

BACKENDS = ("auto", "triton", "reference")
_backend = os.environ.get("QTRAIN_BACKEND", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"QTRAIN_BACKEND={_backend!r} is not one of {BACKENDS}")


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; accepted: {', '.join(BACKENDS)}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    """Run the block with backend ``name``, restoring the previous one after."""
    old = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernel(module: str, fn: str, device: torch.device):
    """The Triton twin ``qtrain.kernels.<module>.<fn>`` if the backend wants it for ``device``, else None."""
    if _backend == "reference":
        return None
    if _backend == "auto" and not (device.type == "cuda" and triton_available()):
        return None
    if _backend == "triton" and device.type != "cuda" and not interpreting():
        raise RuntimeError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before qtrain is "
                           "imported; use backend 'reference' or CUDA tensors")
    return getattr(importlib.import_module(f"qtrain.kernels.{module}"), fn)


# ------------------------------------------------------------------------------------------ quantize_rowwise
@torch.library.custom_op("qtrain::quantize_rowwise", mutates_args=())
def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` float → ``(q [M, K] int8, scale [M] fp32)``; see :mod:`qtrain.quant.rowwise`."""
    k = _kernel("rowwise", "quantize_rowwise", x.device)
    return (k or quant.quantize_rowwise)(x)


@quantize_rowwise.register_fake
def _(x):
    check_float(x)
    check_2d(x)
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:1], dtype=torch.float32)


# --------------------------------------------------------------------------------------- quantize_tensorwise
@torch.library.custom_op("qtrain::quantize_tensorwise", mutates_args=())
def quantize_tensorwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w [N, K]`` float → ``(q [N, K], qt [K, N] int8, scale [] fp32)``; see :mod:`qtrain.quant.tensorwise`."""
    k = _kernel("tensorwise", "quantize_tensorwise", w.device)
    return (k or quant.quantize_tensorwise)(w)


@quantize_tensorwise.register_fake
def _(w):
    check_float(w)
    check_2d(w)
    n, k = w.shape
    return (w.new_empty((n, k), dtype=torch.int8), w.new_empty((k, n), dtype=torch.int8),
            w.new_empty((), dtype=torch.float32))


# ------------------------------------------------------------------------------------------------- int8_gemm
@torch.library.custom_op("qtrain::int8_gemm", mutates_args=())
def int8_gemm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``float(a @ bᵀ) · a_scale[m] · b_scale (+ bias)`` → ``out_dtype``; see :mod:`qtrain.quant.int8_gemm`."""
    k = _kernel("int8_gemm", "int8_gemm", a.device)
    return (k or quant.int8_gemm)(a, b, a_scale, b_scale, bias, out_dtype)


@int8_gemm.register_fake
def _(a, b, a_scale, b_scale, bias, out_dtype):
    check_int8_gemm_args(a, b, a_scale, b_scale, bias, out_dtype)
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)
