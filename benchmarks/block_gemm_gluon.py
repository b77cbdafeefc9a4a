"""Gluon block-scaled INT8 GEMM (qtrain/kernels/block_gemm_gluon.py) vs cuBLAS BF16 and the Triton block kernel,
same run. Shapes M×K×N: the 7B fprop/dgrad layouts with 1×128 activation · 128×128 weight blocks, the wgrad
layouts with 1×128 · 1×128 blocks (both operands blocked along the token dim, K = tokens), and the fallback
term at 0/5/20/100 % flagged tiles on both layouts with 128- and 256-wide scale blocks (``--quick``: one shape
each, 0 and 5 %). Correctness (fp32 output vs the reference, ≤ 1e-5) is checked before timing;
a variant that fails to compile or is wrong is reported and skipped.

Run on the GPU: ``PYTHONPATH=. python benchmarks/block_gemm_gluon.py --out results.json`` (markdown on stdout).
"""
from __future__ import annotations

import argparse
import json
import time
import traceback

import torch
import triton
import triton.testing

from qtrain import quant
from qtrain.kernels import block_gemm as tri
from qtrain.kernels import block_gemm_gluon as glu

FPROP = [(16384, 4096, 4096), (16384, 4096, 11008), (16384, 11008, 4096), (8192, 2048, 2048)]  # M×K×N, rb 128
WGRAD = [(4096, 16384, 4096), (4096, 16384, 11008), (11008, 16384, 4096)]             # rb = 1
# fallback: M×K×N, weight block rows (1: wgrad's blocks along tokens), scale-block width
FALLBACK = [(16384, 4096, 4096, 128, 128), (16384, 11008, 4096, 128, 128), (16384, 4096, 4096, 128, 256),
            (4096, 16384, 4096, 1, 128), (4096, 16384, 4096, 1, 256), (4096, 16384, 11008, 1, 256)]
FALLBACK_QUICK = [FALLBACK[0], FALLBACK[2], FALLBACK[3], FALLBACK[4]]
RATIOS = [0.0, 0.05, 0.20, 1.0]


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def operands(M, K, N, rb, seed=0, block_k=128):
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randint(-127, 128, (M, K), generator=g, device="cuda", dtype=torch.int8)
    b = torch.randint(-127, 128, (N, K), generator=g, device="cuda", dtype=torch.int8)
    nk = triton.cdiv(K, block_k)
    sa = torch.rand(M, nk, generator=g, device="cuda") * 1e-3 + 1e-4
    sb = torch.rand(triton.cdiv(N, rb), nk, generator=g, device="cuda") * 1e-3 + 1e-4
    return a, b, sa, sb


def variants(rb):
    """(name, launch keyword arguments) of the Gluon kernel; the first is the default configuration; a
    ``block_k`` of 256 promotes once per two 128-deep steps (256-wide scale blocks)."""
    common = [("gluon", {}), ("gluon-k256", {"block_k": 256}), ("gluon-lockstep", {"order": 0}),
              ("gluon-k256-lockstep", {"block_k": 256, "order": 0}), ("gluon-magic", {"magic": True})]
    if rb == 1:
        return common + [("gluon-loads", {"sb_cvt": False}), ("gluon-k256-loads", {"block_k": 256, "sb_cvt": False}),
                         ("gluon-g4", {"group": 4}), ("gluon-g16", {"group": 16})]
    return common + [("gluon-s4", {"stages": 4})]


def save(rows, info, path):
    """Write JSON and markdown after every row, so a run cut short keeps what it measured."""
    if path:
        with open(path, "w") as fh:
            json.dump({"info": info, "rows": rows}, fh, indent=1)
        with open(path.rsplit(".", 1)[0] + ".md", "w") as fh:
            fh.write(markdown(rows, info) + "\n")


