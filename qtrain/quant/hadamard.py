"""Block-diagonal Hadamard transform and the Hadamard quantizer's INT4 step (reference twin of
``qtrain.kernels.hadamard``; METHODS.md § INT4 training).

``H_b`` is the orthonormal Sylvester Hadamard matrix of order ``b`` (a power of two, 16–256): ``H_1 = [1]``,
``H_2n = [[H_n, H_n], [H_n, −H_n]] / √2``. It is symmetric and its own inverse (``H·Hᵀ = H·H = I``). The block
transform multiplies each run of ``b`` consecutive entries of a row by ``H_b`` (the reduced dim ``K`` is
zero-padded to a multiple of ``b``: padding is exact for a product, ``(XH)(WH)ᵀ = XWᵀ``).

Exact arithmetic, so kernel and reference agree bit for bit: the transform is the unnormalized fast
Walsh–Hadamard butterfly in fp32 — ``log2(b)`` stages, stage ``s`` replacing each pair ``(u, v)`` at distance
``2^s`` inside groups of ``2^(s+1)`` by ``(u + v, u − v)``, lowest distance first — then one multiplication by
the fp32 constant ``1/√b`` (a power of two for b = 16, 64, 256).

Functions (2-D ``[outer, reduced]`` float inputs, any float dtype; outputs fp32 unless said):

* :func:`hadamard_matrix` ``(b) -> [b, b]`` — the dense ``H_b`` (tests, documentation);
* :func:`block_hadamard` ``(x [M, K], b) -> [M, Kp]``, ``Kp = ⌈K/b⌉·b``;
* :func:`fwht_stage` ``(x, h)`` — one butterfly stage: block ``2b``'s transform is block ``b``'s unnormalized
  one plus the stage at distance ``b`` (what a search over the blocks shares);
* :func:`hadamard_quantize_int4` ``(x [M, K], b, step [] or [1] fp32) -> q [M, Kp] int8`` in ``[-7, 7]``:
  ``q = round_half_even(clamp(block_hadamard(x, b) / step, −7, 7))`` (IEEE division; NaN → 0) — the forward of
  the Hadamard quantizer with a given (LSQ) step; the fused Triton kernel computes the same bits.
"""
from __future__ import annotations

import functools
import math

import torch

from qtrain.quant.core import check_2d, check_float

HADAMARD_BLOCKS = (16, 32, 64, 128, 256)
QMAX4 = 7


def check_hadamard_block(b: int) -> None:
    if b not in HADAMARD_BLOCKS:
        raise ValueError(f"Hadamard block must be one of {HADAMARD_BLOCKS}, got {b!r}")


@functools.lru_cache(maxsize=None)
def inv_sqrt(b: int) -> float:
    """The fp32 normalization constant ``1/√b`` (as a Python float holding the fp32 value)."""
    return float(torch.tensor(1.0 / math.sqrt(b), dtype=torch.float32))


def hadamard_matrix(b: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix ``[b, b]`` (symmetric, ``H·H = I``)."""
    if b < 1 or b & (b - 1):
        raise ValueError(f"Hadamard order must be a power of two, got {b!r}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (h / math.sqrt(b)).to(dtype=dtype, device=device)


def pad_k(x: torch.Tensor, b: int) -> torch.Tensor:
    """``x`` zero-padded along the last dim to a multiple of ``b``."""
    pad = (-x.shape[-1]) % b
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def fwht_stage(x: torch.Tensor, h: int) -> torch.Tensor:
    """One butterfly stage on the last dim of fp32 ``x`` (its length a multiple of ``2h``): each pair ``(u, v)``
    at distance ``h`` inside groups of ``2h`` becomes ``(u + v, u − v)``."""
    v = x.reshape(-1, x.shape[-1] // (2 * h), 2, h)
    u, w = v[:, :, 0, :], v[:, :, 1, :]
    return torch.stack((u + w, u - w), dim=2).reshape(x.shape)


def fwht(x: torch.Tensor, b: int) -> torch.Tensor:
    """Unnormalized butterfly transform of each run of ``b`` entries of the last dim of fp32 ``x`` (its length a
    multiple of ``b``), stage order as in the module docstring."""
    h = 1
    while h < b:
        x = fwht_stage(x, h)
        h *= 2
    return x


def block_hadamard(x: torch.Tensor, b: int) -> torch.Tensor:
    """fp32 ``[M, Kp]``: ``x [M, K]`` (zero-padded to ``Kp = ⌈K/b⌉·b``) times ``blockdiag(H_b, …)``."""
    check_float(x)
    check_2d(x)
    check_hadamard_block(b)
    xp = pad_k(x.float(), b)
    if xp.numel() == 0:
        return xp
    return fwht(xp, b) * inv_sqrt(b)


def check_step(step: torch.Tensor) -> None:
    if not isinstance(step, torch.Tensor) or step.dtype != torch.float32 or step.numel() != 1:
        raise ValueError(f"step must be a one-element fp32 tensor, got {step!r:.80}")


def quantize_step(v: torch.Tensor, step: torch.Tensor, qmax: int = QMAX4) -> torch.Tensor:
    """int8 codes ``round_half_even(clamp(v / step, −qmax, qmax))`` of fp32 ``v`` (IEEE division; NaN → 0)."""
    q = v / step.reshape(()).float()
    q = torch.where(torch.isnan(q), torch.zeros_like(q), q)
    return torch.round(q.clamp(-qmax, qmax)).to(torch.int8)


def hadamard_quantize_int4(x: torch.Tensor, b: int, step: torch.Tensor) -> torch.Tensor:
    """int8 ``[M, Kp]`` INT4 codes of ``block_hadamard(x, b)`` with the per-tensor ``step``."""
    check_step(step)
    return quantize_step(block_hadamard(x, b), step)
