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

A method is a preset in :data:`PRESETS`; :func:`get` looks one up by name.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

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
class OperandSpec:
    """How one GEMM operand is quantized. ``format='hp'`` means kept in high (16/32-bit) precision."""

    format: str = "hp"
    granularity: Granularity = TENSOR
    rounding: str = "nearest"
    transform: str | None = None
    fallback: str | None = None

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"format {self.format!r} is not one of {FORMATS}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding {self.rounding!r} is not one of {ROUNDINGS}")

    @property
    def quantized(self) -> bool:
        return self.format != "hp"

    def __str__(self) -> str:
        if not self.quantized:
            return "hp"
        rnd = "RTN" if self.rounding == "nearest" else "SR"
        return f"{self.format}/{self.granularity}/{rnd}"


HP = OperandSpec()


def int8(granularity: Granularity, rounding: str = "nearest") -> OperandSpec:
    return OperandSpec("int8", granularity, rounding)


@dataclass(frozen=True)
class GemmSpec:
    """One GEMM: how its lhs and rhs operands are quantized; ``out`` is how its output leaves the kernel."""

    lhs: OperandSpec = HP
    rhs: OperandSpec = HP
    out: str = "dequant"

    @property
    def quantized(self) -> bool:
        return self.lhs.quantized or self.rhs.quantized

    def __str__(self) -> str:
        return f"{self.lhs} x {self.rhs}"


@dataclass(frozen=True)
class Recipe:
    """A training method: the three GEMMs of every converted linear layer and what backward keeps.

    ``save_int8_input``: save the fprop-quantized X (int8 + scales) for wgrad instead of the 16-bit X.
    ``dataflow``: ops between linears pass INT8 (Jetfire); not offered by the presets of this version.
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
        def op(o):
            g = o["granularity"]
            gran = Granularity(g["kind"], tuple(g["block"]) if g["block"] is not None else None)
            return OperandSpec(o["format"], gran, o["rounding"], o["transform"], o["fallback"])

        def gemm(g):
            return GemmSpec(op(g["lhs"]), op(g["rhs"]), g["out"])

        return Recipe(d["name"], gemm(d["fprop"]), gemm(d["dgrad"]), gemm(d["wgrad"]),
                      d["save_int8_input"], d["dataflow"], d.get("description", ""))

    def __str__(self) -> str:
        return (f"{self.name}: fprop {self.fprop}; dgrad {self.dgrad}; wgrad {self.wgrad}"
                + ("; saves int8 X" if self.save_int8_input else ""))


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

PRESETS: dict[str, Recipe] = {r.name: r for r in (BF16, SWITCHBACK, SWITCHBACK_M)}


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
