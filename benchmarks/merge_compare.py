"""Merge runs of several `qtrain compare` folders (same model, data, steps and seed) into one table and plot.

Usage: python benchmarks/merge_compare.py OUT_PREFIX LABEL=RUN_FOLDER...   (a run folder holds summary.json and
log.jsonl). Writes OUT_PREFIX.md (the table of `qtrain compare`, Δ % against the run labelled bf16, no speed
ratio: the runs may come from different calls), OUT_PREFIX.png and OUT_PREFIX.json. A run without summary.json
whose log ends with a validation loss (stopped after its last evaluation) gets a row from its log (median
tokens/s, no peak memory); one stopped earlier is plotted and listed with its last step.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from qtrain.train.compare import table
from qtrain.train.plots import plot_runs, read_log


def main(argv: list[str]) -> None:
    prefix, specs = Path(argv[0]), [a.split("=", 1) for a in argv[1:]]
    runs, summaries, unfinished = {}, [], []
    for label, folder in specs:
        folder = Path(folder)
        runs[label] = read_log(folder / "log.jsonl")
        summary = folder / "summary.json"
        last = runs[label][-1]
        if summary.exists():
            summaries.append({**json.loads(summary.read_text()), "recipe": label})
        elif "val_loss" in last:
            rates = sorted(r["tokens_per_s"] for r in runs[label])
            summaries.append({"recipe": label, "steps": last["step"], "final_val_loss": last["val_loss"],
                              "tokens_per_s": rates[len(rates) // 2], "peak_memory_bytes": None,
                              "device": "cuda", "from_log": True})
        else:
            unfinished.append(f"{label}: stopped at step {runs[label][-1]['step']}")
    plot_runs(runs, prefix.with_suffix(".png"), prefix.name)
    text = table(summaries, shared=True) + "".join(f"\n- {u}" for u in unfinished)
    prefix.with_suffix(".md").write_text(text + "\n")
    prefix.with_suffix(".json").write_text(json.dumps(summaries, indent=1))
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
