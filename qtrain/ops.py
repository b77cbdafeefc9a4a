"""Dispatch: each quantized primitive runs its Triton kernel (``qtrain.kernels``) or its PyTorch reference
twin (``qtrain.quant``), both with one contract.

``auto`` (default) picks the kernel for CUDA tensors when Triton is importable, the reference otherwise.
``triton`` forces the kernels (on CPU tensors this needs ``TRITON_INTERPRET=1``, which is how CPU tests drive
them); ``reference`` forces the twins. Set it with :func:`set_backend` or the :func:`use_backend` context,
or the environment variable ``QTRAIN_BACKEND`` (unset or empty: ``auto``). An unknown value is reported where a
backend is chosen — by :func:`get_backend` and the first dispatched op — as a :class:`BackendError` (a
``UserError``: the CLI prints it as one line), not at import, where ``python -m qtrain`` could only show a
traceback.

Each primitive is also a ``qtrain::`` operator (:func:`custom_op`) with a fake (meta) implementation: under
``torch.compile`` the public functions call the operator, so the compiler sees opaque, shape-checked ops; in eager
mode they call the implementation directly (``torch.library.custom_op``'s dispatch cost ~100 µs of host time a
call on the H100, which dominated small layers).
"""
from __future__ import annotations

import contextlib
import importlib
import os

import torch

from qtrain import quant
from qtrain.errors import UserError
from qtrain.quant.core import check_2d, check_float
from qtrain.quant.block_gemm import check_block_gemm_args
from qtrain.quant.blockwise import check_block, check_requantize_args
from qtrain.quant.dataflow import check_int8_blocks
from qtrain.quant.fallback import GROUP_ROWS, check_fallback_args, check_fallback_gemm_args
from qtrain.quant.int8_gemm import check_int8_gemm_args
from qtrain.quant.transpose import check_int8_2d

BACKENDS = ("auto", "triton", "reference")


class BackendError(UserError, ValueError):
    """An unknown backend name (``set_backend`` or ``QTRAIN_BACKEND``); the message lists the accepted ones."""


_backend = os.environ.get("QTRAIN_BACKEND") or "auto"    # checked where it is used: see the module docstring


def _unknown_env_backend() -> BackendError:
    return BackendError(f"QTRAIN_BACKEND={_backend!r} is not a backend; accepted: {', '.join(BACKENDS)} "
                        "(or leave it unset for auto)")


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; accepted: {', '.join(BACKENDS)}")
    _backend = name


def get_backend() -> str:
    """The backend in force; raises :class:`BackendError` if ``QTRAIN_BACKEND`` named an unknown one."""
    if _backend not in BACKENDS:
        raise _unknown_env_backend()
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    """Run the block with backend ``name``, restoring the previous one after."""
    global _backend
    old = _backend   # as it was, even an unknown QTRAIN_BACKEND value (still reported after the block)
    set_backend(name)
    try:
        yield
    finally:
        _backend = old


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_KERNELS: dict[tuple[str, str], object] = {}
_TRITON = triton_available()

# ------------------------------------------------------------------------------------------ op registration
_LIB = torch.library.Library("qtrain", "FRAGMENT")
# Check on every call of an op through the dispatcher that its outputs are fresh tensors (the tests switch it on):
# what torch.library.custom_op checks at run time, and what Inductor relies on for an op without alias annotations.
CHECK_ALIASING = False
OPS: dict[str, "Op"] = {}             # every operator :func:`custom_op` defined, by name


class Op:
    """A functional ``qtrain::`` operator (see :func:`custom_op`): call it like the function it was made from."""

    def __init__(self, name: str):
        self.name = name
        self.overload = getattr(torch.ops.qtrain, name).default

    def __call__(self, *args, **kwargs):
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad
                                           for a in (*args, *kwargs.values())):
            raise RuntimeError(f"qtrain::{self.name} has no gradient: call it on tensors that do not require grad "
                               "(qtrain.nn's autograd Functions do), or under torch.no_grad()")
        return self.overload(*args, **kwargs)

    def register_fake(self, fn):
        """``fn`` (same arguments; output shapes, dtypes and devices only) is the op's fake and meta kernel."""
        torch.library.register_fake(f"qtrain::{self.name}", fn, lib=_LIB)
        return fn


def custom_op(name: str):
    """Decorator: the function (type-annotated, functional: returns new tensors, mutates nothing) as the operator
    ``qtrain::<name>``, opaque to ``torch.compile``, with ``.register_fake`` — what ``torch.library.custom_op(...,
    mutates_args=())`` gives, registered on the dispatcher directly as one CompositeExplicitAutograd kernel,
    without custom_op's Python autograd and aliasing layers: the dispatcher's part of a call 36–41 → 6–11 µs on
    the H200 (``benchmarks/op_dispatch.py``; a later call on another machine was too noisy to tell). Under
    torch.compile every qtrain primitive is called through the dispatcher, so at 1B widths (host-bound) this is
    step time (jetfire_wide 0.61 → 0.73× BF16 with this and the SR seeds drawn inside the ops,
    benchmarks/results/2026-12-01-h200-e2e-session11.md). No gradient is defined: qtrain's autograd.Functions
    call the ops."""
    def define(fn):
        _LIB.define(name + torch.library.infer_schema(fn, mutates_args=()))

        def kernel(*args, **kwargs):
            out = fn(*args, **kwargs)
            if CHECK_ALIASING:
                _check_fresh(name, (*args, *kwargs.values()), out)
            return out

        _LIB.impl(name, kernel, "CompositeExplicitAutograd")
        OPS[name] = Op(name)
        return OPS[name]
    return define


