"""INT8 transpose kernel vs its twin (``q.t().contiguous()``): bit for bit, any strides, ragged edges; bad input
is refused; the custom op traces under torch.compile."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from qtrain import ops, quant  # noqa: E402
from qtrain.kernels.transpose import transpose_int8  # noqa: E402

from .helpers import assert_same  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _codes(m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-127, 128, (m, n), generator=g, dtype=torch.int8).to(DEV)


@pytest.mark.parametrize("shape", [(1, 1), (130, 257), (256, 128), (3, 500)], ids=str)
def test_matches_twin(shape):
    q = _codes(*shape)
    assert_same(transpose_int8(q), quant.transpose_int8(q), f"transpose {shape}")


def test_strided_inputs():
    base = _codes(200, 300, seed=1)
    for view in (base.t(), base[5:150:2, 7:], base[:, ::3]):
        assert_same(transpose_int8(view), view.t().contiguous(), f"view {tuple(view.shape)} {view.stride()}")


def test_empty_and_bad_input():
    assert transpose_int8(_codes(0, 5)).shape == (5, 0)
    with pytest.raises(TypeError, match="int8"):
        transpose_int8(torch.zeros(4, 4, device=DEV))
    with pytest.raises(ValueError, match="2-D"):
        quant.transpose_int8(torch.zeros(4, dtype=torch.int8))


def test_op_under_compile():
    q = _codes(64, 96, seed=2)
    f = torch.compile(lambda t: ops.transpose_int8(t), backend="aot_eager", fullgraph=True)
    assert torch.equal(f(q), q.t().contiguous())
