"""``qtrain inspect``: where a trained model's GEMM operands have outliers, and what each INT8 granularity costs.

Loads a checkpoint (a run folder means its latest), runs the model in fp32 with every linear layer unquantized
on validation batches, forward and backward, and measures for each linear layer (the output head included) the
operands of its GEMMs — X (input, ``[tokens, in]``), W (weight, ``[out, in]``) and dY (output gradient,
``[tokens, out]``):

- outliers: ``absmax / rms`` of the whole tensor, and the share of channels (X: input features, dY: output
  features) whose absmax exceeds ``OUTLIER_RATIO`` × the median channel's;
- the SQNR (dB, against the fp32 tensor) of INT8 round-to-nearest quantization at each granularity of
  :data:`GRANULARITIES` (scales per tensor, per row, per 1×128 or 32×32 block; W per 128×128 block instead of
  1×128), i.e. how much each recipe family would lose on this operand; for X and dY also 1×128 blocks with
  fallback quantization (``1x128+fb``: the 5 % of 128×128 tiles with the largest absmax get the INT8 residual
  term, what the ``fallback`` recipe's default threshold converges to).

Writes ``inspect.md`` (table), ``inspect.json`` and ``inspect.png`` (SQNR per layer and granularity; outlier
share) into ``--out`` (default ``<run folder>/inspect``).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from qtrain import data as qdata
from qtrain import models
from qtrain.errors import UserError
from qtrain.quant.core import fake_quantize, sqnr
from qtrain.nn.functional import Operand
from qtrain.quant.fallback import quantize_fallback, tile_absmax
from qtrain.recipes import ROW, TENSOR, Fallback, block
from qtrain.train import checkpoint
from qtrain.train.loop import resolve_device
from qtrain.train.plots import plt

OUTLIER_RATIO = 20.0
FALLBACK = Fallback()          # the fallback recipe's default policy (target share of tiles)
GRANULARITIES = {
    "x": {"tensor": TENSOR, "row": ROW, "1x128": block(1, 128), "1x128+fb": FALLBACK, "32x32": block(32, 32)},
    "w": {"tensor": TENSOR, "row": ROW, "128x128": block(128, 128), "32x32": block(32, 32)},
    "dy": {"tensor": TENSOR, "row": ROW, "1x128": block(1, 128), "1x128+fb": FALLBACK, "32x32": block(32, 32)},
}


def fallback_fake_quantize(t: torch.Tensor, policy: Fallback = FALLBACK) -> torch.Tensor:
    """fp32 ``t`` after fallback quantization in 1×128 blocks, τ at the policy's target quantile of its tiles."""
    tau = torch.nanquantile(tile_absmax(t, 128).flatten(), 1.0 - policy.target).reshape(1)
    q, s, q2, s2, flags, _ = quantize_fallback(t, tau.float())
    return Operand("fallback", q, s, 1, 128, q2, s2, flags).dequantize()


def _fake(t: torch.Tensor, g) -> torch.Tensor:
    return fallback_fake_quantize(t, g) if isinstance(g, Fallback) else fake_quantize(t, g)


@dataclass
class OperandStats:
    absmax_over_rms: float
    outlier_channels: float | None       # share of channels above OUTLIER_RATIO × the median (None for W)
    sqnr_db: dict[str, float] = field(default_factory=dict)


def operand_stats(t: torch.Tensor, kind: str) -> OperandStats:
    """Stats of a 2-D fp32 operand ``t`` (``kind`` ∈ x, w, dy: which granularities, and whether columns are
    channels)."""
    t = t.float()
    rms = t.pow(2).mean().sqrt().item()
    ratio = t.abs().max().item() / rms if rms > 0 else 0.0
    share = None
    if kind != "w":
        col = t.abs().amax(dim=0)
        share = (col > OUTLIER_RATIO * col.median()).float().mean().item()
    return OperandStats(ratio, share, {name: sqnr(t, _fake(t, g)) for name, g in GRANULARITIES[kind].items()})


@dataclass
class LayerStats:
    name: str
    shape: str
    x: OperandStats
    w: OperandStats
    dy: OperandStats


