"""QuantLinear numerics and behaviour (reference backend on the CPU)."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import qtrain
from qtrain.quant import sqnr
from qtrain.quant.testing import outlier_data

INT8_RECIPES = ["switchback", "switchback_m"]


def _layer(recipe, k=256, n=192, seed=0):
    torch.manual_seed(seed)
    return qtrain.QuantLinear(k, n, recipe=recipe)


def _fwd_bwd(layer, x, dy):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return y, x.grad, layer.weight.grad, layer.bias.grad


def _fp32_reference(layer, x, dy):
    x = x.clone().requires_grad_()
    w = layer.weight.detach().clone().requires_grad_()
    y = F.linear(x, w, layer.bias.detach())
    y.backward(dy)
    return y, x.grad, w.grad


@pytest.mark.parametrize("recipe", INT8_RECIPES)
def test_sqnr_gaussian(recipe):
    layer = _layer(recipe)
    x, dy = torch.randn(512, 256), torch.randn(512, 192)
    y, dx, dw, _ = _fwd_bwd(layer, x, dy)
    ry, rdx, rdw = _fp32_reference(layer, x, dy)
    assert sqnr(ry, y) >= 35 and sqnr(rdx, dx) >= 35
    if recipe == "switchback":  # 16-bit wgrad on the saved X: the unquantized computation, exactly
        assert torch.equal(dw, dy.t() @ x)
    else:  # switchback_m: wgrad on the dequantized INT8 X
        assert sqnr(rdw, dw) >= 35


@pytest.mark.parametrize("recipe", INT8_RECIPES)
def test_sqnr_outliers_reported(recipe, record_property):
    layer = _layer(recipe)
    x, dy = outlier_data(512, 256, magnitude=50.0), torch.randn(512, 192)
    y, dx, _, _ = _fwd_bwd(layer, x, dy)
    ry, rdx, _ = _fp32_reference(layer, x, dy)
    record_property("sqnr_y_outliers_db", sqnr(ry, y))
    # row-wise X spreads each token's outlier over its row: not gated at 35 dB, but it must stay usable
    assert sqnr(ry, y) > 20 and sqnr(rdx, dx) >= 35


def test_bf16_recipe_is_plain_linear():
    layer = _layer("bf16")
    x = torch.randn(8, 256)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_leading_dims_and_non_contiguous_input():
    layer = _layer("switchback", k=64, n=48)
    x = torch.randn(3, 64, 5).transpose(1, 2)  # [3, 5, 64], non-contiguous
    y = layer(x)
    assert y.shape == (3, 5, 48)
    assert torch.equal(y, layer(x.contiguous()))


def test_autocast_returns_linear_dtype_and_weight_grad_dtype():
    layer = _layer("switchback", k=64, n=32)
    x = torch.randn(16, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        ref = F.linear(x, layer.weight, layer.bias)
    assert y.dtype == ref.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert sqnr(ref.float(), y.float()) > 30


def test_eval_and_no_grad_run_the_quantized_forward():
    layer = _layer("switchback", k=64, n=32)
    x = torch.randn(16, 64)
    y_train = layer(x)
    layer.eval()
    with torch.no_grad():
        y_eval = layer(x)
    assert torch.equal(y_train, y_eval)
    assert not torch.equal(y_eval, F.linear(x, layer.weight, layer.bias))


def test_activation_checkpointing_gives_same_grads():
    layer = _layer("switchback", k=64, n=32)
    x, dy = torch.randn(16, 64), torch.randn(16, 32)
    _, dx, dw, _ = _fwd_bwd(layer, x, dy)
    dw = dw.clone()
    layer.weight.grad = None
    xc = x.clone().requires_grad_()
    checkpoint(layer, xc, use_reentrant=False).backward(dy)
    assert torch.equal(xc.grad, dx) and torch.equal(layer.weight.grad, dw)


def test_weight_reuse_only_inside_the_block_and_invalidated_by_update():
    layer = _layer("switchback", k=64, n=32)
    x = torch.randn(4, 64)
    assert layer._quantized_weight() is None                           # nothing kept outside the block
    with qtrain.reuse_quantized_weights(layer):
        y0 = layer(x)
        assert layer._quantized_weight() is layer._quantized_weight()  # reused between micro-steps
        with torch.no_grad():
            layer.weight.mul_(2.0)
        assert torch.allclose(layer(x) - layer.bias, 2 * (y0 - layer.bias), rtol=1e-5, atol=1e-5)
    assert layer._wcache is None and not layer.reuse_weight            # freed at exit


def test_weight_reuse_invalidated_by_an_optimizer_step_without_a_version_bump():
    """FSDP2 re-gathers weights under ``_unsafe_preserve_version_counter``; an update through ``.data`` does
    not bump the version either. Any optimizer step must still invalidate the reused weight."""
    layer = _layer("switchback", k=64, n=32)
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    x = torch.randn(4, 64)
    with qtrain.reuse_quantized_weights(layer):
        y0 = layer(x)
        layer.weight.data.mul_(2.0)                                    # same version, same storage
        opt.step()
        assert torch.allclose(layer(x) - layer.bias, 2 * (y0 - layer.bias), rtol=1e-5, atol=1e-5)


def test_compile_aot_eager_matches_eager():
    layer = _layer("switchback", k=64, n=32)
    x = torch.randn(16, 64)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yc = layer(xe), compiled(xc)
    assert torch.equal(ye, yc)
    ye.sum().backward()
    gw = layer.weight.grad.clone()
    layer.weight.grad = None
    yc.sum().backward()
    assert torch.equal(xe.grad, xc.grad) and torch.equal(gw, layer.weight.grad)


def test_backends_agree_and_validate():
    layer = _layer("switchback", k=64, n=32)
    x = torch.randn(8, 64)
    with qtrain.ops.use_backend("reference"):
        a = layer(x)
    assert torch.equal(a, layer(x))
    with pytest.raises(ValueError, match="auto, triton, reference"):
        qtrain.ops.set_backend("cuda")


def test_bad_inputs_raise_clear_errors():
    layer = _layer("switchback", k=64, n=32)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16.*int64"):
        layer(torch.ones(4, 64, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expects input \[\.\.\., 64\]"):
        layer(torch.randn(4, 63))
    with pytest.raises(ValueError, match="meta.*cpu"):
        layer(torch.randn(4, 64, device="meta"))
    with pytest.raises(ValueError, match="unknown recipe"):
        qtrain.QuantLinear(4, 4, recipe="int3")


def test_compile_inductor_matches_eager():
    layer = _layer("switchback", k=64, n=32)
    x = torch.randn(16, 64)
    compiled = torch.compile(layer)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yc = layer(xe), compiled(xc)
    torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-6)
    ye.sum().backward()
    gw = layer.weight.grad.clone()
    layer.weight.grad = None
    yc.sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.weight.grad, gw, rtol=1e-5, atol=1e-6)
