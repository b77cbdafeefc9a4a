"""How much noise int4's gradient quantization adds, per layer, on a real checkpoint.

For each 2-D parameter: the SQNR (dB) of its gradient under an int4 backward variant against the exact-dY backward
(``int4_fprop_only``: the same quantized forward, steps and Hadamard blocks, dY unquantized), and against a second
draw of the same variant (another stochastic-rounding seed). Unbiased noise shows as ``vs exact ≈ vs draw + 3 dB``;
a smaller gap is a deterministic error. The ``minibatch`` column is the exact gradient of a second batch against the
first: the noise SGD already lives with. Then the LSQ step gradients ``(s_X, s_W)``.

``--recipes A,B,…`` (presets or recipe files) instead: each recipe's gradients against the unquantized model's on
the same batch (``vs exact``) and against a second stochastic-rounding draw (``vs draw``; inf for a deterministic
backward) — how much gradient noise a recipe adds, per layer, beside the ``minibatch`` column.

Usage (from the repository root): ``PYTHONPATH=. python scripts/int4_grad_sqnr.py CHECKPOINT [--batch-size 16
--seq-len 1024 --device cuda] [--recipes fallback,jetfire_wide]``; CHECKPOINT a run folder or ``step-NNNNNN/`` of a
qtrain llama/gpt2 run on the corpus it was trained on.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
from pathlib import Path

import torch

import qtrain
from qtrain import data as qdata, models
from qtrain.nn.functional import reseed
from qtrain.quant import sqnr
from qtrain.recipes import ROW, TENSOR, BitSplit, GemmSpec, Recipe
from qtrain.train import checkpoint
from qtrain.train.loop import quantize_all_but_head, resolve_recipe

FPROP_ONLY = Path(__file__).resolve().parent.parent / "benchmarks" / "recipes" / "int4_fprop_only.json"


def split_variant(name: str, per_row: bool, sampling: bool, budget: float) -> Recipe:
    """The ``int4`` preset with its dY bit split per row (token) or per tensor, and the given sampling."""
    base = qtrain.recipes.get("int4")
    lhs = dataclasses.replace(base.dgrad.lhs, granularity=ROW if per_row else TENSOR,
                              split=BitSplit(sampling, budget))
    return dataclasses.replace(base, name=name, dgrad=GemmSpec(lhs, base.dgrad.rhs),
                               wgrad=GemmSpec(lhs, base.wgrad.rhs))


VARIANTS = [split_variant("tensor_lss1.5", False, True, 1.5), split_variant("tensor_all", False, False, 2.0),
            split_variant("row_lss1.5", True, True, 1.5), split_variant("row_lss1.9", True, True, 1.9),
            split_variant("row_all", True, False, 2.0)]


def gradients(model, recipe, batch, seed, calibrated=None, calibration=None, autocast=contextlib.nullcontext):
    """``(quantized model, {name: fp32 gradient})`` of one forward/backward of a copy of ``model`` under
    ``recipe`` (None: unquantized): calibrated on ``calibration`` or given ``calibrated``'s per-layer state (steps,
    blocks, fallback thresholds)."""
    m = copy.deepcopy(model)
    if recipe is not None:
        qtrain.convert(m, recipe, filter_fn=quantize_all_but_head)
    if calibrated is not None:
        m.load_state_dict(calibrated.state_dict())
    elif calibration is not None:
        with autocast():
            qtrain.calibrate(m, *calibration)
    reseed(seed)
    m.zero_grad()
    with autocast():
        _, loss = m(*batch)
    loss.backward()
    return m, {n: p.grad.detach().float().clone() for n, p in m.named_parameters() if p.grad is not None}


def _load(ckpt_path: str, batch_size: int, seq_len: int, device: str):
    """``(checkpoint path, model on device, three validation batches, autocast factory)``."""
    ckpt = checkpoint.find(ckpt_path, flag="checkpoint")
    config = checkpoint.read_config(ckpt)
    model = models.build_from_config(models.ModelConfig.from_dict(config["model_config"]))
    checkpoint.load(ckpt, model)
    model.to(device)
    run = config["train"]
    tokens = qdata.load_tokens(run["data"], qdata.get_tokenizer(run["tokenizer"]))
    b = [(x.to(device), y.to(device)) for x, y in qdata.eval_batches(tokens.val, 3, batch_size, seq_len)]
    kind = torch.device(device).type                   # autocast takes the device type: 'cuda', not 'cuda:0'
    autocast = (lambda: torch.autocast(kind, torch.bfloat16)) if kind == "cuda" else contextlib.nullcontext
    return ckpt, model, b, autocast


def recipe_report(ckpt_path: str, recipes: list[str], batch_size: int, seq_len: int, device: str) -> str:
    """Per 2-D parameter: the SQNR (dB) of each recipe's gradient against the unquantized model's on the same
    batch, and against the recipe's second draw; the ``minibatch`` column as in :func:`report`."""
    ckpt, model, b, autocast = _load(ckpt_path, batch_size, seq_len, device)
    _, exact = gradients(model, None, b[0], 0, autocast=autocast)
    _, other = gradients(model, None, b[1], 0, autocast=autocast)
    runs = {}
    for name in recipes:
        recipe = resolve_recipe(name)
        first, g = gradients(model, recipe, b[0], 0, calibration=b[2], autocast=autocast)
        runs[recipe.name] = (g, gradients(model, recipe, b[0], 1, first, autocast=autocast)[1])
    lines = [f"{ckpt} · {batch_size}×{seq_len} tokens · {device}", "",
             "| parameter | minibatch | " + " | ".join(f"{k} vs exact / vs draw" for k in runs) + " |",
             "|---|---:|" + "---:|" * len(runs)]
    for n in (n for n in exact if exact[n].dim() == 2):
        cells = [f"{sqnr(exact[n], g[n]):.1f} / {sqnr(g[n], g2[n]):.1f}" for g, g2 in runs.values()]
        lines.append(f"| {n} | {sqnr(exact[n], other[n]):.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report(ckpt_path: str, batch_size: int, seq_len: int, device: str) -> str:
    ckpt, model, b, autocast = _load(ckpt_path, batch_size, seq_len, device)
    fprop_only = Recipe.from_dict(json.loads(FPROP_ONLY.read_text()))
    exact_model, exact = gradients(model, fprop_only, b[0], 0, calibration=b[2], autocast=autocast)
    _, other = gradients(model, fprop_only, b[1], 0, exact_model, autocast=autocast)
    runs = {r.name: [gradients(model, r, b[0], s, exact_model, autocast=autocast)[1] for s in (0, 1)]
            for r in VARIANTS}
    lines = [f"{ckpt} · {batch_size}×{seq_len} tokens · {device}", "",
             "| parameter | minibatch | " + " | ".join(f"{k} vs exact / vs draw" for k in runs) + " |",
             "|---|---:|" + "---:|" * len(runs)]
    for n in (n for n in exact if exact[n].dim() == 2):
        cells = [f"{sqnr(exact[n], g[0][n]):.1f} / {sqnr(g[0][n], g[1][n]):.1f}" for g in runs.values()]
        lines.append(f"| {n} | {sqnr(exact[n], other[n]):.1f} | " + " | ".join(cells) + " |")
    lines += ["", "| LSQ step gradient (s_X, s_W) | exact | other batch | " + " | ".join(runs) + " |",
              "|---|---|---|" + "---|" * len(runs)]
    fmt = lambda t: ", ".join(f"{v:.2e}" for v in t.tolist())
    for n in (n for n in exact if n.endswith("int4_step")):
        lines.append(f"| {n} | {fmt(exact[n])} | {fmt(other[n])} | "
                     + " | ".join(fmt(g[0][n]) for g in runs.values()) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--recipes", help="comma-separated presets or recipe files: each against the unquantized model")
    a = p.parse_args(argv)
    if a.recipes:
        print(recipe_report(a.checkpoint, a.recipes.split(","), a.batch_size, a.seq_len, a.device), end="")
    else:
        print(report(a.checkpoint, a.batch_size, a.seq_len, a.device), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
