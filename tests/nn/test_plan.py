"""The quantizer plan: each preset's per-GEMM paths and reuse, and specs no path runs rejected when a layer is
built (before any training), with what is accepted."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import qtrain
from qtrain import recipes
from qtrain.nn.linear import QuantLinear
from qtrain.nn.plan import build_plan
from qtrain.recipes import (ROW, TENSOR, BitSplit, Fallback, GemmSpec, Hadamard, LearnedStep, OperandSpec, Recipe,
                            block, int8)


def test_preset_paths_and_reuse():
    paths = {name: tuple(getattr(build_plan(r), g).path for g in ("fprop", "dgrad", "wgrad"))
             for name, r in recipes.PRESETS.items()}
    assert paths["bf16"] == ("hp", "hp", "hp")
    assert paths["switchback"] == ("int8", "int8", "hp")
    assert paths["fallback"] == ("fallback", "fallback", "fallback")
    assert paths["int4"] == ("hq_int4", "bitsplit_lss", "bitsplit_lss")
    assert build_plan(recipes.get("switchback")).reuse_wt
    assert build_plan(recipes.get("fallback")).reuse_wt                   # 128×128 blocks transpose exactly
    assert build_plan(recipes.get("fallback")).fallback_gemms == ("fprop", "dgrad", "wgrad")
    sr = Recipe("sr", fprop=GemmSpec(int8(ROW, "stochastic"), int8(TENSOR)))
    assert build_plan(sr).fprop.path == "emulated" and not build_plan(sr).reuse_wt


UNSUPPORTED = {
    "transform": (Recipe("t", fprop=GemmSpec(OperandSpec("int4", TENSOR, transform=Hadamard(64)), int8(TENSOR))),
                  "'hq_int4' path only"),
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
    for name, blocks, reuse_wt in (("jetfire", ((32, 32, 32),) * 3, True),
                                   ("jetfire_wide", ((1, 128, 256), (1, 128, 256), (1, 128, 256)), False)):
        r = recipes.get(name)
        plan = build_plan(r)
        assert r.dataflow and (plan.fprop.path, plan.dgrad.path, plan.wgrad.path) == ("block",) * 3
        assert (plan.fprop.blocks, plan.dgrad.blocks, plan.wgrad.blocks) == blocks and plan.reuse_wt == reuse_wt
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


_HQ = recipes.get("int4").fprop.lhs
_BS = recipes.get("int4").dgrad.lhs
INT4_REJECTED = {
    "hq lhs only": (Recipe("a", fprop=GemmSpec(_HQ, int8(TENSOR))), "'hq_int4' path only"),
    "different blocks": (Recipe("b", fprop=GemmSpec(_HQ, OperandSpec("int4", TENSOR, transform=Hadamard(64),
                                                                   step=LearnedStep()))), "same Hadamard"),
    "hq fprop, mixed backward": (Recipe("c", fprop=GemmSpec(_HQ, _HQ), dgrad=GemmSpec(_BS, _HQ)),
                                 "INT4 paths go together"),
    "bitsplit without hq": (Recipe("d", dgrad=GemmSpec(_BS, int8(TENSOR))), "'bitsplit_lss' path only"),
    "wgrad rhs not reused": (Recipe("e", fprop=GemmSpec(_HQ, _HQ), dgrad=GemmSpec(_BS, _HQ),
                                    wgrad=GemmSpec(_BS, int8(TENSOR))), r"rhs == fprop\.lhs"),
    "bitsplit RTN": (Recipe("f", fprop=GemmSpec(_HQ, _HQ), dgrad=GemmSpec(OperandSpec("int4", TENSOR,
                                                                                     split=BitSplit()), _HQ),
                            wgrad=GemmSpec(_BS, _HQ)), "stochastic"),
    "save int8": (Recipe("g", fprop=GemmSpec(_HQ, _HQ), dgrad=GemmSpec(_BS, _HQ), wgrad=GemmSpec(_BS, _HQ),
                         save_int8_input=True), "save_int8_input"),
    "split scales differ": (Recipe("h", fprop=GemmSpec(_HQ, _HQ),
                                   dgrad=GemmSpec(dataclasses.replace(_BS, granularity=TENSOR), _HQ),
                                   wgrad=GemmSpec(_BS, _HQ)), "lhs granularity must agree"),
}


def test_int4_bit_split_per_row_plans():
    bs = dataclasses.replace(_BS, granularity=ROW)
    r = Recipe("int4_row", fprop=GemmSpec(_HQ, _HQ), dgrad=GemmSpec(bs, _HQ), wgrad=GemmSpec(bs, _HQ))
    plan = build_plan(r)
    assert (plan.fprop.path, plan.dgrad.path, plan.wgrad.path) == ("hq_int4", "bitsplit_lss", "bitsplit_lss")


def test_int4_preset_paths():
    plan = build_plan(recipes.get("int4"))
    assert (plan.fprop.path, plan.dgrad.path, plan.wgrad.path) == ("hq_int4", "bitsplit_lss", "bitsplit_lss")
    assert plan.int4 and not plan.reuse_wt and not plan.weight_quantized


@pytest.mark.parametrize("case", INT4_REJECTED)
def test_int4_rejections_name_what_is_accepted(case):
    recipe, msg = INT4_REJECTED[case]
    with pytest.raises(ValueError, match=msg):
        QuantLinear(8, 8, recipe=recipe)


def test_int4_schema_validation_and_round_trip():
    r = recipes.get("int4")
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert "H≤256/LSQ" in str(r) and "int4/row/SR/bitsplit/LSS(1.9M)" in str(r) and r.description
    with pytest.raises(ValueError, match="INT4 per-tensor"):
        OperandSpec("int8", TENSOR, step=LearnedStep())
    with pytest.raises(ValueError, match="INT4 per-tensor"):
        OperandSpec("int4", ROW, step=LearnedStep())
    with pytest.raises(ValueError, match="per tensor or per row"):
        OperandSpec("int4", block(1, 128), split=BitSplit())
    with pytest.raises(ValueError, match="budget"):
        BitSplit(budget=0.0)
    with pytest.raises(ValueError, match="budget"):
        BitSplit(budget=3)
    with pytest.raises(TypeError, match="search"):
        Hadamard(64, search="yes")
    with pytest.raises(TypeError, match="step"):
        OperandSpec("int4", TENSOR, step=True)
    d = json.loads(json.dumps(r.to_dict()))
    d["dgrad"]["lhs"]["split"]["budgett"] = 1
    with pytest.raises(ValueError, match=r"int4\.dgrad\.lhs\.split: unknown key\(s\) budgett; accepted: sampling, "
                                         "budget"):
        Recipe.from_dict(d)
