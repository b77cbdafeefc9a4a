"""The table of ``scripts/gpu_distributed.sh``: per recipe, DDP and FSDP2 on two processes against one process on
the same global batch (the largest relative difference of the logged training losses and the final validation
loss) and their tokens/s against one process with half the batch (the work of each of the two: 2.0× is perfect
scaling).

Usage: python scripts/distributed_report.py RUN_DIR OUT_DIR — reads RUN_DIR/<recipe>-{1gpu,ddp,fsdp,1gpu-half}/
(``log.jsonl``, ``summary.json``), writes OUT_DIR/distributed.md and .json. A run that is missing or did not
finish gets its row with '-' and is named under the table.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

VARIANTS = ("1gpu", "ddp", "fsdp", "1gpu-half")
NOTE = ("\nLoss Δ: relative, over the logged steps. Round-to-nearest recipes match one process up to the order of "
        "the gradient reduction; stochastic rounding draws other uniforms on two processes and INT4 layers "
        "calibrate on process 0's share of the first batch, so those differ by their noise.\n")


def read_run(folder: Path) -> dict | None:
    """``{'losses': {step: loss}, 'val_loss', 'tokens_per_s'}`` of a finished run folder, else None."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
        lines = (folder / "log.jsonl").read_text().splitlines()
    except (OSError, ValueError):
        return None
    losses = {}
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        losses[entry["step"]] = entry["loss"]
    return {"losses": losses, "val_loss": summary["final_val_loss"], "tokens_per_s": summary["tokens_per_s"]}


def compare(runs: dict[str, dict | None]) -> dict:
    """One recipe's row: for DDP and FSDP2 the largest relative loss difference to the one-process run over the
    steps both logged, the relative final val-loss difference, and tokens/s over the half-batch run's."""
    row = {}
    one, half = runs.get("1gpu"), runs.get("1gpu-half")
    for v in ("ddp", "fsdp"):
        run = runs.get(v)
        if run is None or one is None:
            row[v] = None
            continue
        steps = sorted(set(run["losses"]) & set(one["losses"]))
        row[v] = {
            "max_loss_rel_diff": max((abs(run["losses"][s] / one["losses"][s] - 1) for s in steps), default=None),
            "val_loss_rel_diff": run["val_loss"] / one["val_loss"] - 1,
            "scaling": run["tokens_per_s"] / half["tokens_per_s"] if half else None,
            "tokens_per_s": run["tokens_per_s"],
        }
    return row


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def report(run_dir: Path) -> tuple[dict, str]:
    recipes = sorted({p.name.rsplit("-", 1)[0] for p in run_dir.glob("*-ddp")} |
                     {p.name[:-len("-1gpu")] for p in run_dir.glob("*-1gpu")})
    rows, missing = {}, []
    for r in recipes:
        runs = {v: read_run(run_dir / f"{r}-{v}") for v in VARIANTS}
        missing += [f"{r}-{v}" for v, run in runs.items() if run is None]
        rows[r] = {"runs": {v: (None if run is None else {"val_loss": run["val_loss"],
                                                          "tokens_per_s": run["tokens_per_s"]})
                            for v, run in runs.items()}, **compare(runs)}
    lines = ["| recipe | mode | max loss Δ vs 1 GPU | final val loss Δ | tokens/s | vs 1 GPU at half batch |",
             "|---|---|---:|---:|---:|---:|"]
    for r, row in rows.items():
        for v, name in (("ddp", "DDP"), ("fsdp", "FSDP2")):
            c = row[v]
            if c is None:
                lines.append(f"| {r} | {name} | - | - | - | - |")
                continue
            lines.append(f"| {r} | {name} | {_fmt(c['max_loss_rel_diff'], '.2e')} | "
                         f"{_fmt(c['val_loss_rel_diff'] * 100, '+.3f')} % | {c['tokens_per_s']:,.0f} | "
                         f"{_fmt(c['scaling'], '.2f')}× |")
    text = "\n".join(lines) + "\n" + NOTE
    if missing:
        text += f"\nMissing or unfinished runs: {', '.join(missing)}.\n"
    return {"recipes": rows, "missing": missing}, text


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python scripts/distributed_report.py RUN_DIR OUT_DIR", file=sys.stderr)
        return 2
    run_dir, out = Path(argv[0]), Path(argv[1])
    if not run_dir.is_dir():
        print(f"distributed_report: {run_dir} is not a folder", file=sys.stderr)
        return 2
    data, text = report(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distributed.json").write_text(json.dumps(data, indent=1))
    (out / "distributed.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