def _check_fresh(name: str, inputs, out) -> None:
    def storages(values):
        return [v.untyped_storage().data_ptr() for v in values
                if isinstance(v, torch.Tensor) and v.untyped_storage().nbytes()]
    outs = storages(out if isinstance(out, (tuple, list)) else (out,))
    ins = set(storages(v for i in inputs for v in (i if isinstance(i, (tuple, list)) else (i,))))
    if len(set(outs)) != len(outs) or ins.intersection(outs):
        raise RuntimeError(f"qtrain::{name} returned a tensor that aliases an input or another output; an op "
                           "must return fresh tensors (clone the aliased one)")


def _kernel(module: str, fn: str, device: torch.device):
    """The Triton twin ``qtrain.kernels.<module>.<fn>`` if the backend wants it for ``device``, else None."""
    if _backend == "reference":
        return None
    if _backend == "auto":
        if not (device.type == "cuda" and _TRITON):
            return None
    elif _backend == "triton":
        if device.type != "cuda" and not interpreting():
            raise RuntimeError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before qtrain is "
                               "imported; use backend 'reference' or CUDA tensors")
    else:
        raise _unknown_env_backend()
    k = _KERNELS.get((module, fn))
    if k is None:
        k = _KERNELS[(module, fn)] = getattr(importlib.import_module(f"qtrain.kernels.{module}"), fn)
    return k


# ------------------------------------------------------------------------------------------ quantize_rowwise
def _quantize_rowwise(x):
    k = _kernel("rowwise", "quantize_rowwise", x.device)
    return (k or quant.quantize_rowwise)(x)


@custom_op("quantize_rowwise")
def _quantize_rowwise_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _quantize_rowwise(x)


