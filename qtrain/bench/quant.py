"""Quantize suite: bandwidth of the quantize kernels by minimum bytes, against a device copy in the same run."""
from __future__ import annotations

import torch

from qtrain.bench.common import bench

ROWWISE = [(16384, 4096), (16384, 11008), (8192, 2048)]
TENSORWISE = [(4096, 4096), (11008, 4096), (4096, 11008)]


def run_suite(quick: bool = False):
    from qtrain import quant
    from qtrain.kernels.rowwise import quantize_rowwise
    from qtrain.kernels.tensorwise import quantize_tensorwise

    rows = []
    cases = [("rowwise", s) for s in ROWWISE] + [("tensorwise", s) for s in TENSORWISE]
    for kind, (R, C) in cases[::2] if quick else cases:
        x = torch.randn(R, C, device="cuda", dtype=torch.bfloat16) * torch.rand(R, 1, device="cuda",
                                                                                 dtype=torch.bfloat16)
        dst = torch.empty_like(x)
        n = x.numel()
        if kind == "rowwise":
            kern, ref = quantize_rowwise, quant.quantize_rowwise
            min_bytes = n * 2 + n + R * 4                            # read bf16, write int8 + scales
        else:
            kern, ref = quantize_tensorwise, quant.quantize_tensorwise
            min_bytes = n * 2 + 2 * n + 4                            # read bf16, write W and Wᵀ int8
        for g, r in zip(kern(x), ref(x.cpu())):                    # the CPU reference is exact IEEE
            if not torch.equal(g.cpu(), r):
                raise RuntimeError(f"{kind} kernel differs from the reference at {R}x{C}")
        t_copy = bench(lambda: dst.copy_(x), quick)
        t_kern = bench(lambda: kern(x), quick)
        t_ref = bench(lambda: ref(x), quick)
        copy_bw = 4 * n / t_copy / 1e9                               # TB/s, bytes read + written
        bw = min_bytes / t_kern / 1e9
        rows.append({"kernel": kind, "shape": f"{R}x{C}", "time_us": t_kern * 1e3, "TB_s": bw,
                     "copy_TB_s": copy_bw, "pct_of_copy": 100 * bw / copy_bw, "torch_ref_us": t_ref * 1e3,
                     "speedup_vs_torch_ref": t_ref / t_kern})
        print(rows[-1], flush=True)
    notes = ["Input bf16. Minimum bytes: one read of the input, one write of each output (rowwise: q + scales; "
             "tensorwise: q and qᵀ). Copy bandwidth = bytes read + written by `dst.copy_(x)` on the same tensor.",
             "tensorwise reads the input twice (absmax pass, then quantize pass), so its ceiling by this count "
             "is ~4/6 of copy bandwidth."]
    return rows, notes
