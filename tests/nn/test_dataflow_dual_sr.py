"""With the dual path on (``plan.DUAL_SR_GRAD``), a data-flow recipe whose dgrad and wgrad take dY in the same 1×c
SR blocks (jetfire_wide's structure with 1×128 blocks, :data:`WIDE128`) quantizes dY once for both
(``ops.quantize_blockwise_sr_dual``, whose default tiling is sized for c = 128):
the operands' scales are the two separate calls' bit for bit, dX is the previous two-call path's bit for bit (the
same seed gives dgrad the same codes), dW agrees with it within the SR noise; jetfire (square blocks) keeps its
transposed reuse."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from qtrain import ops, quant, recipes
from qtrain.nn import dataflow
from qtrain.nn.functional import sr_generator
from qtrain.nn import plan as plan_module
from qtrain.nn.plan import build_plan

# the Triton backend runs on the GPU where there is one, else in the interpreter on CPU tensors
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_X, _G = recipes.int8(recipes.block(1, 128)), recipes.int8(recipes.block(1, 128), "stochastic")
_W = recipes.int8(recipes.block(128, 128))
WIDE128 = dataclasses.replace(recipes.JETFIRE_WIDE, name="jetfire_wide_128",
                              fprop=recipes.GemmSpec(_X, _W, out="int8_blocks"),
                              dgrad=recipes.GemmSpec(_G, _W, out="int8_blocks"), wgrad=recipes.GemmSpec(_G, _X))


@pytest.fixture(autouse=True)
def dual_on(monkeypatch):
    """These tests exercise the dual path, off by default (``plan.DUAL_SR_GRAD``)."""
    monkeypatch.setattr(plan_module, "DUAL_SR_GRAD", True)


@pytest.fixture
def sr_state():
    """The SR generator's state (of the test device), restored after the test."""
    gen = sr_generator(DEV)
    state = gen.get_state()
    yield gen, state
    gen.set_state(state)


def _inputs(m=200, k=96, n=160):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / k ** 0.5
    return tuple(t.to(DEV) for t in (x, w, torch.randn(n, generator=g), torch.randn(m, n, generator=g)))


def _spy(monkeypatch, name):
    calls, fn = [], getattr(ops, name)

    def spy(*args, **kwargs):
        out = fn(*args, **kwargs)
        calls.append((args, out))
        return out

    monkeypatch.setattr(ops, name, spy)
    return calls


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_jetfire_wide_backward_quantizes_dy_once(backend, monkeypatch, sr_state):
    gen, state = sr_state
    plan = build_plan(WIDE128)
    assert plan.dual_sr_grad and not build_plan(recipes.get("jetfire")).dual_sr_grad
    assert build_plan(recipes.get("jetfire_wide")).dual_sr_grad             # the preset's blocks (1×256) qualify
    x, w, b, dy = _inputs()
    with ops.use_backend(backend):
        x_op = dataflow._quantize_x(plan, x)
        gen.set_state(state)
        dual, single = _spy(monkeypatch, "quantize_blockwise_sr_dual"), _spy(monkeypatch, "quantize_blockwise_sr")
        dx, dw, db = dataflow._linear_backward(plan, dy, x_op, w, b, (True, True, True))
        assert len(dual) == 1 and not single
        (_, (q, s, qt, st)), = dual
        assert torch.equal(s, quant.quantize_blockwise(dy, 1, 128)[1])          # the two-call path's scales
        assert torch.equal(st, quant.quantize_blockwise(dy.t(), 1, 128)[1])
        monkeypatch.setattr(type(plan), "dual_sr_grad", property(lambda self: False))   # the two-call path
        gen.set_state(state)
        dx0, dw0, db0 = dataflow._linear_backward(plan, dy, x_op, w, b, (True, True, True))
        assert len(single) == 2 and len(dual) == 1
    assert torch.equal(dx, dx0) and torch.equal(db, db0)
    exact = dy.t() @ x_op.dequantize()                                        # wgrad on the same INT8 X
    err, err0 = ((d - exact).norm() / exact.norm() for d in (dw, dw0))
    assert err < 0.02 and err0 < 0.02 and 0.5 < err / err0 < 2, (err, err0)
    assert not torch.equal(dw, dw0)                                           # other draws for dYᵀ


def test_dual_only_where_both_gradients_are_needed(monkeypatch, sr_state):
    plan = build_plan(WIDE128)
    x, w, b, dy = _inputs(64, 32, 48)
    with ops.use_backend("reference"):
        x_op = dataflow._quantize_x(plan, x)
        dual = _spy(monkeypatch, "quantize_blockwise_sr_dual")
        dx, dw, _ = dataflow._linear_backward(plan, dy, x_op, w, b, (True, False, False))
        assert dx is not None and dw is None and not dual
        square = build_plan(recipes.get("jetfire"))
        dataflow._linear_backward(square, dy, dataflow._quantize_x(square, x), w, b, (True, True, False))
        assert not dual


def test_quantlinear_jetfire_wide_quantizes_dy_once(monkeypatch, sr_state):
    """A QuantLinear of that recipe (a linear outside the data-flow blocks) takes the same single read of dY."""
    from qtrain.nn.linear import QuantLinear

    layer = QuantLinear.from_module(torch.nn.Linear(128, 96), WIDE128).to(DEV)
    x = torch.randn(64, 128, device=DEV, requires_grad=True)
    with ops.use_backend("reference"):
        dual, single = _spy(monkeypatch, "quantize_blockwise_sr_dual"), _spy(monkeypatch, "quantize_blockwise_sr")
        layer(x).square().sum().backward()
    assert len(dual) == 1 and not single and x.grad is not None and layer.weight.grad is not None


def test_dual_path_is_off_by_default(monkeypatch):
    monkeypatch.undo()
    assert not plan_module.DUAL_SR_GRAD and not build_plan(WIDE128).dual_sr_grad
