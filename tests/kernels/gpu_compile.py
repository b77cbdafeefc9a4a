"""Compile qtrain's Triton kernels for GPU targets on the CPU, with the launches their launchers really make.

``python gpu_compile.py OUT.json all|KERNEL@TARGET...``, in a process with ``TRITON_INTERPRET=0`` from the start
(under the interpreter Triton's own ``tl.*`` library functions are interpreted ones the compiler rejects): imports
the kernel modules (kernels are then ``JITFunction``/``Autotuner`` objects, launchers pick GPU tile sizes and
autotune configs), calls :func:`run_launchers` on CPU tensors with every kernel's ``run`` replaced by a recorder
(nothing executes; ``check_device`` is switched off), and binds each launch as ``JITFunction.run`` would for each
target: Triton's own binder gives the argument types, constexprs, specializations (``tt.divisibility``, integers
equal to 1) and options. An autotuned launch gives one launch per config its pruning keeps, the config's
``pre_hook`` applied (TMA block shapes). The distinct launches asked for are compiled to cubins in threads;
OUT.json gets the kernels found and every launch's error (or null). Uses Triton 3.6's binder internals
(``create_function_from_signature``, ``JITFunction._pack_args``).

Checked on an H200: each Triton compile :func:`run_launchers` caused there (JIT post-compile hook) was one of the
sm90 launches captured here. Modules ``*_gluon.py`` are left out: Gluon kernels need Gluon's front end
(``gluon_compile.py``).
"""
from __future__ import annotations

import ast
import importlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, KernelInterface, create_function_from_signature

import qtrain

KERNEL_DIR = Path(qtrain.__file__).parent / "kernels"
TARGETS = {"sm90": GPUTarget("cuda", 90, 32), "sm80": GPUTarget("cuda", 80, 32)}
bf16, fp16, fp32, i8 = torch.bfloat16, torch.float16, torch.float32, torch.int8


def module_names() -> list[str]:
    return sorted(p.stem for p in KERNEL_DIR.glob("*.py") if p.stem != "__init__" and not p.stem.endswith("_gluon"))


def jit_names() -> tuple[list[str], list[str]]:
    """``(all, kernels)``: ``module.function`` of each ``@triton.jit`` function in the sources, and of those no
    other one calls (the launched kernels; the rest are device helpers)."""
    jitted = {}
    for mod in module_names():
        for node in ast.parse((KERNEL_DIR / f"{mod}.py").read_text()).body:
            if isinstance(node, ast.FunctionDef) and any(
                    ast.unparse(d.func if isinstance(d, ast.Call) else d) == "triton.jit" for d in node.decorator_list):
                jitted[f"{mod}.{node.name}"] = node
    called = {n.id if isinstance(n, ast.Name) else n.attr for node in jitted.values() for stmt in node.body
              for n in ast.walk(stmt) if isinstance(n, (ast.Name, ast.Attribute))}
    return sorted(jitted), sorted(k for k in jitted if k.split(".")[1] not in called)


M, K, N, F = 2048, 4096, 4096, 11008                              # tokens, hidden, out features, MLP width


def _empty(*shape, dtype=i8):
    return torch.empty(shape, dtype=dtype)


def _x():
    return _empty(M, K, dtype=bf16)


def _xt():
    return _empty(K, M, dtype=bf16).t()                            # transposed view (wgrad operands)


def _rowwise(mod):
    mod.quantize_rowwise(_x())                                     # one pass
    mod.quantize_rowwise(_empty(M, F, dtype=fp32))                 # two passes
    mod.quantize_rowwise(_empty(768, 100, dtype=fp16).t())         # strided, short rows


def _tensorwise(mod):
    mod.quantize_tensorwise(_empty(N, K, dtype=bf16))
    mod.quantize_tensorwise(_empty(N, K, dtype=fp32))


