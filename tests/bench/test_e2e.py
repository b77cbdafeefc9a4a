"""`qtrain bench e2e`: the step-building and measuring logic on a tiny LLaMA on the CPU (wall-clock timer), the
ratios against BF16, failure rows, the recipe list following the preset registry, and the no-GPU refusal."""
from __future__ import annotations

import functools
import json

import pytest
import torch

from qtrain import recipes
from qtrain.bench import common, e2e
from qtrain.errors import UserError

TINY = e2e.Shape("tiny", d_model=64, ffn_hidden=128, n_layer=2, n_head=2, batch=1, seq_len=32, vocab_size=256)


class CountingTimer(e2e.Timer):
    """Wall-clock times; counts the timed calls; reports a fixed peak (1 GiB), as the CUDA timer would, and
    0 then 0.5 GiB allocated around each probed forward."""

    def __init__(self):
        self.calls = 0
        self.probes = 0

    def allocated_bytes(self):
        self.probes += 1
        return 0 if self.probes % 2 else 2**29

    def time_ms(self, fn):
        self.calls += 1
        return super().time_ms(fn)

    def peak_bytes(self):
        return 2**30


def test_rows_bf16_switchback_and_a_failing_recipe(monkeypatch):
    boom = recipes.Recipe("boom", fprop=recipes.SWITCHBACK.fprop, dgrad=recipes.SWITCHBACK.dgrad)
    real_convert = e2e._convert

    def convert(model, recipe, filter_name):
        if getattr(recipe, "name", None) == "boom":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore | details")
        return real_convert(model, recipe, filter_name)

    monkeypatch.setattr(e2e, "_convert", convert)
    timer, seen = CountingTimer(), []
    rows = e2e.run_rows([TINY], [recipes.get("bf16"), boom, recipes.get("switchback"), recipes.get("jetfire_wide"),
                                 recipes.get("fallback")],
                        ["eager"], device="cpu", timer=timer, steps=2, warmup=1,
                        on_row=lambda rows: seen.append(len(rows)))
    assert [r["recipe"] for r in rows] == ["bf16", "boom", "switchback", "jetfire_wide", "fallback"]
    assert seen == [1, 2, 3, 4, 5]
    fb = rows.pop()
    assert fb["error"] is None and 0 < fb["fallback_pct"] <= 100 and rows[2]["fallback_pct"] is None
    assert all(list(r) == list(e2e.empty_row(TINY, "eager", None)) for r in rows)   # same fields, same order
    bf16, failed, sb, jw = rows
    assert timer.calls == 4 * (1 + 2)            # four rows ran: a warm-up step and 2 timed steps each
    assert timer.probes == 4 * 2                 # one probed step per row: before and after the forward
    for r in (bf16, sb, jw):
        assert r["error"] is None and r["steps"] == 2 and r["step_ms"] > 0 and r["first_step_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(TINY.tokens / (r["step_ms"] / 1e3))
        assert r["peak_gib"] == 1.0 and r["mem_vs_bf16"] == 1.0 and r["graphs"] is None
        assert r["saved_gib"] == 0.5 and r["saved_vs_bf16"] == 1.0
    assert bf16["converted"] == "0/9" and sb["converted"] == "8/9"        # 2 × (wqkv, wo, gate_up, down), not lm_head
    assert jw["converted"] == "8/9"                                       # the same 8, inside data-flow blocks
    assert bf16["vs_bf16"] == 1.0 and sb["vs_bf16"] == pytest.approx(bf16["step_ms"] / sb["step_ms"])
    assert failed["error"] == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB more / details"
    assert failed["step_ms"] is None and failed["vs_bf16"] is None and failed["mem_vs_bf16"] is None
    notes = e2e.notes_for([TINY], 2, 1, "default", "torchao not importable (ModuleNotFoundError: x)", rows)
    assert notes[-1].startswith("torchao not importable") and any("vs_bf16" in n for n in notes)


def test_compile_mode_and_a_recipe_that_cannot_run():
    """Compile mode through the same code (Dynamo with its eager backend: no Inductor on the CPU in a test);
    a recipe whose layers raise in the step is a failure row, not an exception."""
    bad = recipes.Recipe("bad", fprop=recipes.GemmSpec(), save_int8_input=True)   # saves an INT8 X it never has
    rows = e2e.run_rows([TINY], [bad], ["compile"], device="cpu", timer=e2e.Timer(), steps=1, warmup=1,
                        compile_fn=functools.partial(torch.compile, backend="eager"))
    assert rows[0]["recipe"] == "bf16" and rows[0]["error"] is None and rows[0]["graphs"] >= 1
    assert rows[0]["vs_bf16"] == 1.0 and rows[0]["mem_vs_bf16"] is None       # no peak memory on the CPU timer
    assert rows[0]["saved_gib"] is None and rows[0]["saved_vs_bf16"] is None
    assert rows[1]["recipe"] == "bad" and rows[1]["error"] and rows[1]["vs_bf16"] is None


def test_cudagraphs_mode_compiles_with_reduce_overhead_and_flags_skipped_graphs(monkeypatch):
    """``cudagraphs`` rows compile with ``mode="reduce-overhead"`` and mark each step's start; a row where
    Inductor skipped CUDA graphs (its counter, bumped here by the stand-in compiler) is an error row. Memory is
    not reported there even by a timer that has it (the graphs' pool hides activations from the counters)."""
    from torch._dynamo.utils import counters

    seen, marks = [], []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))

    def compile_fn(model, **kwargs):
        seen.append(kwargs)
        if len(seen) == 2:
            counters["inductor"]["cudagraph_skips"] += 1
        return torch.compile(model, backend="eager")

    rows = e2e.run_rows([TINY], [recipes.get("switchback")], ["cudagraphs"], device="cpu", timer=CountingTimer(),
                        steps=1, warmup=1, compile_fn=compile_fn)
    assert seen == [{"mode": "reduce-overhead"}] * 2 and len(marks) == 2 * 3     # first, timed, probed step
    assert rows[0]["error"] is None and rows[0]["graphs"] >= 1 and rows[0]["vs_bf16"] == 1.0
    assert rows[0]["peak_gib"] is None and rows[0]["saved_gib"] is None and rows[0]["mem_vs_bf16"] is None
    assert rows[1]["error"].startswith("Inductor skipped CUDA graphs 1×") and rows[1]["vs_bf16"] is None


