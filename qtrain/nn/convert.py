"""``convert``: swap a model's linear layers for :class:`QuantLinear` in place; ``calibrate``: set the layers'
data-dependent state on one batch; ``report``: per-layer telemetry."""
from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from qtrain import recipes
from qtrain.nn import dataflow
from qtrain.nn.linear import QuantLinear, calibrating, is_hf_conv1d
from qtrain.nn.plan import GEMMS, build_plan
from qtrain.quant.core import FLOAT_DTYPES

log = logging.getLogger("qtrain")

HEAD_NAMES = ("lm_head", "head", "output", "classifier", "score", "embed_out")
# On CUDA, layers whose smaller side is below this stay in 16-bit: quantize/launch overhead outweighs the
# INT8 GEMM's gain there. Measured on the H100/H200 (benchmarks/results, NOTES.md): eager SwitchBack layers
# break even near 3072 features, compiled ones (torch.compile) pay from 2048 (a d 2048 LLaMA step 1.11×, a
# 16384×2048→5632 linear 1.26× BF16); below 2048 neither does.
MIN_CUDA_FEATURES = 2048


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def _features(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return tuple(module.weight.shape)


def skip_reason(module: nn.Module, name: str, tied: set[int]) -> str | None:
    """Why the default filter leaves this linear layer alone, or None to convert it."""
    if name.rsplit(".", 1)[-1] in HEAD_NAMES:
        return "output head"
    if id(module.weight) in tied:
        return "weight tied to an embedding"
    if module.weight.device.type == "cuda" and min(_features(module)) < MIN_CUDA_FEATURES:
        return f"smaller than {MIN_CUDA_FEATURES} features (quantizing does not pay on CUDA)"
    return None


def convert(model: nn.Module, recipe="switchback",
            filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Replace the eligible ``nn.Linear`` / HF ``Conv1D`` layers of ``model`` by :class:`QuantLinear` in place.

    ``recipe``: a preset name (see ``qtrain.recipes.PRESETS``) or a :class:`~qtrain.recipes.Recipe`.
    ``filter_fn(module, fully_qualified_name) -> bool`` chooses the layers; by default every linear layer except
    the output head, weights tied to an embedding, and (on CUDA) layers below ``MIN_CUDA_FEATURES``.
    The Parameters are kept (tied weights and existing optimizers keep working; ``state_dict`` is unchanged).
    Call before ``torch.compile``, DDP or FSDP. Returns ``model``. If the default filter leaves every layer
    alone (a small model on CUDA), it logs a warning saying why and returns the model unchanged; a
    ``filter_fn`` that selects nothing, a model without linear layers, or one already converted is an error.
    A recipe with a spec no path runs is rejected before any layer is touched.

    A recipe with ``dataflow=True`` (``"jetfire"``, ``"jetfire_wide"``) first swaps every transformer block of
    qtrain's reference models (:class:`qtrain.models.llama.Block`, :class:`qtrain.models.gpt2.Block`) whose four
    linear layers the filter accepts for its data-flow version (:mod:`qtrain.nn.dataflow`: same submodules,
    Parameters and ``state_dict`` keys); the linear layers outside such blocks (or in blocks the filter or an
    unsupported norm leaves out) become plain :class:`QuantLinear` layers running the recipe's GEMMs, which save
    their input in 16-bit. A model with no such block (any other architecture, Hugging Face models) is converted
    that way entirely, with a warning that no data flow applies.
    """
    recipe = recipes.get(recipe)
    build_plan(recipe)
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert takes an nn.Module, got {type(model).__name__}")
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    converted, skipped = [], []
    n_blocks = _convert_dataflow_blocks(model, recipe, filter_fn, tied, converted) if recipe.dataflow else 0
    inside = tuple(f"{n}." for n, _ in _dataflow_blocks(model))
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not is_linear(child) or isinstance(child, QuantLinear):
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if name.startswith(inside):                      # runs inside a data-flow block
                continue
            if filter_fn is not None:
                reason = None if filter_fn(child, name) else "filter_fn"
            else:
                reason = skip_reason(child, name, tied)
            if reason is None and child.weight.dtype not in FLOAT_DTYPES:
                raise TypeError(f"{name}: weight dtype {child.weight.dtype} is not supported; accepted: "
                                "float32, bfloat16, float16")
            if reason is None and child.weight.device.type not in ("cpu", "cuda", "meta"):
                raise ValueError(f"{name}: device {child.weight.device} is not supported; accepted: cpu, cuda")
            if reason:
                skipped.append((name, reason))
                continue
            setattr(parent, child_name, QuantLinear.from_module(child, recipe))
            converted.append(name)
    if not converted:
        done = quant_layers(model)
        blocks = _dataflow_blocks(model)
        if done or blocks:
            what = ", ".join(w for w in (f"{len(done)} QuantLinear layers" if done else "",
                                         f"{len(blocks)} data-flow blocks" if blocks else "") if w)
            done = done or blocks
            raise ValueError(f"convert({recipe.name!r}): the model is already converted ({what}, recipe "
                             f"{done[0][1].recipe.name!r}; {len(skipped)} linear layers left alone); convert a "
                             "model built fresh instead")
        listing = ", ".join(f"{n} ({r})" for n, r in skipped)
        if filter_fn is None and skipped:
            log.warning("qtrain.convert(%s): no layer converted, the default filter skipped all %d: %s — pass "
                        "filter_fn to choose layers yourself", recipe.name, len(skipped), listing)
            return model
        raise ValueError(f"convert({recipe.name!r}) found no linear layer to convert "
                         f"({len(skipped)} skipped: {listing or 'none seen'})")
    if recipe.dataflow and not n_blocks:
        log.warning("qtrain.convert(%s): no supported transformer block (qtrain.models LLaMA/GPT-2) found, so no "
                    "INT8 data flow: %d linear layers converted to QuantLinear with the recipe's GEMMs (their inputs "
                    "are saved in 16-bit)", recipe.name, len(converted))
    log.info("qtrain.convert(%s): converted %d linear layers%s, skipped %d%s", recipe.name, len(converted),
             f" ({n_blocks} data-flow blocks)" if recipe.dataflow else "", len(skipped),
             "".join(f"\n  skipped {n}: {r}" for n, r in skipped))
    return model


def _convert_dataflow_blocks(model: nn.Module, recipe, filter_fn, tied: set[int], converted: list) -> int:
    """Swap the supported blocks whose linear layers are all selected for their data-flow versions."""
    n = 0
    for parent_name, parent in list(model.named_modules()):
        if isinstance(parent, dataflow.DATAFLOW_BLOCKS):
            continue
        for child_name, child in list(parent.named_children()):
            linears = dataflow.block_linears(child)
            if not linears or dataflow.unsupported_reason(child) is not None:
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            names = [f"{name}.{ln}" for ln, _ in linears]
            if filter_fn is not None:
                ok = all(filter_fn(m, fq) for (_, m), fq in zip(linears, names))
            else:
                ok = all(skip_reason(m, fq, tied) is None for (_, m), fq in zip(linears, names))
            ok = ok and all(m.weight.dtype in FLOAT_DTYPES and m.weight.device.type in ("cpu", "cuda", "meta")
                            for _, m in linears)
            if ok:
                setattr(parent, child_name, dataflow.to_dataflow(child, recipe))
                converted.extend(names)
                n += 1
    return n


def quant_layers(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def quantized_linear_names(model: nn.Module) -> list[str]:
    """Every linear layer that runs quantized: the QuantLinear layers and the linears inside data-flow blocks."""
    names = [n for n, _ in quant_layers(model)]
    for bn, block in _dataflow_blocks(model):
        names += [f"{bn}.{n}" if bn else n for n, _ in block.linears()]
    return sorted(names)


@torch.no_grad()
def calibrate(model: nn.Module, *args, **kwargs) -> int:
    """Calibrate the layers that calibrate on their first input (INT4: the Hadamard block and the LSQ steps) by
    one forward ``model(*args, **kwargs)`` without gradients; return how many did (0, with no forward, where none
    needs it — e.g. after loading a calibrated checkpoint).

    Where torch.distributed is initialized an INT4 layer refuses to calibrate outside this function: call it on
    every process with the same batch, before wrapping the model in DDP or ``fully_shard`` (FSDP2 would lose
    steps written during its forward; a sharded layer is refused here). The processes' results are then
    compared (one all-reduce): a mismatch — different batches or weights — raises."""
    layers = [(n, m) for n, m in quant_layers(model) if m.needs_calibration]
    if not layers:
        return 0
    sharded = [n for n, m in layers if hasattr(m.int4_step, "full_tensor")]
    if sharded:
        raise ValueError(f"qtrain.calibrate: layer {sharded[0]!r} is sharded (FSDP2 fully_shard): calibrate "
                         "before sharding, the steps written during a sharded forward would be lost")
    with calibrating():
        model(*args, **kwargs)
    missed = [n for n, m in layers if m.needs_calibration]
    if missed:
        raise ValueError(f"qtrain.calibrate: the forward did not reach {len(missed)} layer(s) that need "
                         f"calibration ({', '.join(missed[:3])}{', …' if len(missed) > 3 else ''})")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        state = torch.cat([torch.cat([m.int4_step.detach().float().reshape(-1),
                                      m.hq_block.float().reshape(1).to(m.int4_step.device)]) for _, m in layers])
        hi, lo = state.clone(), state.clone()
        dist.all_reduce(hi, dist.ReduceOp.MAX)
        dist.all_reduce(lo, dist.ReduceOp.MIN)
        if not torch.equal(hi, lo):
            raise ValueError("qtrain.calibrate: the processes calibrated differently (different batches or "
                             "weights): pass every process the same batch and the same model")
    return len(layers)


@contextlib.contextmanager
def track_errors(model: nn.Module):
    """Within the block, every QuantLinear and every data-flow block records its forward's quantization error
    per linear layer (costs fp32 GEMMs, and recomputing a data-flow block's INT8 operands)."""
    layers = [m for _, m in quant_layers(model)] + [m for _, m in _dataflow_blocks(model)]
    for m in layers:
        m.track_errors = True
    try:
        yield model
    finally:
        for m in layers:
            m.track_errors = False


@contextlib.contextmanager
def reuse_quantized_weights(model: nn.Module):
    """Within the block, each QuantLinear quantizes its weight once and reuses the INT8 copy while the weight is
    unchanged — wrap the micro-steps of one optimizer step (gradient accumulation), an evaluation or a
    generation loop. The copies (2 bytes per weight: W and Wᵀ) are freed at exit and never outlive a change of
    the weight or an optimizer step. Under FSDP2 they are unsharded copies: weigh that memory before using it
    there."""
    layers = [m for _, m in quant_layers(model)]
    before = [m.reuse_weight for m in layers]
    for m in layers:
        m.reuse_weight = True
    try:
        yield model
    finally:
        for m, b in zip(layers, before):
            m.reuse_weight = b
            if not b:
                m._wcache = None


def _dataflow_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, dataflow.DATAFLOW_BLOCKS)]


def fallback_stats(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per fallback layer, each GEMM's share of tiles that fell back at its last call (NaN before any) — one
    host synchronization for the whole model."""
    layers = [(n, m) for n, m in quant_layers(model) if m.fallback_ratio is not None]
    if not layers:
        return {}
    ratios = torch.stack([m.fallback_ratio.float() for _, m in layers]).cpu()
    return {n: {g: ratios[i, j].item() for j, g in enumerate(GEMMS) if g in m.plan.fallback_gemms}
            for i, (n, m) in enumerate(layers)}


def report(model: nn.Module) -> str:
    """A table of the quantized linear layers (QuantLinear layers and the linears inside data-flow blocks, in
    module order): shape, recipe, and the last recorded quantization errors (``x err``/``w err``: ‖t − t̂‖/‖t‖ of
    the fprop operands; ``y SQNR``: dB against an fp32 linear; a data-flow linear's operands are the INT8 blocks
    its GEMM consumes, see :class:`qtrain.nn.dataflow._DataflowBlock`). Errors are recorded inside
    :func:`track_errors`; '-' where none was. Layers with fallback add each GEMM's last fallback share
    (``fallback %`` fprop/dgrad/wgrad) and X's error without the fallback term; INT4 layers their steps over the
    transformed operand's RMS (``step/RMS x/w``; ~0.35 is the least-error 4-bit step of Gaussian data) and the share
    of its elements beyond ±7 steps (``clipped % x/w``: their straight-through gradient is 0)."""
    fb = fallback_stats(model)
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            layers.append((name, m, m.recipe, m.stats))
        elif isinstance(m, dataflow.DATAFLOW_BLOCKS):
            layers += [(f"{name}.{n}" if name else n, lin, m.recipe, m.stats.get(n, {})) for n, lin in m.linears()]
    int4 = any("x_step_rms" in s for *_, s in layers)
    cols = ("layer", "in→out", "recipe", "x err", "w err", "y SQNR dB") + (
        ("fallback % f/d/w", "x err no-fb") if fb else ()) + (("step/RMS x/w", "clipped % x/w") if int4 else ())
    rows = [cols]
    for name, m, recipe, s in layers:
        row = (name, f"{m.in_features}→{m.out_features}", recipe.name,
               f"{s['x_rel_err']:.2e}" if s else "-", f"{s['w_rel_err']:.2e}" if s else "-",
               f"{s['y_sqnr_db']:.1f}" if s else "-")
        if fb:
            shares = fb.get(name, {})
            row += ("/".join(f"{100 * shares[g]:.1f}" if g in shares else "-" for g in GEMMS) if shares else "-",
                    f"{s['x_rel_err_no_fallback']:.2e}" if "x_rel_err_no_fallback" in s else "-")
        if int4:
            row += tuple(f"{s[f'x_{k}']:{f}}/{s[f'w_{k}']:{f}}" if "x_step_rms" in s else "-"
                         for k, f in (("step_rms", ".3f"), ("clipped_pct", ".1f")))
        rows.append(row)
    if len(rows) == 1:
        return "no QuantLinear layers (call qtrain.convert first)"
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