def _blockwise(mod):
    for r, c, t in ((1, 128, _x()), (128, 128, _empty(N, K, dtype=fp32)), (32, 32, _x()), (1, 128, _xt()),
                    (128, 256, _empty(N, K, dtype=fp32)), (1, 256, _xt())):  # ... jetfire_wide's W and Xᵀ
        mod.quantize_blockwise(t, r, c)
    mod.quantize_blockwise_sr(_x(), 32, 32, torch.zeros(1, dtype=torch.int64))
    mod.quantize_blockwise_sr(_xt(), 1, 256, torch.zeros(1, dtype=torch.int64))       # jetfire_wide's dYᵀ
    for c in (32, 128):                                            # dY of jetfire_wide; a wide tile of small c
        mod.quantize_blockwise_sr_dual(_x(), c, torch.zeros(1, dtype=torch.int64))
    mod.requantize_blockwise_t(_empty(M, K), _empty(M, K // 128, dtype=fp32), 1, 128, 1, 128)
    mod.requantize_blockwise_t(_empty(M, K), _empty(M, K // 256, dtype=fp32), 1, 256, 1, 256)
    mod.requantize_blockwise_t(_empty(M, K), _empty(M, K // 256, dtype=fp32), 1, 256, 128, 256)  # jetfire_wide's Xᵀ


def _dataflow(mod):
    def scales(cols, r, c):
        return _empty(-(-M // r), -(-cols // c), dtype=fp32)

    w = _empty(K, dtype=bf16)
    r, c = 32, 32                                                  # jetfire blocks, a LLaMA block
    mod.rmsnorm_quantize(_empty(M, K), scales(K, r, c), w, 1e-6, r, c)
    mod.swiglu_quantize(_empty(M, 2 * F), scales(2 * F, r, c), r, c)
    r, c = 1, 128                                                  # jetfire_wide blocks, a GPT-2 block
    mod.layernorm_quantize(_empty(M, K), scales(K, r, c), w, w, 1e-5, r, c)
    mod.gelu_quantize(_empty(M, F), scales(F, r, c), r, c)
    mod.gelu_backward(_empty(M, F), scales(F, r, c), _empty(M, F), scales(F, r, c), r, c)
    r, c = 32, 32
    mod.swiglu_backward(_empty(M, 2 * F), scales(2 * F, r, c), _empty(M, F), scales(F, r, c), r, c)
    mod.rmsnorm_backward(_empty(M, K), scales(K, r, c), w, _empty(M, K), scales(K, r, c), 1e-6, r, c)
    r, c = 1, 128
    mod.layernorm_backward(_empty(M, K), scales(K, r, c), w, w, _empty(M, K), scales(K, r, c), 1e-5, r, c)
    r, c = 1, 256                                                  # jetfire_wide blocks, a LLaMA block
    mod.rmsnorm_quantize(_empty(M, K), scales(K, r, c), w, 1e-6, r, c)
    mod.swiglu_quantize(_empty(M, 2 * F), scales(2 * F, r, c), r, c)
    mod.swiglu_backward(_empty(M, 2 * F), scales(2 * F, r, c), _empty(M, F), scales(F, r, c), r, c)
    mod.rmsnorm_backward(_empty(M, K), scales(K, r, c), w, _empty(M, K), scales(K, r, c), 1e-6, r, c)
    mod.quantize_swiglu(_empty(M, 2 * F, dtype=bf16), r, c)       # h quantized + SwiGLU in one op (FUSED_H_ACT)
    mod.quantize_gelu(_empty(M, F, dtype=bf16), 32, 32)
    wide = 4 * mod.NORM_BWD_ROW_ELEMS                              # rows too wide for registers: three passes
    mod.rmsnorm_backward(_empty(M, wide), scales(wide, r, c), _empty(wide, dtype=bf16), _empty(M, wide),
                         scales(wide, r, c), 1e-6, r, c)


def _hadamard(mod):
    for b in (16, 32, 64, 128, 256):                               # Hadamard(search=True) tries every block
        mod.block_hadamard(_x(), b)
    for b in (16, 256):
        mod.hadamard_quantize_int4(_x(), b, torch.ones((), dtype=fp32))


def _fallback(mod):
    tau = torch.zeros((), dtype=fp32)
    mod.quantize_fallback(_x(), tau, 128)
    mod.quantize_fallback(_xt(), tau, 64)
    sa, sb = _empty(M, K // 128, dtype=fp32), _empty(N // 128, K // 128, dtype=fp32)
    flags = torch.zeros(M // 128, K // 128, dtype=torch.bool)
    mod.fallback_block_gemm(_empty(M, K), sa, _empty(M, K), sa, flags, _empty(N, K), sb, 128, 128)


def _int8_gemm(mod):
    a, b = _empty(4 * M, 2 * K), _empty(N, 2 * K)                  # M·N·K ≥ TMA_MIN_MNK: the TMA path
    mod.int8_gemm(a, b, _empty(4 * M, dtype=fp32), _empty(dtype=fp32))
    a, b = _empty(M, K), _empty(N, K)
    mod.int8_gemm(a[:64], b[:1024], _empty(64, dtype=fp32), _empty(1024, dtype=fp32), _empty(1024, dtype=bf16),
                  fp32)                                            # pointers, row scales, bias
    mod.int8_gemm(a[:1], b, _empty(1, dtype=fp32), _empty(dtype=fp32), None, fp16)   # one token


def _block_gemm(mod):
    # large M: every config; M = 64: the autotuner's pruning keeps only BLOCK_M = 64
    a, b = _empty(M, K), _empty(N, K)
    for m, ra, rb, c, bias, out in ((M, 1, 128, 128, None, bf16), (64, 32, 32, 32, _empty(N, dtype=bf16), fp32)):
        sa, sb = _empty(-(-m // ra), K // c, dtype=fp32), _empty(-(-N // rb), K // c, dtype=fp32)
        mod.block_int8_gemm(a[:m], b, sa, sb, ra, rb, c, bias, out)


def _transpose(mod):
    q = _empty(M, K)
    mod.transpose_int8(q)
    mod.transpose_int8(q.t())


def _stable_adamw(mod):
    lists = [[_empty(n, dtype=bf16) for n in (1024 * K, K, 7)] for _ in range(4)]         # θ, g, m, u
    mod.stable_adamw_update(*lists, lr=1e-3, beta1_hat=0.9, beta2_hat=0.99, eps=1e-8, weight_decay=0.1)


LAUNCHES = {"rowwise": _rowwise, "tensorwise": _tensorwise, "blockwise": _blockwise, "dataflow": _dataflow,
            "hadamard": _hadamard, "fallback": _fallback, "int8_gemm": _int8_gemm, "block_gemm": _block_gemm,
            "transpose": _transpose, "stable_adamw": _stable_adamw}


def run_launchers(k: dict) -> None:
    """The launchers of each kernel module present (``k[name]``), called as ``qtrain.ops``/``qtrain.nn``/
    ``qtrain.optim`` call them, on GPU-sized CPU tensors (never touched: only the launch arguments matter): a sample
    that reaches each kernel's constexpr branches, input dtypes, tile geometries and autotune configs, kept small
    enough to compile in ~30 s on two cores. Calls Gluon would take on a Hopper GPU take the Triton path they take
    elsewhere (CPU tensors are not admitted to Gluon)."""
    for name, launch in LAUNCHES.items():
        if name in k:
            launch(k[name])


def jit_objects(modules: dict) -> dict:
    """``module.name → object`` of every jitted object (``JITFunction`` or a wrapper of one) a module defines."""
    def jit_function(obj):
        while isinstance(obj, KernelInterface) and not isinstance(obj, JITFunction):
            obj = obj.fn
        return obj if isinstance(obj, JITFunction) else None

    return {f"{m}.{name}": obj for m, mod in modules.items() for name, obj in vars(mod).items()
            if (jf := jit_function(obj)) is not None and jf.fn.__module__ == mod.__name__}


@dataclass
class Launch:
    kernel: str          # module.function
    target: str          # a key of TARGETS
    label: str           # constexprs, argument types, options: what a failure names
    src: ASTSource
    options: dict

    def error(self) -> str | None:
        try:
            triton.compile(self.src, target=TARGETS[self.target], options=self.options)
        except Exception as e:  # noqa: BLE001 - reported for this launch
            return f"{type(e).__name__}: {e}"
        return None


def _show(v) -> str:
    return repr(v) if isinstance(v, str) else str(v).removeprefix("triton.language.")


class Recorder:
    """Stands in for the kernels' ``run``: keeps each distinct launch, bound for every target."""

    def __init__(self):
        self.launches: dict[tuple, Launch] = {}
        self.backends = {t: make_backend(target) for t, target in TARGETS.items()}
        self.binders: dict = {}

    def patch(self, kernel: str, obj) -> None:
        if isinstance(obj, JITFunction):
            obj.run = lambda *args, grid, warmup, **kwargs: self.record(kernel, obj, args, kwargs)
        elif isinstance(obj, Autotuner) and isinstance(obj.fn, JITFunction):
            def run(*args, grid, warmup, **kwargs):
                obj.nargs = dict(zip(obj.arg_names, args))
                for config in obj.prune_configs(kwargs) if len(obj.configs) > 1 else obj.configs:
                    full = {**kwargs, **config.all_kwargs()}
                    if config.pre_hook is not None:
                        config.pre_hook({**obj.nargs, **full})
                    self.record(kernel, obj.fn, args, full)
                obj.nargs = None
            obj.run = run
        else:
            raise NotImplementedError(f"{kernel}: cannot record launches of a {type(obj).__name__}")

    def record(self, kernel: str, fn: JITFunction, args, kwargs) -> None:
        """What ``JITFunction.run`` does before it compiles, for each target."""
        kwargs = {**kwargs, "debug": kwargs.get("debug", fn.debug) or knobs.runtime.debug,
                  "instrumentation_mode": knobs.compilation.instrumentation_mode}
        for target, backend in self.backends.items():
            binder = self.binders.get((fn, target))
            if binder is None:
                binder = self.binders[fn, target] = create_function_from_signature(fn.signature, fn.params, backend)
            bound, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
            label = " ".join([f"{fn.arg_names[p[0]]}={_show(v)}" for p, v in constexprs.items()]
                             + [f"{n}:{t}" for n, t in signature.items() if t != "constexpr"]
                             + [f"num_warps={options.num_warps} num_stages={options.num_stages}"])
            key = (kernel, target, label, repr(attrs), repr(sorted(options.__dict__.items())))
            if key not in self.launches:
                self.launches[key] = Launch(kernel, target, label, ASTSource(fn, signature, constexprs, attrs),
                                            dict(options.__dict__))


def main(out_path: str, wanted: list[str]) -> None:
    if knobs.runtime.interpret:
        sys.exit("gpu_compile.py needs TRITON_INTERPRET=0 from the start")
    start = time.perf_counter()
    modules = {m: importlib.import_module(f"qtrain.kernels.{m}") for m in module_names()}
    for mod in modules.values():
        if hasattr(mod, "check_device"):
            mod.check_device = lambda x: None
    rec = Recorder()
    objects = jit_objects(modules)
    for kernel, obj in objects.items():
        rec.patch(kernel, obj)
    run_launchers(modules)
    jobs = [launch for launch in rec.launches.values() if wanted == ["all"] or f"{launch.kernel}@{launch.target}"
            in wanted]
    with ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:
        errors = list(pool.map(Launch.error, jobs))
    jitted, kernels = jit_names()
    Path(out_path).write_text(json.dumps({
        "jitted": jitted, "kernels": kernels, "objects": sorted(objects),
        "launched": sorted({launch.kernel for launch in rec.launches.values()}),
        "results": [[j.kernel, j.target, j.label, err] for j, err in zip(jobs, errors)],
        "seconds": time.perf_counter() - start}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
