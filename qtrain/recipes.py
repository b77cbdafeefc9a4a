"""Recipes: for each of a linear layer's three GEMMs, how each operand is quantized.

A linear layer computes ``Y = X·Wᵀ (+ b)`` with ``X: [M, K]``, ``W: [N, K]``, ``dY: [M, N]``:

======== ============== ============= =============
GEMM     computes       lhs [outer,R]  rhs [outer,R]
======== ============== ============= =============
fprop    Y  = X·Wᵀ      X  [M, K]      W  [N, K]
dgrad    dX = dY·W      dY [M, N]      Wᵀ [K, N]
wgrad    dW = dYᵀ·X     dYᵀ [N, M]     Xᵀ [K, M]
======== ============== ============= =============

Every operand is described in the orientation its GEMM consumes it: ``[outer, reduced]``. A granularity is
relative to that orientation: ``row`` is one scale per outer index (per token for X in fprop, per output
channel for W), ``block(r, c)`` has ``r`` along the outer dim and ``c`` along the reduced one.

An operand may carry extras: a ``transform`` (:class:`Hadamard`, applied along the reduced dim before
quantizing), a ``fallback`` policy (:class:`Fallback`: tiles holding outliers add a second INT8 term on the
residual) and, for the ``int4`` recipe a ``step`` (:class:`LearnedStep`: LSQ) or a ``split``
(:class:`BitSplit`: bit splitting + leverage-score sampling of the gradient). A GEMM's ``out`` says how its result
leaves the kernel: ``dequant`` (16/32-bit) or ``int8_blocks``
(quantized for the next op, Jetfire's data flow). Which combinations run is decided once per layer by
:mod:`qtrain.nn.plan`, which rejects the rest when the layer is built.

A method is a preset in :data:`PRESETS`; :func:`get` looks one up by name.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

FORMATS = ("int8", "int4", "hp")
ROUNDINGS = ("nearest", "stochastic")
GRANULARITY_KINDS = ("tensor", "row", "column", "block")


@dataclass(frozen=True)
class Granularity:
    """Where scales change: one per tensor, per row, per column, or per ``(r, c)`` block."""

    kind: str
    block: tuple[int, int] | None = None

    def __post_init__(self):
        if self.kind not in GRANULARITY_KINDS:
            raise ValueError(f"granularity kind {self.kind!r} is not one of {GRANULARITY_KINDS}")
        if (self.kind == "block") != (self.block is not None):
            raise ValueError("a block granularity needs block=(r, c); the other kinds take none")
        if self.block is not None and (len(self.block) != 2 or min(self.block) < 1):
            raise ValueError(f"block must be two positive ints (r, c), got {self.block!r}")

    def __str__(self) -> str:
        return f"block{self.block[0]}x{self.block[1]}" if self.kind == "block" else self.kind


TENSOR = Granularity("tensor")
ROW = Granularity("row")
COLUMN = Granularity("column")


def block(r: int, c: int) -> Granularity:
    """Block granularity: ``r`` along the operand's outer dim, ``c`` along the reduced dim."""
    return Granularity("block", (int(r), int(c)))


@dataclass(frozen=True)
class Hadamard:
    """Multiply the operand along its reduced dim by a block-diagonal orthonormal Hadamard matrix of ``block``
    (a power of two, 16–256) before quantizing (METHODS.md § INT4).

    ``search=True``: each layer picks its own block among the powers of two 16 … ``block`` on its first forward,
    the one with the least reconstruction error of the fprop product (as the paper does); the choice is module
    state (``QuantLinear.hq_block``, in ``state_dict``). Both operands of a GEMM share the transform."""

    block: int = 128
    search: bool = False

    def __post_init__(self):
        if not (isinstance(self.block, int) and 16 <= self.block <= 256 and self.block & (self.block - 1) == 0):
            raise ValueError(f"Hadamard block must be a power of two in [16, 256], got {self.block!r}")
        if not isinstance(self.search, bool):
            raise TypeError(f"Hadamard search must be a bool, got {self.search!r}")

    def __str__(self) -> str:
        return f"H≤{self.block}" if self.search else f"H{self.block}"


