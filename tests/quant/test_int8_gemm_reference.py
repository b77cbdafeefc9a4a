import pytest
import torch

from qtrain import quant


def test_int_mm_exact_matches_int64_at_large_k():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (9, 5000), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (7, 5000), dtype=torch.int8, generator=g)
    exact = (a.long()[:, None, :] * b.long()[None, :, :]).sum(-1)
    assert torch.equal(quant.int_mm_exact(a, b).long(), exact)
    a.fill_(127), b.fill_(-127)  # extreme: |sum| = 5000·127² > 2^24, exact only through chunking
    assert quant.int_mm_exact(a, b)[0, 0].item() == -5000 * 127 * 127


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_int8_gemm_epilogue(out_dtype):
    a = torch.randint(-127, 128, (6, 40), dtype=torch.int8)
    b = torch.randint(-127, 128, (5, 40), dtype=torch.int8)
    sa, sb, bias = torch.rand(6) + 0.1, torch.rand(5) + 0.1, torch.randn(5)
    out = quant.int8_gemm(a, b, sa, sb, bias, out_dtype)
    ref = (a.double() @ b.double().t()) * sa.double()[:, None] * sb.double() + bias.double()
    assert out.dtype == out_dtype
    tol = 1e-6 if out_dtype == torch.float32 else 1e-2
    assert torch.allclose(out.double(), ref, rtol=tol, atol=0)
    out_t = quant.int8_gemm(a, b, sa, torch.tensor(0.5), None, out_dtype)
    assert torch.allclose(out_t.double(), (a.double() @ b.double().t()) * sa.double()[:, None] * 0.5, rtol=tol)


def test_int8_gemm_rejects_bad_args():
    a = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(TypeError, match="int8"):
        quant.int8_gemm(a.float(), a, torch.ones(4), torch.ones(()))
    with pytest.raises(ValueError, match="K"):
        quant.int8_gemm(a, torch.zeros(4, 9, dtype=torch.int8), torch.ones(4), torch.ones(()))
    with pytest.raises(ValueError, match="a_scale"):
        quant.int8_gemm(a, a, torch.ones(3), torch.ones(()))
    with pytest.raises(ValueError, match="b_scale"):
        quant.int8_gemm(a, a, torch.ones(4), torch.ones(2))


def test_int8_gemm_k0_is_a_scaled_empty_sum():
    """K = 0: acc = 0, then the same epilogue: 0·a_scale·b_scale + bias (NaN where a scale is NaN or ±Inf)."""
    a, b = torch.empty(3, 0, dtype=torch.int8), torch.empty(2, 0, dtype=torch.int8)
    sa, sb = torch.tensor([1.0, float("nan"), float("inf")]), torch.tensor([2.0, 0.5])
    out = quant.int8_gemm(a, b, sa, sb, torch.tensor([1.0, -1.0]), torch.float32)
    assert torch.equal(out[0], torch.tensor([1.0, -1.0])) and torch.isnan(out[1:]).all()
    assert torch.equal(quant.int8_gemm(a[:1], b, sa[:1], sb, None, torch.float32), torch.zeros(1, 2))
