"""End-to-end suite: full training steps of qtrain's LLaMA at LLaMA-7B and 1B layer shapes, BF16 against every
recipe (and torchao float8 tensorwise when importable), eager, under ``torch.compile``, and (mode
``cudagraphs``) compiled with Inductor's CUDA graphs.

One step is what ``qtrain train`` runs per optimizer step: forward under BF16 autocast (fp32 master weights),
the fp32 next-token cross-entropy, backward, the default optimizer (StableAdamW) and ``zero_grad``. Each row is
timed with CUDA events, median over ``steps`` steps after ``warmup`` untimed ones (the first of which compiles
in compile mode); ratios are against the BF16 row of the same shape and mode in the same process. A row that
fails (out of memory, compile error, a recipe that cannot run) is recorded with its error and the suite goes on.

The measuring logic (:func:`run_rows`) takes the device, a :class:`Timer` and the compile function as
arguments, so it runs on the CPU too (tests use a tiny shape); :func:`run` is the CUDA-only command.
"""
from __future__ import annotations

import gc
import statistics
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch

ROW_SECONDS = 20.0          # cap on one row's timed steps: fewer steps (at least MIN_STEPS) when steps are slow
MIN_STEPS = 3
TORCHAO = "torchao_float8_tensorwise"
MODES = ("eager", "compile", "cudagraphs")
COMPILED = ("compile", "cudagraphs")
FILTERS = ("default", "all")


@dataclass(frozen=True)
class Shape:
    """A LLaMA of ``n_layer`` blocks, trained on ``batch`` × ``seq_len`` tokens per step."""

    name: str
    d_model: int
    ffn_hidden: int
    n_layer: int
    n_head: int
    batch: int
    seq_len: int
    vocab_size: int = 32000

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    def model_config(self):
        from qtrain.models import ModelConfig

        return ModelConfig("llama", d_model=self.d_model, n_layer=self.n_layer, n_head=self.n_head,
                           ffn_hidden=self.ffn_hidden, vocab_size=self.vocab_size, max_seq_len=self.seq_len)

    def describe(self) -> str:
        return (f"{self.name}: d_model {self.d_model}, ffn {self.ffn_hidden}, {self.n_layer} layers, "
                f"{self.n_head} heads, vocab {self.vocab_size}, {self.batch}×{self.seq_len} tokens/step")


# LLaMA-7B layer shapes (as GPU.md's end-to-end anchors) and TinyLlama-1.1B's widths (d 2048, ffn 5632; it has
# 22 layers and 4 KV heads — here 4 layers and full multi-head attention, so that compiling stays in budget).
SHAPES = {
    "7b": Shape("7b", d_model=4096, ffn_hidden=11008, n_layer=4, n_head=32, batch=4, seq_len=2048),
    "1b": Shape("1b", d_model=2048, ffn_hidden=5632, n_layer=4, n_head=16, batch=4, seq_len=2048),
}


# ------------------------------------------------------------------------------------------------ timers
class Timer:
    """Wall-clock timing (``time.perf_counter``), no memory statistics: the CPU stand-in for :class:`CudaTimer`."""

    def sync(self) -> None:
        pass

    def time_ms(self, fn: Callable[[], None]) -> float:
        """Milliseconds one call of ``fn`` takes."""
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return (time.perf_counter() - t0) * 1e3

    def reset_peak(self) -> None:
        pass

    def peak_bytes(self) -> int | None:
        return None

    def allocated_bytes(self) -> int | None:
        return None

    def free(self) -> None:
        gc.collect()


