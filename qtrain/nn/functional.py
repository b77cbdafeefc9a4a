"""Operands of the quantized GEMMs and the predicates that choose their path (used by :mod:`qtrain.nn.plan`).

Operands are 2-D ``[outer, reduced]``. :class:`Operand` is a quantized one, carrying what its path needs;
:func:`emulate` is the quantize-dequantize of the reference numerics (the path of specs no kernel runs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qtrain import ops, quant
from qtrain.quant.block_gemm import BLOCK_KS
from qtrain.quant.fallback import expand_tiles
from qtrain.quant.core import expand_scale
from qtrain.recipes import OperandSpec, block

_SR_GENERATORS: dict[torch.device, torch.Generator] = {}


def _generator_key(device) -> torch.device:
    """``device`` with its index: ``cuda`` and ``cuda:0`` (when current) name one generator."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def sr_generator(device: torch.device) -> torch.Generator:
    """The generator stochastic rounding draws from on ``device`` (``cuda`` means the current CUDA device),
    seeded from torch's default generator the first time it is used (so ``torch.manual_seed`` makes runs
    reproducible); :func:`reseed` resets it."""
    device = _generator_key(device)
    if device not in _SR_GENERATORS:
        g = torch.Generator(device=device)
        g.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        _SR_GENERATORS[device] = g
    return _SR_GENERATORS[device]


def reseed(seed: int, devices=None) -> None:
    """Reset the stochastic-rounding generators to ``seed``: those of ``devices`` (default: the CPU and every
    visible CUDA device); the others start afresh on first use."""
    _SR_GENERATORS.clear()
    if devices is None:
        devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    for dev in devices:
        dev = _generator_key(dev)
        g = torch.Generator(device=dev)
        g.manual_seed(seed)
        _SR_GENERATORS[dev] = g


def sr_state() -> dict[str, torch.Tensor]:
    """The state of each stochastic-rounding generator made so far, by device name (``'cpu'``, ``'cuda:0'``)."""
    return {str(d): g.get_state() for d, g in _SR_GENERATORS.items()}


def set_sr_state(state: dict[str, torch.Tensor]) -> None:
    """Restore :func:`sr_state`: the generators it names, on the devices this process has (the others, and
    devices it does not name, start afresh on first use, as in a new process)."""
    _SR_GENERATORS.clear()
    for name, s in state.items():
        d = torch.device(name)
        if d.type == "cuda" and not (torch.cuda.is_available() and d.index < torch.cuda.device_count()):
            continue
        g = torch.Generator(device=d)
        g.set_state(s)
        _SR_GENERATORS[d] = g


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
class Operand:
    """A quantized GEMM operand ``q [outer, reduced]`` int8 with what its path needs.

    ``int8`` path: ``scale`` ``[]`` (tensor) or ``[outer]`` (row). ``block``: ``scale``
    ``[⌈outer/rows⌉, ⌈reduced/block_k⌉]``. ``fallback`` (``rows`` 1): also the residual ``q2``/``scale2`` and the
    tile ``flags``/``tile_absmax`` of :func:`qtrain.quant.fallback.quantize_fallback`.
    """

    path: str
    q: torch.Tensor
    scale: torch.Tensor
    rows: int = 1
    block_k: int = 0
    q2: torch.Tensor | None = None
    scale2: torch.Tensor | None = None
    flags: torch.Tensor | None = None
    tile_absmax: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        M, K = self.q.shape
        if self.path == "int8":
            s = self.scale[:, None] if self.scale.dim() == 1 else self.scale
            return (self.q.float() * s).to(dtype)
        out = self.q.float() * expand_scale(self.scale, block(self.rows, self.block_k), (M, K))
        if self.path == "fallback":
            mask = expand_tiles(self.flags, M).repeat_interleave(self.block_k, 1)[:, :K]
            s2 = expand_scale(self.scale2, block(1, self.block_k), (M, K))
            out = out + torch.where(mask, self.q2.float(), 0.0) * s2
        return out.to(dtype)

    def outer_scale(self) -> torch.Tensor:
        """An ``int8`` path scale as ``[outer]`` (the lhs of ``ops.int8_gemm`` wants one per row)."""
        return self.scale.expand(self.q.shape[0]).contiguous() if self.scale.dim() == 0 else self.scale

    def transposed(self) -> "Operand":
        """The operand of ``tᵀ``: exact for tensor scales and square blocks (the same blocks, transposed)."""
        if self.path == "int8" and self.scale.dim() == 0:
            return Operand("int8", ops.transpose_int8(self.q), self.scale)
        if self.path == "block" and self.rows == self.block_k:
            return Operand("block", ops.transpose_int8(self.q), self.scale.t().contiguous(), self.rows,
                           self.block_k)
        raise ValueError(f"a {self.path} operand with {self.rows}-row blocks has no exact transpose")


def emulate(t: torch.Tensor, spec: OperandSpec) -> torch.Tensor:
    """fp32 ``dequantize(quantize(t))`` as ``spec`` says (identity cast for high precision); transforms and
    fallback run on their own paths, never emulated."""
    if not spec.quantized:
        return t.float()
    if (spec.transform is not None or spec.fallback is not None or getattr(spec, "step", None) is not None
            or getattr(spec, "split", None) is not None):
        raise ValueError(f"operand {spec} has no emulated path (its plan runs it: qtrain.nn.plan)")
    gen = sr_generator(t.device) if spec.rounding == "stochastic" else None
    return quant.fake_quantize(t, spec.granularity, spec.format, spec.rounding, gen)