@dataclass(frozen=True)
class Fallback:
    """Fallback quantization (METHODS.md § Fallback): a tile of ``group_rows`` outer rows × one scale block
    along the reduced dim whose absmax exceeds the layer's threshold τ also gets the residual
    ``x − s₁q₁`` quantized to INT8 (a second MMA on that tile only).

    ``threshold=None``: τ adapts per layer and GEMM so that a ``target`` share of tiles falls back — after each
    quantization ``τ ← ema·τ + (1 − ema)·quantile(tile absmax, 1 − target)`` (the first one sets τ directly).
    A number fixes τ.
    """

    target: float = 0.05
    threshold: float | None = None
    ema: float = 0.9
    group_rows: int = 128

    def __post_init__(self):
        if not (isinstance(self.target, (int, float)) and 0.0 < self.target < 1.0):
            raise ValueError(f"fallback target must be a fraction in (0, 1), got {self.target!r}")
        if self.threshold is not None and not (isinstance(self.threshold, (int, float))
                                               and math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"fallback threshold must be None (adaptive) or a finite number ≥ 0, "
                             f"got {self.threshold!r}")
        if not (isinstance(self.ema, (int, float)) and 0.0 <= self.ema < 1.0):
            raise ValueError(f"fallback ema must be in [0, 1), got {self.ema!r}")
        if self.group_rows != 128:
            raise ValueError(f"fallback group_rows must be 128 (the GEMM tile height), got {self.group_rows!r}")

    def __str__(self) -> str:
        return f"fallback(τ={self.threshold})" if self.threshold is not None else f"fallback({self.target:.0%})"


STEP_INITS = ("lsq", "mse")


@dataclass(frozen=True)
class LearnedStep:
    """A per-tensor step size learned with LSQ (METHODS.md § INT4): initialized from the first batch to
    ``2·mean|x|/√qmax``, gradient scaled by ``1/√(numel·qmax)``, straight-through estimator masked outside the
    clip range. ``learn=False`` keeps the initial step (no gradient). The steps are per-layer Parameters
    (``QuantLinear.int4_step``): an optimizer built after :func:`qtrain.convert` trains them.

    ``relative=True``: the Parameter is the step divided by the operand's RMS (of the transformed operand,
    ``‖t‖/√(rows·padded K)``, taken at every forward): the step follows the tensor's scale, and an optimizer's
    update of the Parameter (~lr under Adam) is a relative change of the step instead of an absolute one (weight
    steps are ~0.005: Adam-sized absolute updates made some degenerate, ``…-compare-llama125m-int4-lsq-eps.md``).
    ``scaled=False``: the step gradient without LSQ's ``1/√(numel·qmax)`` — a scale made for SGD, which under
    Adam only decides whether the gradient clears eps (at 16k tokens a GEMM it does not: the steps stay near
    their first-batch values). Measured (llama-125m, 500 steps, seed 1): relative with LSQ's scale — the Parameter
    frozen, i.e. a step of ``2·mean|t|/√qmax`` taken afresh every forward — ended +8.5 % above BF16, worse than the
    preset's absolute steps (+2.0 … +5.9 % at that seed, ``…-compare-llama125m-int4-relstep.md``); relative and
    unscaled (``benchmarks/recipes/int4_relstep_unscaled.json``) +6.3 % against the preset's +3.8 % (seeds 2, 3;
    its ratio moved from 0.60 to 0.54–0.60 in 500 steps), ``init='mse'`` +3.75 % (``…-int4-four-seeds.md``).

    ``init``: ``'lsq'`` (METHODS.md's ``2·mean|x|/√qmax``) or ``'mse'`` — the step with the least squared error on
    the first batch (:func:`qtrain.quant.lsq.mse_step`; on Gaussian data 0.35·RMS, 18.9 dB, against LSQ's
    0.60·RMS, 15.2 dB)."""

    learn: bool = True
    relative: bool = False
    scaled: bool = True
    init: str = "lsq"

    def __post_init__(self):
        for name in ("learn", "relative", "scaled"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"LearnedStep {name} must be a bool, got {getattr(self, name)!r}")
        if self.init not in STEP_INITS:
            raise ValueError(f"LearnedStep init {self.init!r} is not one of {STEP_INITS}")

    def __str__(self) -> str:
        return (("LSQ" if self.learn else "LSQ(fixed)") + ("/rel" if self.relative else "")
                + ("" if self.scaled else "/unscaled") + ("" if self.init == "lsq" else f"/{self.init}-init"))


