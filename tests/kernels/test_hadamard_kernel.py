"""The fused block-Hadamard + INT4 quantize kernel against its reference twin: bit-exact (Triton's interpreter
on the CPU)."""
from __future__ import annotations

import pytest
import torch

from qtrain import ops
from qtrain.kernels import hadamard as kern
from qtrain.quant import hadamard as ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("b", ref.HADAMARD_BLOCKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_bit_exact(b, dtype):
    g = torch.Generator().manual_seed(b)
    x = (torch.randn(70, 300, generator=g) * 3).to(DEV, dtype)                     # ragged rows and K
    step = torch.tensor([0.37], device=DEV)
    assert torch.equal(kern.block_hadamard(x, b), ref.block_hadamard(x, b))
    q = kern.hadamard_quantize_int4(x, b, step)
    assert q.dtype == torch.int8 and q.shape == (70, -(-300 // b) * b)
    assert torch.equal(q, ref.hadamard_quantize_int4(x, b, step))
    assert q.abs().max() == 7                                                     # clipping exercised
    xt = x.t()                                                                    # strided input
    assert torch.equal(kern.hadamard_quantize_int4(xt, b, step), ref.hadamard_quantize_int4(xt, b, step))


def test_kernel_edge_cases_and_dispatch():
    x = torch.randn(5, 40, device=DEV)
    x[1, 3] = float("nan")
    step = torch.tensor(0.5, device=DEV)
    assert torch.equal(kern.hadamard_quantize_int4(x, 16, step), ref.hadamard_quantize_int4(x, 16, step))
    assert kern.block_hadamard(torch.empty(0, 40, device=DEV), 32).shape == (0, 64)
    with pytest.raises(ValueError, match="Hadamard block"):
        kern.block_hadamard(x, 48)
    with pytest.raises(ValueError, match="step"):
        kern.hadamard_quantize_int4(x, 16, torch.tensor([1.0, 2.0], device=DEV))
    with ops.use_backend("triton"):
        a = ops.hadamard_quantize_int4(x, 32, step)
    with ops.use_backend("reference"):
        b = ops.hadamard_quantize_int4(x, 32, step)
    assert torch.equal(a, b)
