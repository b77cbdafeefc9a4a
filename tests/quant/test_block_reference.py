"""Block-wise quantization and the block-scaled INT8 GEMM (reference twins)."""
import pytest
import torch

from qtrain import quant
from qtrain.quant.core import dequantize
from qtrain.recipes import block


@pytest.mark.parametrize("shape,blk", [((70, 300), (1, 128)), ((70, 300), (32, 32)), ((130, 129), (128, 128)),
                                       ((5, 3), (4, 2))], ids=str)
def test_quantize_blockwise_blocks(shape, blk):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 3
    x[0, 0] = 0.0
    q, s = quant.quantize_blockwise(x, *blk)
    r, c = blk
    assert q.dtype == torch.int8 and q.is_contiguous() and s.shape == (-(-shape[0] // r), -(-shape[1] // c))
    for i in range(s.shape[0]):                      # every block's absmax lands on ±127, error ≤ half a step
        for j in range(s.shape[1]):
            qb = q[i * r:(i + 1) * r, j * c:(j + 1) * c]
            xb = x[i * r:(i + 1) * r, j * c:(j + 1) * c]
            assert qb.abs().max() == 127
            assert torch.allclose(s[i, j], xb.abs().max() / 127)
            assert ((qb.float() * s[i, j] - xb).abs() <= s[i, j] / 2 * (1 + 1e-6)).all()
    with pytest.raises(ValueError, match="positive ints"):
        quant.quantize_blockwise(x, 0, 128)


@pytest.mark.parametrize("ra,rb,c", [(1, 128, 128), (32, 32, 32), (1, 1, 64), (3, 5, 7)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_block_gemm_equals_dequantized_product(ra, rb, c, out_dtype):
    g = torch.Generator().manual_seed(1)
    x, w, bias = torch.randn(37, 300, generator=g), torch.randn(45, 300, generator=g), torch.randn(45, generator=g)
    qa, sa = quant.quantize_blockwise(x, ra, c)
    qb, sb = quant.quantize_blockwise(w, rb, c)
    out = quant.block_int8_gemm(qa, qb, sa, sb, ra, rb, c, bias, out_dtype)
    da, db = dequantize(qa, sa, block(ra, c), torch.float64), dequantize(qb, sb, block(rb, c), torch.float64)
    ref = da @ db.t() + bias.double()
    magnitude = da.abs() @ db.abs().t() + bias.double().abs()     # error bounds scale with it (cancellation)
    assert out.dtype == out_dtype
    tol = 2.0 ** -23 if out_dtype == torch.float32 else 2.0 ** -8   # one rounding of the output
    assert ((out.double() - ref).abs() <= tol * magnitude).all()


def test_block_gemm_rejects_bad_args():
    a = torch.zeros(4, 256, dtype=torch.int8)
    s = torch.ones(4, 2)
    with pytest.raises(TypeError, match="int8"):
        quant.block_int8_gemm(a.float(), a, s, s, 1, 1, 128)
    with pytest.raises(ValueError, match=r"a_scale must be fp32 \[4, 2\]"):
        quant.block_int8_gemm(a, a, torch.ones(4, 3), s, 1, 1, 128)
    with pytest.raises(ValueError, match=r"b_scale must be fp32 \[1, 2\]"):
        quant.block_int8_gemm(a, a, s, s, 1, 128, 128)
    with pytest.raises(ValueError, match="not be exact"):
        quant.block_int8_gemm(a, a, torch.ones(4, 1), torch.ones(4, 1), 1, 1, 2048)
    with pytest.raises(ValueError, match="positive ints"):
        quant.block_int8_gemm(a, a, s, s, 0, 1, 128)


def test_quantize_blockwise_sr_dual_is_both_directions_sr():
    """``(q, s)``: the 1×c SR of x for the seed; ``(qt, st)``: the 1×c SR of xᵀ from the same generator's next
    uniforms (independent of q's), contiguous, with RTN's scales."""
    x = torch.randn(70, 300, generator=torch.Generator().manual_seed(2)) * 3
    x[:, 5] *= 100                                        # column blocks with scales of their own
    seed = torch.tensor([9])
    q, s, qt, st = quant.quantize_blockwise_sr_dual(x, 128, seed)
    q1, s1 = quant.quantize_blockwise_sr(x, 1, 128, seed)
    assert torch.equal(q, q1) and torch.equal(s, s1)
    assert qt.shape == (300, 70) and qt.is_contiguous() and st.shape == (300, 1)
    assert torch.equal(st, quant.quantize_blockwise(x.t(), 1, 128)[1])
    g = torch.Generator().manual_seed(9)
    quant.quantize_blockwise(x, 1, 128, "stochastic", g)
    assert torch.equal(qt, quant.quantize_blockwise(x.t(), 1, 128, "stochastic", g)[0])
    assert ((qt.float() - x.t() / st).abs() < 1).all()
    with pytest.raises(ValueError, match="positive ints"):
        quant.quantize_blockwise_sr_dual(x, 0, seed)
    with pytest.raises(ValueError, match="seed"):
        quant.quantize_blockwise_sr_dual(x, 128, 9)