@dataclass(frozen=True)
class BitSplit:
    """Bit splitting of the output gradient into two INT4 parts, ``dY ≈ (14·hi + lo)/s`` (~8 bits; ``s`` one per
    tensor, METHODS.md's, or one per row — token — where the operand's granularity is ``row``), with
    leverage-score sampling of the stacked ``[hi; lo]`` rows (METHODS.md § INT4): ``sampling=True`` keeps row
    ``i`` with probability ``p_i`` (``Σp = budget·M`` of the ``2M`` rows, capped at 1), scaled by ``1/p_i``
    (unbiased); ``budget`` 1.0 costs about one GEMM, 2.0 keeps every row (no sampling error)."""

    sampling: bool = True
    budget: float = 1.0

    def __post_init__(self):
        if not isinstance(self.sampling, bool):
            raise TypeError(f"BitSplit sampling must be a bool, got {self.sampling!r}")
        if not (isinstance(self.budget, (int, float)) and not isinstance(self.budget, bool)
                and 0.0 < self.budget <= 2.0):
            raise ValueError(f"BitSplit budget must be a fraction of M in (0, 2], got {self.budget!r}")

    def __str__(self) -> str:
        return f"bitsplit/LSS({self.budget:g}M)" if self.sampling else "bitsplit"


@dataclass(frozen=True)
class OperandSpec:
    """How one GEMM operand is quantized. ``format='hp'`` means kept in high (16/32-bit) precision."""

    format: str = "hp"
    granularity: Granularity = TENSOR
    rounding: str = "nearest"
    transform: Hadamard | None = None
    fallback: Fallback | None = None
    step: LearnedStep | None = None
    split: BitSplit | None = None

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"format {self.format!r} is not one of {FORMATS}")
        if not isinstance(self.granularity, Granularity):
            raise TypeError(f"granularity must be a Granularity, got {self.granularity!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding {self.rounding!r} is not one of {ROUNDINGS}")
        if self.transform is not None and not isinstance(self.transform, Hadamard):
            raise TypeError(f"transform must be None or qtrain.recipes.Hadamard, got {self.transform!r}")
        if self.fallback is not None and not isinstance(self.fallback, Fallback):
            raise TypeError(f"fallback must be None or qtrain.recipes.Fallback, got {self.fallback!r}")
        if (self.transform is not None or self.fallback is not None) and not self.quantized:
            raise ValueError("a high-precision ('hp') operand takes no transform or fallback")
        if self.step is not None and not isinstance(self.step, LearnedStep):
            raise TypeError(f"step must be None or qtrain.recipes.LearnedStep, got {self.step!r}")
        if self.split is not None and not isinstance(self.split, BitSplit):
            raise TypeError(f"split must be None or qtrain.recipes.BitSplit, got {self.split!r}")
        if self.step is not None and (self.format != "int4" or self.granularity.kind != "tensor"):
            raise ValueError(f"a learned step needs an INT4 per-tensor operand, got {self.format}/{self.granularity}")
        if self.split is not None and (self.format != "int4" or self.granularity.kind not in ("tensor", "row")):
            raise ValueError("bit splitting needs an INT4 operand scaled per tensor or per row, got "
                             f"{self.format}/{self.granularity}")
        if self.step is not None and self.split is not None:
            raise ValueError("an operand takes a learned step (forward) or bit splitting (gradient), not both")

    @property
    def quantized(self) -> bool:
        return self.format != "hp"

    def __str__(self) -> str:
        if not self.quantized:
            return "hp"
        rnd = "RTN" if self.rounding == "nearest" else "SR"
        extras = "".join(f"/{e}" for e in (self.transform, self.fallback, self.step, self.split) if e is not None)
        return f"{self.format}/{self.granularity}/{rnd}{extras}"


