"""QuantLinear with a user-defined block-scaled recipe runs on the block primitives (``ops.quantize_blockwise``,
``ops.block_int8_gemm``) and computes what the emulated path computes."""
import pytest
import torch

import qtrain
from qtrain import ops
from qtrain.nn import functional, plan
from qtrain.quant import relative_error, sqnr
from qtrain.quant.testing import outlier_data
from qtrain.recipes import ROW, GemmSpec, Recipe, block, int8

BLOCKED = Recipe("blocked", fprop=GemmSpec(int8(block(1, 128)), int8(block(128, 128))),
                 dgrad=GemmSpec(int8(block(1, 128)), int8(block(128, 128))),
                 wgrad=GemmSpec(int8(block(1, 128)), int8(block(1, 128))))


def _run(recipe, x, dy, seed=0):
    torch.manual_seed(seed)
    layer = qtrain.QuantLinear(256, 384, recipe=recipe)
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return y, x.grad, layer.weight.grad


def test_block_pair_rules():
    assert functional.block_pair(int8(block(1, 128)), int8(block(128, 128))) == (1, 128, 128)
    assert functional.block_pair(int8(block(32, 32)), int8(block(32, 32))) == (32, 32, 32)
    assert functional.block_pair(int8(block(1, 128)), int8(block(128, 64))) is None      # different c
    assert functional.block_pair(int8(block(3, 128)), int8(block(128, 128))) is None     # rows not 2^n
    assert functional.block_pair(int8(block(1, 16)), int8(block(16, 16))) is None        # c below 32
    assert functional.block_pair(int8(ROW), int8(block(128, 128))) is None
    assert functional.block_pair(int8(block(1, 128), "stochastic"), int8(block(128, 128))) is None


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_block_recipe_uses_block_gemm_and_matches_emulation(backend, monkeypatch):
    x, dy = torch.randn(300, 256), torch.randn(300, 384)
    calls = []
    real = ops.block_int8_gemm
    monkeypatch.setattr(ops, "block_int8_gemm", lambda *a: calls.append(a[4:7]) or real(*a))
    with ops.use_backend(backend):
        got = _run(BLOCKED, x, dy)
    assert calls == [(1, 128, 128), (1, 128, 128), (1, 1, 128)]                        # fprop, dgrad, wgrad
    monkeypatch.setattr(plan, "block_pair", lambda lhs, rhs: None)                      # the emulated path
    plan.build_plan.cache_clear()
    try:
        assert plan.build_plan(BLOCKED).fprop.path == "emulated"
        want = _run(BLOCKED, x, dy)
    finally:
        plan.build_plan.cache_clear()
    for name, g, w in zip(("y", "dx", "dw"), got, want):
        assert relative_error(w, g) <= 1e-5, name


def test_block_recipe_sqnr():
    x, dy = torch.randn(512, 256), torch.randn(512, 384)
    torch.manual_seed(0)
    ref_layer = torch.nn.Linear(256, 384)
    y, dx, dw = _run(BLOCKED, x, dy)
    xr = x.clone().requires_grad_()
    yr = ref_layer(xr)
    yr.backward(dy)
    assert sqnr(yr, y) >= 35 and sqnr(xr.grad, dx) >= 35 and sqnr(ref_layer.weight.grad, dw) >= 35
    xo = outlier_data(512, 256, magnitude=50.0)
    yo, _, _ = _run(BLOCKED, xo, dy)
    assert sqnr(ref_layer(xo), yo) >= 25                 # DESIGN.md's per-block gate on outlier data
