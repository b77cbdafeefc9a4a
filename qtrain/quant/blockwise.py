"""Block-wise INT8 quantization (reference twin of ``qtrain.kernels.blockwise``).

``quantize_blockwise(x [M, K] float, r, c) -> (q [M, K] int8 contiguous, scale [⌈M/r⌉, ⌈K/c⌉] fp32)``: one
scale per ``r × c`` block (ragged edge blocks cover what is left), RTN, with the rules of
:mod:`qtrain.quant.core`. ``(1, 128)`` blocks are the per-token-group scales of activations and gradients,
``(128, 128)`` those of weights, ``(32, 32)`` Jetfire's. ``rounding='stochastic'`` with an explicit
``generator`` gives stochastic rounding (``floor(v + u)``, ``u ~ U[0, 1)``) with the same scales.

``quantize_blockwise_sr(x, r, c, seed [1] int64) -> (q, scale)``: stochastic rounding seeded by a one-element
tensor (what the kernel twin takes, so no host synchronization is needed to draw a seed on the GPU). The
scales are bit-exact with RTN's; the codes are each within one step of ``x / scale`` and unbiased. The kernel
twin draws its uniforms with ``tl.rand`` — a different stream, so the twins agree in distribution, not bit for
bit (DESIGN.md's SR gate). :func:`qtrain.ops.quantize_blockwise_sr` draws ``seed`` from the project's SR
generator (:func:`qtrain.nn.functional.sr_generator`).

``quantize_blockwise_sr_dual(x [M, N] float, c, seed) -> (q [M, N], s [M, ⌈N/c⌉], qt [N, M], st [N, ⌈M/c⌉])``:
both SR quantizations of a gradient the backward needs, in one call (the kernel twin reads ``x`` once):
``(q, s)`` are ``quantize_blockwise_sr(x, 1, c, seed)`` (1×c blocks along N) and ``(qt, st)`` the 1×c blocks of
``xᵀ`` (c-token blocks along M), ``qt`` contiguous, with uniforms independent of the first's.

``requantize_blockwise_t(q, scale, r_in, c_in, r, c) -> (qt [K, M], scale_t)``: RTN ``r × c`` blocks of the
transpose of ``q``'s dequantization (``q [M, K]`` int8 in ``r_in × c_in`` blocks).
"""
from __future__ import annotations

import torch

from qtrain.quant.core import dequantize, quantize
from qtrain.recipes import block


def check_block(r: int, c: int) -> None:
    if not (isinstance(r, int) and isinstance(c, int) and r >= 1 and c >= 1):
        raise ValueError(f"block (r, c) must be two positive ints, got ({r!r}, {c!r})")


def check_seed(seed: torch.Tensor) -> None:
    if not (isinstance(seed, torch.Tensor) and seed.numel() == 1 and not seed.dtype.is_floating_point
            and seed.dtype != torch.bool):
        raise ValueError(f"seed must be a one-element integer tensor, got {seed!r:.80}")


def quantize_blockwise(x: torch.Tensor, r: int, c: int, rounding: str = "nearest",
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    check_block(r, c)
    q, scale = quantize(x, block(r, c), "int8", rounding, generator)
    return q.contiguous(), scale


def check_requantize_args(q: torch.Tensor, scale: torch.Tensor, r_in: int, c_in: int) -> None:
    check_block(r_in, c_in)
    if q.dtype != torch.int8 or q.dim() != 2:
        raise TypeError(f"requantize_blockwise_t takes 2-D int8 codes, got {q.dtype} of shape {tuple(q.shape)}")
    want = (-(-q.shape[0] // r_in), -(-q.shape[1] // c_in))
    if scale.dtype != torch.float32 or tuple(scale.shape) != want:
        raise ValueError(f"scale must be fp32 {list(want)} for {r_in}×{c_in} blocks of {list(q.shape)}, got "
                         f"{scale.dtype} {list(scale.shape)}")


def requantize_blockwise_t(q: torch.Tensor, scale: torch.Tensor, r_in: int, c_in: int, r: int,
                           c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [M, K]`` int8 with ``r_in × c_in`` block scales → the ``r × c`` blocks of its dequantized transpose
    ``[K, M]`` (e.g. an activation saved in 1×128 blocks re-blocked along tokens for the weight gradient)."""
    check_requantize_args(q, scale, r_in, c_in)
    return quantize_blockwise(dequantize(q, scale, block(r_in, c_in)).t(), r, c)


def _seeded(seed: torch.Tensor, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded by the one-element integer tensor ``seed`` (checked)."""
    check_seed(seed)
    g = torch.Generator(device=device)
    g.manual_seed(int(seed.reshape(()).item()) & ((1 << 63) - 1))
    return g


def quantize_blockwise_sr(x: torch.Tensor, r: int, c: int, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_blockwise(x, r, c, "stochastic", _seeded(seed, x.device))


def quantize_blockwise_sr_dual(x: torch.Tensor, c: int, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor, torch.Tensor]:
    """``(q, s)`` of ``x`` and ``(qt, st)`` of ``xᵀ`` in 1×c SR blocks; ``(q, s)`` bit-exact with
    :func:`quantize_blockwise_sr` for ``seed``, ``(qt, st)`` from the next uniforms of the same generator."""
    check_block(1, c)
    g = _seeded(seed, x.device)
    q, s = quantize_blockwise(x, 1, c, "stochastic", g)
    qt, st = quantize_blockwise(x.t(), 1, c, "stochastic", g)
    return q, s, qt, st
