"""The three GEMMs of a quantized linear layer, run as a :class:`~qtrain.recipes.GemmSpec` says.

Operands are 2-D ``[outer, reduced]``. Two paths:

* **int8 fast path** — both operands INT8, round-to-nearest, scales constant along the reduced dim
  (``tensor`` or ``row``): quantize with the ``qtrain.ops`` primitives and run ``ops.int8_gemm`` (Triton
  kernel on CUDA, exact integer reference elsewhere) with the dequantizing epilogue fused.
* **block path** — both operands INT8, round-to-nearest, with power-of-two ``(r, c)`` block scales sharing the
  same ``c`` (32–256) along the reduced dim: ``ops.quantize_blockwise`` each, then ``ops.block_int8_gemm``.
* **emulated path** — any other quantized spec (other blocks, SR, INT4, mixed kinds): quantize-dequantize each
  operand with the reference numerics of :mod:`qtrain.quant` and multiply in fp32. Numerically what a kernel
  would compute (up to fp32 accumulation order), not fast.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qtrain import ops, quant
from qtrain.quant.block_gemm import BLOCK_KS
from qtrain.recipes import GemmSpec, OperandSpec

_SR_GENERATORS: dict[torch.device, torch.Generator] = {}


def sr_generator(device: torch.device) -> torch.Generator:
    """The generator stochastic rounding draws from on ``device``, seeded from torch's default generator the
    first time it is used (so ``torch.manual_seed`` makes runs reproducible); :func:`reseed` resets it."""
    device = torch.device(device)
    if device not in _SR_GENERATORS:
        g = torch.Generator(device=device)
        g.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        _SR_GENERATORS[device] = g
    return _SR_GENERATORS[device]


def reseed(seed: int) -> None:
    """Reset every stochastic-rounding generator to ``seed``."""
    _SR_GENERATORS.clear()
    for dev in ("cpu",) + (("cuda",) if torch.cuda.is_available() else ()):
        g = torch.Generator(device=dev)
        g.manual_seed(seed)
        _SR_GENERATORS[torch.device(dev)] = g


def _plain_int8(spec: OperandSpec) -> bool:
    """INT8, round-to-nearest, no transform, no fallback."""
    return (spec.format == "int8" and spec.rounding == "nearest" and spec.transform is None
            and spec.fallback is None)


def fast_int8(spec: OperandSpec) -> bool:
    """True if ``spec`` runs on the int8 fast path (INT8, RTN, scale constant along the reduced dim)."""
    return _plain_int8(spec) and spec.granularity.kind in ("tensor", "row")


def block_pair(lhs: OperandSpec, rhs: OperandSpec) -> tuple[int, int, int] | None:
    """``(lhs rows, rhs rows, c)`` when the pair runs on the block path, else None."""
    if not all(_plain_int8(s) and s.granularity.kind == "block" for s in (lhs, rhs)):
        return None
    (ra, ca), (rb, cb) = lhs.granularity.block, rhs.granularity.block
    if ca != cb or ca not in BLOCK_KS or ra & (ra - 1) or rb & (rb - 1):
        return None
    return ra, rb, ca


@dataclass
class Int8Operand:
    """An INT8 operand for ``ops.int8_gemm``: ``q [outer, reduced]`` with ``scale`` ``[]`` or ``[outer]``."""

    q: torch.Tensor
    scale: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        s = self.scale[:, None] if self.scale.dim() == 1 else self.scale
        return (self.q.float() * s).to(dtype)

    def outer_scale(self) -> torch.Tensor:
        """Scale as ``[outer]`` (the lhs of ``ops.int8_gemm`` wants one per row)."""
        return self.scale.expand(self.q.shape[0]).contiguous() if self.scale.dim() == 0 else self.scale


def quantize_int8(t: torch.Tensor, spec: OperandSpec) -> Int8Operand:
    """Quantize a 2-D operand on the fast path (``fast_int8(spec)`` must hold)."""
    if spec.granularity.kind == "row":
        return Int8Operand(*ops.quantize_rowwise(t))
    q, _, s = ops.quantize_tensorwise(t)
    return Int8Operand(q, s)


def emulate(t: torch.Tensor, spec: OperandSpec) -> torch.Tensor:
    """fp32 ``dequantize(quantize(t))`` as ``spec`` says (identity cast for high precision)."""
    if not spec.quantized:
        return t.float()
    if spec.transform is not None or spec.fallback is not None:
        raise NotImplementedError(f"operand transform/fallback {spec} is not implemented in this version")
    gen = sr_generator(t.device) if spec.rounding == "stochastic" else None
    return quant.fake_quantize(t, spec.granularity, spec.format, spec.rounding, gen)


def gemm(spec: GemmSpec, lhs, rhs, out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``lhs @ rhsᵀ (+ bias)`` for ``lhs [M, R]``, ``rhs [N, R]`` as ``spec`` says → ``[M, N]`` ``out_dtype``.

    ``lhs``/``rhs`` are float tensors or already-quantized :class:`Int8Operand` s (reused quantizations).
    """
    if not spec.quantized:
        out = lhs.to(out_dtype) @ rhs.to(out_dtype).t()
        return out + bias.to(out_dtype) if bias is not None else out
    if fast_int8(spec.lhs) and fast_int8(spec.rhs):
        a = lhs if isinstance(lhs, Int8Operand) else quantize_int8(lhs, spec.lhs)
        b = rhs if isinstance(rhs, Int8Operand) else quantize_int8(rhs, spec.rhs)
        return ops.int8_gemm(a.q, b.q, a.outer_scale(), b.scale, bias, out_dtype)
    blocks = block_pair(spec.lhs, spec.rhs)
    if blocks is not None and not isinstance(lhs, Int8Operand) and not isinstance(rhs, Int8Operand):
        ra, rb, c = blocks
        qa, sa = ops.quantize_blockwise(lhs, ra, c)
        qb, sb = ops.quantize_blockwise(rhs, rb, c)
        return ops.block_int8_gemm(qa, qb, sa, sb, ra, rb, c, bias, out_dtype)
    a = lhs.dequantize() if isinstance(lhs, Int8Operand) else emulate(lhs, spec.lhs)
    b = rhs.dequantize() if isinstance(rhs, Int8Operand) else emulate(rhs, spec.rhs)
    out = a @ b.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)