HP = OperandSpec()


def int8(granularity: Granularity, rounding: str = "nearest", fallback: Fallback | None = None) -> OperandSpec:
    return OperandSpec("int8", granularity, rounding, fallback=fallback)


OUTS = ("dequant", "int8_blocks")


@dataclass(frozen=True)
class GemmSpec:
    """One GEMM: how its lhs and rhs operands are quantized; ``out`` is how its output leaves the kernel."""

    lhs: OperandSpec = HP
    rhs: OperandSpec = HP
    out: str = "dequant"

    def __post_init__(self):
        for side in ("lhs", "rhs"):
            if not isinstance(getattr(self, side), OperandSpec):
                raise TypeError(f"GemmSpec.{side} must be an OperandSpec, got {getattr(self, side)!r}")
        if self.out not in OUTS:
            raise ValueError(f"GemmSpec out {self.out!r} is not one of {OUTS}")

    @property
    def quantized(self) -> bool:
        return self.lhs.quantized or self.rhs.quantized

    def __str__(self) -> str:
        return f"{self.lhs} x {self.rhs}"


@dataclass(frozen=True)
class Recipe:
    """A training method: the three GEMMs of every converted linear layer and what backward keeps.

    ``save_int8_input``: save the fprop-quantized X (int8 + scales) for wgrad instead of the 16-bit X.
    ``dataflow``: ops between linears pass INT8 (Jetfire): :func:`qtrain.convert` swaps the supported
    transformer blocks for the data-flow blocks of :mod:`qtrain.nn.dataflow` (see :mod:`qtrain.nn.plan` for what
    such a recipe must say).
    """

    name: str
    fprop: GemmSpec = GemmSpec()
    dgrad: GemmSpec = GemmSpec()
    wgrad: GemmSpec = GemmSpec()
    save_int8_input: bool = False
    dataflow: bool = False
    description: str = field(default="", compare=False)

    @property
    def quantized(self) -> bool:
        return self.fprop.quantized or self.dgrad.quantized or self.wgrad.quantized

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Recipe":
        """The inverse of :meth:`to_dict`. Strict: an unknown key anywhere is an error naming its place and the
        accepted keys; omitted keys take their defaults."""
        def build(cls, value, where, **nested):
            if value is None and cls in (Hadamard, Fallback, LearnedStep, BitSplit):
                return None
            if not isinstance(value, dict):
                raise ValueError(f"recipe {where}: expected an object, got {value!r}")
            names = [f.name for f in fields(cls)]
            unknown = sorted(set(value) - set(names))
            if unknown:
                raise ValueError(f"recipe {where}: unknown key(s) {', '.join(unknown)}; accepted: "
                                 f"{', '.join(names)}")
            kw = {k: (nested[k](v, f"{where}.{k}") if k in nested else v) for k, v in value.items()}
            return cls(**kw)

        def gran(v, where):
            g = build(Granularity, v, where)
            return Granularity(g.kind, tuple(g.block)) if g.block is not None else g

        def op(v, where):
            return build(OperandSpec, v, where, granularity=gran,
                         transform=lambda t, w: build(Hadamard, t, w),
                         fallback=lambda f, w: build(Fallback, f, w),
                         step=lambda t, w: build(LearnedStep, t, w),
                         split=lambda t, w: build(BitSplit, t, w))

        def gemm(v, where):
            return build(GemmSpec, v, where, lhs=op, rhs=op)

        if not isinstance(d, dict) or "name" not in d:
            raise ValueError(f"a recipe must be an object with a 'name', got {d!r:.80}")
        return build(Recipe, d, d["name"], fprop=gemm, dgrad=gemm, wgrad=gemm)

    def __str__(self) -> str:
        return (f"{self.name}: fprop {self.fprop}; dgrad {self.dgrad}; wgrad {self.wgrad}"
                + ("; saves int8 X" if self.save_int8_input else "") + ("; INT8 data flow" if self.dataflow else ""))


