"""qtrain's operators on the dispatcher (``qtrain.ops.custom_op``): every op has a fake kernel whose outputs match
the real call, an aliasing output is caught, and an op reached with tensors that require grad says it has none."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from qtrain import ops

import qtrain.nn  # noqa: F401  (defines the int4 layer's operators)

OPS = list(ops.OPS.values())


def test_every_op_is_a_qtrain_operator_with_a_fake_kernel():
    names = {op.name for op in OPS}
    assert {"block_int8_gemm", "quantize_blockwise_sr", "fallback_block_gemm", "rmsnorm_backward",
            "swiglu_backward", "lss_sample", "int4_first_forward"} <= names
    for op in OPS:
        assert op.overload is getattr(torch.ops.qtrain, op.name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"qtrain::{op.name}", "Meta"), op.name


def _quantize_args():
    return (torch.randn(64, 256, dtype=torch.bfloat16), 1, 128)


@pytest.mark.parametrize("name, args", [
    ("quantize_blockwise", _quantize_args()),
    ("quantize_rowwise", (torch.randn(8, 32),)),
    ("block_int8_gemm", (torch.randint(-127, 128, (64, 256), dtype=torch.int8),
                         torch.randint(-127, 128, (128, 256), dtype=torch.int8),
                         torch.rand(64, 2), torch.rand(1, 2), 1, 128, 128, None, torch.bfloat16)),
])
def test_fake_kernel_matches_the_real_outputs(name, args):
    op = getattr(torch.ops.qtrain, name).default
    with ops.use_backend("reference"):
        real = op(*args)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = op(*args)
    real, fake = (real, fake) if isinstance(real, tuple) else ((real,), (fake,))
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]


def test_an_output_aliasing_an_input_is_caught():
    name = "test_alias_probe"
    if not hasattr(torch.ops.qtrain, name):
        @ops.custom_op(name)
        def probe(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x.view(-1), x.clone()

        probe.register_fake(lambda x: (x.new_empty(x.numel()), torch.empty_like(x)))
    x = torch.ones(4)
    assert ops.CHECK_ALIASING                      # tests/conftest.py
    with pytest.raises(RuntimeError, match="aliases an input"):
        getattr(torch.ops.qtrain, name).default(x)


def test_an_op_with_inputs_that_require_grad_says_it_has_no_gradient():
    x = torch.randn(8, 32, requires_grad=True)
    with pytest.raises(RuntimeError, match="has no gradient"):
        ops._quantize_rowwise_op(x)
    with torch.no_grad():
        q, s = ops._quantize_rowwise_op(x)
    assert q.dtype == torch.int8 and s.shape == (8,)


def test_ops_under_compile_match_eager():
    x = torch.randn(64, 256)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(t):
        return ops.quantize_blockwise(t * 2, 1, 128)

    with ops.use_backend("reference"):
        q, s = f(x)
        q_ref, s_ref = ops.quantize_blockwise(x * 2, 1, 128)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