def gemm_rows(shapes, rb, label, rows, bad, done=lambda: None):
    for M, K, N in shapes:
        a, b, sa, sb = operands(M, K, N, rb)
        x16 = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w16 = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        ops = 2 * M * N * K
        row = {"M": M, "K": K, "N": N, "blocks": label, "rb": rb}
        t_bf16 = bench(lambda: x16 @ w16.t())
        row["bf16_tflops"] = ops / t_bf16 / 1e9
        t_tri = bench(lambda: tri.launch(a, b, sa, sb, 1, rb, 128, None, torch.bfloat16))
        row["triton_tops"] = ops / t_tri / 1e9
        ref = quant.block_int8_gemm(a, b, sa, sb, 1, rb, 128, None, torch.float32)
        best = None
        scales = {128: (sa, sb)}
        for name, kw in variants(rb):
            if name in bad:
                continue
            bk = kw.get("block_k", 128)
            if bk not in scales:
                scales[bk] = operands(M, K, N, rb, block_k=bk)[2:]
                t_tri_k = bench(lambda: tri.launch(a, b, *scales[bk], 1, rb, bk, None, torch.bfloat16))
                row[f"triton_k{bk}_tops"] = ops / t_tri_k / 1e9
            vsa, vsb = scales[bk]
            try:
                vref = ref if bk == 128 else quant.block_int8_gemm(a, b, vsa, vsb, 1, rb, bk, None, torch.float32)
                err = quant.relative_error(vref, glu.launch(a, b, vsa, vsb, rb, None, torch.float32, **kw))
                if not err <= 1e-5:
                    row[f"{name}_error"] = err
                    print(f"{M}x{K}x{N} {name}: WRONG rel err {err:.2e}", flush=True)
                    continue
                t = bench(lambda: glu.launch(a, b, vsa, vsb, rb, None, torch.bfloat16, **kw))
            except Exception:
                bad.add(name)
                traceback.print_exc(limit=4)
                continue
            row[f"{name}_tops"] = ops / t / 1e9
            row[f"{name}_vs_bf16"] = t_bf16 / t
            if name == "gluon":
                row["gluon_rel_err_fp32"] = err
                best = t
        if best is not None:
            row["gluon_vs_bf16"] = t_bf16 / best
            row["gluon_vs_triton"] = t_tri / best
        if rb == 128:           # the per-row-scaled Gluon INT8 GEMM on the same operands: the no-promotion ceiling
            try:
                from qtrain.kernels import int8_gemm_gluon as g8
                sr, st = torch.rand(M, device="cuda") + 0.5, torch.tensor(1e-3, device="cuda")
                row["int8_gluon_rowscaled_tops"] = ops / bench(lambda: g8.launch(a, b, sr, st, None,
                                                                                  torch.bfloat16)) / 1e9
            except Exception:
                traceback.print_exc(limit=2)
        rows.append(row)
        print(json.dumps(row), flush=True)
        done()


def fallback_rows(rows, done=lambda: None, quick=False):
    """Per layout (128-row weight blocks, wgrad's 1-row blocks along tokens) and scale-block width: the fallback
    kernel at each flagged share against the plain kernel on the same operands and blocking."""
    for M, K, N, rb, bk in (FALLBACK_QUICK if quick else FALLBACK):
        a, b, sa, sb = operands(M, K, N, rb, seed=1, block_k=bk)
        a2 = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8)
        nk, gm = triton.cdiv(K, bk), triton.cdiv(M, 128)
        ops = 2 * M * N * K
        x16 = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w16 = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        t_bf16 = bench(lambda: x16 @ w16.t())
        t_plain = bench(lambda: glu.launch(a, b, sa, sb, rb, None, torch.bfloat16, block_k=bk))
        for ratio in RATIOS[:2] if quick else RATIOS:
            g = torch.Generator(device="cuda").manual_seed(2)
            flags = torch.rand(gm, nk, generator=g, device="cuda") < ratio
            sa2 = torch.where(flags.repeat_interleave(128, 0)[:M], sa * 1e-2, torch.zeros_like(sa))
            row = {"M": M, "K": K, "N": N, "blocks": f"fallback 1x{bk} · {rb}x{bk}", "rb": rb, "block_k": bk,
                   "ratio": ratio, "flagged": flags.float().mean().item(), "bf16_tflops": ops / t_bf16 / 1e9,
                   "gluon_nofb_tops": ops / t_plain / 1e9}
            fb = (a2, sa2, flags)
            try:
                tiles = flags.repeat_interleave(128, 0)[:M].repeat_interleave(bk, 1)[:, :K]
                ref = (quant.block_int8_gemm(a, b, sa, sb, 1, rb, bk, None, torch.float32)
                       + quant.block_int8_gemm(torch.where(tiles, a2, 0), b, sa2, sb, 1, rb, bk, None, torch.float32))
                err = quant.relative_error(ref, glu.launch(a, b, sa, sb, rb, None, torch.float32, *fb, block_k=bk))
                row["gluon_rel_err_fp32"] = err
                if not err <= 1e-5:
                    print(f"fallback {M}x{K}x{N} rb {rb} bk {bk} {ratio}: WRONG rel err {err:.2e}", flush=True)
                    rows.append(row)
                    continue
                t = bench(lambda: glu.launch(a, b, sa, sb, rb, None, torch.bfloat16, *fb, block_k=bk))
                row["gluon_fb_tops"] = ops / t / 1e9
                row["fb_vs_nofb_time"] = t / t_plain
                row["gluon_fb_vs_bf16"] = t_bf16 / t
                if rb == 1:     # lockstep: the lagging warpgroup holds a scale block's stages longer (ORDER 1)
                    t0 = bench(lambda: glu.launch(a, b, sa, sb, rb, None, torch.bfloat16, *fb, block_k=bk, order=0))
                    row["gluon_fb_lockstep_tops"] = ops / t0 / 1e9
                if not quick:
                    t_tri = bench(lambda: tri.launch(a, b, sa, sb, 1, rb, bk, None, torch.bfloat16, fallback=fb))
                    row["triton_fb_tops"] = ops / t_tri / 1e9
                    row["gluon_fb_vs_triton_fb"] = t_tri / t
            except Exception:
                traceback.print_exc(limit=4)
            rows.append(row)
            print(json.dumps(row), flush=True)
            done()


