"""Host cost of one Gluon INT8 GEMM call, by piece (layouts, descriptors, launch), on a launch-bound shape."""
from __future__ import annotations

import torch
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

import qtrain
from overhead import host_us  # same folder: run as `python benchmarks/gluon_overhead.py`
from qtrain.kernels import int8_gemm as kg
from qtrain.kernels import int8_gemm_gluon as glu


def main():
    M, K, N = 256, 512, 256
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8, device="cuda")
    b = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
    sa, sb = torch.rand(M, device="cuda"), torch.tensor(1e-3, device="cuda")
    out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    bm, bn, bk, stages, warps = glu.CONFIG
    la = gl.NVMMASharedLayout.get_default_for([bm, bk], gl.int8)
    lb = gl.NVMMASharedLayout.get_default_for([bn, bk], gl.int8)
    lc = gl.NVMMASharedLayout.get_default_for([bm, bn], gl.bfloat16)
    da = TensorDescriptor.from_tensor(a, [bm, bk], la)
    db = TensorDescriptor.from_tensor(b, [bn, bk], lb)
    dc = TensorDescriptor.from_tensor(out, [bm, bn], lc)
    n, wm, wn = glu._instr_n(bm, bn, warps)

    def launch():
        glu._gluon_int8_gemm_kernel[(2,)](da, db, dc, sa, sb, sa, M, N, K, B_ROW=False, HAS_BIAS=False,
                                          STAGES=stages, GROUP_M=8, INSTR_N=n, WARPS_M=wm, WARPS_N=wn,
                                          num_warps=warps)
    print(f"torch add                     {host_us(lambda: a.add(1)):7.1f} µs")
    layouts = lambda: [gl.NVMMASharedLayout.get_default_for([bm, bk], gl.int8) for _ in range(3)]  # noqa: E731
    descs = lambda: [TensorDescriptor.from_tensor(a, [bm, bk], la) for _ in range(3)]  # noqa: E731
    print(f"3× get_default_for            {host_us(layouts):7.1f} µs")
    print(f"3× TensorDescriptor           {host_us(descs):7.1f} µs")
    print(f"launch, prebuilt descriptors  {host_us(launch):7.1f} µs")
    print(f"glu.int8_gemm                 {host_us(lambda: glu.int8_gemm(a, b, sa, sb, None, torch.bfloat16)):7.1f} µs")
    kg.TMA_MIN_MNK = 0
    gemm = lambda: kg.int8_gemm(a, b, sa, sb, None, torch.bfloat16)  # noqa: E731
    print(f"kg.int8_gemm (→ gluon)        {host_us(gemm):7.1f} µs")
    kg.GLUON_ENABLED = False
    print(f"kg.int8_gemm (triton TMA)     {host_us(gemm):7.1f} µs")
    kg.TMA_ENABLED = False
    print(f"kg.int8_gemm (triton ptr)     {host_us(gemm):7.1f} µs")
    kg.TMA_ENABLED, kg.GLUON_ENABLED, kg.TMA_MIN_MNK = True, True, 1 << 37

    layer = qtrain.QuantLinear(4096, 4096, bias=False, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16)

    def step():
        layer.weight.grad = None
        layer(x).backward(dy)
    print(f"QuantLinear fwd+bwd (512 tok) {host_us(step, 100):7.1f} µs")


if __name__ == "__main__":
    main()
