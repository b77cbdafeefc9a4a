"""GPU tests (`pytest -m gpu` on the lent device): the compiled Triton kernels vs their reference twins at
LLaMA-7B shapes, QuantLinear through kernels vs reference, and SwitchBack training steps on CUDA.

Quantizers are compared with the reference run on the CPU, whose arithmetic is exact IEEE on every torch build
(on CUDA, torch divides by a Python scalar as a multiplication by its reciprocal, which differs from the IEEE
quotient in the last bit; the reference now divides by a tensor, but the CPU stays the independent check).
"""
from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.gpu

pytest.importorskip("triton")

import qtrain  # noqa: E402
from qtrain import ops, quant  # noqa: E402
from qtrain.kernels import int8_gemm as kgemm  # noqa: E402
from qtrain.kernels import rowwise as krow  # noqa: E402
from qtrain.kernels import tensorwise as ktens  # noqa: E402

from .helpers import assert_one_rounding, assert_same, rows_with_distinct_scales  # noqa: E402


@pytest.mark.parametrize("shape,dtype,transposed", [((16384, 4096), torch.bfloat16, False),
                                                    ((16384, 11008), torch.bfloat16, False),
                                                    ((4096, 16384), torch.float16, True),
                                                    ((1000, 4099), torch.float32, False),
                                                    ((64, 40000), torch.bfloat16, False)], ids=str)
def test_rowwise_gpu(shape, dtype, transposed):
    x = rows_with_distinct_scales(*(shape[::-1] if transposed else shape), dtype, "cuda")
    x = x.t() if transposed else x
    x[1, 5], x[2, 7], x[3] = float("nan"), float("inf"), 0
    for name, g, r in zip(("q", "scale"), krow.quantize_rowwise(x), quant.quantize_rowwise(x.cpu())):
        assert_same(g.cpu(), r, name)


@pytest.mark.parametrize("shape,dtype", [((4096, 4096), torch.bfloat16), ((11008, 4096), torch.bfloat16),
                                         ((4096, 11008), torch.float32), ((1001, 999), torch.float16)], ids=str)
def test_tensorwise_gpu(shape, dtype):
    w = rows_with_distinct_scales(*shape, dtype, "cuda")
    for name, g, r in zip(("q", "qt", "scale"), ktens.quantize_tensorwise(w), quant.quantize_tensorwise(w.cpu())):
        assert_same(g.cpu(), r, name)
    w[5, 3] = float("nan")
    assert torch.isnan(ktens.quantize_tensorwise(w)[2])


@pytest.mark.parametrize("mkn", [(16384, 4096, 4096), (16384, 4096, 11008), (16384, 11008, 4096),
                                 (1000, 999, 1001), (8192, 1024, 1024), (77, 4096, 96)], ids=str)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_int8_gemm_gpu(mkn, out_dtype):
    M, K, N = mkn
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randint(-127, 128, (M, K), generator=g, device="cuda", dtype=torch.int8)
    b = torch.randint(-127, 128, (N, K), generator=g, device="cuda", dtype=torch.int8)
    sa = torch.logspace(-5, -3, M, device="cuda")
    for sb, bias in ((torch.tensor(2e-3, device="cuda"), None),
                     (torch.rand(N, generator=g, device="cuda") * 1e-3, torch.randn(N, device="cuda"))):
        out = kgemm.int8_gemm(a, b, sa, sb, bias, out_dtype)
        ref32 = quant.int8_gemm(a, b, sa, sb, bias, torch.float32)
        if out_dtype == torch.float32:
            assert quant.relative_error(ref32, out) <= 1e-5
        else:
            mag = quant.int8_gemm(a, b, sa, sb, None, torch.float32).abs()
            assert_one_rounding(out, ref32, mag + bias.abs() if bias is not None else mag)


@pytest.mark.parametrize("path", ["triton-tma", "triton-pointers"])
def test_int8_gemm_triton_paths_gpu(path, monkeypatch):
    """The Triton kernel's own TMA and pointer paths at a 7B shape (large GEMMs normally go to Gluon)."""
    monkeypatch.setattr(kgemm, "GLUON_ENABLED", False)
    monkeypatch.setattr(kgemm, "TMA_ENABLED", path == "triton-tma")
    M, K, N = 16384, 4096, 4096
    a = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8)
    b = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
    sa, sb = torch.rand(M, device="cuda") * 1e-3, torch.rand(N, device="cuda") * 1e-3
    ref = quant.int8_gemm(a, b, sa, sb, None, torch.float32)
    assert quant.relative_error(ref, kgemm.int8_gemm(a, b, sa, sb, None, torch.float32)) <= 1e-5


@pytest.mark.parametrize("config", [(128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 256, 64, 4, 8),
                                    (128, 128, 128, 4, 4)], ids=str)
