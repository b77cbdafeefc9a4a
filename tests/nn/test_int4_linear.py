"""QuantLinear with the `int4` recipe (METHODS.md § INT4 training): forward/backward SQNR reported (DESIGN.md: INT4
SQNR reported, HQ beats plain INT4 on outlier data), the backward unbiased around the LSQ autograd reference,
per-layer state (LSQ steps, Hadamard block) in state_dict, kernel path = reference path, torch.compile, no host
synchronization in a training step."""
from __future__ import annotations

import collections
import copy
import dataclasses
import math

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

import qtrain
from qtrain import ops
from qtrain.models import ModelConfig, build_from_config
from qtrain.nn import linear as qlinear
from qtrain.nn.functional import reseed
from qtrain.nn.linear import QuantLinear
from qtrain.quant import sqnr
from qtrain.quant.hadamard import hadamard_matrix, block_hadamard
from qtrain.quant.lsq import fake_quantize_lsq, lsq_init, mse_step
from qtrain.quant.testing import outlier_data
from qtrain.recipes import ROW, BitSplit, GemmSpec, OperandSpec, Recipe, TENSOR

INT4 = qtrain.recipes.get("int4")
PLAIN_INT4 = Recipe("plain_int4", fprop=GemmSpec(OperandSpec("int4", TENSOR), OperandSpec("int4", TENSOR)),
                    dgrad=GemmSpec(OperandSpec("int4", TENSOR, "stochastic"), OperandSpec("int4", TENSOR)),
                    wgrad=GemmSpec(OperandSpec("int4", TENSOR, "stochastic"), OperandSpec("int4", TENSOR)))


def with_split(sampling=True, budget=1.0, granularity=TENSOR):
    """``int4`` with dY's bit split scaled per ``granularity`` (TENSOR: METHODS.md's; ROW: the preset's) and the
    given leverage-score sampling, in dgrad and wgrad."""
    bs = dataclasses.replace(INT4.dgrad.lhs, granularity=granularity, split=BitSplit(sampling, budget))
    return dataclasses.replace(INT4, name=f"int4_{granularity.kind}_{sampling}_{budget}",
                               dgrad=GemmSpec(bs, INT4.dgrad.rhs), wgrad=GemmSpec(bs, INT4.wgrad.rhs))


FPROP_ONLY = dataclasses.replace(INT4, name="int4_fprop_only", dgrad=GemmSpec(), wgrad=GemmSpec())


def _layer(ref, recipe):
    """A QuantLinear with copies of ``ref``'s parameters (so gradients do not mix)."""
    q = QuantLinear.from_module(nn.Linear(ref.in_features, ref.out_features), recipe)
    q.weight, q.bias = nn.Parameter(ref.weight.detach().clone()), nn.Parameter(ref.bias.detach().clone())
    return q


def _step(layer, x, dy):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.weight.grad


def test_int4_forward_backward_sqnr_and_hq_beats_plain():
    torch.manual_seed(0)
    reseed(0)
    ref = nn.Linear(512, 256)
    results = {}
    for data in ("normal", "outlier"):
        x = torch.randn(512, 512) if data == "normal" else outlier_data(512, 512, magnitude=50.0, seed=1,
                                                                       pattern="scattered")
        dy = torch.randn(512, 256)
        want = _step(ref, x, dy)
        ref.weight.grad = None
        for name, recipe in (("int4", INT4), ("int4 no sampling", with_split(False)), ("plain", PLAIN_INT4)):
            got = _step(_layer(ref, recipe), x, dy)
            results[data, name] = [sqnr(w, g) for w, g in zip(want, got)]
    for k, v in results.items():
        print(k, "SQNR y/dx/dw dB:", " / ".join(f"{s:.1f}" for s in v))
    # measured (CPU): normal y 12.1 dB (plain INT4 13.7), dx/dw one sampled draw ~4 dB, without sampling
    # ~15 dB; scattered outliers y 11.6 dB vs plain INT4 2.2 dB
    assert results["normal", "int4"][0] >= 10                        # INT4 per tensor: ~2 bits of SQNR
    assert results["outlier", "int4"][0] > results["outlier", "plain"][0] + 3      # HQ beats plain INT4
    assert all(s >= 12 for s in results["normal", "int4 no sampling"])
    assert all(s >= 2 for s in results["normal", "int4"] + results["outlier", "int4"])  # one LSS draw: noisy