# ---------------------------------------------------------------------------------------------- presets
BF16 = Recipe("bf16", description="No quantization: the run's training precision (BF16 autocast on GPU).")

SWITCHBACK = Recipe(
    "switchback",
    fprop=GemmSpec(lhs=int8(ROW), rhs=int8(TENSOR)),
    dgrad=GemmSpec(lhs=int8(ROW), rhs=int8(TENSOR)),
    wgrad=GemmSpec(),
    description="Wortsman et al. 2023: X and dY row-wise INT8, W tensor-wise INT8 (reused, transposed, in "
                "dgrad); the weight gradient stays 16-bit.",
)

SWITCHBACK_M = Recipe(
    "switchback_m",
    fprop=SWITCHBACK.fprop,
    dgrad=SWITCHBACK.dgrad,
    wgrad=GemmSpec(),
    save_int8_input=True,
    description="SwitchBack, memory-efficient: saves the INT8 X and its row scales for the 16-bit wgrad.",
)

_ACT = int8(block(1, 128), fallback=Fallback())      # activation/gradient: 1×128 blocks + fallback
FALLBACK = Recipe(
    "fallback",
    fprop=GemmSpec(lhs=_ACT, rhs=int8(block(128, 128))),
    dgrad=GemmSpec(lhs=_ACT, rhs=int8(block(128, 128))),
    wgrad=GemmSpec(lhs=_ACT, rhs=int8(block(1, 128))),
    description="Zhang et al. 2025: all three GEMMs INT8 in 1×128 blocks along the reduced dim (weights "
                "128×128, reused transposed in dgrad); activation and gradient tiles over an adaptive per-layer "
                "threshold (5 % of tiles) add an INT8 residual term inside the same GEMM.",
)

def _jetfire(name: str, act: Granularity, weight: Granularity, description: str,
             wgrad_x: Granularity | None = None) -> Recipe:
    """``wgrad_x``: wgrad's X blocks (rows: features, columns: tokens), if not ``act``'s."""
    x, g = int8(act), int8(act, "stochastic")                   # activations RTN, gradients SR
    return Recipe(name,
                  fprop=GemmSpec(lhs=x, rhs=int8(weight), out="int8_blocks"),
                  dgrad=GemmSpec(lhs=g, rhs=int8(weight), out="int8_blocks"),
                  wgrad=GemmSpec(lhs=g, rhs=int8(wgrad_x) if wgrad_x else x),
                  dataflow=True, description=description)


JETFIRE = _jetfire(
    "jetfire", block(32, 32), block(32, 32),
    "Xi et al. 2024: all three GEMMs INT8 in 32×32 blocks (activations and weights round-to-nearest, gradients "
    "stochastic rounding); INT8 data flow: norms and activations take INT8 blocks in and give INT8 blocks out, "
    "and each block saves its activations for backward in INT8 (the residual stream stays floating point, "
    "attention's core BF16). 32×32 blocks transpose exactly, so the saved INT8 X serves wgrad as it is.")