def test_add_ratios_only_within_shape_and_mode():
    def row(shape, mode, recipe, ms, peak=None, error=None):
        return {**e2e.empty_row(e2e.SHAPES[shape], mode, None), "recipe": recipe, "step_ms": ms, "peak_gib": peak,
                "error": error}

    rows = [row("7b", "eager", "bf16", 100.0, 10.0), row("7b", "eager", "switchback", 80.0, 11.0),
            row("7b", "compile", "bf16", None, error="OutOfMemoryError: ..."),
            row("7b", "compile", "switchback", 50.0, 9.0), row("1b", "eager", "switchback", 10.0, 1.0)]
    e2e.add_ratios(rows)
    assert rows[1]["vs_bf16"] == pytest.approx(1.25) and rows[1]["mem_vs_bf16"] == pytest.approx(1.1)
    assert rows[3]["vs_bf16"] is None and rows[4]["vs_bf16"] is None          # no BF16 row to compare with


def test_time_limit_records_skipped_rows():
    rows = e2e.run_rows([TINY], [recipes.get("switchback")], ["eager", "compile"], device="cpu",
                        timer=e2e.Timer(), steps=1, warmup=1, time_limit=1e-9)
    assert len(rows) == 4 and all(r["error"].startswith("skipped: time limit") for r in rows)


