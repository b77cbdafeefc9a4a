"""Reference quantization numerics in pure PyTorch (the contract every kernel is tested against).

Symmetric integer quantization, exact arithmetic (METHODS.md § Notation):

* ``scale = absmax / qmax`` in fp32 (IEEE division); a block of zeros gets ``scale = 1.0``; a block holding
  NaN or Inf gets a NaN/Inf scale, so the non-finite value reaches the output.
* ``v = x.float() / scale``; NaN quotients become 0; ``v`` is clamped to ``[-qmax, qmax]``;
* RTN: ``q = round-half-even(v)``; SR: ``q = floor(v + u)``, ``u ~ U[0, 1)`` drawn from an explicit generator.

Every operand is ``[outer, reduced]`` 2-D; scales have these shapes (fp32):
``tensor`` → ``[]``, ``row`` → ``[R]``, ``column`` → ``[C]``, ``block(r, c)`` → ``[ceil(R/r), ceil(C/c)]``.
Quantized values are stored in int8 (INT4 values too, in ``[-7, 7]``; :func:`pack_int4` packs two a byte).
"""
from __future__ import annotations

import math

import torch

from qtrain.recipes import Granularity

QMAX = {"int8": 127, "int4": 7}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on the current stream of ``device`` (never on other devices)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def capture_safe(generator: torch.Generator | None) -> torch.Generator | None:
    """The generator to draw from now: ``generator``, except while a CUDA graph is being captured on the current
    stream, where None (the device's default generator). A capture registers the default generator, whose draws
    advance on every replay; a replay of a draw from an unregistered generator would repeat the captured numbers
    (and PyTorch cannot capture one). Graph replays are therefore not reproduced by ``reseed``."""
    if generator is not None and capturing(generator.device):
        return None
    return generator


def qmax_of(fmt: str) -> int:
    try:
        return QMAX[fmt]
    except KeyError:
        raise ValueError(f"format {fmt!r} has no integer range; accepted: {', '.join(QMAX)}") from None


def check_float(x: torch.Tensor, what: str = "input") -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what} must be float32, bfloat16 or float16, got {x.dtype}")


def check_2d(x: torch.Tensor, what: str = "input") -> None:
    if x.dim() != 2:
        raise ValueError(f"{what} must be 2-D [outer, reduced], got shape {tuple(x.shape)}")


def scale_from_absmax(absmax: torch.Tensor, qmax: int) -> torch.Tensor:
    """fp32 scale from an fp32 absmax: ``absmax / qmax``, exactly 1.0 where absmax is 0 (NaN/Inf kept)."""
    absmax = absmax.float()
    # a tensor divisor: CUDA torch turns division by a Python scalar into a multiplication by its reciprocal
    scale = absmax / torch.full_like(absmax, float(qmax))
    return torch.where(absmax == 0, torch.ones_like(scale), scale)


def round_scaled(v: torch.Tensor, qmax: int, rounding: str = "nearest",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 ``v = x / scale`` → int8 codes by the module's rules (NaN → 0, clamp, RTN or SR)."""
    v = torch.where(torch.isnan(v), torch.zeros_like(v), v)
    if rounding == "nearest":
        q = torch.round(v.clamp(-qmax, qmax))
    elif rounding == "stochastic":
        if generator is None:
            raise ValueError("stochastic rounding needs an explicit torch.Generator (for reproducibility)")
        u = torch.rand(v.shape, generator=generator, device=v.device, dtype=torch.float32)
        q = torch.floor(v.clamp(-qmax, qmax) + u).clamp(-qmax, qmax)
    else:
        raise ValueError(f"rounding {rounding!r} is not 'nearest' or 'stochastic'")
    return q.to(torch.int8)


def _blocks(x: torch.Tensor, r: int, c: int) -> torch.Tensor:
    """Zero-pad a 2-D tensor to multiples of (r, c) and view it as [R/r, r, C/c, c]."""
    R, C = x.shape
    pr, pc = (-R) % r, (-C) % c
    if pr or pc:
        x = torch.nn.functional.pad(x, (0, pc, 0, pr))
    return x.reshape(x.shape[0] // r, r, x.shape[1] // c, c)


def absmax(x: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """fp32 absmax per scale group (NaN-propagating), shaped as this module's scale shapes."""
    a = x.float().abs()
    if granularity.kind == "tensor":
        return a.amax() if a.numel() else a.new_zeros(())
    if granularity.kind == "row":
        return a.amax(dim=1)
    if granularity.kind == "column":
        return a.amax(dim=0)
    r, c = granularity.block
    return _blocks(a, r, c).amax(dim=(1, 3))


def expand_scale(scale: torch.Tensor, granularity: Granularity, shape: tuple[int, int]) -> torch.Tensor:
    """Broadcast a scale tensor to the full ``shape`` of its operand."""
    R, C = shape
    if granularity.kind == "tensor":
        return scale.expand(R, C)
    if granularity.kind == "row":
        return scale[:, None].expand(R, C)
    if granularity.kind == "column":
        return scale[None, :].expand(R, C)
    r, c = granularity.block
    return scale.repeat_interleave(r, 0)[:R].repeat_interleave(c, 1)[:, :C]


def quantize(x: torch.Tensor, granularity: Granularity, fmt: str = "int8", rounding: str = "nearest",
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D ``[outer, reduced]`` float tensor → ``(q int8, scale fp32)``."""
    check_float(x)
    check_2d(x)
    qmax = qmax_of(fmt)
    scale = scale_from_absmax(absmax(x, granularity), qmax)
    v = x.float() / expand_scale(scale, granularity, tuple(x.shape))
    return round_scaled(v, qmax, rounding, generator), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, granularity: Granularity,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q · scale`` in fp32, then cast to ``dtype``."""
    return (q.float() * expand_scale(scale, granularity, tuple(q.shape))).to(dtype)


def fake_quantize(x: torch.Tensor, granularity: Granularity, fmt: str = "int8", rounding: str = "nearest",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """``dequantize(quantize(x))`` in fp32."""
    q, s = quantize(x, granularity, fmt, rounding, generator)
    return dequantize(q, s, granularity)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 codes in [-8, 7] two per byte along the last dim (even index → low nibble)."""
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int4 takes int8 codes, got {q.dtype}")
    if q.shape[-1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    lo = q[..., 0::2].to(torch.int16) & 0xF
    hi = q[..., 1::2].to(torch.int16) & 0xF
    return (lo | (hi << 4)).to(torch.uint8)


def unpack_int4(p: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``n`` int8 codes along the last dim."""
    v = p.to(torch.int16)
    lo, hi = v & 0xF, (v >> 4) & 0xF
    out = torch.stack((lo, hi), dim=-1).reshape(*p.shape[:-1], -1)[..., :n]
    return torch.where(out >= 8, out - 16, out).to(torch.int8)


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``20·log10(‖ref‖ / ‖ref − out‖)`` (fp64)."""
    ref, out = ref.double(), out.double()
    noise = torch.linalg.vector_norm(ref - out).item()
    signal = torch.linalg.vector_norm(ref).item()
    return math.inf if noise == 0 else 20.0 * math.log10(signal / noise)


def relative_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    """``‖ref − out‖ / ‖ref‖`` in fp64."""
    ref, out = ref.double(), out.double()
    return (torch.linalg.vector_norm(ref - out) / torch.linalg.vector_norm(ref).clamp_min(1e-300)).item()