def test_row_split_gradients_on_tokens_of_different_scale():
    """dY whose rows (tokens) differ in scale, as output gradients do: the bit split scaled per row keeps dx and
    dw near the full-precision-dY gradients (the int4_fprop_only ablation: the same forward) where one scale per
    tensor loses most rows to the low part; with sampling the estimate stays unbiased (its mean converges)."""
    torch.manual_seed(0)
    reseed(3)
    ref = nn.Linear(256, 128)
    x = torch.randn(512, 256)
    dy = torch.randn(512, 128) * torch.exp(torch.randn(512, 1) * 1.5)
    base = _layer(ref, FPROP_ONLY)
    base(x)                                                                        # calibrates
    want = _step(base, x, dy)

    def grads(recipe, n=1):
        layer = _layer(ref, recipe)
        layer(x)
        layer.int4_step.data.copy_(base.int4_step.data)
        layer._hq_b = base._hq_b
        total = None
        for _ in range(n):
            layer.weight.grad = None
            g = [t.clone() for t in _step(layer, x, dy)[1:]]
            total = g if total is None else [a + b for a, b in zip(total, g)]
        return [t / n for t in total]

    tensor = grads(with_split(False))
    row = grads(with_split(False, granularity=ROW))
    db = {k: [sqnr(w, g) for w, g in zip(want[1:], v)] for k, v in (("tensor", tensor), ("row", row))}
    print("SQNR vs full-precision dY (dx, dw) dB:", db)       # measured (CPU): tensor 21 dB, row 32 dB
    assert all(r >= 27 for r in db["row"]) and all(r > t + 6 for r, t in zip(db["row"], db["tensor"]))
    sampled = grads(with_split(True, 1.5, ROW), n=32)       # 1.5·M: more sampling than the preset's 1.9·M
    one = grads(with_split(True, 1.5, ROW))
    print("sampled, one draw / mean of 32:", [sqnr(w, g) for w, g in zip(want[1:], one)],
          [sqnr(w, g) for w, g in zip(want[1:], sampled)])
    assert all(sqnr(w, g) >= 25 for w, g in zip(want[1:], one))        # measured 30.5 dB: sampling costs little
    assert all(sqnr(w, g) >= 28 for w, g in zip(want[1:], sampled))


