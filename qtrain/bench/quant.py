"""Quantize suite: bandwidth of the quantize kernels by minimum bytes, against a device copy in the same run."""
from __future__ import annotations

import functools

import torch

from qtrain.bench.common import bench

ROWWISE = [(16384, 4096), (16384, 11008), (8192, 2048)]
TENSORWISE = [(4096, 4096), (11008, 4096), (4096, 11008)]
# The block quantize calls of a 7B-width layer step (8192 tokens): (what, shape, dtype, (r, c), transposed, SR).
# transposed: the kernel reads the transpose of a contiguous [shape] tensor (blocks along tokens for wgrad, Wᵀ).
BLOCKWISE = [
    ("x 1x128", (8192, 4096), torch.bfloat16, (1, 128), False, False),
    ("x 1x128 fp32", (8192, 4096), torch.float32, (1, 128), False, False),
    ("h 1x128 fp32", (8192, 22016), torch.float32, (1, 128), False, False),
    ("dY 1x128 SR", (8192, 4096), torch.bfloat16, (1, 128), False, True),
    ("dYT tokens SR", (8192, 4096), torch.bfloat16, (1, 128), True, True),
    ("dY 1x256 SR", (8192, 4096), torch.bfloat16, (1, 256), False, True),
    ("dYT 256 tokens SR", (8192, 4096), torch.bfloat16, (1, 256), True, True),
    ("XT tokens fp32", (8192, 11008), torch.float32, (1, 128), True, False),
    ("W 128x128 fp32", (11008, 4096), torch.float32, (128, 128), False, False),
    ("WT 128x128 fp32", (11008, 4096), torch.float32, (128, 128), True, False),
    ("W 128x256 fp32", (22016, 4096), torch.float32, (128, 256), False, False),         # jetfire_wide's gate_up
    ("WT 128x256 fp32", (22016, 4096), torch.float32, (128, 256), True, False),
    ("dYT 256 tokens SR", (8192, 22016), torch.bfloat16, (1, 256), True, True),
]
# Saved INT8 X re-blocked for wgrad (``requantize_blockwise_t``, jetfire_wide's backward): (what, shape, (r_in, c_in),
# (r, c)) of X.
REQUANTIZE = [("X 1x256 -> XT 128x256", (8192, 4096), (1, 256), (128, 256)),
              ("X 1x256 -> XT 128x256", (8192, 11008), (1, 256), (128, 256))]
# dY quantized for dgrad and wgrad by one dual SR call (jetfire_wide's backward): (what, shape, dtype, c); the
# two calls it replaces are the "dY 1x128 SR" and "dYT tokens SR" rows.
BLOCKWISE_DUAL = [("dY dual SR", (8192, 4096), torch.bfloat16, 128)]
# Fallback quantize calls (recipe fallback): (what, shape, transposed, flagged fraction[, stochastic rounding: the
# gradients of benchmarks/recipes/fallback_sr.json]); τ is set to the tile-absmax quantile that flags that fraction
# of the 128×128 tiles.
FALLBACK = [("x 1x128", (8192, 4096), False, 0.05), ("h 1x128", (8192, 11008), False, 0.05),
            ("dYT tokens", (8192, 4096), True, 0.05), ("x 1x128 all", (8192, 4096), False, 1.0),
            ("dY 1x128 SR", (8192, 4096), False, 0.05, True), ("dYT tokens SR", (8192, 4096), True, 0.05, True)]


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
    rows += _blockwise_rows(quick)
    rows += _blockwise_dual_rows(quick)
    rows += _fallback_rows(quick)
    rows += _transpose_rows(quick)
    notes = ["Input bf16. Minimum bytes: one read of the input, one write of each output (rowwise: q + scales; "
             "tensorwise: q and qᵀ). Copy bandwidth = bytes read + written by `dst.copy_(x)` on the same tensor.",
             "tensorwise reads the input twice (absmax pass, then quantize pass), so its ceiling by this count "
             "is ~4/6 of copy bandwidth.",
             "blockwise rows: the block quantize calls of a 7B-width training step (input dtype as named; "
             "'transposed' rows read a transposed view, blocks along tokens); minimum bytes: one read of the input, "
             "one write of q and the scales; torch_ref_us: the reference on the GPU. SR rows check the scales "
             "against the reference, RTN rows q and scales bit for bit.",
             "blockwise dual rows: one read of dY, the 1x128 SR blocks of dY and of dYᵀ written (q, qᵀ and both "
             "scales: the minimum bytes); two_calls_us (JSON): the two single SR calls it replaces, in the same run; "
             "the scales of both directions are checked against the reference.",
             "fallback rows: quantize_fallback of bf16 input with outliers, τ flagging the named fraction of "
             "128×128 tiles; minimum bytes: one read, q and the scales written, q2 on flagged tiles; checked bit "
             "for bit against the reference (q2 on flagged tiles).",
             "transpose rows: int8 q → qᵀ contiguous (the transposed GEMM operands of square blocks); torch_ref_us: "
             "`q.t().contiguous()`; minimum bytes: one read and one write."]
    return rows, notes