def test_int8_gemm_gluon_configs_gpu(config):
    """Every Gluon config vs the reference: ragged M, bias, both scale kinds, three output dtypes."""
    glu = pytest.importorskip("qtrain.kernels.int8_gemm_gluon")
    M, K, N = 3000, 1024, 1040
    a = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8)
    b = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
    sa = torch.logspace(-5, -3, M, device="cuda")
    for sb, bias in ((torch.tensor(2e-3, device="cuda"), None),
                     (torch.rand(N, device="cuda") * 1e-3, torch.randn(N, device="cuda"))):
        ref32 = quant.int8_gemm(a, b, sa, sb, bias, torch.float32)
        mag = quant.int8_gemm(a, b, sa, sb, None, torch.float32).abs() + (bias.abs() if bias is not None else 0)
        for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
            out = glu.int8_gemm(a, b, sa, sb, bias, out_dtype, config=config)
            if out_dtype == torch.float32:
                assert quant.relative_error(ref32, out) <= 1e-5
            else:
                assert_one_rounding(out, ref32, mag)


def test_quantlinear_kernels_match_reference_gpu():
    """Same numbers up to fp32 epilogue rounding (the GPU fuses the bias add into an FMA, flipping the last bf16
    bit of rare outputs): the gate is a relative error far below the quantization error (~1e-2)."""
    torch.manual_seed(0)
    layer = qtrain.QuantLinear(4096, 11008, bias=True, recipe="switchback").to("cuda", torch.bfloat16)
    x = torch.randn(4, 4096, 4096, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(4, 4096, 11008, device="cuda", dtype=torch.bfloat16)
    res = {}
    for backend in ("triton", "reference"):
        lay, xx = copy.deepcopy(layer), x.clone().requires_grad_(True)
        with ops.use_backend(backend):
            y = lay(xx)
            y.backward(dy)
        res[backend] = (y, xx.grad, lay.weight.grad, lay.bias.grad)
    for name, g, r in zip(("y", "dx", "dw", "db"), res["triton"], res["reference"]):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        assert quant.relative_error(r, g) <= 1e-3, f"{name} differs between backends"


def test_switchback_training_steps_cuda(monkeypatch):
    """A small MLP trained with SwitchBack under BF16 autocast tracks the same model trained in BF16."""
    calls = {"n": 0}
    real = kgemm.int8_gemm

    def counting(*args):
        calls["n"] += 1
        return real(*args)

    monkeypatch.setitem(ops._KERNELS, ("int8_gemm", "int8_gemm"), counting)

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 1024),
                                   torch.nn.GELU(), torch.nn.Linear(1024, 1024)).cuda()

    torch.manual_seed(1)
    x = torch.randn(4096, 1024, device="cuda")
    target = torch.tanh(x @ torch.randn(1024, 1024, device="cuda") / 32)
    losses = {}
    for recipe in ("bf16", "switchback"):
        model = make() if recipe == "bf16" else qtrain.convert(make(), "switchback", filter_fn=lambda m, n: True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        hist = []
        for _ in range(30):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.mse_loss(model(x).float(), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            hist.append(loss.item())
        losses[recipe] = hist
        assert all(p.grad is None and torch.isfinite(p).all() for p in model.parameters())
    assert calls["n"] == 30 * 5          # fprop of 3 layers + dgrad of 2 (the first layer's input needs no grad)
    sb, bf = losses["switchback"], losses["bf16"]
    assert sb[-1] < 0.5 * sb[0]
    assert abs(sb[-1] - bf[-1]) <= 0.05 * bf[-1], (sb[-1], bf[-1])


@pytest.mark.parametrize("shape,blk,transposed", [((16384, 4096), (1, 128), False),
                                                  ((4096, 11008), (128, 128), False),
                                                  ((11008, 4096), (32, 32), False),
                                                  ((4096, 16384), (128, 128), True)], ids=str)
def test_blockwise_gpu(shape, blk, transposed):
    from qtrain.kernels import blockwise as kbw

    x = rows_with_distinct_scales(*(shape[::-1] if transposed else shape), torch.bfloat16, "cuda")
    x = x.t() if transposed else x
    x[1, 5], x[2, 7], x[3] = float("nan"), float("inf"), 0
    for name, g, r in zip(("q", "scale"), kbw.quantize_blockwise(x, *blk), quant.quantize_blockwise(x.cpu(), *blk)):
        assert_same(g.cpu(), r, name)


@pytest.mark.parametrize("mkn", [(16384, 4096, 4096), (16384, 11008, 4096), (1000, 999, 1001)], ids=str)
@pytest.mark.parametrize("ra,rb,c", [(1, 128, 128), (32, 32, 32)], ids=str)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_block_gemm_gpu(mkn, ra, rb, c, out_dtype):
    from qtrain.kernels import block_gemm as kbg

    M, K, N = mkn
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randint(-127, 128, (M, K), generator=g, device="cuda", dtype=torch.int8)
    b = torch.randint(-127, 128, (N, K), generator=g, device="cuda", dtype=torch.int8)
    nk = -(-K // c)
    sa = torch.rand(-(-M // ra), nk, generator=g, device="cuda") * 1e-3 + 1e-4
    sb = torch.rand(-(-N // rb), nk, generator=g, device="cuda") * 1e-3 + 1e-4
    bias = torch.randn(N, generator=g, device="cuda")
    out = kbg.block_int8_gemm(a, b, sa, sb, ra, rb, c, bias, out_dtype)
    ref = quant.block_int8_gemm(a, b, sa, sb, ra, rb, c, bias, torch.float32)
    assert quant.relative_error(ref, out.float()) <= (1e-5 if out_dtype == torch.float32 else 4e-3)