@_quantize_rowwise_op.register_fake
def _(x):
    check_float(x)
    check_2d(x)
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:1], dtype=torch.float32)


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` float → ``(q [M, K] int8, scale [M] fp32)``; see :mod:`qtrain.quant.rowwise`."""
    return _quantize_rowwise_op(x) if torch.compiler.is_compiling() else _quantize_rowwise(x)


# --------------------------------------------------------------------------------------- quantize_tensorwise
def _quantize_tensorwise(w):
    k = _kernel("tensorwise", "quantize_tensorwise", w.device)
    return (k or quant.quantize_tensorwise)(w)


@custom_op("quantize_tensorwise")
def _quantize_tensorwise_op(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _quantize_tensorwise(w)


@_quantize_tensorwise_op.register_fake
def _(w):
    check_float(w)
    check_2d(w)
    n, k = w.shape
    return (w.new_empty((n, k), dtype=torch.int8), w.new_empty((k, n), dtype=torch.int8),
            w.new_empty((), dtype=torch.float32))


def quantize_tensorwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w [N, K]`` float → ``(q [N, K], qt [K, N] int8, scale [] fp32)``; see :mod:`qtrain.quant.tensorwise`."""
    return _quantize_tensorwise_op(w) if torch.compiler.is_compiling() else _quantize_tensorwise(w)


# -------------------------------------------------------------------------------------------- transpose_int8
def _transpose_int8(q):
    k = _kernel("transpose", "transpose_int8", q.device)
    return (k or quant.transpose_int8)(q)


@custom_op("transpose_int8")
def _transpose_int8_op(q: torch.Tensor) -> torch.Tensor:
    return _transpose_int8(q)


@_transpose_int8_op.register_fake
def _(q):
    check_int8_2d(q)
    return q.new_empty((q.shape[1], q.shape[0]))


def transpose_int8(q: torch.Tensor) -> torch.Tensor:
    """``q [M, N]`` int8 → ``qᵀ [N, M]`` contiguous; see :mod:`qtrain.quant.transpose`."""
    return _transpose_int8_op(q) if torch.compiler.is_compiling() else _transpose_int8(q)


# ------------------------------------------------------------------------------------------------- int8_gemm
def _int8_gemm(a, b, a_scale, b_scale, bias, out_dtype):
    k = _kernel("int8_gemm", "int8_gemm", a.device)
    return (k or quant.int8_gemm)(a, b, a_scale, b_scale, bias, out_dtype)


@custom_op("int8_gemm")
def _int8_gemm_op(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    return _int8_gemm(a, b, a_scale, b_scale, bias, out_dtype)


@_int8_gemm_op.register_fake
def _(a, b, a_scale, b_scale, bias, out_dtype):
    check_int8_gemm_args(a, b, a_scale, b_scale, bias, out_dtype)
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


def int8_gemm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``float(a @ bᵀ) · a_scale[m] · b_scale (+ bias)`` → ``out_dtype``; see :mod:`qtrain.quant.int8_gemm`."""
    if torch.compiler.is_compiling():
        return _int8_gemm_op(a, b, a_scale, b_scale, bias, out_dtype)
    return _int8_gemm(a, b, a_scale, b_scale, bias, out_dtype)


# ---------------------------------------------------------------------------------------- quantize_blockwise
def _quantize_blockwise(x, r, c):
    k = _kernel("blockwise", "quantize_blockwise", x.device)
    return (k or quant.quantize_blockwise)(x, r, c)


@custom_op("quantize_blockwise")
def _quantize_blockwise_op(x: torch.Tensor, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _quantize_blockwise(x, r, c)


@_quantize_blockwise_op.register_fake
def _(x, r, c):
    check_float(x)
    check_2d(x)
    check_block(r, c)
    m, k = x.shape
    return x.new_empty((m, k), dtype=torch.int8), x.new_empty((-(-m // r), -(-k // c)), dtype=torch.float32)


def quantize_blockwise(x: torch.Tensor, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` float → ``(q [M, K] int8, scale [⌈M/r⌉, ⌈K/c⌉] fp32)``; see :mod:`qtrain.quant.blockwise`."""
    return _quantize_blockwise_op(x, r, c) if torch.compiler.is_compiling() else _quantize_blockwise(x, r, c)


# ---------------------------------------------------------------------------------- requantize_blockwise_t
def _requantize_blockwise_t(q, scale, r_in, c_in, r, c):
    k = _kernel("blockwise", "requantize_blockwise_t", q.device)
    return (k or quant.requantize_blockwise_t)(q, scale, r_in, c_in, r, c)


@custom_op("requantize_blockwise_t")
def _requantize_blockwise_t_op(q: torch.Tensor, scale: torch.Tensor, r_in: int, c_in: int, r: int,
                               c: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _requantize_blockwise_t(q, scale, r_in, c_in, r, c)


@_requantize_blockwise_t_op.register_fake
def _(q, scale, r_in, c_in, r, c):
    check_requantize_args(q, scale, r_in, c_in)
    check_block(r, c)
    m, k = q.shape
    return q.new_empty((k, m)), scale.new_empty((-(-k // r), -(-m // c)))


def requantize_blockwise_t(q: torch.Tensor, scale: torch.Tensor, r_in: int, c_in: int, r: int,
                           c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [M, K]`` int8 in ``r_in × c_in`` blocks → ``(qt [K, M] int8, scale [⌈K/r⌉, ⌈M/c⌉])``: its dequantized
    transpose in ``r × c`` blocks, from the codes; see :mod:`qtrain.quant.blockwise`."""
    if torch.compiler.is_compiling():
        return _requantize_blockwise_t_op(q, scale, r_in, c_in, r, c)
    return _requantize_blockwise_t(q, scale, r_in, c_in, r, c)


# ------------------------------------------------------------------------------------- quantize_blockwise_sr
def _quantize_blockwise_sr(x, r, c, seed):
    k = _kernel("blockwise", "quantize_blockwise_sr", x.device)
    return (k or quant.quantize_blockwise_sr)(x, r, c, _drawn(seed, x))


@custom_op("quantize_blockwise_sr")
def _quantize_blockwise_sr_op(x: torch.Tensor, r: int, c: int, seed: torch.Tensor | None) -> tuple[torch.Tensor,
                                                                                                     torch.Tensor]:
    return _quantize_blockwise_sr(x, r, c, seed)


