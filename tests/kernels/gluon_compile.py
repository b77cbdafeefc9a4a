"""Compile qtrain's Gluon (Hopper) kernels for sm_90 on the CPU, with launches their launchers make.

``python gluon_compile.py OUT.json``, in a process with ``TRITON_INTERPRET=0``: replaces each Gluon kernel's
``run`` with a recorder, calls the modules' ``launch`` functions on CPU tensors for every constexpr combination
the library and its benchmarks use (nothing executes), binds each launch as ``JITFunction.run`` would for an sm_90
target, and compiles it (Gluon's front end, ``GluonASTSource``) down to a cubin. OUT.json: one
``[kernel, label, error or null, SASS instruction counts, shared-memory bytes]`` row per launch. The counts
(cuobjdump of the cubin, when Triton ships it) let a test check instruction-level properties without a GPU.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import create_function_from_signature

from qtrain.kernels import block_gemm_gluon as bg
from qtrain.kernels import int8_gemm_gluon as ig

TARGET = GPUTarget("cuda", 90, 32)
OPCODES = ("I2FP", "I2F", "FMUL", "FFMA", "LDG", "LDS", "STL", "LDL", "IGMMA", "STG", "UTMASTG")


def _recorder(fn, name, jobs, backend):
    def run(*args, grid, warmup, **kwargs):
        kwargs = {**kwargs, "debug": fn.debug or knobs.runtime.debug,
                  "instrumentation_mode": knobs.compilation.instrumentation_mode}
        bound, spec, options = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
        label = " ".join(f"{fn.arg_names[p[0]]}={v}" for p, v in constexprs.items() if p[0] < len(fn.arg_names))
        jobs.append((name, label, GluonASTSource(fn, signature, constexprs, attrs), dict(options.__dict__)))
    return run


def _block_operands(rb, bk, M=512, K=1024, N=512):
    a, b = torch.zeros(M, K, dtype=torch.int8), torch.zeros(N, K, dtype=torch.int8)
    nk = -(-K // bk)
    return a, b, torch.ones(M, nk), torch.ones(-(-N // rb), nk)


def run_launchers() -> None:
    """The launches: block GEMM per weight blocking, scale-block width and column-scale load, fallback, bias, fp32
    output (the whole tile through shared memory, or two column halves); the row-scaled INT8 GEMM per scale kind."""
    for rb in (128, 1):
        for bk in bg.BLOCK_KS:
            for sb_cvt in ((False, True) if rb == 1 else (False,)):
                a, b, sa, sb = _block_operands(rb, bk)
                bg.launch(a, b, sa, sb, rb, None, torch.bfloat16, block_k=bk, grid_size=132, sb_cvt=sb_cvt)
    a, b, sa, sb = _block_operands(128, 128)
    bg.launch(a, b, sa, sb, 128, torch.zeros(512), torch.float32, grid_size=132, magic=True)
    bg.launch(a, b, sa, sb, 128, None, torch.bfloat16, a, sa, torch.zeros(4, 8, dtype=torch.uint8), grid_size=132)
    for rb in (128, 1):                                     # the fallback term over 256-wide scale blocks
        a, b, sa, sb = _block_operands(rb, 256)
        bg.launch(a, b, sa, sb, rb, None, torch.bfloat16, a, sa, torch.zeros(4, 4, dtype=torch.uint8), block_k=256,
                  grid_size=132)
    for rb in (128, 1):                         # fallback, fp32 output: in two column halves (default), whole
        for bk in bg.BLOCK_KS:
            a, b, sa, sb = _block_operands(rb, bk)
            for split in (None, 1):
                bg.launch(a, b, sa, sb, rb, torch.zeros(512), torch.float32, a, sa,
                          torch.zeros(4, 1024 // bk, dtype=torch.uint8), block_k=bk, grid_size=132, split=split)
    a, b = torch.zeros(512, 1024, dtype=torch.int8), torch.zeros(512, 1024, dtype=torch.int8)
    ig.launch(a, b, torch.ones(512), torch.ones(512), torch.zeros(512), torch.bfloat16)
    ig.launch(a, b, torch.ones(512), torch.ones(()), None, torch.float32)


def _counts(cubin: bytes) -> dict[str, int]:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        sass = subprocess.run([str(tool), "-sass", fh.name], capture_output=True, text=True, check=True).stdout
    return {op: len(re.findall(rf"\b{op}[.\s]", sass)) for op in OPCODES}


def main(out_path: str) -> None:
    if knobs.runtime.interpret:
        sys.exit("gluon_compile.py needs TRITON_INTERPRET=0 from the start")
    backend = make_backend(TARGET)
    jobs: list = []
    bg._block_gemm_ws_kernel.run = _recorder(bg._block_gemm_ws_kernel, "block_gemm_gluon._block_gemm_ws_kernel",
                                             jobs, backend)
    ig._gluon_int8_gemm_kernel.run = _recorder(ig._gluon_int8_gemm_kernel, "int8_gemm_gluon._gluon_int8_gemm_kernel",
                                               jobs, backend)
    bg._num_sms = lambda device: 132
    run_launchers()
    rows = []
    for name, label, src, options in jobs:
        try:
            kernel = triton.compile(src, target=TARGET, options=options)
            rows.append([name, label, None, _counts(kernel.asm["cubin"]), kernel.metadata.shared])
        except Exception as e:  # noqa: BLE001 - reported for this launch
            rows.append([name, label, f"{type(e).__name__}: {e}", {}, None])
    Path(out_path).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