def _lsq_reference(layer, ref, x, dy):
    """``(y, (dx, dw, dstep))`` of autograd through fake_quantize_lsq(XH)·fake_quantize_lsq(WH)ᵀ + b with the
    calibrated ``layer``'s Hadamard block and steps (``ref``'s weight and bias)."""
    b, K = layer._hq_b, x.shape[1]
    st = layer.int4_step.detach().clone().requires_grad_()
    xr, wr = x.clone().requires_grad_(), ref.weight.detach().clone().requires_grad_()
    h = torch.block_diag(*[hadamard_matrix(b)] * (K // b))
    yr = fake_quantize_lsq(xr @ h, st[0:1]) @ fake_quantize_lsq(wr @ h, st[1:2]).t() + ref.bias.detach()
    yr.backward(dy)
    return yr.detach(), (xr.grad, wr.grad, st.grad)


@pytest.mark.parametrize("granularity", [TENSOR, ROW], ids=["tensor", "row"])
def test_backward_is_unbiased_around_the_lsq_reference(granularity):
    """The mean of many sampled backward passes converges to autograd through fake_quantize_lsq(XH)·(WH)ᵀ, with
    dY's split scaled per tensor or per row (no deterministic error: METHODS.md's ±6 clamps had one per row)."""
    torch.manual_seed(0)
    reseed(1)
    ref = nn.Linear(128, 96)
    x = outlier_data(256, 128, magnitude=20.0, seed=2)
    dy = torch.randn(256, 96)
    layer = _layer(ref, with_split(True, 1.0, granularity))   # budget M: the most sampling noise
    xx = x.clone().requires_grad_()
    layer(xx)                                                                     # calibrates
    yr, want = _lsq_reference(layer, ref, x, dy)
    sums, errs = None, {}
    for n in range(1, 65):
        for t in (xx, layer.weight, layer.int4_step):
            t.grad = None
        y = layer(xx)
        y.backward(dy)
        got = (xx.grad, layer.weight.grad, layer.int4_step.grad)
        sums = got if sums is None else tuple(a + g for a, g in zip(sums, got))
        if n in (4, 64):
            errs[n] = [sqnr(w, s / n) for w, s in zip(want, sums)]
    assert sqnr(yr, y.detach()) > 100                                   # forward: the same numbers
    print("SQNR vs LSQ reference (dx, dw, dstep) after 4 / 64 draws:", errs)
    for a, c in zip(errs[4], errs[64]):
        assert c > a + 6                                                          # 16× draws: ~12 dB
    assert errs[64][0] > 15 and errs[64][1] > 15 and errs[64][2] > 15
    full = _layer(ref, with_split(False, granularity=granularity))
    full(x)
    full.int4_step.data.copy_(layer.int4_step.data)
    g = _step(full, x, dy)
    assert sqnr(want[0], g[1]) > 25 and sqnr(want[1], g[2]) > 25                 # no sampling: bit split only


def test_fprop_only_ablation_is_the_lsq_reference_exactly():
    """dgrad/wgrad 'hp' (the ablation of the gradient quantization): full-precision dY against fprop's quantized
    operands — autograd through fake_quantize_lsq(XH)·fake_quantize_lsq(WH)ᵀ, up to fp32 rounding."""
    plan = qtrain.nn.plan.build_plan(FPROP_ONLY)
    assert (plan.fprop.path, plan.dgrad.path, plan.wgrad.path) == ("hq_int4", "hp", "hp") and plan.int4
    torch.manual_seed(0)
    ref = nn.Linear(128, 96)
    x = outlier_data(256, 128, magnitude=20.0, seed=2)
    dy = torch.randn(256, 96)
    layer = _layer(ref, FPROP_ONLY)
    layer(x)                                                                      # calibrates
    yr, want = _lsq_reference(layer, ref, x, dy)
    xx = x.clone().requires_grad_()
    y = layer(xx)
    y.backward(dy)
    assert sqnr(yr, y.detach()) > 100
    for w, g in zip(want, (xx.grad, layer.weight.grad, layer.int4_step.grad)):
        assert sqnr(w, g) > 60, sqnr(w, g)
    with pytest.raises(ValueError, match="both 'bitsplit_lss' or both 'hp'"):
        qtrain.nn.plan.build_plan(dataclasses.replace(FPROP_ONLY, wgrad=INT4.wgrad))


def relative(recipe):
    """``recipe`` with both fprop operands' LearnedStep relative (dgrad/wgrad reuse fprop's specs)."""
    rel = dataclasses.replace(recipe.fprop.lhs, step=dataclasses.replace(recipe.fprop.lhs.step, relative=True))
    fprop = GemmSpec(rel, rel)
    dgrad = GemmSpec(recipe.dgrad.lhs, rel) if recipe.dgrad.quantized else recipe.dgrad
    wgrad = GemmSpec(recipe.wgrad.lhs, rel) if recipe.wgrad.quantized else recipe.wgrad
    return dataclasses.replace(recipe, name=f"{recipe.name}_rel", fprop=fprop, dgrad=dgrad, wgrad=wgrad)


def test_relative_step_is_lsq_on_the_rms_scaled_step():
    """A relative LearnedStep: the Parameter α is the step over the operand's RMS; the layer is autograd through
    fake_quantize_lsq(XH, α_X·rms(XH))·fake_quantize_lsq(WH, α_W·rms(WH))ᵀ with the RMS a constant (so the
    gradient of α is LSQ's times the RMS), and its first forward uses the preset's steps (α·rms = 2·mean|·|/√7)."""
    recipe = relative(FPROP_ONLY)
    torch.manual_seed(0)
    ref = nn.Linear(128, 96)
    x = outlier_data(256, 128, magnitude=20.0, seed=2)
    dy = torch.randn(256, 96)
    layer, absolute = _layer(ref, recipe), _layer(ref, FPROP_ONLY)
    layer(x), absolute(x)                                                         # calibrate
    b = layer._hq_b
    h = torch.block_diag(*[hadamard_matrix(b)] * (128 // b))
    rms = torch.stack([(x @ h).pow(2).mean().sqrt(), (ref.weight.detach() @ h).pow(2).mean().sqrt()])
    torch.testing.assert_close(layer.int4_step.detach() * rms, absolute.int4_step.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(absolute.int4_step.detach(), torch.stack([lsq_init(x @ h), lsq_init(ref.weight @ h)]),
                               rtol=1e-5, atol=0)
    alpha = layer.int4_step.detach().clone().requires_grad_()
    xr, wr = x.clone().requires_grad_(), ref.weight.detach().clone().requires_grad_()
    st = alpha * rms
    yr = fake_quantize_lsq(xr @ h, st[0:1]) @ fake_quantize_lsq(wr @ h, st[1:2]).t() + ref.bias.detach()
    yr.backward(dy)
    xx = x.clone().requires_grad_()
    y = layer(xx)
    y.backward(dy)
    assert sqnr(yr.detach(), y.detach()) > 100
    for w, g in zip((xr.grad, wr.grad, alpha.grad), (xx.grad, layer.weight.grad, layer.int4_step.grad)):
        assert sqnr(w, g) > 60, sqnr(w, g)


def test_unscaled_step_gradient_drops_only_lsqs_scale():
    """LearnedStep(scaled=False): the same step gradient without LSQ's 1/√(numel·7) (X: M·K values, W: N·K)."""
    torch.manual_seed(0)
    ref = nn.Linear(128, 96)
    x = torch.randn(256, 128)
    dy = torch.randn(256, 96)
    rel = relative(FPROP_ONLY)
    st = dataclasses.replace(rel.fprop.lhs.step, scaled=False)
    op = dataclasses.replace(rel.fprop.lhs, step=st)
    unscaled = dataclasses.replace(rel, name="unscaled", fprop=GemmSpec(op, op))
    grads = []
    for recipe in (rel, unscaled):
        layer = _layer(ref, recipe)
        layer(x)
        _step(layer, x, dy)
        grads.append(layer.int4_step.grad)
    ratio = torch.tensor([math.sqrt(256 * 128 * 7), math.sqrt(96 * 128 * 7)])
    torch.testing.assert_close(grads[1], grads[0] * ratio, rtol=1e-5, atol=0)


@pytest.mark.parametrize("rel", [False, True], ids=["absolute", "relative"])
def test_mse_init_calibrates_the_least_error_steps(rel):
    """LearnedStep(init='mse'): the first forward sets the steps (times the RMS where relative) to mse_step of XH
    and WH at the chosen block; the layer then quantizes with them."""
    torch.manual_seed(0)
    ref = nn.Linear(128, 96)
    x = torch.randn(256, 128)
    st = dataclasses.replace(INT4.fprop.lhs.step, init="mse", relative=rel)
    op = dataclasses.replace(INT4.fprop.lhs, step=st)
    recipe = dataclasses.replace(FPROP_ONLY, name="mse", fprop=GemmSpec(op, op))
    layer = _layer(ref, recipe)
    layer(x)
    b = layer._hq_b
    want = torch.stack([mse_step(block_hadamard(x, b)), mse_step(block_hadamard(ref.weight.detach(), b))])
    got = layer.int4_step.detach()
    if rel:
        got = got * torch.stack([block_hadamard(t, b).pow(2).mean().sqrt() for t in (x, ref.weight.detach())])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="init 'max' is not one of"):
        dataclasses.replace(st, init="max")


def test_report_shows_step_over_rms_and_clipped_share():
    """qtrain.report's INT4 columns: the step over the transformed operand's RMS (LSQ's init: ~0.6 on Gaussian
    data) and the share beyond ±7 steps; an absolute step kept while the weight grows 10× reads 10× smaller and
    clips most of the weight, a relative one keeps its ratio."""
    torch.manual_seed(0)
    x = torch.randn(256, 128)
    rows = {}
    for name, recipe in (("absolute", FPROP_ONLY), ("relative", relative(FPROP_ONLY))):
        model = nn.Sequential(QuantLinear.from_module(nn.Linear(128, 96), recipe))
        with qtrain.track_errors(model):
            model(x)
            before = dict(model[0].stats)
            with torch.no_grad():
                model[0].weight.mul_(10.0)
            model(x)
        rows[name] = (before, model[0].stats, qtrain.report(model))
    before, after, rep = rows["absolute"]
    assert 0.55 < before["w_step_rms"] < 0.65 and before["w_clipped_pct"] < 1.0
    assert after["w_step_rms"] == pytest.approx(before["w_step_rms"] / 10, rel=1e-4)
    assert after["w_clipped_pct"] > 50
    assert "step/RMS x/w" in rep and f"{after['w_step_rms']:.3f}" in rep
    before, after, _ = rows["relative"]
    assert after["w_step_rms"] == pytest.approx(before["w_step_rms"], rel=1e-4) and after["w_clipped_pct"] < 1.0


def test_weight_stats_without_a_forward():
    """QuantLinear.int4_weight_stats: the report's weight columns from the weight and step alone (None before
    calibration and for other recipes)."""
    torch.manual_seed(0)
    layer = QuantLinear.from_module(nn.Linear(128, 96), FPROP_ONLY)
    assert layer.int4_weight_stats() is None
    with qtrain.track_errors(nn.Sequential(layer)):
        layer(torch.randn(64, 128))
    stats = layer.int4_weight_stats()
    assert stats == pytest.approx({k: layer.stats[k] for k in ("w_step_rms", "w_clipped_pct")}, rel=1e-5)
    assert QuantLinear.from_module(nn.Linear(128, 96), qtrain.recipes.get("switchback")).int4_weight_stats() is None


def test_relative_step_follows_the_operand_scale():
    """After calibration, X ×0.5 and W ×3 give the same INT4 codes with a relative step (y ×1.5), while the
    absolute step, fixed at its calibrated value, quantizes the scaled operands differently."""
    torch.manual_seed(0)
    ref = nn.Linear(128, 96, bias=False)
    x = torch.randn(256, 128)
    out = {}
    for name, recipe in (("relative", relative(FPROP_ONLY)), ("absolute", FPROP_ONLY)):
        layer = QuantLinear.from_module(copy.deepcopy(ref), recipe)
        y0 = layer(x).detach()
        with torch.no_grad():
            layer.weight.mul_(3.0)
        out[name] = (y0, layer(0.5 * x).detach())
    y0, y1 = out["relative"]
    torch.testing.assert_close(y1, 1.5 * y0, rtol=1e-5, atol=1e-6)
    y0, y1 = out["absolute"]
    assert sqnr(1.5 * y0, y1) < 40


def test_fprop_only_ablation_takes_16_bit_gradients_in_16_bit_gemms():
    """With a bf16 dY (BF16 autocast) the 'hp' backward runs its GEMMs in bf16 with the dequantized operands
    rounded once, as BF16 training's backward does: close to the fp32 GEMMs (≥ 40 dB), not equal to them."""
    torch.manual_seed(0)
    g = torch.randn(256, 96).bfloat16()
    codes, step = torch.randint(-7, 8, (96, 128), dtype=torch.int8), torch.tensor([0.013])
    got, fp32 = qlinear._hp_mm(g, codes, step), g.float() @ (codes.float() * step)
    assert got.dtype == torch.float32 and 40 < sqnr(fp32, got) < 100
    torch.testing.assert_close(qlinear._hp_mm(g.float(), codes, step), fp32, rtol=0, atol=0)


def test_int4_state_in_state_dict_and_plain_checkpoints():
    torch.manual_seed(0)
    layer = QuantLinear.from_module(nn.Linear(96, 64), INT4)
    assert layer.int4_step.tolist() == [-1.0, -1.0] and layer.hq_block.item() == 0
    x = torch.randn(128, 96)
    layer(x).sum().backward()
    xh = block_hadamard(x, layer._hq_b)
    assert layer.hq_block.item() == layer._hq_b and layer._hq_b in (16, 32, 64, 128)
    assert torch.allclose(layer.int4_step[0], lsq_init(xh))
    assert layer.int4_step.grad is not None and torch.isfinite(layer.int4_step.grad).all()
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "int4_step", "hq_block"}
    fresh = QuantLinear.from_module(nn.Linear(96, 64), INT4)
    fresh.load_state_dict(sd)
    assert fresh._int4_ready and fresh._hq_b == layer._hq_b and torch.equal(fresh.int4_step, layer.int4_step)
    before = fresh.int4_step.detach().clone()
    fresh.load_state_dict(nn.Linear(96, 64).state_dict())                        # a plain model's checkpoint
    assert torch.equal(fresh.int4_step, before)
    model = nn.Sequential(nn.Linear(96, 64))
    qtrain.convert(model, "int4", filter_fn=lambda m, n: True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)                            # built after convert
    model(x).square().mean().backward()
    s0 = model[0].int4_step.detach().clone()
    opt.step()
    assert not torch.equal(model[0].int4_step, s0)                                # the steps are learned
    with qtrain.track_errors(model):
        model(x)
    assert "int4" in qtrain.report(model) and model[0].stats["y_sqnr_db"] > 10


def test_a_learned_step_at_or_below_zero_loads_as_trained():
    """The optimizer moves the LSQ steps freely and one may cross zero (seen in training: the quantizer is odd in
    the step, so training goes on). Loading such a layer's state must keep its steps (resume exactness), not
    re-calibrate them from the next batch as if the layer had never run."""
    torch.manual_seed(0)
    layer = QuantLinear.from_module(nn.Linear(96, 64), INT4)
    x = torch.randn(128, 96)
    layer(x)
    with torch.no_grad():
        layer.int4_step[1] = -layer.int4_step[1]                                 # a learned step gone negative
    for steps in (layer.int4_step.detach().clone(), torch.tensor([0.5, 0.0])):
        layer.int4_step.data.copy_(steps)
        fresh = QuantLinear.from_module(nn.Linear(96, 64), INT4)
        fresh.load_state_dict(layer.state_dict())
        assert fresh._int4_ready and fresh._hq_b == layer._hq_b
        assert torch.equal(fresh(3 * x), layer(3 * x))                            # another batch: no calibration
        assert torch.equal(fresh.int4_step, steps)
    never_run = QuantLinear.from_module(nn.Linear(96, 64), INT4)
    fresh = QuantLinear.from_module(nn.Linear(96, 64), INT4)
    fresh.load_state_dict(never_run.state_dict())                                 # saved before its first forward
    assert not fresh._int4_ready
    fresh(x)
    assert fresh._int4_ready and (fresh.int4_step > 0).all()


def test_saves_no_int4_codes_for_backward():
    """What an int4 layer holds from forward to backward: ``x`` and the Parameters (what ``F.linear`` keeps) and
    the two steps used — no INT4 codes (the backward recomputes them)."""
    torch.manual_seed(0)
    layer = _layer(nn.Linear(256, 192), INT4)
    x = torch.randn(64, 256, requires_grad=True)
    layer(x)                                                                      # calibrates
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {x.untyped_storage().data_ptr()}
    extra = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            extra.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert extra == [(torch.float32, (2,))], extra


def test_backward_holds_no_fp32_transform_across_the_dgrad_gemm(monkeypatch):
    """Peak memory: while dgrad's INT4 GEMM runs, no fp32 ``[M, Kp]`` tensor (``XH``, its fp32 codes, its LSQ
    residual) is alive — X's codes are held as int8, the transform is recomputed after the GEMM."""
    import gc
    torch.manual_seed(0)
    layer = _layer(nn.Linear(200, 96), INT4)
    x = torch.randn(130, 200)
    layer(x)                                                                      # calibrates
    kp = -(-200 // layer._hq_b) * layer._hq_b
    seen, gemm = [], ops.int4_gemm

    def spy(a, *args, **kwargs):
        if a.shape[1] == 96:                                                      # dgrad: the split dY × Q(WH)ᵀ
            seen.append(sum(1 for o in gc.get_objects() if type(o) is torch.Tensor     # (not weak proxies)
                            and o.dtype == torch.float32 and tuple(o.shape) == (130, kp)))
        return gemm(a, *args, **kwargs)

    monkeypatch.setattr(ops, "int4_gemm", spy)
    xx = x.clone().requires_grad_()
    layer(xx).backward(torch.randn(130, 96))
    assert seen == [0], seen


@pytest.mark.parametrize("b", [16, 64, 256])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_backward_recomputes_the_forward_codes(b, backend):
    """LSQ's backward (``block_hadamard`` recomputed, then LSQ's quantizer: its clip mask and residual) sees the
    codes of the fused ``hadamard_quantize_int4`` the GEMMs use, bit for bit — on CUDA tensors where there is a
    GPU (its kernels)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t = outlier_data(96, 300, magnitude=30.0, pattern="scattered").to(dev)
    with ops.use_backend(backend):
        for step in (t.abs().max() / 7, t.pow(2).mean().sqrt() / 3, torch.tensor(1e-3, device=dev)):
            s = step.float().reshape(1)
            fused = ops.hadamard_quantize_int4(t, b, s)
            again = qtrain.quant.lsq.lsq_quantize(ops.block_hadamard(t, b), s, residual=False)[0].to(torch.int8)
            assert torch.equal(fused, again)


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the Triton kernels on CPU tensors under the interpreter "
                    "(set only without CUDA); on a GPU the kernels meet their twins in tests/kernels on CUDA tensors")
def test_kernel_path_equals_reference_path():
    torch.manual_seed(0)
    ref = nn.Linear(200, 96)
    x = outlier_data(130, 200, magnitude=30.0, pattern="scattered")
    dy = torch.randn(130, 96)
    outs = {}
    for backend in ("reference", "triton"):
        reseed(3)
        layer = _layer(ref, INT4)
        with ops.use_backend(backend):
            outs[backend] = (*_step(layer, x, dy), layer.int4_step.grad, layer.int4_step.detach().clone())
    for name, a, b in zip(("y", "dx", "dw", "dstep", "step"), outs["reference"], outs["triton"]):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("recipe", [INT4, relative(INT4)], ids=["absolute", "relative"])
def test_compile_fullgraph_matches_eager(recipe):
    torch.manual_seed(0)
    ref = nn.Linear(128, 64)
    x = torch.randn(96, 128)
    dy = torch.randn(96, 64)
    eager, twin = _layer(ref, recipe), _layer(ref, recipe)
    with torch.no_grad():                   # the first forward (block choice, LSQ init) runs eagerly by design
        eager(x), twin(x)
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    for i in range(2):
        reseed(i)
        a = _step(eager, x, dy)
        reseed(i)
        b = _step(compiled, x, dy)
        assert torch.equal(a[0], b[0])
        for name, u, v in zip(("dx", "dw"), a[1:], b[1:]):
            assert ((u - v).norm() / u.norm()).item() < 1e-5, name
        eager.weight.grad = twin.weight.grad = None


def test_compiled_model_before_calibration_is_one_graph_and_matches_eager():
    """A model compiled before its INT4 layers calibrate (as `qtrain bench e2e` and `qtrain train --compile` do):
    the first step runs each layer's calibration, forward and backward in opaque ops, in one graph without a
    break (a break inside the model's loop over its blocks made Dynamo skip the loop for good: a graph per block
    and layer, recompiled per layer); the second recompiles once (the layers are ready) into one graph; every
    step gives eager's loss and gradients and the layers calibrate alike."""
    torch.manual_seed(0)
    cfg = ModelConfig("llama", d_model=64, n_layer=2, n_head=2, ffn_hidden=96, vocab_size=64, max_seq_len=16)
    eager = build_from_config(cfg)
    qtrain.convert(eager, INT4)
    twin = copy.deepcopy(eager)
    idx, tgt = torch.randint(0, 64, (2, 2, 16))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(twin, backend="aot_eager")
    graphs = []
    for i in range(3):
        out = []
        for model, params in ((eager, eager), (compiled, twin)):
            reseed(i)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(idx, tgt)[1]
            loss.backward()
            out.append((loss.detach(), {n: p.grad for n, p in params.named_parameters()}))
            params.zero_grad(set_to_none=True)
        graphs.append(counters["stats"]["unique_graphs"])
        (la, ga), (lb, gb) = out
        assert torch.allclose(la, lb, rtol=1e-6, atol=0), (i, la, lb)
        assert ga.keys() == gb.keys() and any(n.endswith("int4_step") for n in ga)
        for n in ga:
            assert ((ga[n] - gb[n]).norm() / ga[n].norm()).item() < 1e-5, (i, n)
    assert graphs == [1, 2, 2] and not counters["graph_break"], (graphs, dict(counters["graph_break"]))
    for a, b in zip(eager.modules(), twin.modules()):
        if isinstance(a, QuantLinear):
            assert a._hq_b == b._hq_b and torch.equal(a.int4_step, b.int4_step)
    torch._dynamo.reset()


class _AtenCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


# aten ops that read a device tensor back to the host (a synchronization on an accelerator)
SYNCING = {"_local_scalar_dense", "nonzero", "item", "masked_select", "is_nonzero", "equal", "_unique2"}


@pytest.mark.parametrize("gather", [False, True])
def test_training_step_without_host_synchronization(monkeypatch, gather):
    """After the first forward (one read-back: the chosen block), a forward + backward reads nothing back from the
    device on the accelerator path (static shapes); the CPU's gathered dgrad reads the kept-row count, once."""
    monkeypatch.setattr(qlinear, "_lss_gather", lambda device, n: gather)
    torch.manual_seed(0)
    layer = QuantLinear(96, 64, recipe="int4")
    x = torch.randn(48, 96, requires_grad=True)
    with ops.use_backend("reference"):
        with _AtenCount() as first:
            layer(x).sum().backward()
        with _AtenCount() as step:
            layer(x).sum().backward()
    assert first.calls["_local_scalar_dense"] >= 1                        # the block choice (+ host-only reads)
    syncs = {k: v for k, v in step.calls.items() if k in SYNCING}
    assert syncs == ({"nonzero": 1} if gather else {}), syncs


def test_calibrate_is_the_first_forward_and_runs_once():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32))
    x = outlier_data(48, 64, seed=3)
    first, explicit = (qtrain.convert(copy.deepcopy(net), INT4, filter_fn=lambda m, n: True) for _ in range(2))
    with torch.no_grad():
        first(x)
    assert qtrain.calibrate(explicit, x) == 2
    assert qtrain.calibrate(explicit, x) == 0                          # calibrated: no forward
    for a, b in zip(first, explicit):
        if isinstance(a, QuantLinear):
            assert not b.needs_calibration
            assert torch.equal(a.int4_step, b.int4_step) and int(a.hq_block) == int(b.hq_block)
    assert qtrain.calibrate(qtrain.convert(copy.deepcopy(net), "switchback", filter_fn=lambda m, n: True), x) == 0
    partial = qtrain.convert(_FirstOnly(), INT4, filter_fn=lambda m, n: True)
    with pytest.raises(ValueError, match=r"did not reach 1 layer\(s\) that need calibration \(unused\)"):
        qtrain.calibrate(partial, x)


class _FirstOnly(nn.Module):
    """Two linear layers, of which the forward calls one."""

    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(64, 32), nn.Linear(64, 32)

    def forward(self, x):
        return self.used(x)


def test_compiled_forward_saves_no_codes_or_transforms():
    """Under torch.compile (min-cut partitioner, as Inductor's) the forward keeps what eager keeps — x, the weight,
    the steps — not the INT4 codes of X or W nor an fp32 transform: the backward's recomputations take ``after=dY``
    (without it the partitioner merged them with the forward's call and saved their outputs)."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    torch.manual_seed(0)
    layer = QuantLinear.from_module(nn.Linear(200, 96), "int4")
    x = torch.randn(384, 200, requires_grad=True)
    layer(x).sum().backward()                                            # calibrated eagerly
    saved = []

    def forward_compiler(gm, _):
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        saved.extend(o.meta["val"] for o in out if isinstance(o, torch.fx.Node) and "val" in o.meta)
        return gm

    def backend(gm, example):
        return aot_module_simplified(gm, example, fw_compiler=forward_compiler, bw_compiler=lambda g, _: g,
                                     partition_fn=min_cut_rematerialization_partition)

    torch.compile(layer, backend=backend)(x).sum().backward()
    kp = layer.weight.shape[1] + (-layer.weight.shape[1]) % layer._hq_b
    assert kp != 200 and saved
    shapes = [(tuple(t.shape), t.dtype) for t in saved]
    assert not [s for s in shapes if s[1] == torch.int8], shapes
    assert not [s for s in shapes if s[0] in ((384, kp), (96, kp))], shapes
    assert ((384, 200), torch.float32) in shapes and ((96, 200), torch.float32) in shapes, shapes