JETFIRE_WIDE = _jetfire(
    "jetfire_wide", block(1, 256), block(128, 256),
    "Jetfire with Hopper-friendly blocks: activations and gradients 1×256 along the reduced dim, weights 128×256, "
    "wgrad's dY 1×256 along tokens and X 128×256 (128 features × 256 tokens) — one promotion of the INT8 GEMM's "
    "int32 partial per 256-deep K slice instead of per 32 (compiled 7B step 89.1 ms against 93.8 ms with "
    "128-wide blocks under the profiler; val loss −0.55 % vs BF16 on llama-125m, benchmarks/results/"
    "2026-12-01-h200-compare-llama125m-k256.md), and in wgrad a row scale times one scalar as in fprop (7B step "
    "1.151× BF16 against 1.123× with X in 1×256 blocks; val loss +0.29 % / +1.57 % at seeds 1 / 2, "
    "…-e2e-session11.md, …-compare-llama125m-wgx128-int4nolss.md); gradients stochastic rounding; the same INT8 "
    "data flow. wgrad re-blocks the saved INT8 X along tokens, dgrad quantizes Wᵀ itself (1×c and 128×c blocks "
    "do not transpose).",
    wgrad_x=block(128, 256))

PRESETS: dict[str, Recipe] = {r.name: r for r in (BF16, SWITCHBACK, SWITCHBACK_M, FALLBACK, JETFIRE, JETFIRE_WIDE)}

_HQ = OperandSpec("int4", TENSOR, transform=Hadamard(256, search=True), step=LearnedStep())
# dY's bit split with one scale per token (row) and leverage-score sampling at 1.9·M of the 2M stacked rows. With one
# scale per tensor (METHODS.md's formula) most tokens' gradients fall to the 4-bit low part: on llama-125m (H200) that
# backward's weight gradients lie 9.5-25 dB from the exact-dY ones, per token (1.5·M) 19-30 dB, per token with every
# row kept 26-34 dB; per token at 1.9·M is within 1 dB of every row (llama-tiny, CPU; scripts/int4_grad_sqnr.py).
# Val loss vs BF16 at 500 steps: per tensor at 1.5·M +5.69 / +5.71 % (seeds 1 / 2; benchmarks/recipes/
# int4_tensor_split.json); per token at 1.5·M +5.85 / +3.13 %, at 1.9·M +2.7 % (seed 1), every row +3.05 / +0.27 %;
# the forward alone +0.81 / +1.96 % — all with METHODS.md's ±6 clamps of the split, since replaced by INT4's ±7
# (unbiased; qtrain/quant/lss.py). This preset with ±7: +1.69 % ± 1.67 (mean ± s.e., seeds 0-3: -3.11 / +2.32 /
# +2.99 / +4.56 %; benchmarks/results/2026-12-02-h200-compare-llama125m-int4-*).
_BS = OperandSpec("int4", ROW, "stochastic", split=BitSplit(budget=1.9))
INT4 = Recipe(
    "int4",
    fprop=GemmSpec(lhs=_HQ, rhs=_HQ),
    dgrad=GemmSpec(lhs=_BS, rhs=_HQ),
    wgrad=GemmSpec(lhs=_BS, rhs=_HQ),
    description="Xi et al. 2023: fprop X and W times a block-diagonal Hadamard matrix along K (block 16–256 "
                "picked per layer on the first forward), then INT4 per tensor with learned steps (LSQ); dgrad "
                "and wgrad split dY into two INT4 parts (~8 bits, one scale per token) and keep 1.9·M of the "
                "2M stacked rows (in expectation) by leverage-score sampling (unbiased), against fprop's INT4 W "
                "and X (reused). INT4 values run on the INT8 GEMM.",
)
PRESETS[INT4.name] = INT4


def get(recipe: "str | Recipe") -> Recipe:
    """The preset named ``recipe`` (or ``recipe`` itself if it is a :class:`Recipe`)."""
    if isinstance(recipe, Recipe):
        return recipe
    if not isinstance(recipe, str):
        raise TypeError(f"recipe must be a name or a qtrain.recipes.Recipe, got {type(recipe).__name__}")
    try:
        return PRESETS[recipe]
    except KeyError:
        raise ValueError(f"unknown recipe {recipe!r}; valid recipes: {', '.join(PRESETS)}") from None