class CudaTimer(Timer):
    """CUDA events around each call (GPU time from the step's first to its last kernel, host gaps included);
    peak memory from ``torch.cuda.max_memory_allocated``."""

    def __init__(self, device=None):
        self.device = torch.device(device or "cuda")

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def time_ms(self, fn: Callable[[], None]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.sync()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device)

    def allocated_bytes(self) -> int | None:
        return torch.cuda.memory_allocated(self.device)

    def free(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- one training step
def torchao_status() -> str | None:
    """None when ``torchao.float8`` imports, else why not (recorded in the results instead of failing)."""
    try:
        import torchao.float8  # noqa: F401
    except Exception as e:      # ImportError, or a torchao built for another torch
        return f"torchao not importable ({type(e).__name__}: {e})"
    return None


def _torchao_filter(module, fqn: str) -> bool:
    """Every linear but the output head, with both dims divisible by 16 (torchao's float8 GEMM requirement)."""
    return (fqn.rsplit(".", 1)[-1] != "lm_head" and module.in_features % 16 == 0
            and module.out_features % 16 == 0)


def _convert(model, recipe, filter_name: str) -> int:
    """Convert ``model`` in place for ``recipe`` (a Recipe, or :data:`TORCHAO`); the number of converted layers."""
    if isinstance(recipe, str) and recipe == TORCHAO:
        from torchao.float8 import convert_to_float8_training

        convert_to_float8_training(model, module_filter_fn=_torchao_filter)   # default config: tensorwise
        return sum(type(m).__name__ == "Float8Linear" for m in model.modules())
    import qtrain
    from qtrain.train.loop import quantize_all_but_head

    qtrain.convert(model, recipe, filter_fn=quantize_all_but_head if filter_name == "all" else None)
    return len(qtrain.nn.quantized_linear_names(model))


def build_step(shape: Shape, recipe, mode: str, device, filter_name: str = "default",
               compile_fn: Callable | None = None):
    """A closure running one training step of ``shape`` with ``recipe`` (None: the plain BF16 model, a Recipe,
    or :data:`TORCHAO`), and ``'converted/linear layers'``. Each call of the closure trains on the next of two
    fixed random batches; ``step(probe)`` also calls ``probe()`` before the forward and after it (the loss
    computed, backward not yet run)."""
    from torch import nn

    from qtrain import models
    from qtrain.train.config import TrainConfig
    from qtrain.train.loop import make_optimizer

    device = torch.device(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = models.build_from_config(shape.model_config())
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    converted = 0 if recipe is None else _convert(model, recipe, filter_name)
    defaults = TrainConfig()
    opt = make_optimizer(defaults.optimizer, model, 3e-4, defaults.weight_decay)
    step_model = model
    if mode in COMPILED:
        torch._dynamo.reset()           # a fresh cache per row: no recompile limit, no graphs of earlier rows
        step_model = (compile_fn or torch.compile)(model, **({"mode": "reduce-overhead"} if mode == "cudagraphs"
                                                            else {}))
    g = torch.Generator(device="cpu").manual_seed(1)
    batches = [(torch.randint(0, shape.vocab_size, (shape.batch, shape.seq_len + 1), generator=g)
                .to(device)) for _ in range(2)]
    batches = [(b[:, :-1].contiguous(), b[:, 1:].contiguous()) for b in batches]
    calls = [0]

    def step(probe: Callable[[], None] | None = None):
        x, y = batches[calls[0] % len(batches)]
        calls[0] += 1
        if mode == "cudagraphs":
            torch.compiler.cudagraph_mark_step_begin()      # a new step: the last step's graph outputs are dead
        if probe is not None:
            probe()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            _, loss = step_model(x, y)
        if probe is not None:
            probe()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step.model = model
    return step, f"{converted}/{n_linear}"


# ----------------------------------------------------------------------------------------------------- rows
def _label(recipe) -> str:
    return "bf16" if recipe is None else (recipe if isinstance(recipe, str) else recipe.name)


def _error_text(e: BaseException) -> str:
    """One markdown-safe line: the exception's type and the first lines of its message (a compile error's cause
    is on its second line), shortened."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = f"{type(e).__name__}: {' '.join(lines[:3])}".replace("|", "/")
    return text if len(text) <= 300 else text[:297] + "..."


def empty_row(shape: Shape, mode: str, recipe) -> dict:
    """A row's fields, all None but what identifies it (every row has the same keys, in this order)."""
    return {"shape": shape.name, "mode": mode, "recipe": _label(recipe), "converted": None, "step_ms": None,
            "tokens_per_s": None, "vs_bf16": None, "peak_gib": None, "mem_vs_bf16": None, "saved_gib": None,
            "saved_vs_bf16": None, "steps": None,
            "first_step_s": None, "graphs": None, "fallback_pct": None, "error": None}


def measure(shape: Shape, recipe, mode: str, device, timer: Timer, steps: int, warmup: int,
            filter_name: str = "default", compile_fn: Callable | None = None,
            row_seconds: float = ROW_SECONDS) -> dict:
    """One result row (``error`` set and no timings when building or running the step raised)."""
    row = empty_row(shape, mode, recipe)
    try:
        _run_row(row, shape, recipe, mode, device, timer, steps, warmup, filter_name, compile_fn, row_seconds)
    except Exception as e:          # OOM, compile errors, recipes that cannot run: record and go on
        row["error"] = _error_text(e)
        where = "".join(traceback.format_exception(type(e), e, e.__traceback__, limit=-2))
        print(f"\n{where[-3000:]}", end="", flush=True)      # the end of the traceback, for the log
    if mode in COMPILED:
        torch._dynamo.reset()       # compiled code holds the model: drop it before the next row
    timer.free()                    # the row's model, optimizer state and graphs are gone by now
    return row


def _run_row(row, shape, recipe, mode, device, timer, steps, warmup, filter_name, compile_fn, row_seconds):
    from torch._dynamo.utils import counters

    timer.free()
    counters.clear()
    step, row["converted"] = build_step(shape, recipe, mode, device, filter_name, compile_fn)
    first = timer.time_ms(step)                         # compiles in compile mode: excluded, reported apart
    row["first_step_s"] = first / 1e3
    budget_ms = row_seconds * 1e3 if row_seconds else float("inf")
    warm = []
    while len(warm) < warmup - 1 and sum(warm) < budget_ms / 2:     # slow rows (e.g. emulated recipes)
        warm.append(timer.time_ms(step))                            # warm up and time fewer steps
    if warm:
        steps = max(min(steps, MIN_STEPS), min(steps, int(budget_ms / max(warm[-1], 1e-3))))
    timer.reset_peak()                                  # steady state: weights, optimizer state, activations
    times = [timer.time_ms(step) for _ in range(steps)]
    peak = timer.peak_bytes()
    ms = statistics.median(times)
    allocated = []
    step(lambda: (timer.sync(), allocated.append(timer.allocated_bytes())))
    saved = None if None in allocated else allocated[1] - allocated[0]
    if mode == "cudagraphs":        # activations live in the graphs' private pool, allocated at capture: the
        peak = saved = None         # allocator's counters see no allocation during replays (measure in compile)
    row.update(step_ms=ms, tokens_per_s=shape.tokens / (ms / 1e3), steps=steps,
               peak_gib=None if peak is None else peak / 2**30, saved_gib=None if saved is None else saved / 2**30)
    if mode in COMPILED:            # Dynamo graphs compiled for the row: 1 is the whole model in one graph,
        row["graphs"] = counters["stats"]["unique_graphs"]      # more means graph breaks or recompiles
    if mode == "cudagraphs":        # Inductor ran a graph without CUDA graphs: the row is not what it says
        skips = counters["inductor"]["cudagraph_skips"]
        if skips:
            row["error"] = f"Inductor skipped CUDA graphs {skips}× (see the log): timings are not of CUDA graphs"
    row["fallback_pct"] = fallback_pct(step.model)


def fallback_pct(model) -> float | None:
    """Mean share (%) of tiles that fell back over the fallback GEMMs of every layer at the last step, or None
    without fallback layers."""
    import qtrain

    shares = [v for gemms in qtrain.fallback_stats(model).values() for v in gemms.values()]
    return 100 * sum(shares) / len(shares) if shares else None


def add_ratios(rows: list[dict]) -> None:
    """``vs_bf16`` (BF16 step time / the row's: > 1 is faster) and ``mem_vs_bf16`` (peak / BF16's peak) against
    the BF16 row of the same shape and mode."""
    base = {(r["shape"], r["mode"]): r for r in rows if r["recipe"] == "bf16" and r["error"] is None}
    for r in rows:
        b = base.get((r["shape"], r["mode"]))
        if b is None or r["error"] is not None:
            continue
        r["vs_bf16"] = b["step_ms"] / r["step_ms"]
        if b["peak_gib"] and r["peak_gib"] is not None:
            r["mem_vs_bf16"] = r["peak_gib"] / b["peak_gib"]
        if b["saved_gib"] and r["saved_gib"] is not None:
            r["saved_vs_bf16"] = r["saved_gib"] / b["saved_gib"]


def run_rows(shapes: list[Shape], recipes: list, modes: list[str], *, device, timer: Timer, steps: int,
             warmup: int, filter_name: str = "default", torchao: bool = False, compile_fn: Callable | None = None,
             time_limit: float = 0.0, row_seconds: float = ROW_SECONDS,
             on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Rows for every shape × mode × (BF16, ``recipes``..., torchao float8 when ``torchao``), in that order.

    ``recipes``: :class:`~qtrain.recipes.Recipe` objects (one named ``bf16`` is left out: the plain model, run
    first, is the baseline). ``time_limit`` (seconds, 0: none): rows not started by then are recorded as skipped.
    ``on_row(rows)`` is called after every row (progress, partial results)."""
    plan = [(s, m, r) for s in shapes for m in modes
            for r in [None] + [r for r in recipes if r.name != "bf16"] + ([TORCHAO] if torchao else [])]
    rows, t0 = [], time.perf_counter()
    for i, (shape, mode, recipe) in enumerate(plan):
        elapsed = time.perf_counter() - t0
        print(f"[{i + 1}/{len(plan)} {elapsed:5.0f} s] {shape.name} {mode} {_label(recipe)} ...", end=" ",
              flush=True)
        if time_limit and elapsed > time_limit:
            row = {**empty_row(shape, mode, recipe), "error": f"skipped: time limit of {time_limit:.0f} s reached"}
        else:
            row = measure(shape, recipe, mode, device, timer, steps, warmup, filter_name, compile_fn, row_seconds)
        rows.append(row)
        add_ratios(rows)
        print(row["error"] or (f"{row['step_ms']:.1f} ms/step, {row['tokens_per_s']:,.0f} tokens/s"
                               + (f", {row['vs_bf16']:.2f}× bf16" if row["vs_bf16"] is not None else "")
                               + (f", peak {row['peak_gib']:.1f} GiB" if row["peak_gib"] is not None else "")
                               + (f", saved for backward {row['saved_gib']:.2f} GiB" if row["saved_gib"] is not None
                                  else "")
                               + f", {row['converted']} layers converted, first step {row['first_step_s']:.1f} s"),
              flush=True)
        if on_row is not None:
            on_row(rows)
    return rows


def notes_for(shapes: list[Shape], steps: int, warmup: int, filter_name: str, torchao: str | None,
              rows: list[dict]) -> list[str]:
    from qtrain.nn.convert import MIN_CUDA_FEATURES

    notes = ["Shapes (qtrain's LLaMA: RMSNorm, SwiGLU, RoPE, SDPA attention, untied lm_head kept in BF16): "
             + "; ".join(s.describe() for s in shapes) + ". 7b: LLaMA-7B's layer widths; 1b: TinyLlama-1.1B's "
             "widths (it has 22 layers and 4 KV heads; 4 layers and full multi-head attention here, to keep the "
             "compile time of the suite in budget).",
             "One step = forward under BF16 autocast (fp32 master weights) + fp32 next-token cross-entropy + "
             "backward + StableAdamW step (qtrain train's default optimizer, weight decay 0.1 on matrices) + "
             "zero_grad; two fixed batches of random token ids alternate.",
             f"step_ms: median of `steps` steps timed with CUDA events after {warmup} untimed steps; first_step_s: "
             "the first of those (in compile mode it includes compiling, so it is excluded from the median). "
             f"Up to {steps} steps per row, fewer (at least {MIN_STEPS}) where they would take over "
             f"{ROW_SECONDS:.0f} s.",
             "vs_bf16: BF16 step time / the row's step time (> 1 is faster), against BF16 of the same shape and "
             "mode in the same process; mem_vs_bf16 likewise for peak_gib, torch.cuda.max_memory_allocated over "
             "the timed steps (reset after warm-up: weights, gradients, optimizer state and activations); saved_gib: "
             "torch.cuda.memory_allocated after the forward (loss computed) minus before it, in one more step: "
             "what the forward keeps for backward (activations, quantized copies), saved_vs_bf16 its ratio. "
             "Not measured in cudagraphs rows: there activations live in the graphs' private memory pool, "
             "allocated at capture, and the allocator's counters see no allocation during a replay (the compile "
             "rows run the same model).",
             "compile: torch.compile(model) of the whole model (default mode, as `qtrain train --compile`), the "
             "optimizer step eager; torch._dynamo.reset() before each row; graphs: Dynamo graphs compiled in the row "
             "(1: the whole forward in one graph; int4: 2, its first step calibrates in opaque ops and the second "
             "recompiles once into one graph; more: graph breaks or recompiles). cudagraphs: the same with "
             "mode=\"reduce-overhead\" (Inductor's CUDA graphs: no per-kernel host launches; "
             "torch.compiler.cudagraph_mark_step_begin() before each step; a row where Inductor skipped CUDA graphs "
             "is marked as an error). Stochastic rounding and int4's sampling draw from the default CUDA generator "
             "inside a graph capture (qtrain.quant.core.capture_safe).",
             "fallback_pct: recipes with fallback — the share of tiles that fell back at the last step, averaged "
             "over every layer's fallback GEMMs (each layer's threshold tracks its own target).",
             "converted: quantized / all linear layers. "
             + (f"Default qtrain.convert filter: lm_head kept, and on CUDA layers narrower than "
                f"{MIN_CUDA_FEATURES} features stay BF16." if filter_name == "default" else
                "--filter all: every linear layer but lm_head (as `qtrain train`).")
             + " torchao float8 converts every linear but lm_head.",
             "qtrain.reuse_quantized_weights is not used: with one micro-step per optimizer step each weight is "
             "quantized once per step either way (it pays only under gradient accumulation)."]
    if any(r["error"] and "no linear layer to convert" in r["error"] for r in rows):
        notes.append("Rows with 'no linear layer to convert': the default filter keeps every layer of that shape "
                     "in BF16; `--filter all` measures the recipe there.")
    notes.append(torchao or f"torchao {_torchao_version()}: float8 tensorwise "
                            "(torchao.float8.convert_to_float8_training, default config) as a reference row.")
    return notes


def _torchao_version() -> str:
    import torchao

    return getattr(torchao, "__version__", "?")


# -------------------------------------------------------------------------------------------- the command
def parse_list(text: str, valid, what: str) -> list[str]:
    from qtrain.errors import UserError

    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in valid]
    if not items or bad:
        raise UserError(f"--{what} {text!r}: {'unknown ' + ', '.join(map(repr, bad)) if bad else 'empty'}; "
                        f"valid: {', '.join(valid)}")
    return list(dict.fromkeys(items))


def resolve_recipes(text: str | None) -> list:
    """``--recipes`` (preset names or recipe .json files) as Recipe objects; default every preset of
    ``qtrain.recipes.PRESETS`` (read now, so presets added later are included) but ``bf16`` (always run)."""
    from qtrain import recipes
    from qtrain.train.loop import resolve_recipe

    names = [n for n in recipes.PRESETS if n != "bf16"] if text is None else \
        [t.strip() for t in text.split(",") if t.strip()]
    resolved = {}
    for name in names:
        r = resolve_recipe(name)
        resolved.setdefault(r.name, r)
    return list(resolved.values())


def suite_name(filter_name: str) -> str:
    """The results' suite name: ``e2e``, or ``e2e-filter-all`` with ``--filter all`` (so neither overwrites)."""
    return "e2e" if filter_name == "default" else f"e2e-filter-{filter_name}"


def run_suite(quick: bool = False, shapes: str = "7b,1b", recipes: str | None = None, modes: str = "eager,compile",
              steps: int | None = None, warmup: int | None = None, filter_name: str = "default",
              time_limit: float = 0.0, out=None):
    """The suite on the current GPU: ``(rows, notes)`` like the other suites. With ``out``, the rows so far are
    also written to ``<out>/<date>-<gpu>-<suite>.partial.json`` after every row (kept if the run is killed)."""
    from qtrain.bench.common import partial_results_writer
    from qtrain.errors import UserError

    shape_list = [SHAPES[s] for s in parse_list(shapes, SHAPES, "shapes")]
    mode_list = parse_list(modes, MODES, "modes")
    if filter_name not in FILTERS:
        raise UserError(f"--filter {filter_name!r}: valid: {', '.join(FILTERS)}")
    recipe_list = resolve_recipes(recipes)
    steps = steps if steps is not None else (3 if quick else 10)
    warmup = warmup if warmup is not None else (2 if quick else 3)
    if steps < 1 or warmup < 1:
        raise UserError(f"--steps and --warmup must be at least 1 (got {steps}, {warmup}); the first warm-up "
                        "step compiles in compile mode")
    torchao = torchao_status()
    print(f"e2e: shapes {', '.join(s.name for s in shape_list)}; modes {', '.join(mode_list)}; recipes bf16, "
          f"{', '.join(r.name for r in recipe_list if r.name != 'bf16')}"
          + ("" if torchao else f", {TORCHAO}") + f"; {warmup} warm-up + {steps} timed steps per row"
          + (f"; {torchao}" if torchao else ""), flush=True)
    writer = partial_results_writer(suite_name(filter_name), out) if out is not None else None

    def note_list(rows):
        return notes_for(shape_list, steps, warmup, filter_name, torchao, rows)

    rows = run_rows(shape_list, recipe_list, mode_list, device="cuda", timer=CudaTimer(), steps=steps,
                    warmup=warmup, filter_name=filter_name, torchao=torchao is None, time_limit=time_limit,
                    on_row=(lambda rows: writer(rows, note_list(rows))) if writer else None)
    if writer is not None:
        writer.done()
    return rows, note_list(rows)


def add_arguments(p, common: bool = True) -> None:
    """The e2e options (``python -m qtrain.bench e2e -h``); ``common=False`` leaves out ``--quick`` and ``--out``
    (for a parser shared with the other suites, which has them)."""
    p.add_argument("--shapes", default="7b,1b", help=f"comma-separated, from {', '.join(SHAPES)} (default all)")
    p.add_argument("--recipes", default=None,
                   help="comma-separated preset names or recipe .json files (default: every preset in "
                        "qtrain.recipes.PRESETS); BF16 is always measured as the baseline")
    p.add_argument("--modes", default="eager,compile",
                   help="comma-separated, from eager, compile, cudagraphs (compile with mode=reduce-overhead) "
                        "(default eager,compile)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 10; --quick 3)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps per row, the first compiles in compile mode (default 3; --quick 2)")
    p.add_argument("--filter", dest="filter_name", choices=FILTERS, default="default",
                   help="layers to convert: qtrain.convert's default filter, or every linear but lm_head")
    p.add_argument("--time-limit", type=float, default=0.0,
                   help="seconds; rows not started by then are recorded as skipped (default 0: none)")
    if common:
        p.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
        p.add_argument("--out", default="benchmarks/results", help="directory for the JSON/markdown results")


def run(args) -> int:
    """``python -m qtrain.bench e2e``: refuse without CUDA, run the suite, write the results."""
    from qtrain.bench.common import require_cuda, write_results

    require_cuda()
    rows, notes = run_suite(quick=args.quick, shapes=args.shapes, recipes=args.recipes, modes=args.modes,
                            steps=args.steps, warmup=args.warmup, filter_name=args.filter_name,
                            time_limit=args.time_limit, out=args.out)
    paths = write_results(suite_name(args.filter_name), rows, notes, args.out)
    print(f"wrote {', '.join(map(str, paths))}")
    return 0

