"""Does the output dtype (shared-memory epilogue, hence pipeline depth) explain the fallback GEMM's cost in a
compiled step? The Gluon block GEMM, plain and with the fallback term (5 % of tiles flagged), bf16 and fp32
output, 256-wide scale blocks, on the 7B step's wgrad (K = 8192 tokens) and dgrad shapes; stage counts printed;
the fallback kernel also with its output stored from registers (``direct``: no epilogue tile, one stage more).

Run on the GPU: ``PYTHONPATH=. python benchmarks/fallback_out_dtype.py`` (markdown table on stdout).
"""
from __future__ import annotations

import torch
import triton
import triton.testing

from qtrain.kernels import block_gemm_gluon as glu

CASES = [("wgrad 4096x8192x4096", 4096, 8192, 4096, 1), ("wgrad 11008x8192x4096", 11008, 8192, 4096, 1),
         ("dgrad 8192x11008x4096", 8192, 11008, 4096, 128), ("dgrad 8192x4096x12288", 8192, 4096, 12288, 128)]


def main():
    bk = 256
    print(f"# fallback GEMM by output dtype — {torch.cuda.get_device_name()}, triton {triton.__version__}\n")
    print("| case | out | plain stages | plain µs | fallback stages | fallback µs | fallback / plain "
          "| fallback, stored from registers: stages | µs | / plain |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, M, K, N, rb in CASES:
        g = torch.Generator(device="cuda").manual_seed(0)
        a = torch.randint(-127, 128, (M, K), generator=g, device="cuda", dtype=torch.int8)
        a2 = torch.randint(-127, 128, (M, K), generator=g, device="cuda", dtype=torch.int8)
        b = torch.randint(-127, 128, (N, K), generator=g, device="cuda", dtype=torch.int8)
        nk = triton.cdiv(K, bk)
        sa = torch.rand(M, nk, device="cuda") * 1e-3
        sb = torch.rand(triton.cdiv(N, rb), nk, device="cuda") * 1e-3
        flags = torch.rand(triton.cdiv(M, 128), nk, generator=g, device="cuda") < 0.05
        for out in (torch.bfloat16, torch.float32):
            tp = triton.testing.do_bench(lambda: glu.launch(a, b, sa, sb, rb, None, out, block_k=bk),
                                         return_mode="median")
            tf = triton.testing.do_bench(lambda: glu.launch(a, b, sa, sb, rb, None, out, a2, sa, flags, block_k=bk),
                                         return_mode="median")
            td = triton.testing.do_bench(lambda: glu.launch(a, b, sa, sb, rb, None, out, a2, sa, flags, block_k=bk,
                                                            direct=True), return_mode="median")
            print(f"| {label} | {str(out)[6:]} | {glu.stages_for(out, False)} | {tp * 1e3:.0f} | "
                  f"{glu.stages_for(out, True, False)} | {tf * 1e3:.0f} | {tf / tp:.2f} | "
                  f"{glu.stages_for(out, True, True)} | {td * 1e3:.0f} | {td / tp:.2f} |", flush=True)


if __name__ == "__main__":
    main()
