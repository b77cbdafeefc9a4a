from pathlib import Path

import pytest

from qtrain import recipes
from qtrain.recipes import ROW, TENSOR, GemmSpec, OperandSpec, Recipe, block


def test_presets_describe_switchback():
    sb = recipes.get("switchback")
    assert sb.fprop.lhs == OperandSpec("int8", ROW) and sb.fprop.rhs == OperandSpec("int8", TENSOR)
    assert sb.dgrad.lhs.granularity == ROW and sb.dgrad.rhs.granularity == TENSOR
    assert not sb.wgrad.quantized and not sb.save_int8_input
    assert recipes.get("switchback_m").save_int8_input
    assert not recipes.get("bf16").quantized


def test_unknown_recipe_lists_valid_names():
    with pytest.raises(ValueError, match="unknown recipe 'nope'.*bf16.*switchback"):
        recipes.get("nope")
    with pytest.raises(TypeError):
        recipes.get(3)


def test_recipe_is_frozen_hashable_and_round_trips():
    r = Recipe("custom", fprop=GemmSpec(OperandSpec("int8", block(32, 32), "stochastic"),
                                        OperandSpec("int4", TENSOR)))
    assert hash(r) == hash(Recipe.from_dict(r.to_dict()))
    assert Recipe.from_dict(r.to_dict()) == r
    with pytest.raises(Exception):
        r.name = "x"
    assert "int8/block32x32/SR" in str(r)


@pytest.mark.parametrize("bad", [dict(format="int3"), dict(rounding="up")])
def test_operand_spec_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        OperandSpec(**bad)


def test_granularity_validation():
    with pytest.raises(ValueError):
        recipes.Granularity("block")
    with pytest.raises(ValueError):
        block(0, 4)


@pytest.mark.parametrize("name", ["jetfire", "jetfire_wide"])
def test_jetfire_presets_round_trip_and_describe(name):
    import json
    r = recipes.get(name)
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r and r.description
    assert r.dataflow and not r.save_int8_input and r.fprop.out == "int8_blocks" and r.wgrad.out == "dequant"
    for gemm in (r.fprop, r.dgrad, r.wgrad):                  # one c along K on both operands of every GEMM
        assert gemm.lhs.granularity.block[1] == gemm.rhs.granularity.block[1]
    assert r.fprop.lhs.rounding == r.fprop.rhs.rounding == r.dgrad.rhs.rounding == "nearest"
    assert r.dgrad.lhs.rounding == r.wgrad.lhs.rounding == "stochastic"
    assert "INT8 data flow" in str(r)
    if name == "jetfire":
        assert {s.granularity.block for g in (r.fprop, r.dgrad, r.wgrad) for s in (g.lhs, g.rhs)} == {(32, 32)}


RECIPE_FILES = Path(__file__).parents[1] / "benchmarks" / "recipes"


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPE_FILES.glob("*.json")))
def test_benchmark_recipe_files_build(name):
    """Every recipe file the benchmarks and the README's GPU commands name loads and converts a small model
    (one forward and backward on the CPU), so a change of the recipe format cannot leave them stale."""
    import torch

    import qtrain
    from qtrain.models import build
    from qtrain.train.loop import resolve_recipe

    recipe = resolve_recipe(str(RECIPE_FILES / name))
    torch.manual_seed(0)
    model = build("llama-tiny", vocab_size=64, n_layer=1)
    qtrain.convert(model, recipe, filter_fn=lambda m, name: "lm_head" not in name)
    x = torch.randint(0, 64, (2, 32))
    _, loss = model(x, x)
    loss.backward()
    assert torch.isfinite(loss) and qtrain.nn.quantized_linear_names(model)