def collect(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[LayerStats]:
    """Run ``model`` (a :class:`~qtrain.models.base.CausalLM`) forward and backward on ``batches`` (their tokens
    concatenated per layer) and return the stats of every ``nn.Linear``, in module order."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if not linears:
        raise UserError("the model has no nn.Linear layer to inspect")
    xs: dict[str, list] = {n: [] for n in linears}
    dys: dict[str, list] = {n: [] for n in linears}
    hooks = []
    for name, m in linears.items():
        hooks.append(m.register_forward_hook(
            lambda mod, inp, out, n=name: xs[n].append(inp[0].detach().reshape(-1, inp[0].shape[-1]))))
        hooks.append(m.register_full_backward_hook(
            lambda mod, gin, gout, n=name: dys[n].append(gout[0].detach().reshape(-1, gout[0].shape[-1]))))
    try:
        model.train()
        for x, y in batches:
            model.zero_grad(set_to_none=True)
            _, loss = model(x, y)
            loss.backward()
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
    return [LayerStats(name, f"{m.in_features}→{m.out_features}", operand_stats(torch.cat(xs[name]), "x"),
                       operand_stats(m.weight.detach(), "w"), operand_stats(torch.cat(dys[name]), "dy"))
            for name, m in linears.items()]


def table(stats: list[LayerStats]) -> str:
    """Markdown: one row per layer; SQNR columns per operand and granularity."""
    cols = [(k, g) for k in ("x", "w", "dy") for g in GRANULARITIES[k]]
    head = ["layer", "in→out", "X max/rms", f"X ch>{OUTLIER_RATIO:g}×", "dY ch>" + f"{OUTLIER_RATIO:g}×"]
    head += [f"{k.upper() if k != 'dy' else 'dY'} {g}" for k, g in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in stats:
        row = [s.name, s.shape, f"{s.x.absmax_over_rms:.0f}", f"{100 * s.x.outlier_channels:.1f} %",
               f"{100 * s.dy.outlier_channels:.1f} %"]
        row += [f"{getattr(s, k).sqnr_db[g]:.1f}" for k, g in cols]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(stats: list[LayerStats], path: Path, title: str) -> None:
    """SQNR per layer for X and dY (one line per granularity) and the shares of outlier channels."""
    fig, axes = plt.subplots(3, 1, figsize=(max(8.0, 0.22 * len(stats) + 3), 10), sharex=True)
    idx = range(len(stats))
    for ax, k, label in ((axes[0], "x", "X (fprop input)"), (axes[1], "dy", "dY (output gradient)")):
        for g in GRANULARITIES[k]:
            ax.plot(idx, [getattr(s, k).sqnr_db[g] for s in stats], "o-", markersize=3, label=g)
        ax.set_ylabel(f"{label}\nINT8 SQNR (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=4)
    axes[2].bar([i - 0.2 for i in idx], [100 * s.x.outlier_channels for s in stats], width=0.4, label="X")
    axes[2].bar([i + 0.2 for i in idx], [100 * s.dy.outlier_channels for s in stats], width=0.4, label="dY")
    axes[2].set_ylim(bottom=0)
    axes[2].set_ylabel(f"channels with absmax\n> {OUTLIER_RATIO:g}× median (%)")
    axes[2].legend(fontsize=8)
    axes[2].set_xticks(list(idx), [s.name for s in stats], rotation=90, fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def inspect_checkpoint(path: str, batches: int = 2, device: str = "auto", out: str | None = None) -> Path:
    """Inspect the checkpoint ``path`` names; write the table, JSON and plot; return the output folder."""
    if batches < 1:
        raise UserError(f"--batches must be at least 1, got {batches}")
    ckpt = checkpoint.find(path, flag="checkpoint")
    config = checkpoint.read_config(ckpt)
    try:
        run, model_config = config["train"], models.ModelConfig.from_dict(config["model_config"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"checkpoint {ckpt} is corrupt: config.json lacks valid 'train'/'model_config'") from None
    dev = resolve_device(device)
    model = models.build_from_config(model_config)
    checkpoint.load(ckpt, model)
    model.to(dev)
    tokens = qdata.load_tokens(run["data"], qdata.get_tokenizer(run["tokenizer"]))
    data = [(x.to(dev), y.to(dev)) for x, y in
            qdata.eval_batches(tokens.val, batches, run["batch_size"], run["seq_len"])]
    stats = collect(model, data)
    folder = Path(out) if out else ckpt.parent / "inspect"
    folder.mkdir(parents=True, exist_ok=True)
    title = f"{run['model']} · {ckpt.name} · {batches} validation batches × {run['batch_size']} × {run['seq_len']}"
    (folder / "inspect.md").write_text(f"# qtrain inspect: {title}\n\n" + table(stats)
                                       + "\nSQNR in dB of INT8 round-to-nearest at each granularity (higher is "
                                       "better); channel shares: absmax above "
                                       f"{OUTLIER_RATIO:g}× the median channel's.\n\n![inspect](inspect.png)\n")
    (folder / "inspect.json").write_text(json.dumps([asdict(s) for s in stats], indent=1))
    plot(stats, folder / "inspect.png", title)
    return folder


def _cmd_inspect(args: argparse.Namespace) -> int:
    folder = inspect_checkpoint(args.checkpoint, args.batches, args.device, args.out)
    print((folder / "inspect.md").read_text(), end="")
    print(f"→ {folder}")
    return 0


def add_commands(subparsers) -> None:
    """Register ``inspect`` on the ``qtrain`` command's sub-parsers."""
    p = subparsers.add_parser("inspect", help="per-layer outliers and INT8 quantization error of a checkpoint",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="checkpoint folder (step-NNNNNN/) or run folder (its latest checkpoint)")
    p.add_argument("--batches", type=int, default=2, help="validation batches to run (default 2)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--out", help="output folder (default <run folder>/inspect)")
    p.set_defaults(func=_cmd_inspect)
