"""The quantizer plan: each preset's per-GEMM paths and reuse, and specs no path runs rejected when a layer is
built (before any training), with what is accepted."""
from __future__ import annotations

import json

import pytest
import torch

import qtrain
from qtrain import recipes
from qtrain.nn.linear import QuantLinear
from qtrain.nn.plan import build_plan
from qtrain.recipes import ROW, TENSOR, Fallback, GemmSpec, Hadamard, OperandSpec, Recipe, block, int8


def test_preset_paths_and_reuse():
    paths = {name: tuple(getattr(build_plan(r), g).path for g in ("fprop", "dgrad", "wgrad"))
             for name, r in recipes.PRESETS.items()}
    assert paths["bf16"] == ("hp", "hp", "hp")
    assert paths["switchback"] == ("int8", "int8", "hp")
    assert paths["fallback"] == ("fallback", "fallback", "fallback")
    assert build_plan(recipes.get("switchback")).reuse_wt
    assert build_plan(recipes.get("fallback")).reuse_wt                   # 128×128 blocks transpose exactly
    assert build_plan(recipes.get("fallback")).fallback_gemms == ("fprop", "dgrad", "wgrad")
    sr = Recipe("sr", fprop=GemmSpec(int8(ROW, "stochastic"), int8(TENSOR)))
    assert build_plan(sr).fprop.path == "emulated" and not build_plan(sr).reuse_wt


UNSUPPORTED = {
    "transform": (Recipe("t", fprop=GemmSpec(OperandSpec("int4", TENSOR, transform=Hadamard(64)), int8(TENSOR))),
                  "transform H64 is not implemented"),
    "int8 out": (Recipe("o", fprop=GemmSpec(int8(ROW), int8(TENSOR), out="int8_blocks")), "out='int8_blocks'"),
    "dataflow": (Recipe("d", dataflow=True), "dataflow"),
    "fallback rhs": (Recipe("f", fprop=GemmSpec(int8(block(1, 128)), int8(block(128, 128), fallback=Fallback()))),
                     "lhs .*only"),
    "fallback rows": (Recipe("r", fprop=GemmSpec(int8(ROW, fallback=Fallback()), int8(TENSOR))),
                      "fallback needs"),
    "save int8 blocks": (Recipe("s", fprop=recipes.get("fallback").fprop, save_int8_input=True), "saves the INT8"),
}


@pytest.mark.parametrize("case", UNSUPPORTED)
def test_unsupported_specs_fail_when_the_layer_is_built(case):
    recipe, msg = UNSUPPORTED[case]
    with pytest.raises(ValueError, match=msg):
        QuantLinear(8, 8, recipe=recipe)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match=msg):
        qtrain.convert(model, recipe)
    assert isinstance(model[0], torch.nn.Linear)                          # nothing half-converted


def test_recipe_file_round_trip_and_unknown_keys(tmp_path):
    r = recipes.get("fallback")
    d = json.loads(json.dumps(r.to_dict()))
    assert Recipe.from_dict(d) == r
    d["wgrad"]["lhs"]["fallback"]["targett"] = 0.1
    with pytest.raises(ValueError, match=r"fallback\.wgrad\.lhs\.fallback: unknown key\(s\) targett; accepted: target"):
        Recipe.from_dict(d)
    with pytest.raises(ValueError, match="unknown key"):
        Recipe.from_dict({"name": "x", "fprop": {"lhs": {"format": "int8", "granule": "row"}}})
    with pytest.raises(TypeError, match="transform"):
        OperandSpec("int8", ROW, transform="hadamard")


def test_sr_block_operands_take_the_block_path():
    sr = Recipe("srb", fprop=GemmSpec(int8(block(32, 32)), int8(block(32, 32))),
                dgrad=GemmSpec(int8(block(1, 64), "stochastic"), int8(block(64, 64))))
    plan = build_plan(sr)
    assert plan.dgrad.path == "block" and plan.dgrad.blocks == (1, 64, 64)
    dy = torch.randn(40, 70)
    a = plan.dgrad.quantize(dy, "lhs")
    rtn = plan.fprop.quantize(dy, "lhs")
    assert a.path == "block" and a.scale.shape == (40, 2)
    assert ((a.dequantize() - dy).abs() <= a.dequantize().abs().max()).all()
    v = dy / a.scale.repeat_interleave(64, 1)[:, :70]
    assert ((a.q.float() - v).abs() < 1).all() and rtn.rows == 32


def test_jetfire_presets_plan():
    for name, blocks in (("jetfire", ((32, 32, 32),) * 3), ("jetfire_wide", ((1, 128, 128), (1, 128, 128),
                                                                             (1, 1, 128)))):
        r = recipes.get(name)
        plan = build_plan(r)
        assert r.dataflow and (plan.fprop.path, plan.dgrad.path, plan.wgrad.path) == ("block",) * 3
        assert (plan.fprop.blocks, plan.dgrad.blocks, plan.wgrad.blocks) == blocks and plan.reuse_wt
        assert r.dgrad.lhs.rounding == r.wgrad.lhs.rounding == "stochastic" and r.fprop.lhs.rounding == "nearest"
        QuantLinear(64, 64, recipe=r)                 # a plain layer runs the same GEMMs (dequantized outputs)


DATAFLOW_REJECTED = {
    "hp gemm": (Recipe("d1", fprop=recipes.get("jetfire").fprop, dgrad=recipes.get("jetfire").dgrad,
                       dataflow=True), "wgrad runs on the 'hp' path; a dataflow recipe"),
    "row": (Recipe("d2", fprop=GemmSpec(int8(ROW), int8(TENSOR), out="int8_blocks"), dataflow=True),
            "fprop runs on the 'int8' path"),
    "fprop dequant": (Recipe("d3", fprop=GemmSpec(int8(block(32, 32)), int8(block(32, 32))),
                             dgrad=recipes.get("jetfire").dgrad, wgrad=recipes.get("jetfire").wgrad, dataflow=True),
                      "fprop out='dequant' in a dataflow recipe"),
    "wgrad int8 out": (Recipe("d4", fprop=recipes.get("jetfire").fprop, dgrad=recipes.get("jetfire").dgrad,
                              wgrad=GemmSpec(int8(block(32, 32), "stochastic"), int8(block(32, 32)),
                                             out="int8_blocks"), dataflow=True), "wgrad out='int8_blocks'"),
    "block out without dataflow": (Recipe("d5", fprop=GemmSpec(int8(block(32, 32)), int8(block(32, 32)),
                                                               out="int8_blocks")), "out='int8_blocks'"),
}


@pytest.mark.parametrize("case", DATAFLOW_REJECTED)
def test_dataflow_recipes_need_block_gemms(case):
    recipe, msg = DATAFLOW_REJECTED[case]
    with pytest.raises(ValueError, match=msg):
        build_plan(recipe)
