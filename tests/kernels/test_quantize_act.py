"""Quantize + activation in one op (``quantize_swiglu``/``quantize_gelu``: the gate/up projection's float ``h`` to its
INT8 blocks and the activation's INT8 blocks): the kernel bit for bit the two kernels it replaces
(``quantize_blockwise`` then ``swiglu_quantize``/``gelu_quantize``), against the reference twin within the activation
ops' contract, bad input refused, the op under compile; a data-flow block with the fused path on gives the outputs
and gradients of the two-op path bit for bit."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("triton")

from qtrain import models, ops  # noqa: E402
from qtrain.kernels import blockwise as kbw  # noqa: E402
from qtrain.kernels import dataflow as kdf  # noqa: E402
from qtrain.nn import dataflow as nn_dataflow  # noqa: E402
from qtrain.nn.functional import reseed  # noqa: E402
from qtrain.quant import dataflow as rdf  # noqa: E402

from .helpers import assert_same, rows_with_distinct_scales  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _h(m, k, dtype):
    h = rows_with_distinct_scales(m, k, torch.float32, DEV, seed=5) / 10
    h[2, 3] = 3e4                                   # a saturating entry: exp must not overflow
    return h.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape,blk", [((70, 512), (1, 256)), ((33, 256), (1, 128)), ((70, 256), (32, 64)),
                                       ((40, 384), (4, 64))], ids=str)
def test_fused_kernel_is_the_two_kernels(shape, blk, dtype):
    h = _h(*shape, dtype)
    hq, hs = kbw.quantize_blockwise(h, *blk)
    for got, want in ((kdf.quantize_swiglu(h, *blk), (hq, hs, *kdf.swiglu_quantize(hq, hs, *blk))),
                      (kdf.quantize_gelu(h, *blk), (hq, hs, *kdf.gelu_quantize(hq, hs, *blk)))):
        for name, g, w in zip(("hq", "hs", "aq", "as"), got, want):
            assert_same(g, w, name)


def test_fused_kernel_against_reference_twin():
    h = _h(70, 512, torch.bfloat16)
    for fn in ("quantize_swiglu", "quantize_gelu"):
        got, want = getattr(kdf, fn)(h, 1, 128), getattr(rdf, fn)(h, 1, 128)
        assert_same(got[0], want[0], "hq")                                 # RTN: bit for bit
        assert_same(got[1], want[1], "hs")
        assert ((got[3] - want[3]).abs() <= 1e-5 * want[3].abs()).all(), fn
        diff = (got[2].int() - want[2].int()).abs()
        assert diff.max() <= 1 and diff.sum() <= max(2, want[2].numel() // 1000), fn


def test_bad_input_and_compile():
    with pytest.raises(ValueError, match="multiple of c = 128"):
        kdf.quantize_swiglu(torch.zeros(8, 2 * 192, device=DEV), 1, 128)      # F = 192: up half off the blocks
    with pytest.raises(ValueError, match="gate \\| up"):
        rdf.quantize_swiglu(torch.zeros(8, 255), 1, 128)
    with pytest.raises(TypeError):
        rdf.quantize_gelu(torch.zeros(8, 256, dtype=torch.int8), 1, 128)
    h = _h(64, 512, torch.bfloat16)
    f = torch.compile(lambda t: ops.quantize_swiglu(t, 1, 128), backend="aot_eager", fullgraph=True)
    for name, g, w in zip(("hq", "hs", "aq", "as"), f(h), ops.quantize_swiglu(h, 1, 128)):
        assert_same(g, w, name)


@pytest.mark.parametrize("family,recipe", [("llama", "jetfire_wide"), ("gpt2", "jetfire")])
def test_dataflow_block_with_the_fused_op_is_bit_for_bit(family, recipe, monkeypatch):
    torch.manual_seed(0)
    cfg = models.ModelConfig(family, d_model=128, n_layer=1, n_head=4, max_seq_len=64,
                             ffn_hidden=256 if family == "llama" else 512)
    m = models.build_from_config(cfg).to(DEV)
    args = (m.rope_cos[:64], m.rope_sin[:64]) if family == "llama" else ()
    block = nn_dataflow.to_dataflow(m.blocks()[0], recipe)
    x = torch.randn(2, 64, 128, device=DEV)
    dy = torch.randn(2, 64, 128, device=DEV)
    name = "quantize_swiglu" if family == "llama" else "quantize_gelu"
    real, runs = getattr(ops, name), []
    for fused in (False, True):
        monkeypatch.setattr(nn_dataflow, "FUSED_H_ACT", fused)
        calls = []
        monkeypatch.setattr(ops, name, lambda *a: calls.append(1) or real(*a))
        b = copy.deepcopy(block)
        xi = x.clone().requires_grad_()
        reseed(3)                                                   # the same SR draws in both backward passes
        y = b(xi, *args)
        y.backward(dy)
        runs.append((y, xi.grad, [p.grad for p in b.parameters()]))
        assert len(calls) == (1 if fused else 0)
    (y0, dx0, g0), (y1, dx1, g1) = runs
    assert_same(y1, y0, "y")
    assert_same(dx1, dx0, "dx")
    for a, b in zip(g1, g0):
        assert_same(a, b, "parameter gradient")
