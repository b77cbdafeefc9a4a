"""QuantLinear with the `fallback` recipe: accuracy on outlier data (DESIGN.md gate ≥ 30 dB), the kernel path
equal to the reference path, the per-layer threshold as module state (state_dict, eval, plain checkpoints),
telemetry in qtrain.report, and torch.compile."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import qtrain
from qtrain import ops
from qtrain.nn.linear import QuantLinear
from qtrain.quant import sqnr
from qtrain.quant.testing import PATTERNS, outlier_data
from qtrain.train.loop import resolve_recipe

DEV = "cuda" if torch.cuda.is_available() else "cpu"        # CPU: the kernels under Triton's interpreter


def _step(layer, x, dy):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.weight.grad


@pytest.mark.parametrize("pattern", PATTERNS)
def test_fallback_sqnr_on_outlier_data(pattern):
    torch.manual_seed(0)
    ref = nn.Linear(512, 384)
    x = outlier_data(1024, 512, magnitude=80.0, pattern=pattern, seed=1)
    dy = outlier_data(1024, 384, magnitude=30.0, pattern="token", seed=2)
    got = _step(QuantLinear.from_module(ref, "fallback"), x, dy)
    ref.weight.grad = None
    want = _step(ref, x, dy)
    for name, g, w, gate in zip(("y", "dx", "dw"), got, want, (30, 30, 25)):
        # dW: its X operand (blocks of 128 tokens) has no fallback term, so token outliers cost it a few dB
        assert sqnr(w, g) >= gate, (name, sqnr(w, g))
    blocked = qtrain.recipes.Recipe("b", **{g: qtrain.recipes.GemmSpec(
        qtrain.recipes.int8(qtrain.recipes.block(1, 128)), getattr(qtrain.recipes.get("fallback"), g).rhs)
        for g in ("fprop", "dgrad", "wgrad")})
    ref.weight.grad = None
    plain = _step(QuantLinear.from_module(ref, blocked), x, dy)
    assert sqnr(want[0], got[0]) > sqnr(want[0], plain[0])              # the fallback term is what helps


FALLBACK_SR = resolve_recipe(str(Path(__file__).parents[2] / "benchmarks" / "recipes" / "fallback_sr.json"))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_stochastic_gradient_operands_are_unbiased(backend):
    """``fallback_sr`` (dY and dYᵀ rounded stochastically, with fallback): dX averaged over draws converges to
    dY·Ŵ (Ŵ: the weight as quantized), ~1/√draws, where the preset's round-to-nearest dY keeps its error; the
    plan runs both gradient GEMMs on the fallback path."""
    plan = qtrain.nn.plan.build_plan(FALLBACK_SR)
    assert (plan.dgrad.path, plan.wgrad.path) == ("fallback", "fallback")
    assert plan.dgrad.spec.lhs.rounding == "stochastic" and plan.dgrad.spec.lhs.fallback is not None
    torch.manual_seed(0)
    ref = nn.Linear(256, 128).to(DEV)
    x = outlier_data(128, 256, magnitude=20.0, pattern="scattered", seed=3, device=DEV)
    dy = outlier_data(128, 128, magnitude=8.0, pattern="token", seed=4, device=DEV)
    w_hat = qtrain.quant.fake_quantize(ref.weight.detach(), qtrain.recipes.block(128, 128))
    want = dy.double() @ w_hat.double()
    errs = {}
    with ops.use_backend(backend):
        for recipe, n in ((FALLBACK_SR, 16), ("fallback", 2)):
            layer = QuantLinear.from_module(ref, recipe)
            _step(layer, x, dy)                          # sets the thresholds (the first step flags every tile)
            layer.eval()                                 # ... and keeps them: the same tiles fall back each draw
            ref.weight.grad = None
            grads = []
            for i in range(n):
                qtrain.nn.functional.reseed(100 + i)
                grads.append(_step(layer, x, dy)[1].double())
            errs[recipe if isinstance(recipe, str) else "sr"] = [
                ((g - want).norm() / want.norm()).item() for g in (grads[0], sum(grads) / n)]
    one, mean = errs["sr"]
    assert mean < one / 2.5, errs                       # 16 draws: ~1/4 of one draw's error
    assert errs["fallback"][1] == pytest.approx(errs["fallback"][0])     # deterministic: no averaging away
    assert mean < errs["fallback"][0], errs


def test_kernel_path_equals_reference_path():
    torch.manual_seed(0)
    ref = nn.Linear(256, 200).to(DEV)
    x = outlier_data(300, 256, magnitude=80.0, pattern="scattered", device=DEV)
    dy = torch.randn(300, 200, device=DEV)
    outs = {}
    for backend in ("reference", "triton"):
        layer = QuantLinear.from_module(ref, "fallback")
        ref.weight.grad = None
        with ops.use_backend(backend):
            outs[backend] = (*_step(layer, x, dy), layer.fallback_tau.clone())
    for name, a, b in zip(("y", "dx", "dw", "tau"), outs["reference"], outs["triton"]):
        assert ((a - b).norm() / a.norm()).item() <= 1e-5, name


def test_threshold_is_module_state():
    torch.manual_seed(0)
    layer = QuantLinear.from_module(nn.Linear(256, 128), "fallback")
    assert layer.fallback_tau.tolist() == [-1.0, -1.0, -1.0]
    x = outlier_data(512, 256, magnitude=80.0, pattern="token")
    _step(layer, x, torch.randn(512, 128))
    tau = layer.fallback_tau.clone()
    assert (tau > 0).all() and torch.isfinite(layer.fallback_ratio).all()
    layer.eval()
    with torch.no_grad():
        layer(x * 3)
    assert torch.equal(layer.fallback_tau, tau)                           # evaluation leaves τ alone
    sd = layer.state_dict()
    assert torch.equal(sd["fallback_tau"], tau)
    fresh = QuantLinear.from_module(nn.Linear(256, 128), "fallback")
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.fallback_tau, tau)
    plain_sd = nn.Linear(256, 128).state_dict()                           # a checkpoint of the plain model
    fresh.load_state_dict(plain_sd)
    assert torch.equal(fresh.fallback_tau, tau)
    fixed = qtrain.recipes.Recipe("fixed", fprop=qtrain.recipes.GemmSpec(
        qtrain.recipes.int8(qtrain.recipes.block(1, 128), fallback=qtrain.recipes.Fallback(threshold=5.0)),
        qtrain.recipes.int8(qtrain.recipes.block(128, 128))))
    f = QuantLinear.from_module(nn.Linear(256, 128), fixed)
    _step(f, x, torch.randn(512, 128))
    assert f.fallback_tau[0].item() == 5.0


def test_report_shows_fallback_share_and_errors():
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64))
    qtrain.convert(model, "fallback", filter_fn=lambda m, n: True)
    x = outlier_data(256, 256, magnitude=80.0, pattern="token")
    with qtrain.track_errors(model):
        model(x).sum().backward()
    rep = qtrain.report(model)
    assert "fallback %" in rep and "x err no-fb" in rep
    stats = qtrain.fallback_stats(model)
    assert set(stats) == {"0", "2"} and set(stats["0"]) == {"fprop", "dgrad", "wgrad"}
    assert model[0].stats["x_rel_err"] <= model[0].stats["x_rel_err_no_fallback"]


@pytest.mark.parametrize("recipe", ["fallback", FALLBACK_SR], ids=["fallback", "fallback_sr"])
def test_compile_matches_eager(recipe):
    """fallback_sr: the SR op draws its seed inside (one opaque op), so eager and compiled round alike."""
    torch.manual_seed(0)
    ref = nn.Linear(256, 256)
    eager = QuantLinear.from_module(ref, recipe)
    twin = QuantLinear.from_module(ref, recipe)
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    for i in range(2):
        x = outlier_data(384, 256, magnitude=80.0, seed=i, pattern="scattered")
        dy = torch.randn(384, 256)
        ref.weight.grad = None
        qtrain.nn.functional.reseed(i)
        a = _step(eager, x, dy)
        ref.weight.grad = None
        qtrain.nn.functional.reseed(i)
        b = _step(compiled, x, dy)
        for name, u, v in zip(("y", "dx", "dw"), a, b):
            assert torch.equal(u, v), name
        assert torch.equal(eager.fallback_tau, twin.fallback_tau)


@pytest.mark.gpu
def test_cuda_kernels_match_reference_and_inductor():
    torch.manual_seed(0)
    ref = nn.Linear(1024, 768).cuda()
    x = outlier_data(2048, 1024, magnitude=80.0, pattern="scattered", device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(2048, 768, device="cuda", dtype=torch.bfloat16)
    outs = {}
    for name in ("reference", "triton", "inductor"):
        layer = QuantLinear.from_module(ref, "fallback")
        ref.weight.grad = None
        run = torch.compile(layer) if name == "inductor" else layer
        with ops.use_backend("reference" if name == "reference" else "auto"):
            outs[name] = (*_step(run, x, dy), layer.fallback_tau.clone())
    for other in ("triton", "inductor"):
        for what, a, b in zip(("y", "dx", "dw", "tau"), outs["reference"], outs[other]):
            assert ((a.float() - b.float()).norm() / a.float().norm()).item() <= 1e-2, (other, what)
