"""qtrain.kernels.launch: the cached launch path gives what Triton's launch gives, per specialization (GPU), and
stays out of the way under the interpreter (CPU)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from qtrain import quant  # noqa: E402
from qtrain.kernels import blockwise as kbw  # noqa: E402
from qtrain.kernels import launch  # noqa: E402

from .helpers import assert_same  # noqa: E402


def test_interpreter_takes_tritons_path(monkeypatch):
    """Under the interpreter nothing is cached (an InterpretedFunction has no compiled kernel to reuse)."""
    if not kbw.interpreting():
        pytest.skip("runs under TRITON_INTERPRET=1 (the CPU suite)")
    launch.clear()
    x = torch.randn(64, 256)
    for _ in range(2):
        for g, r in zip(kbw.quantize_blockwise(x, 1, 128), quant.quantize_blockwise(x, 1, 128)):
            assert_same(g, r, "interpreted")
    assert not launch._CACHE


@pytest.mark.gpu
@pytest.mark.parametrize("fast", [True, False], ids=["cached", "triton"])
def test_cached_launch_matches_reference_per_specialization(monkeypatch, fast):
    """Each call is checked against the CPU reference, alternating specializations that need different compiled
    kernels (dtype, 16-byte alignment of the base pointer, a transposed view, SR on and off), so a cache hit
    that reused another specialization's kernel would give wrong codes or scales."""
    monkeypatch.setattr(launch, "FAST", fast)
    launch.clear()
    base = torch.randn(257 * 512 + 8, device="cuda")
    cases = [base[:256 * 512].view(256, 512).bfloat16(), base[:256 * 512].view(256, 512),
             base[1:1 + 256 * 512].view(256, 512), base[:512 * 256].view(512, 256).t(),
             base[:96 * 512].view(96, 512).half()]
    for _ in range(3):
        for x in cases:
            for g, r in zip(kbw.quantize_blockwise(x, 1, 128), quant.quantize_blockwise(x.cpu(), 1, 128)):
                assert_same(g.cpu(), r, f"{x.dtype} {tuple(x.stride())} ptr%16={x.data_ptr() % 16}")
    assert bool(launch._CACHE) == fast
    seed = torch.tensor([7], device="cuda")
    q1, s1 = kbw.quantize_blockwise_sr(cases[0], 1, 128, seed)
    q2, s2 = kbw.quantize_blockwise_sr(cases[0], 1, 128, seed)                 # second call: the cached kernel
    assert torch.equal(q1, q2) and torch.equal(s1, s2)
    assert_same(s1.cpu(), quant.quantize_blockwise(cases[0].cpu(), 1, 128)[1], "SR scales")
    assert ((q1.float() - quant.quantize_blockwise(cases[0].cpu(), 1, 128)[0].cuda().float()).abs() <= 1).all()


@pytest.mark.gpu
def test_cached_launch_is_taken_and_runs_on_the_current_stream():
    """The second launch of a specialization returns None (the cached path) and is ordered on the current
    stream: work on a side stream sees the producer's result after a wait."""
    launch.clear()
    x = torch.randn(128, 256, device="cuda")
    q, s = torch.empty(128, 256, dtype=torch.int8, device="cuda"), torch.empty(128, 2, device="cuda")
    args = (x, q, s, s, s, 128, 256, x.stride(0), x.stride(1), s.stride(0), s.stride(1), 128, 2)
    meta = dict(R=1, C=128, TM=32, SR=False, XR=1, XC=1, SCALED_INPUT=False, num_warps=4)
    assert launch.launch_kernel(kbw._blockwise_kernel, (4, 2), *args, **meta) is not None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        q.zero_()
        assert launch.launch_kernel(kbw._blockwise_kernel, (4, 2), *args, **meta) is None
    torch.cuda.current_stream().wait_stream(side)
    assert_same(q.cpu(), quant.quantize_blockwise(x.cpu(), 1, 128)[0], "codes on a side stream")
