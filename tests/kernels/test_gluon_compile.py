"""The Gluon (Hopper) kernels compile for sm_90 on the CPU, with the constexpr combinations their launchers and
benchmarks use (:mod:`gluon_compile`, one subprocess with the interpreter off), without register spills, and their
SASS has the shape the design relies on: 256-wide scale blocks halve the promotions (int→float conversions) per
integer MMA, and the 1-row column scales' layout conversion replaces 32 global loads a thread per scale block."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("triton.experimental.gluon")

import qtrain  # noqa: E402

HELPER = Path(__file__).with_name("gluon_compile.py")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("gluon_compile") / "report.json"
    path = os.pathsep.join(p for p in (str(Path(qtrain.__file__).parents[1]), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, str(HELPER), str(out)], capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": path}, timeout=600)
    assert proc.returncode == 0, f"gluon_compile.py failed:\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


def _find(rows, **constexprs):
    want = [f"{k}={v}" for k, v in constexprs.items()]
    found = [r for r in rows if all(w in r[1].split() for w in want)]
    assert len(found) == 1, (constexprs, [r[1] for r in found])
    return found[0][3]


def test_every_launch_fits_shared_memory(rows):
    """Ring stages + epilogue tile + barriers fit the 227 KB a Hopper block may allocate (the host's
    ``stages_for`` budget is what keeps them there)."""
    assert all(r[4] is not None and r[4] <= 227 * 1024 for r in rows), [(r[1], r[4]) for r in rows]


def test_every_launch_compiles_without_spills(rows):
    assert {r[0] for r in rows} == {"block_gemm_gluon._block_gemm_ws_kernel",
                                    "int8_gemm_gluon._gluon_int8_gemm_kernel"}
    failures = [(r[1], r[2]) for r in rows if r[2] is not None]
    assert not failures, failures[0]
    counted = [r for r in rows if r[3]]
    if not counted:
        pytest.skip("Triton ships no cuobjdump here: the SASS is not counted")
    assert all(r[3]["STL"] == 0 and r[3]["LDL"] == 0 for r in counted), [r[1] for r in counted if r[3]["STL"]]


@pytest.mark.parametrize("rb", [128, 1])
def test_wide_scale_blocks_halve_promotions_per_mma(rows, rb):
    one = _find(rows, RB=rb, KP=1, SB_CVT=False, FALLBACK=False, MAGIC=False)
    two = _find(rows, RB=rb, KP=2, SB_CVT=False)
    if not one:
        pytest.skip("Triton ships no cuobjdump here: the SASS is not counted")
    assert one["I2FP"] > 0 and one["I2FP"] == two["I2FP"]           # one promotion per scale block in the loop
    assert two["IGMMA"] == 2 * one["IGMMA"]                          # ... over twice the MMAs


@pytest.mark.parametrize("rb", [128, 1])
def test_fallback_term_chains_both_steps_of_a_wide_block(rows, rb):
    one = _find(rows, RB=128, KP=1, FALLBACK=True, HAS_BIAS=False, SPLIT=1)
    two = _find(rows, RB=rb, KP=2, FALLBACK=True, HAS_BIAS=False, SPLIT=1)
    if not one:
        pytest.skip("Triton ships no cuobjdump here: the SASS is not counted")
    assert two["IGMMA"] == 2 * one["IGMMA"]             # A·B and A2·B: two 128-deep steps each per scale block
    assert two["STL"] == 0 and two["LDL"] == 0


def test_column_scale_conversion_replaces_global_loads(rows):
    plain, cvt = _find(rows, RB=1, KP=1, SB_CVT=False), _find(rows, RB=1, KP=1, SB_CVT=True, FALLBACK=False)
    if not plain:
        pytest.skip("Triton ships no cuobjdump here: the SASS is not counted")
    assert plain["LDG"] - cvt["LDG"] >= 2 * 30          # 32 loads a thread per scale block, in each consumer
    assert cvt["LDS"] > plain["LDS"]


@pytest.mark.parametrize("bk", [128, 256])
@pytest.mark.parametrize("rb", [128, 1])
def test_split_store_halves_the_epilogue_tile_for_a_fourth_stage(rows, rb, bk):
    """fp32 fallback output stored in two column halves: a 32 KB epilogue tile, so 4 ring stages (3 with the
    whole 64 KB tile), two TMA stores per warpgroup, and no layout conversion through shared memory."""
    from qtrain.kernels import block_gemm_gluon as bg

    assert bg.stages_for(torch.float32, True) == 3 and bg.stages_for(torch.float32, True, split=2) == 4
    assert bg.split_store(torch.float32, True) == 2 and bg.split_store(torch.bfloat16, True) == 1
    kp = bk // bg.BLOCK_K
    split = _find(rows, RB=rb, KP=kp, FALLBACK=True, HAS_BIAS=True, SPLIT=2, STAGES=4)
    whole = _find(rows, RB=rb, KP=kp, FALLBACK=True, HAS_BIAS=True, SPLIT=1, STAGES=3)
    shared = [r[4] for r in rows if all(w in r[1].split() for w in (f"RB={rb}", f"KP={kp}", "SPLIT=2"))]
    assert shared and shared[0] >= 4 * 48 * 1024 + 32 * 1024
    if not split:
        pytest.skip("Triton ships no cuobjdump here: the SASS is not counted")
    assert split["UTMASTG"] == 2 * whole["UTMASTG"] == 4 and split["STG"] == 0
    assert split["IGMMA"] == whole["IGMMA"] and split["LDS"] == whole["LDS"]
