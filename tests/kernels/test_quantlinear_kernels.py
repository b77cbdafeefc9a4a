"""QuantLinear (switchback) forward + backward through the Triton kernels equals the reference backend."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("triton")

import qtrain  # noqa: E402
from qtrain import ops  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _run(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, backend: str):
    layer = copy.deepcopy(layer)                      # fresh weight cache per backend
    x = x.detach().clone().requires_grad_(True)
    with ops.use_backend(backend):
        y = layer(x)
        y.backward(dy)
    return y.detach(), x.grad, layer.weight.grad, layer.bias.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("recipe", ["switchback", "switchback_m"])
def test_switchback_kernels_match_reference(recipe, dtype):
    torch.manual_seed(0)
    layer = qtrain.QuantLinear(200, 72, bias=True, recipe=recipe).to(device=DEV, dtype=dtype)
    x = (torch.randn(3, 37, 200) * torch.logspace(-2, 2, 37)[:, None]).to(device=DEV, dtype=dtype)
    dy = torch.randn(3, 37, 72).to(device=DEV, dtype=dtype)
    got = _run(layer, x, dy, "triton")
    ref = _run(layer, x, dy, "reference")
    for name, g, r in zip(("y", "dx", "dw", "db"), got, ref):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        torch.testing.assert_close(g, r, rtol=1e-6, atol=0, msg=f"{name} differs between backends")
    assert qtrain.quant.sqnr(x.float() @ layer.weight.float().t() + layer.bias.float(), got[0].float()) > 30