def _blockwise_rows(quick: bool, cases=BLOCKWISE, device: str = "cuda") -> list[dict]:
    from qtrain import quant
    from qtrain.kernels.blockwise import quantize_blockwise, quantize_blockwise_sr

    rows = []
    seed = torch.tensor([7], device=device)
    for what, (R, C), dtype, (r, c), transposed, sr in cases[::3] if quick else cases:
        base = torch.randn(R, C, device=device, dtype=dtype) * torch.rand(R, 1, device=device, dtype=dtype)
        x = base.t() if transposed else base
        n = x.numel()

        def kern():
            return quantize_blockwise_sr(x, r, c, seed) if sr else quantize_blockwise(x, r, c)

        def ref():
            return quant.quantize_blockwise_sr(x, r, c, seed) if sr else quant.quantize_blockwise(x, r, c)

        got, want = kern(), quant.quantize_blockwise(x.cpu(), r, c)
        same = (torch.equal(got[1].cpu(), want[1]) and (sr or torch.equal(got[0].cpu(), want[0])))
        if not same:
            raise RuntimeError(f"blockwise kernel differs from the reference for {what}")
        dst = torch.empty_like(base)
        t_copy, t_kern, t_ref = bench(lambda: dst.copy_(base), quick), bench(kern, quick), bench(ref, quick)
        copy_bw = 2 * n * base.element_size() / t_copy / 1e9
        bw = (n * base.element_size() + n + 4 * n // (r * c)) / t_kern / 1e9
        rows.append({"kernel": f"blockwise {what}", "shape": f"{R}x{C}" + ("ᵀ" if transposed else ""),
                     "time_us": t_kern * 1e3, "TB_s": bw, "copy_TB_s": copy_bw, "pct_of_copy": 100 * bw / copy_bw,
                     "torch_ref_us": t_ref * 1e3, "speedup_vs_torch_ref": t_ref / t_kern})
        print(rows[-1], flush=True)
    return rows


def _blockwise_dual_rows(quick: bool, cases=BLOCKWISE_DUAL, device: str = "cuda") -> list[dict]:
    from qtrain import quant
    from qtrain.kernels.blockwise import quantize_blockwise_sr, quantize_blockwise_sr_dual

    rows = []
    seed = torch.tensor([7], device=device)
    for what, (R, C), dtype, c in cases:
        x = torch.randn(R, C, device=device, dtype=dtype) * torch.rand(R, 1, device=device, dtype=dtype)
        n = x.numel()
        _, s, _, st = quantize_blockwise_sr_dual(x, c, seed)
        if not (torch.equal(s.cpu(), quant.quantize_blockwise(x.cpu(), 1, c)[1])
                and torch.equal(st.cpu(), quant.quantize_blockwise(x.t().cpu(), 1, c)[1])):
            raise RuntimeError(f"dual blockwise kernel's scales differ from the reference for {what}")
        dst = torch.empty_like(x)
        t_copy = bench(lambda: dst.copy_(x), quick)
        t_kern = bench(lambda: quantize_blockwise_sr_dual(x, c, seed), quick)
        t_two = bench(lambda: (quantize_blockwise_sr(x, 1, c, seed), quantize_blockwise_sr(x.t(), 1, c, seed)), quick)
        t_ref = bench(lambda: quant.quantize_blockwise_sr_dual(x, c, seed), quick)
        copy_bw = 2 * n * x.element_size() / t_copy / 1e9
        bw = (n * x.element_size() + 2 * n + 2 * 4 * n // c) / t_kern / 1e9
        rows.append({"kernel": f"blockwise {what}", "shape": f"{R}x{C}", "time_us": t_kern * 1e3, "TB_s": bw,
                     "copy_TB_s": copy_bw, "pct_of_copy": 100 * bw / copy_bw, "torch_ref_us": t_ref * 1e3,
                     "speedup_vs_torch_ref": t_ref / t_kern, "two_calls_us": t_two * 1e3})
        print(rows[-1], flush=True)
    return rows


def fallback_case(shape: tuple[int, int], transposed: bool, frac: float, device: str = "cuda"):
    """``(base, x, tau)``: bf16 ``base [shape]`` with scattered outliers, ``x`` it or its transposed view, and the
    fp32 ``tau`` that flags ``frac`` of ``x``'s 128×128 tiles (−1, every tile, for ``frac`` 1)."""
    from qtrain.quant import fallback as ref
    from qtrain.quant.testing import outlier_data

    base = outlier_data(*shape, magnitude=50.0, pattern="scattered", seed=3, dtype=torch.bfloat16, device=device)
    x = base.t() if transposed else base
    tau = (torch.quantile(ref.tile_absmax(x, 128).flatten(), 1 - frac).reshape(1) if frac < 1
           else torch.full((1,), -1.0))
    return base, x, tau.to(device=device, dtype=torch.float32)


def fallback_mismatch(got, want, sr: bool = False) -> str | None:
    """The first of ``quantize_fallback``'s outputs where ``got`` differs from ``want`` (``q2`` compared on
    ``want``'s flagged tiles, where the contract defines it), or None. ``sr``: ``got`` from the SR quantizer —
    its scales, flags and tile absmax compared, its codes in distribution only (not checked here)."""
    from qtrain.quant import fallback as ref

    got = [g.cpu() for g in got]
    want = [w.cpu() for w in want]
    flagged = ref.expand_tiles(want[4], want[0].shape[0]).repeat_interleave(128, 1)[:, :want[0].shape[1]]
    for name, g, w in zip(("q", "scale", "q2", "scale2", "flags", "tile_absmax"), got, want):
        if sr and name in ("q", "q2", "scale2"):
            continue
        if not torch.equal(g[flagged] if name == "q2" else g, w[flagged] if name == "q2" else w):
            return name
    return None


def fallback_min_bytes(x: torch.Tensor, flags: torch.Tensor) -> float:
    """One bf16 read of ``x``, its codes and scales written, the residual's on the flagged share of tiles."""
    n = x.numel()
    return 2 * n + n * (1 + flags.float().mean().item()) + 4 * n // 128 * 2


def _fallback_rows(quick: bool, cases=FALLBACK, device: str = "cuda") -> list[dict]:
    from qtrain.kernels import fallback as kern
    from qtrain.quant import fallback as ref

    rows = []
    for what, shape, transposed, frac, *sr in cases[::2] if quick else cases:
        base, x, tau = fallback_case(shape, transposed, frac, device)
        if sr and sr[0]:
            seed = torch.tensor([1], device=device)
            fn, ref_fn = (functools.partial(q, block_k=128, seed=seed)
                          for q in (kern.quantize_fallback_sr, ref.quantize_fallback_sr))
        else:
            fn, ref_fn = kern.quantize_fallback, ref.quantize_fallback
        want = ref.quantize_fallback(x.cpu(), tau.cpu())
        bad = fallback_mismatch(fn(x, tau), want, sr=bool(sr and sr[0]))
        if bad is not None:
            raise RuntimeError(f"fallback kernel's {bad} differs from the reference for {what}")
        dst = torch.empty_like(base)
        t_copy = bench(lambda: dst.copy_(base), quick)
        t_kern = bench(lambda: fn(x, tau), quick)
        t_ref = bench(lambda: ref_fn(x, tau), quick)
        copy_bw = 4 * x.numel() / t_copy / 1e9
        bw = fallback_min_bytes(x, want[4]) / t_kern / 1e9
        rows.append({"kernel": f"fallback {what}", "shape": "x".join(map(str, shape)) + ("ᵀ" if transposed else ""),
                     "flagged": want[4].float().mean().item(), "time_us": t_kern * 1e3, "TB_s": bw,
                     "copy_TB_s": copy_bw, "pct_of_copy": 100 * bw / copy_bw, "torch_ref_us": t_ref * 1e3,
                     "speedup_vs_torch_ref": t_ref / t_kern})
        print(rows[-1], flush=True)
    return rows


def _transpose_rows(quick: bool, shapes=((11008, 4096), (8192, 11008)), device: str = "cuda") -> list[dict]:
    from qtrain.kernels.transpose import transpose_int8

    rows = []
    for R, C in shapes[:1] if quick else shapes:
        q = torch.randint(-127, 128, (R, C), device=device, dtype=torch.int8)
        if not torch.equal(transpose_int8(q), q.t().contiguous()):
            raise RuntimeError(f"transpose kernel differs from q.t().contiguous() at {R}x{C}")
        dst = torch.empty_like(q)
        t_copy, t_kern = bench(lambda: dst.copy_(q), quick), bench(lambda: transpose_int8(q), quick)
        t_ref = bench(lambda: q.t().contiguous(), quick)
        n = q.numel()
        rows.append({"kernel": "transpose int8", "shape": f"{R}x{C}", "time_us": t_kern * 1e3,
                     "TB_s": 2 * n / t_kern / 1e9, "copy_TB_s": 2 * n / t_copy / 1e9,
                     "pct_of_copy": 100 * t_copy / t_kern, "torch_ref_us": t_ref * 1e3,
                     "speedup_vs_torch_ref": t_ref / t_kern})
        print(rows[-1], flush=True)
    return rows
