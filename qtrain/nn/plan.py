"""A recipe turned, once per layer, into what each GEMM runs: the quantizer plan.

:func:`build_plan` decides for each of ``fprop``/``dgrad``/``wgrad`` its **path** and rejects, when the layer is
built, any spec no path implements (with what is accepted):

========== =====================================================================================================
path       operands → GEMM
========== =====================================================================================================
hp         both high precision → a 16/32-bit matmul
int8       INT8 RTN, tensor or row scales → ``ops.quantize_rowwise``/``quantize_tensorwise`` → ``ops.int8_gemm``
block      INT8 RTN or SR, power-of-two ``(r, c)`` blocks, one ``c`` ∈ 32–256 → ``ops.quantize_blockwise``
           (SR operands: ``ops.quantize_blockwise_sr``, seeded from ``sr_generator``) → ``ops.block_int8_gemm``
fallback   lhs INT8 ``(1, c)`` blocks with a :class:`~qtrain.recipes.Fallback` policy (RTN, or SR:
           ``ops.quantize_fallback_sr``), rhs as on ``block`` → ``ops.quantize_fallback`` →
           ``ops.fallback_block_gemm``
hq_int4    fprop only (the ``int4`` preset): X and W INT4 per tensor, both with the same
           :class:`~qtrain.recipes.Hadamard` transform and a :class:`~qtrain.recipes.LearnedStep` →
           ``ops.hadamard_quantize_int4`` → ``ops.int4_gemm`` (today the INT8 GEMM); run by
           :class:`qtrain.nn.linear.Int4LinearFunction`
bitsplit_lss dgrad/wgrad with an hq_int4 fprop: lhs dY with :class:`~qtrain.recipes.BitSplit` (INT4 scaled per
           tensor or per row, SR; dgrad's and wgrad's alike: one split), rhs fprop's quantized W (dgrad) or X
           (wgrad) reused (``rhs == fprop.rhs`` / ``fprop.lhs``) → :mod:`qtrain.quant.lss` (dgrad on
           ``ops.int4_gemm``, wgrad in fp32 over the sampled codes); or both
           ``hp`` with an hq_int4 fprop (the ablation of the gradient quantization: dY unquantized, bf16 under
           autocast as in BF16 training, against fprop's codes)
emulated   other quantized specs (SR rows/tensors, INT4, other blocks, mixed kinds): reference quantize-dequantize,
           fp32 matmul
========== =====================================================================================================

and what is reused: ``reuse_wt`` — dgrad's ``Wᵀ`` is fprop's quantized ``W`` transposed (exact for tensor scales
and square blocks), saved for backward instead of quantizing again.

A ``dataflow`` recipe (Jetfire) is accepted when all three GEMMs run on the block path, fprop's ``out`` is
``'int8_blocks'`` and wgrad's ``'dequant'``; the data-flow blocks of :mod:`qtrain.nn.dataflow` run it (fprop
output re-quantized to INT8 blocks where an activation consumes it; dgrad output with ``'int8_blocks'``
quantized to INT8 SR blocks before the norm/activation backward). A plain :class:`~qtrain.nn.QuantLinear` with
such a recipe (a layer outside a data-flow block) runs the same GEMMs with dequantized outputs. ``out`` other
than ``'dequant'`` is rejected without ``dataflow``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from qtrain import ops
from qtrain.nn.functional import Operand, block_pair, emulate, fast_int8
from qtrain.quant.block_gemm import BLOCK_KS
from qtrain.quant.fallback import update_threshold
from qtrain.recipes import GemmSpec, OperandSpec, Recipe

GEMMS = ("fprop", "dgrad", "wgrad")
# Quantize dY for dgrad and wgrad in one dual SR call where both take SR (1, c) blocks (``LinearPlan.dual_sr_grad``).
# Off: on the H200 the dual kernel took 1.37-1.39x the time of the two single SR calls it replaces at c = 128,
# whatever its tiling, and 2.5-11x with 256-row tiles, the smallest it takes at c = 256 (jetfire_wide's blocks)
# (benchmarks/results/2026-12-01-h200-dual-sr-sweep.md); the seam stays for a faster dual kernel.
DUAL_SR_GRAD = False


@dataclass(frozen=True)
class GemmPlan:
    """One GEMM ``lhs [M, R] @ rhs [N, R]ᵀ`` on its path (see the module table)."""

    name: str
    spec: GemmSpec
    path: str
    blocks: tuple[int, int, int] | None = None          # (lhs rows, rhs rows, c) on the block/fallback paths

    def quantize(self, t: torch.Tensor, side: str, tau: torch.Tensor | None = None, update: bool = False):
        """``t`` as this GEMM's ``side`` operand: an :class:`Operand`, or ``t`` itself where the GEMM takes
        floats (hp, emulated). On the fallback path ``tau`` is the layer's threshold for this GEMM; with
        ``update`` it moves toward this call's tiles (training)."""
        spec = getattr(self.spec, side)
        if self.path == "int8":
            if spec.granularity.kind == "row":
                return Operand("int8", *ops.quantize_rowwise(t))
            q, _, s = ops.quantize_tensorwise(t)
            return Operand("int8", q, s)
        if self.path in ("block", "fallback"):
            rows = self.blocks[0] if side == "lhs" else self.blocks[1]
            c = self.blocks[2]
            if self.path == "fallback" and side == "lhs":
                fn = ops.quantize_fallback_sr if spec.rounding == "stochastic" else ops.quantize_fallback
                q, s, q2, s2, flags, tmax = fn(t, tau, c)
                if update:
                    update_threshold(tau, tmax, spec.fallback)
                return Operand("fallback", q, s, 1, c, q2, s2, flags, tmax)
            if spec.rounding == "stochastic":
                return Operand("block", *ops.quantize_blockwise_sr(t, rows, c), rows, c)
            return Operand("block", *ops.quantize_blockwise(t, rows, c), rows, c)
        return t

    def __call__(self, a, b, out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``a @ bᵀ (+ bias)`` → ``out_dtype``; ``a``/``b`` as :meth:`quantize` returns them."""
        if self.path == "hp":
            out = a.to(out_dtype) @ b.to(out_dtype).t()
            return out + bias.to(out_dtype) if bias is not None else out
        if self.path == "int8":
            return ops.int8_gemm(a.q, b.q, a.outer_scale(), b.scale, bias, out_dtype)
        if self.path == "block":
            return ops.block_int8_gemm(a.q, b.q, a.scale, b.scale, a.rows, b.rows, a.block_k, bias, out_dtype)
        if self.path == "fallback":
            return ops.fallback_block_gemm(a.q, a.scale, a.q2, a.scale2, a.flags, b.q, b.scale, b.rows,
                                           a.block_k, bias, out_dtype)
        out = emulate(a, self.spec.lhs) @ emulate(b, self.spec.rhs).t()
        if bias is not None:
            out = out + bias.float()
        return out.to(out_dtype)


@dataclass(frozen=True)
class LinearPlan:
    """The three GEMM plans of one layer and what crosses between them."""

    recipe: Recipe
    fprop: GemmPlan
    dgrad: GemmPlan
    wgrad: GemmPlan
    reuse_wt: bool

    @property
    def int4(self) -> bool:
        """The INT4 recipe's paths (``hq_int4`` fprop): :class:`qtrain.nn.linear.Int4LinearFunction` runs them."""
        return self.fprop.path == "hq_int4"

    @property
    def fallback_gemms(self) -> tuple[str, ...]:
        return tuple(g for g in GEMMS if getattr(self, g).path == "fallback")

    @property
    def weight_quantized(self) -> bool:
        """fprop quantizes W with a kernel (so a reused quantization saves work)."""
        return self.fprop.path in ("int8", "block", "fallback")

    @property
    def dual_sr_grad(self) -> bool:
        """dgrad's and wgrad's lhs (dY and dYᵀ) are both INT8 SR ``(1, c)`` blocks with one ``c`` on the block
        path (jetfire_wide), and :data:`DUAL_SR_GRAD` is on: one ``ops.quantize_blockwise_sr_dual`` call gives
        both (:meth:`quantize_grad`)."""
        dg, wg = self.dgrad, self.wgrad
        return (DUAL_SR_GRAD and dg.path == wg.path == "block"
                and dg.spec.lhs.rounding == wg.spec.lhs.rounding == "stochastic"
                and dg.blocks[0] == wg.blocks[0] == 1 and dg.blocks[2] == wg.blocks[2])

    def quantize_grad(self, dy: torch.Tensor) -> tuple[Operand, Operand]:
        """dgrad's ``dY`` and wgrad's ``dYᵀ`` operands from one read of ``dy`` (needs :attr:`dual_sr_grad`)."""
        c = self.wgrad.blocks[2]
        q, s, qt, st = ops.quantize_blockwise_sr_dual(dy, c)
        return Operand("block", q, s, 1, c), Operand("block", qt, st, 1, c)

    def quantize_weight(self, w: torch.Tensor) -> tuple[Operand | torch.Tensor, Operand | None]:
        """fprop's ``W`` operand (``w`` itself where fprop takes floats) and, if dgrad reuses it, ``Wᵀ``'s."""
        if self.fprop.path == "int8" and self.fprop.spec.rhs.granularity.kind == "tensor":
            q, qt, s = ops.quantize_tensorwise(w)                       # W and Wᵀ from one pass
            return Operand("int8", q, s), (Operand("int8", qt, s) if self.reuse_wt else None)
        w_op = self.fprop.quantize(w, "rhs")
        return w_op, (w_op.transposed() if self.reuse_wt else None)


def _reject(recipe: Recipe, gemm: str, what: str) -> ValueError:
    return ValueError(f"recipe {recipe.name!r}: {gemm} {what}")


def _rtn(op: OperandSpec) -> OperandSpec:
    """``op`` with round-to-nearest: an SR INT8 block operand takes the block path as its RTN twin would."""
    if op.rounding == "stochastic" and op.format == "int8" and op.granularity.kind == "block":
        return OperandSpec(op.format, op.granularity, "nearest", op.transform, op.fallback)
    return op


def _gemm_plan(recipe: Recipe, name: str) -> GemmPlan:
    spec: GemmSpec = getattr(recipe, name)
    if recipe.dataflow:
        plan = _gemm_plan(Recipe(recipe.name, **{name: GemmSpec(spec.lhs, spec.rhs)}), name)
        if plan.path != "block":
            raise _reject(recipe, name, f"runs on the {plan.path!r} path; a dataflow recipe needs every GEMM on "
                                        f"the 'block' path (INT8 power-of-two (r, c) blocks, one c ∈ {BLOCK_KS})")
        if (name == "fprop") != (spec.out == "int8_blocks") and name != "dgrad":
            raise _reject(recipe, name, f"out={spec.out!r} in a dataflow recipe; accepted: fprop 'int8_blocks', "
                                        "dgrad either, wgrad 'dequant'")
        return GemmPlan(name, spec, "block", plan.blocks)
    if spec.out != "dequant":
        raise _reject(recipe, name, f"out={spec.out!r} (an INT8 output for the data flow) is not implemented in "
                                    "this version; accepted: 'dequant'")
    int4 = _int4_gemm_plan(recipe, name, spec)
    if int4 is not None:
        return int4
    for side in ("lhs", "rhs"):
        op = getattr(spec, side)
        if op.transform is not None:
            raise _reject(recipe, name, f"{side} transform {op.transform} is not implemented in this version; "
                                        "accepted: none")
    if not spec.quantized:
        return GemmPlan(name, spec, "hp")
    if spec.rhs.fallback is not None:
        raise _reject(recipe, name, "rhs has a fallback policy: fallback applies to the lhs (the activation or "
                                    "gradient operand) only")
    if spec.lhs.fallback is not None:
        plain = spec.lhs.__class__(spec.lhs.format, spec.lhs.granularity, spec.lhs.rounding)
        blocks = block_pair(_rtn(plain), spec.rhs)
        if blocks is None or blocks[0] != 1:
            raise _reject(recipe, name, f"fallback needs an INT8 lhs (round-to-nearest or stochastic) in (1, c) "
                                        f"blocks and an INT8 RTN rhs in power-of-two (r, c) blocks with the same "
                                        f"c ∈ {BLOCK_KS}; got {spec}")
        return GemmPlan(name, spec, "fallback", blocks)
    if fast_int8(spec.lhs) and fast_int8(spec.rhs):
        return GemmPlan(name, spec, "int8")
    blocks = block_pair(_rtn(spec.lhs), _rtn(spec.rhs))
    if blocks is not None:
        return GemmPlan(name, spec, "block", blocks)
    return GemmPlan(name, spec, "emulated")


def _hq(op: OperandSpec) -> bool:
    return (op.format == "int4" and op.granularity.kind == "tensor" and op.rounding == "nearest"
            and op.transform is not None and op.step is not None and op.fallback is None)


def _int4_gemm_plan(recipe: Recipe, name: str, spec: GemmSpec) -> GemmPlan | None:
    """The ``hq_int4``/``bitsplit_lss`` plan of a GEMM whose operands carry a transform, a learned step or bit
    splitting; None when none does; an error naming what is accepted when they do not fit those paths."""
    if not any(op.transform is not None or op.step is not None or op.split is not None
               for op in (spec.lhs, spec.rhs)):
        return None
    if name == "fprop":
        if not (_hq(spec.lhs) and _hq(spec.rhs) and spec.lhs.transform == spec.rhs.transform):
            raise _reject(recipe, name, "with a Hadamard transform, learned step or bit splitting runs on the "
                                        "'hq_int4' path only, which needs lhs and rhs both INT4 per tensor, "
                                        "round-to-nearest, with the same Hadamard(b) and a LearnedStep (no "
                                        f"split); got {spec}")
        return GemmPlan(name, spec, "hq_int4")
    reused = "lhs" if name == "wgrad" else "rhs"
    lhs = spec.lhs
    if not (lhs.split is not None and lhs.rounding == "stochastic" and lhs.transform is None
            and lhs.granularity.kind in ("tensor", "row")
            and lhs.fallback is None and _hq(recipe.fprop.lhs) and _hq(recipe.fprop.rhs)
            and recipe.fprop.lhs.transform == recipe.fprop.rhs.transform
            and spec.rhs == getattr(recipe.fprop, reused)):
        raise _reject(recipe, name, "with a Hadamard transform, learned step or bit splitting runs on the "
                                    "'bitsplit_lss' path only, which needs an lhs INT4 per tensor or per row with "
                                    "BitSplit and stochastic rounding (the low part), an fprop on the 'hq_int4' path, "
                                    f"and as rhs fprop's quantized {'X' if name == 'wgrad' else 'W'} reused "
                                    f"(rhs == fprop.{reused}); got {spec}")
    return GemmPlan(name, spec, "bitsplit_lss")


INT4_PATHS = (("hq_int4", "bitsplit_lss", "bitsplit_lss"), ("hq_int4", "hp", "hp"))


def _check_int4(recipe: Recipe, fprop: GemmPlan, dgrad: GemmPlan, wgrad: GemmPlan) -> None:
    """An ``hq_int4`` fprop comes with ``bitsplit_lss`` dgrad and wgrad, or with both ``hp`` (the ablation of the
    gradient quantization: unquantized dY against fprop's quantized operands); its backward runs the
    straight-through estimator of the quantizer and the LSQ step gradients, and it keeps X in floating point."""
    paths = (fprop.path, dgrad.path, wgrad.path)
    if "hq_int4" not in paths and "bitsplit_lss" not in paths:
        return
    if paths not in INT4_PATHS:
        raise ValueError(f"recipe {recipe.name!r}: the INT4 paths go together; accepted: fprop 'hq_int4' with "
                         f"dgrad and wgrad both 'bitsplit_lss' or both 'hp' (see qtrain.nn.plan); got "
                         f"{'/'.join(paths)}")
    if dgrad.path == "bitsplit_lss" and dgrad.spec.lhs.granularity != wgrad.spec.lhs.granularity:
        raise ValueError(f"recipe {recipe.name!r}: dgrad and wgrad take the same bit split of dY (one split per "
                         f"step), so their lhs granularity must agree; got dgrad {dgrad.spec.lhs.granularity}, "
                         f"wgrad {wgrad.spec.lhs.granularity}")
    if recipe.save_int8_input:
        raise ValueError(f"recipe {recipe.name!r}: save_int8_input with the INT4 paths is not implemented (the "
                         "backward recomputes the INT4 X from the saved X); accepted: save_int8_input=False")


def _reuses_wt(recipe: Recipe, fprop: GemmPlan, dgrad: GemmPlan) -> bool:
    if recipe.dgrad.rhs != recipe.fprop.rhs:
        return False
    g = recipe.fprop.rhs.granularity
    if fprop.path == "int8" and dgrad.path == "int8":
        return g.kind == "tensor"
    if fprop.path in ("block", "fallback") and dgrad.path in ("block", "fallback"):
        return g.block[0] == g.block[1]
    return False


@functools.lru_cache(maxsize=None)
def build_plan(recipe: Recipe) -> LinearPlan:
    """The plan of ``recipe`` for one linear layer; raises ``ValueError`` naming the spec no path implements."""
    fprop, dgrad, wgrad = (_gemm_plan(recipe, g) for g in GEMMS)
    _check_int4(recipe, fprop, dgrad, wgrad)
    if recipe.save_int8_input and not (fprop.path == "int8" and fast_int8(recipe.fprop.lhs)):
        raise ValueError(f"recipe {recipe.name!r} saves the INT8 input for wgrad, which needs an fprop lhs in INT8 "
                         f"with tensor or row scales; got {recipe.fprop.lhs}")
    return LinearPlan(recipe, fprop, dgrad, wgrad, _reuses_wt(recipe, fprop, dgrad))
