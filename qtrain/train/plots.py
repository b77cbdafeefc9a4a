"""Loss plots (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_log(path: Path) -> list[dict]:
    """The records of a ``log.jsonl``."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def smooth(values: list[float], alpha: float = 0.1) -> list[float]:
    """Exponential moving average with bias correction (the first points are not pulled towards zero)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = (1 - alpha) * avg + alpha * v
        out.append(avg / (1 - (1 - alpha) ** i))
    return out


def plot_runs(runs: dict[str, list[dict]], path: Path, title: str) -> None:
    """Train loss (smoothed) and validation loss against step, one line per run, saved as a PNG at ``path``."""
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, records in runs.items():
        train = [r for r in records if "loss" in r]
        line, = ax_t.plot([r["step"] for r in train], smooth([r["loss"] for r in train]), label=label)
        val = [r for r in records if "val_loss" in r]
        ax_v.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", color=line.get_color(),
                  label=label, markersize=3)
    for ax, name in ((ax_t, "train loss (EMA 0.1)"), (ax_v, "validation loss")):
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
