"""Every ``@triton.jit`` kernel of ``qtrain/kernels/*.py`` compiles, down to a cubin, for Hopper (sm_90) and Ampere
(sm_80) with the arguments, constexprs and autotune configs its launchers really give it on a GPU — on the CPU, no
GPU needed (the interpreter runs code the compiler rejects, e.g. a ``tl.constexpr`` assigned in a loop).

One subprocess (:mod:`gpu_compile`, interpreter off) captures the launches of the public launchers and compiles the
distinct ones; each test reads its kernel's results. Gluon kernels (``*_gluon.py``) need Gluon's front end:
``test_gluon_compile.py`` compiles those. A kernel no launcher call reaches fails
:func:`test_every_kernel_is_launched`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

import qtrain  # noqa: E402

from .gpu_compile import TARGETS, jit_names  # noqa: E402

HELPER = Path(__file__).with_name("gpu_compile.py")
JITTED, KERNELS = jit_names()


@pytest.fixture(scope="module")
def report(request, tmp_path_factory):
    """The subprocess's report, compiling only the (kernel, target) pairs this session runs."""
    wanted = [f"{item.callspec.params['kernel']}@{item.callspec.params['target']}" for item in request.session.items
              if getattr(item, "originalname", None) == "test_compiles" and hasattr(item, "callspec")]
    out = tmp_path_factory.mktemp("gpu_compile") / "report.json"
    path = os.pathsep.join(p for p in (str(Path(qtrain.__file__).parents[1]), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, str(HELPER), str(out), *wanted], capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": path}, timeout=600)
    assert proc.returncode == 0, f"gpu_compile.py failed:\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("kernel", KERNELS)
def test_compiles(kernel, target, report):
    results = [(label, err) for k, t, label, err in report["results"] if (k, t) == (kernel, target)]
    assert results, f"no launcher call reaches {kernel}: add a call to gpu_compile.LAUNCHES"
    failures = [(label, err) for label, err in results if err is not None]
    if failures:
        pytest.fail(f"{len(failures)} of {len(results)} launches of {kernel} fail to compile for {target}; first: "
                    f"{failures[0][0]}\n{failures[0][1]}", pytrace=False)


def test_every_kernel_is_launched(report):
    assert KERNELS, "no @triton.jit kernel found"
    missed = set(report["objects"]) - set(JITTED)
    assert not missed, f"jitted objects the source scan missed (not decorated @triton.jit?): {missed}"
    assert report["launched"] == KERNELS, (f"kernels no launcher call reaches: {set(KERNELS) - set(report['launched'])}"
                                           f"; launched, not found in the sources: "
                                           f"{set(report['launched']) - set(KERNELS)}")
