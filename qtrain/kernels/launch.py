"""A cheaper host path for launching compiled Triton kernels.

``launch_kernel(fn, grid, *args, **meta)`` does what ``fn[grid](*args, **meta)`` does — same compiled kernel, same
arguments, same stream — with less host work per call: Triton's own binder still computes the specialization
of the arguments (dtypes, 16-byte alignment, integers equal to 1, constexpr values), but the compiled kernel is
found by a dict lookup on that specialization and launched directly, skipping Triton 3.6's per-call work around
it (the cache-key string built from the options on every call, the check that the kernel's global values have
not changed, the launch-hook plumbing). A specialization seen for the first time, Triton's interpreter, a launch
hook or Triton's debug knob take Triton's path (which compiles, checks and caches as usual).

What this gives up: Triton's check that a kernel's module-level globals still hold the values it was compiled
with. qtrain's kernels read module constants only as ``tl.constexpr`` at compile time; a process that changes
one after the first launch of a specialization must call :func:`clear`.

``FAST`` (module switch): False sends every call through Triton's path (benchmarks/op_dispatch.py times both).
"""
from __future__ import annotations

from triton import knobs
from triton.compiler import CompiledKernel
from triton.runtime.driver import driver

from qtrain.kernels._common import interpreting

FAST = True
_CACHE: dict = {}


def clear() -> None:
    """Forget the compiled kernels found so far (the next launch of each takes Triton's path once)."""
    _CACHE.clear()


def launch_kernel(fn, grid: tuple, *args, **meta):
    """``fn[grid](*args, **meta)`` for a ``triton.jit``/``gluon.jit`` function ``fn`` (not an autotuner);
    ``grid`` a tuple of 1–3 ints. Returns what Triton's launch returns (the compiled kernel) on Triton's path and
    None on the fast one."""
    if not FAST or interpreting() or not fn.device_caches or knobs.runtime.debug \
            or knobs.compilation.instrumentation_mode or knobs.runtime.launch_enter_hook is not None \
            or knobs.runtime.launch_exit_hook is not None:
        return _triton_path(fn, grid, args, meta)
    device = driver.active.get_current_device()
    caches = fn.device_caches.get(device)
    if caches is None:
        return _triton_path(fn, grid, args, meta)
    bound, specialization, options = caches[4](*args, **meta)
    kernel = _CACHE.get((fn, device, tuple(specialization), tuple(options.items())))
    if kernel is None:
        return _triton_path(fn, grid, args, meta)
    kernel.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
               driver.active.get_current_stream(device), kernel.function, kernel.packed_metadata, None, None, None,
               *bound.values())
    return None


def _triton_path(fn, grid, args, meta):
    """Triton's launch; the compiled kernel it used is remembered under the arguments' specialization."""
    kernel = fn[grid](*args, **meta)
    if FAST and isinstance(kernel, CompiledKernel):
        device = driver.active.get_current_device()
        _, specialization, options = fn.device_caches[device][4](*args, **meta)
        _CACHE[(fn, device, tuple(specialization), tuple(options.items()))] = kernel
    return kernel