def markdown(rows, info):
    lines = [f"# Gluon block-scaled INT8 GEMM — {info['gpu']}, torch {info['torch']}, triton {info['triton']}",
             "", "TOP/s by 2·M·N·K; median of triton.testing.do_bench (L2 flushed); bf16 output; all columns from "
             "the same run; variants as TOP/s (× BF16).", ""]
    f = lambda r, k: f"{r[k]:.0f}" if k in r else "—"                                          # noqa: E731
    x = lambda r, k: f"{r[k]:.2f}×" if k in r else "—"                                          # noqa: E731
    for rb in (128, 1):
        group = [r for r in rows if "ratio" not in r and r.get("rb") == rb]
        if not group:
            continue
        names = [n for n, _ in variants(rb)[1:]]
        lines += ["| M×K×N | blocks | BF16 TFLOP/s | Triton block | Gluon | Gluon / BF16 | Gluon / Triton | "
                  + " | ".join(names) + " | Triton k256 | row-scaled Gluon INT8 |",
                  "|---" * (9 + len(names)) + "|"]
        for r in group:
            lines.append(f"| {r['M']}×{r['K']}×{r['N']} | {r['blocks']} | {f(r, 'bf16_tflops')} | "
                         f"{f(r, 'triton_tops')} | {f(r, 'gluon_tops')} | {x(r, 'gluon_vs_bf16')} | "
                         f"{x(r, 'gluon_vs_triton')} | "
                         + " | ".join(f"{f(r, n + '_tops')} ({x(r, n + '_vs_bf16')})" for n in names)
                         + f" | {f(r, 'triton_k256_tops')} | {f(r, 'int8_gluon_rowscaled_tops')} |")
        lines.append("")
    lines += ["Fallback (second A operand on flagged 128-row × c-K tiles), against the plain kernel on the same "
              "blocks:", "", "| M×K×N | blocks | flagged | Gluon no-fallback | Gluon fallback | time vs no-fallback "
              "| vs BF16 | Triton fallback | Gluon / Triton | Gluon fallback, lockstep |", "|---" * 10 + "|"]
    for r in rows:
        if "ratio" not in r:
            continue
        lines.append(f"| {r['M']}×{r['K']}×{r['N']} | {r['blocks']} | {100 * r['flagged']:.1f} % | "
                     f"{f(r, 'gluon_nofb_tops')} | {f(r, 'gluon_fb_tops')} | {r.get('fb_vs_nofb_time', 0):.3f} | "
                     f"{x(r, 'gluon_fb_vs_bf16')} | {f(r, 'triton_fb_tops')} | {x(r, 'gluon_fb_vs_triton_fb')} | "
                     f"{f(r, 'gluon_fb_lockstep_tops')} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None, help="write the JSON rows here (and the markdown next to it, .md)")
    p.add_argument("--quick", action="store_true", help="one shape per group")
    p.add_argument("--skip", default="", help="comma list of groups to skip: fprop, wgrad, fallback")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d")}
    rows, bad = [], set()
    done = lambda: save(rows, info, args.out)                                               # noqa: E731
    if "fprop" not in skip:
        gemm_rows(FPROP[:1] if args.quick else FPROP, 128, "1x128 · 128x128", rows, bad, done)
    if "wgrad" not in skip:
        gemm_rows(WGRAD[:1] if args.quick else WGRAD, 1, "1x128 · 1x128 (wgrad)", rows, bad, done)
    if "fallback" not in skip:
        fallback_rows(rows, done, args.quick)
    print(markdown(rows, info))


if __name__ == "__main__":
    main()