def test_default_recipes_follow_the_preset_registry(monkeypatch):
    new = recipes.Recipe("newest", fprop=recipes.SWITCHBACK.fprop)
    monkeypatch.setitem(recipes.PRESETS, "newest", new)
    names = [r.name for r in e2e.resolve_recipes(None)]
    assert names == [n for n in recipes.PRESETS if n != "bf16"] and "newest" in names and "bf16" not in names
    assert [r.name for r in e2e.resolve_recipes("switchback, bf16,switchback")] == ["switchback", "bf16"]
    with pytest.raises(UserError, match="unknown recipe 'nope'"):
        e2e.resolve_recipes("switchback,nope")
    assert e2e.parse_list("compile,eager,compile", e2e.MODES, "modes") == ["compile", "eager"]
    with pytest.raises(UserError, match="--shapes '7b,3b': unknown '3b'"):
        e2e.parse_list("7b,3b", e2e.SHAPES, "shapes")


def test_shapes_are_the_requested_ones():
    s7, s1 = e2e.SHAPES["7b"], e2e.SHAPES["1b"]
    assert (s7.d_model, s7.ffn_hidden, s7.n_layer, s7.n_head, s7.tokens) == (4096, 11008, 4, 32, 8192)
    assert (s1.d_model, s1.ffn_hidden, s1.n_layer, s1.n_head, s1.tokens) == (2048, 5632, 4, 16, 8192)
    assert s7.model_config().max_seq_len == 2048


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_cli_refuses_without_cuda(capsys):
    from qtrain.bench.__main__ import main

    assert main(["e2e", "--shapes", "1b", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA" in err and "Traceback" not in err


def test_cli_options():
    import argparse

    p = argparse.ArgumentParser()
    e2e.add_arguments(p)
    a = p.parse_args(["--shapes", "7b", "--recipes", "switchback", "--modes", "compile", "--steps", "5",
                      "--warmup", "2", "--quick", "--out", "x", "--filter", "all", "--time-limit", "500"])
    assert (a.shapes, a.recipes, a.modes, a.steps, a.warmup, a.quick, a.out, a.filter_name, a.time_limit) == \
        ("7b", "switchback", "compile", 5, 2, True, "x", "all", 500.0)
    shared = argparse.ArgumentParser()
    shared.add_argument("--out")
    shared.add_argument("--quick", action="store_true")
    e2e.add_arguments(shared, common=False)               # no clash with a parser that has --out/--quick
    d = p.parse_args([])
    assert d.recipes is None and d.steps is None and d.shapes == "7b,1b" and d.modes == "eager,compile"


def test_partial_results_writer(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "metadata", lambda: {"gpu": "NVIDIA H200", "date": "2026-12-01"})
    monkeypatch.setattr(common, "gpu_slug", lambda: "h200")
    w = common.partial_results_writer("e2e", tmp_path / "res")
    w([{"shape": "7b", "step_ms": 1.5}], ["a note"])
    data = json.loads((tmp_path / "res" / "2026-12-01-h200-e2e.partial.json").read_text())
    assert data["partial"] and data["rows"][0]["step_ms"] == 1.5 and data["notes"] == ["a note"]
    w.done()
    assert not list((tmp_path / "res").iterdir())


def test_slow_rows_warm_up_and_time_fewer_steps():
    class TenSeconds(e2e.Timer):          # every step "takes" 10 s (the step is not run)
        calls = 0

        def time_ms(self, fn):
            self.calls += 1
            return 10_000.0

    timer = TenSeconds()
    row = e2e.measure(TINY, None, "eager", "cpu", timer, steps=10, warmup=5, row_seconds=20)
    # first step, warm-up until 10 s (half the row budget) are spent, then at least MIN_STEPS timed steps
    assert row["error"] is None and timer.calls == 1 + 1 + e2e.MIN_STEPS and row["steps"] == e2e.MIN_STEPS
    assert row["step_ms"] == 10_000.0 and row["tokens_per_s"] == pytest.approx(TINY.tokens / 10)