@_quantize_blockwise_sr_op.register_fake
def _(x, r, c, seed):
    check_float(x)
    check_2d(x)
    check_block(r, c)
    m, k = x.shape
    return x.new_empty((m, k), dtype=torch.int8), x.new_empty((-(-m // r), -(-k // c)), dtype=torch.float32)


def sr_seed(generator: torch.Generator) -> torch.Tensor:
    """A one-element int64 seed drawn from ``generator`` on its own device (no host synchronization; inside a
    CUDA graph capture from the default generator: :func:`qtrain.quant.core.capture_safe`)."""
    return torch.randint(0, 2**62, (1,), generator=quant.core.capture_safe(generator), device=generator.device,
                         dtype=torch.int64)


def quantize_blockwise_sr(x: torch.Tensor, r: int, c: int,
                          generator: "torch.Generator | torch.Tensor | None" = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_blockwise`` with stochastic rounding: the seed is drawn from ``generator`` (None: the project's
    stochastic-rounding generator of ``x``'s device, ``qtrain.nn.functional.sr_generator``) or given as a
    one-element integer tensor; see :mod:`qtrain.quant.blockwise`. Under ``torch.compile`` the project's
    generator is drawn inside an opaque op; other generators cannot be traced (pass a seed tensor)."""
    seed = _sr_seed_of(generator, "quantize_blockwise_sr")
    if torch.compiler.is_compiling():
        return _quantize_blockwise_sr_op(x, r, c, seed)
    return _quantize_blockwise_sr(x, r, c, seed)


def _sr_seed_of(generator, what: str) -> torch.Tensor | None:
    """The one-element seed tensor of an SR op: ``generator`` itself if a tensor, else drawn from it; None for
    the project's generator, which the implementation draws from inside (:func:`_drawn`; under torch.compile one
    opaque op instead of two, and a ``torch.Generator`` cannot be traced there)."""
    if generator is None or isinstance(generator, torch.Tensor):
        return generator
    if torch.compiler.is_compiling():
        raise ValueError(f"under torch.compile {what} takes generator=None (the project's) or a seed tensor, "
                         "not a torch.Generator")
    return sr_seed(generator)


def _drawn(seed: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``seed``, or (None) one drawn from the project's stochastic-rounding generator of ``x``'s device."""
    return seed if seed is not None else sr_seed(_sr_generator(x.device))


# -------------------------------------------------------------------------------- quantize_blockwise_sr_dual
def _quantize_blockwise_sr_dual(x, c, seed):
    k = _kernel("blockwise", "quantize_blockwise_sr_dual", x.device)
    return (k or quant.quantize_blockwise_sr_dual)(x, c, _drawn(seed, x))


@custom_op("quantize_blockwise_sr_dual")
def _quantize_blockwise_sr_dual_op(x: torch.Tensor, c: int, seed: torch.Tensor | None) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _quantize_blockwise_sr_dual(x, c, seed)


@_quantize_blockwise_sr_dual_op.register_fake
def _(x, c, seed):
    check_float(x)
    check_2d(x)
    check_block(1, c)
    m, n = x.shape
    return (x.new_empty((m, n), dtype=torch.int8), x.new_empty((m, -(-n // c)), dtype=torch.float32),
            x.new_empty((n, m), dtype=torch.int8), x.new_empty((n, -(-m // c)), dtype=torch.float32))


def quantize_blockwise_sr_dual(x: torch.Tensor, c: int, generator: "torch.Generator | torch.Tensor | None" = None
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [M, N]`` float → ``(q [M, N], s [M, ⌈N/c⌉], qt [N, M], st [N, ⌈M/c⌉])``: the 1×c SR blocks of ``x`` and
    of ``xᵀ`` (independent roundings) from one read of ``x``; the seed as :func:`quantize_blockwise_sr` takes it;
    see :mod:`qtrain.quant.blockwise`."""
    seed = _sr_seed_of(generator, "quantize_blockwise_sr_dual")
    if torch.compiler.is_compiling():
        return _quantize_blockwise_sr_dual_op(x, c, seed)
    return _quantize_blockwise_sr_dual(x, c, seed)


# ------------------------------------------------------------------------------------------- block_int8_gemm
def _block_int8_gemm(a, b, a_scale, b_scale, a_rows, b_rows, block_k, bias, out_dtype):
    k = _kernel("block_gemm", "block_int8_gemm", a.device)
    return (k or quant.block_int8_gemm)(a, b, a_scale, b_scale, a_rows, b_rows, block_k, bias, out_dtype)


@custom_op("block_int8_gemm")
def _block_int8_gemm_op(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                        a_rows: int, b_rows: int, block_k: int, bias: torch.Tensor | None,
                        out_dtype: torch.dtype) -> torch.Tensor:
    return _block_int8_gemm(a, b, a_scale, b_scale, a_rows, b_rows, block_k, bias, out_dtype)


@_block_int8_gemm_op.register_fake
def _(a, b, a_scale, b_scale, a_rows, b_rows, block_k, bias, out_dtype):
    check_block_gemm_args(a, b, a_scale, b_scale, a_rows, b_rows, block_k, bias, out_dtype)
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


def block_int8_gemm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                    a_rows: int, b_rows: int, block_k: int, bias: torch.Tensor | None = None,
                    out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``Σ_j (a @ bᵀ over K-block j) · a_scale · b_scale (+ bias)``; see :mod:`qtrain.quant.block_gemm`."""
    args = (a, b, a_scale, b_scale, a_rows, b_rows, block_k, bias, out_dtype)
    return _block_int8_gemm_op(*args) if torch.compiler.is_compiling() else _block_int8_gemm(*args)


# ----------------------------------------------------------------------------------------- quantize_fallback
def _quantize_fallback(x, tau, block_k):
    k = _kernel("fallback", "quantize_fallback", x.device)
    return (k or quant.quantize_fallback)(x, tau, block_k)


@custom_op("quantize_fallback")
def _quantize_fallback_op(x: torch.Tensor, tau: torch.Tensor, block_k: int) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _quantize_fallback(x, tau, block_k)


@_quantize_fallback_op.register_fake
def _fake_fallback(x, tau, block_k, seed=None):
    check_fallback_args(x, tau, block_k, GROUP_ROWS)
    m, k = x.shape
    nk, gm = -(-k // block_k), -(-m // GROUP_ROWS)
    q = x.new_empty((m, k), dtype=torch.int8)
    s = x.new_empty((m, nk), dtype=torch.float32)
    return (q, s, torch.empty_like(q), torch.empty_like(s), x.new_empty((gm, nk), dtype=torch.bool),
            x.new_empty((gm, nk), dtype=torch.float32))


def quantize_fallback(x: torch.Tensor, tau: torch.Tensor, block_k: int = 128):
    """``x [M, K]`` → ``(q, scale, q2, scale2, flags, tile_absmax)``; see :mod:`qtrain.quant.fallback`."""
    return _quantize_fallback_op(x, tau, block_k) if torch.compiler.is_compiling() else _quantize_fallback(
        x, tau, block_k)


# -------------------------------------------------------------------------------------- quantize_fallback_sr
def _quantize_fallback_sr(x, tau, block_k, seed):
    k = _kernel("fallback", "quantize_fallback_sr", x.device)
    return (k or quant.quantize_fallback_sr)(x, tau, block_k, _drawn(seed, x))


@custom_op("quantize_fallback_sr")
def _quantize_fallback_sr_op(x: torch.Tensor, tau: torch.Tensor, block_k: int, seed: torch.Tensor | None) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _quantize_fallback_sr(x, tau, block_k, seed)


_quantize_fallback_sr_op.register_fake(_fake_fallback)


def quantize_fallback_sr(x: torch.Tensor, tau: torch.Tensor, block_k: int = 128,
                         generator: "torch.Generator | torch.Tensor | None" = None):
    """:func:`quantize_fallback` with the first term rounded stochastically (the seed as
    :func:`quantize_blockwise_sr` takes it); see :mod:`qtrain.quant.fallback`."""
    seed = _sr_seed_of(generator, "quantize_fallback_sr")
    if torch.compiler.is_compiling():
        return _quantize_fallback_sr_op(x, tau, block_k, seed)
    return _quantize_fallback_sr(x, tau, block_k, seed)


# --------------------------------------------------------------------------------------- fallback_block_gemm
def _fallback_block_gemm(a, a_scale, a2, a2_scale, flags, b, b_scale, b_rows, block_k, bias, out_dtype):
    k = _kernel("fallback", "fallback_block_gemm", a.device)
    return (k or quant.fallback_block_gemm)(a, a_scale, a2, a2_scale, flags, b, b_scale, b_rows, block_k, bias,
                                            out_dtype)


@custom_op("fallback_block_gemm")
def _fallback_block_gemm_op(a: torch.Tensor, a_scale: torch.Tensor, a2: torch.Tensor, a2_scale: torch.Tensor,
                            flags: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, b_rows: int,
                            block_k: int, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    return _fallback_block_gemm(a, a_scale, a2, a2_scale, flags, b, b_scale, b_rows, block_k, bias, out_dtype)


@_fallback_block_gemm_op.register_fake
def _(a, a_scale, a2, a2_scale, flags, b, b_scale, b_rows, block_k, bias, out_dtype):
    check_fallback_gemm_args(a, a_scale, a2, a2_scale, flags, b, b_scale, b_rows, block_k, bias, out_dtype)
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


def fallback_block_gemm(a: torch.Tensor, a_scale: torch.Tensor, a2: torch.Tensor, a2_scale: torch.Tensor,
                        flags: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, b_rows: int,
                        block_k: int = 128, bias: torch.Tensor | None = None,
                        out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The block-scaled GEMM plus the residual term on flagged tiles; see :mod:`qtrain.quant.fallback`."""
    args = (a, a_scale, a2, a2_scale, flags, b, b_scale, b_rows, block_k, bias, out_dtype)
    return _fallback_block_gemm_op(*args) if torch.compiler.is_compiling() else _fallback_block_gemm(*args)


# ------------------------------------------------------------------------------------- INT4 (Hadamard, GEMM)
# ``after`` (block_hadamard, hadamard_quantize_int4): a tensor of the backward (its dY), unused by the op — an
# autograd.Function's backward that recomputes from saved inputs passes it so that, under torch.compile, the call
# depends on the backward and runs there. Without it the partitioner counts a call on saved inputs only as forward
# work and saves its output (merged by CSE with the forward's identical call, or an fp32 transform), which is the
# memory the recomputation was to spare: int4's compiled 7B step saved 1.06x BF16's for backward, not 0.86x.
def _block_hadamard(x, b):
    k = _kernel("hadamard", "block_hadamard", x.device)
    return (k or quant.hadamard.block_hadamard)(x, b)


@custom_op("block_hadamard")
def _block_hadamard_op(x: torch.Tensor, b: int, after: torch.Tensor | None = None) -> torch.Tensor:
    return _block_hadamard(x, b)


@_block_hadamard_op.register_fake
def _(x, b, after=None):
    check_float(x)
    check_2d(x)
    quant.hadamard.check_hadamard_block(b)
    return x.new_empty((x.shape[0], -(-x.shape[1] // b) * b), dtype=torch.float32)


def block_hadamard(x: torch.Tensor, b: int, after: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K]`` float → fp32 ``[M, ⌈K/b⌉·b]``: times ``blockdiag(H_b, …)``; see :mod:`qtrain.quant.hadamard`.
    ``after``: unused (see above)."""
    return _block_hadamard_op(x, b, after) if torch.compiler.is_compiling() else _block_hadamard(x, b)


def _hadamard_quantize_int4(x, b, step):
    k = _kernel("hadamard", "hadamard_quantize_int4", x.device)
    return (k or quant.hadamard.hadamard_quantize_int4)(x, b, step)


@custom_op("hadamard_quantize_int4")
def _hadamard_quantize_int4_op(x: torch.Tensor, b: int, step: torch.Tensor,
                               after: torch.Tensor | None = None) -> torch.Tensor:
    return _hadamard_quantize_int4(x, b, step)


@_hadamard_quantize_int4_op.register_fake
def _(x, b, step, after=None):
    check_float(x)
    check_2d(x)
    quant.hadamard.check_hadamard_block(b)
    quant.hadamard.check_step(step)
    return x.new_empty((x.shape[0], -(-x.shape[1] // b) * b), dtype=torch.int8)


def hadamard_quantize_int4(x: torch.Tensor, b: int, step: torch.Tensor,
                           after: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K]`` float → INT4 codes int8 ``[M, ⌈K/b⌉·b]`` of ``block_hadamard(x, b)`` with the per-tensor
    ``step`` (fused in one kernel); see :mod:`qtrain.quant.hadamard`. ``after``: unused (see above)."""
    if torch.compiler.is_compiling():
        return _hadamard_quantize_int4_op(x, b, step, after)
    return _hadamard_quantize_int4(x, b, step)


def int4_gemm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """INT4 codes (int8 storage, values in [-8, 7]) ``float(a @ bᵀ) · a_scale[m] · b_scale (+ bias)``, the
    contract of :func:`int8_gemm`. The seam for a native INT4 GEMM: Hopper has no INT4 tensor cores (``mma``
    s4 runs at ~4 % of s8 on an H100), so today INT4 values run on the INT8 GEMM; an Ampere/Ada kernel taking
    packed operands (``quant.pack_int4``) would be dispatched here."""
    return int8_gemm(a, b, a_scale, b_scale, bias, out_dtype)


# ---------------------------------------------------------------------------- INT8 data flow (Jetfire) ops
def _dataflow(fn, q, *args):
    k = _kernel("dataflow", fn, q.device)
    return (k or getattr(quant.dataflow, fn))(q, *args)


def _fake_same_blocks(q, s, r, c, k_out=None):
    check_int8_blocks(q, s, r, c)
    m, k = q.shape[0], q.shape[1] if k_out is None else k_out
    return q.new_empty((m, k), dtype=torch.int8), s.new_empty((-(-m // r), -(-k // c)), dtype=torch.float32)


@custom_op("rmsnorm_quantize")
def _rmsnorm_quantize_op(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, eps: float, r: int,
                         c: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _dataflow("rmsnorm_quantize", xq, xs, weight, eps, r, c)


@_rmsnorm_quantize_op.register_fake
def _(xq, xs, weight, eps, r, c):
    return _fake_same_blocks(xq, xs, r, c)


def rmsnorm_quantize(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, eps: float, r: int,
                     c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 ``(r, c)`` blocks in → RMSNorm → INT8 blocks out; see :mod:`qtrain.quant.dataflow`."""
    if torch.compiler.is_compiling():
        return _rmsnorm_quantize_op(xq, xs, weight, eps, r, c)
    return _dataflow("rmsnorm_quantize", xq, xs, weight, eps, r, c)


@custom_op("layernorm_quantize")
def _layernorm_quantize_op(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           eps: float, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _dataflow("layernorm_quantize", xq, xs, weight, bias, eps, r, c)


@_layernorm_quantize_op.register_fake
def _(xq, xs, weight, bias, eps, r, c):
    return _fake_same_blocks(xq, xs, r, c)


def layernorm_quantize(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       eps: float, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 ``(r, c)`` blocks in → LayerNorm → INT8 blocks out; see :mod:`qtrain.quant.dataflow`."""
    if torch.compiler.is_compiling():
        return _layernorm_quantize_op(xq, xs, weight, bias, eps, r, c)
    return _dataflow("layernorm_quantize", xq, xs, weight, bias, eps, r, c)


@custom_op("swiglu_quantize")
def _swiglu_quantize_op(hq: torch.Tensor, hs: torch.Tensor, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _dataflow("swiglu_quantize", hq, hs, r, c)


@_swiglu_quantize_op.register_fake
def _(hq, hs, r, c):
    return _fake_same_blocks(hq, hs, r, c, hq.shape[1] // 2)


def swiglu_quantize(hq: torch.Tensor, hs: torch.Tensor, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 ``[M, 2F]`` (gate | up) blocks in → ``silu(gate)·up`` → INT8 ``[M, F]`` blocks out."""
    if torch.compiler.is_compiling():
        return _swiglu_quantize_op(hq, hs, r, c)
    return _dataflow("swiglu_quantize", hq, hs, r, c)


def _fake_quantize_act(h, r, c, swiglu):
    quant.dataflow.check_quantize_act(h, r, c, swiglu)
    (m, k), nr = h.shape, -(-h.shape[0] // r)
    f = k // 2 if swiglu else k
    return (h.new_empty((m, k), dtype=torch.int8), h.new_empty((nr, -(-k // c)), dtype=torch.float32),
            h.new_empty((m, f), dtype=torch.int8), h.new_empty((nr, -(-f // c)), dtype=torch.float32))


@custom_op("quantize_swiglu")
def _quantize_swiglu_op(h: torch.Tensor, r: int, c: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _dataflow("quantize_swiglu", h, r, c)


@_quantize_swiglu_op.register_fake
def _(h, r, c):
    return _fake_quantize_act(h, r, c, True)


def quantize_swiglu(h: torch.Tensor, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float ``h [M, 2F]`` → its INT8 ``(r, c)`` blocks ``(hq, hs)`` and SwiGLU's INT8 output ``(aq, as)`` from those
    blocks: ``quantize_blockwise`` then ``swiglu_quantize`` in one pass; see :mod:`qtrain.quant.dataflow`."""
    if torch.compiler.is_compiling():
        return _quantize_swiglu_op(h, r, c)
    return _dataflow("quantize_swiglu", h, r, c)


@custom_op("quantize_gelu")
def _quantize_gelu_op(h: torch.Tensor, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _dataflow("quantize_gelu", h, r, c)


@_quantize_gelu_op.register_fake
def _(h, r, c):
    return _fake_quantize_act(h, r, c, False)


def quantize_gelu(h: torch.Tensor, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`quantize_swiglu` for tanh GELU (``h [M, F]``)."""
    if torch.compiler.is_compiling():
        return _quantize_gelu_op(h, r, c)
    return _dataflow("quantize_gelu", h, r, c)


@custom_op("gelu_quantize")
def _gelu_quantize_op(hq: torch.Tensor, hs: torch.Tensor, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _dataflow("gelu_quantize", hq, hs, r, c)


@_gelu_quantize_op.register_fake
def _(hq, hs, r, c):
    return _fake_same_blocks(hq, hs, r, c)


def gelu_quantize(hq: torch.Tensor, hs: torch.Tensor, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 blocks in → tanh-approximate GELU → INT8 blocks out; see :mod:`qtrain.quant.dataflow`."""
    if torch.compiler.is_compiling():
        return _gelu_quantize_op(hq, hs, r, c)
    return _dataflow("gelu_quantize", hq, hs, r, c)


def _activation_backward(name: str, doc: str):
    """``ops.<name>`` (``swiglu_backward``/``gelu_backward``): ``dh`` (fp32 or bf16, ``out_dtype``) from INT8 ``h``
    and the INT8 gradient, both in ``(r, c)`` blocks; an opaque custom op under torch.compile."""
    @custom_op(name)
    def op(hq: torch.Tensor, hs: torch.Tensor, gq: torch.Tensor, gs: torch.Tensor, r: int, c: int,
           out_dtype: torch.dtype) -> torch.Tensor:
        return _dataflow(name, hq, hs, gq, gs, r, c, out_dtype)

    @op.register_fake
    def _(hq, hs, gq, gs, r, c, out_dtype):
        return hq.new_empty(hq.shape, dtype=out_dtype)

    def backward(hq: torch.Tensor, hs: torch.Tensor, gq: torch.Tensor, gs: torch.Tensor, r: int,
                 c: int, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return op(hq, hs, gq, gs, r, c, out_dtype)
        return _dataflow(name, hq, hs, gq, gs, r, c, out_dtype)

    backward.__name__ = backward.__qualname__ = name
    backward.__doc__ = doc
    return backward


swiglu_backward = _activation_backward(
    "swiglu_backward", "``dh [M, 2F]`` (``out_dtype`` fp32 or bf16) of ``silu(gate)·up`` from INT8 ``h`` and the INT8 "
                       "gradient ``[M, F]``, both in ``(r, c)`` blocks; see :mod:`qtrain.quant.dataflow`.")
gelu_backward = _activation_backward(
    "gelu_backward", "``dh`` (``out_dtype`` fp32 or bf16) of the tanh GELU from INT8 ``h`` and the INT8 gradient, "
                     "both in ``(r, c)`` blocks; see :mod:`qtrain.quant.dataflow`.")


@custom_op("rmsnorm_backward")
def _rmsnorm_backward_op(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, gq: torch.Tensor,
                         gs: torch.Tensor, eps: float, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _dataflow("rmsnorm_backward", xq, xs, weight, gq, gs, eps, r, c)


@_rmsnorm_backward_op.register_fake
def _(xq, xs, weight, gq, gs, eps, r, c):
    return xq.new_empty(xq.shape, dtype=torch.float32), xq.new_empty((xq.shape[1],), dtype=torch.float32)


def rmsnorm_backward(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, gq: torch.Tensor, gs: torch.Tensor,
                     eps: float, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(dx, dweight)`` of RMSNorm from the INT8 input and the INT8 output gradient, both in ``(r, c)``
    blocks; see :mod:`qtrain.quant.dataflow`."""
    if torch.compiler.is_compiling():
        return _rmsnorm_backward_op(xq, xs, weight, gq, gs, eps, r, c)
    return _dataflow("rmsnorm_backward", xq, xs, weight, gq, gs, eps, r, c)


@custom_op("layernorm_backward")
def _layernorm_backward_op(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           gq: torch.Tensor, gs: torch.Tensor, eps: float, r: int,
                           c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = _dataflow("layernorm_backward", xq, xs, weight, bias, gq, gs, eps, r, c)
    return dx, dw, db if db is not None else dw.new_zeros(dw.shape)         # an op returns tensors only


@_layernorm_backward_op.register_fake
def _(xq, xs, weight, bias, gq, gs, eps, r, c):
    k = xq.shape[1]
    return (xq.new_empty(xq.shape, dtype=torch.float32), xq.new_empty((k,), dtype=torch.float32),
            xq.new_empty((k,), dtype=torch.float32))


def layernorm_backward(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       gq: torch.Tensor, gs: torch.Tensor, eps: float, r: int, c: int) -> tuple:
    """fp32 ``(dx, dweight, dbias)`` of LayerNorm (``dbias`` None without a bias) from the INT8 input and the
    INT8 output gradient, both in ``(r, c)`` blocks; see :mod:`qtrain.quant.dataflow`."""
    if torch.compiler.is_compiling():
        dx, dw, db = _layernorm_backward_op(xq, xs, weight, bias, gq, gs, eps, r, c)
        return dx, dw, db if bias is not None else None
    return _dataflow("layernorm_backward", xq, xs, weight, bias, gq, gs, eps, r, c)

# ------------------------------------------------------------------ INT4 backward: bit splitting, LSS draws
def _sr_generator(device: torch.device) -> torch.Generator:
    from qtrain.nn.functional import sr_generator          # qtrain.nn imports this module
    return sr_generator(device)


@custom_op("bit_split")
def _bit_split_op(dy: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return quant.lss.split_stacked(dy, _sr_generator(dy.device), per_row)


@_bit_split_op.register_fake
def _(dy, per_row):
    check_float(dy)
    check_2d(dy)
    m, n = dy.shape
    return (dy.new_empty((2 * m, n), dtype=torch.int8), dy.new_empty((m,) if per_row else (), dtype=torch.float32),
            dy.new_empty((2 * m,), dtype=torch.float32))


def bit_split(dy: torch.Tensor, per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dy [M, N]`` → ``(codes int8 [2M, N], s [] fp32 (per_row: [M]), norms fp32 [2M])``: the stacked
    ``[hi; lo]`` INT4 parts and the norms the sampling weighs their rows by, the low part's SR drawn from the
    stochastic-rounding generator of ``dy``'s device (an op opaque to ``torch.compile``); see
    :func:`qtrain.quant.lss.split_stacked`."""
    if torch.compiler.is_compiling():
        return _bit_split_op(dy, per_row)
    return quant.lss.split_stacked(dy, _sr_generator(dy.device), per_row)


@custom_op("lss_sample")
def _lss_sample_op(c: torch.Tensor, budget: float, sampling: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _lss_sample(c, budget, sampling)


def _lss_sample(c, budget, sampling):
    if not sampling:
        return torch.ones_like(c, dtype=torch.float32), torch.ones(c.shape, dtype=torch.bool, device=c.device)
    p = quant.lss.leverage_probabilities(c, budget)
    return p, quant.lss.sample_rows(p, _sr_generator(c.device))


@_lss_sample_op.register_fake
def _(c, budget, sampling):
    return c.new_empty(c.shape, dtype=torch.float32), c.new_empty(c.shape, dtype=torch.bool)


def lss_sample(c: torch.Tensor, budget: float, sampling: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p fp32, keep bool)`` like the row scores ``c [..., n]``: leverage-score probabilities with ``Σp = budget``
    along the last dim and one draw from the stochastic-rounding generator (or every row, ``p = 1``, without
    ``sampling``); several score vectors stacked draw in one call; see :mod:`qtrain.quant.lss`."""
    return _lss_sample_op(c, budget, sampling) if torch.compiler.is_compiling() else _lss_sample(c, budget, sampling)
