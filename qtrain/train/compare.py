"""``qtrain compare``: train the same model on the same data with several recipes and compare the losses.

Every recipe's run uses the same seed, so the same initial weights, the same batches in the same order, the same
validation set and the same optimizer; only the recipe differs. Each run gets a sub-folder named after its
recipe; the comparison writes ``compare.png`` (train and validation loss, one line per recipe) and
``compare.md`` (final validation loss, Δ % vs ``bf16``, tokens/s, peak memory).

``seeds`` (``--seeds 0,1,2``): every recipe once per seed, in sub-folders ``<recipe>-seed<N>``; the table then
gives each recipe's final validation loss per seed, its Δ % against ``bf16`` of the same seed, and the mean Δ with
its standard error over seeds (one run per recipe does not resolve differences below the run-to-run spread: on
llama-125m at 500 steps BF16 runs of the same seed ended up to 1 % apart).

``jobs > 1`` trains that many recipes at once, each in its own process on the same device: the losses are the
same as one after another (same seed, same data), but tokens/s and peak memory then measure runs sharing the
device, and ``compare.md`` says so.

The comparison files are rewritten as each run finishes: a comparison stopped part way (a device's time limit)
keeps the runs it finished, and ``compare.md`` says how many of how many.
"""
from __future__ import annotations

import functools
import io
import json
import math
import multiprocessing
import os
import statistics
import sys
from datetime import datetime
from pathlib import Path

import torch

from qtrain.errors import UserError
from qtrain.train import distributed
from qtrain.train.config import TrainConfig
from qtrain.train.loop import check_out, resolve_device, resolve_recipe, train, unique_path
from qtrain.train.plots import plot_runs, read_log


def parse_recipes(text: str) -> list[str]:
    """The comma-separated recipes of ``--recipes`` (preset names or recipe .json paths), checked."""
    names = [r.strip() for r in text.split(",") if r.strip()]
    if not names:
        raise UserError("--recipes needs at least one recipe name, e.g. --recipes bf16,switchback")
    resolved = [resolve_recipe(name).name for name in names]
    if len(set(resolved)) != len(resolved):
        raise UserError(f"--recipes {text!r} names a recipe twice")
    return names


def parse_seeds(text: str) -> list[int]:
    """The comma-separated integer seeds of ``--seeds``, checked (at least one, none twice)."""
    try:
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--seeds {text!r}: expected comma-separated integers, e.g. --seeds 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r}: expected distinct comma-separated integers, e.g. --seeds 0,1,2")
    return seeds


def seeds_table(summaries: list[dict]) -> str:
    """The markdown table of a comparison over seeds: per recipe the final validation loss at each seed, Δ % vs
    the ``bf16`` run of the same seed, and the mean Δ ± its standard error over seeds (sd / √n of the paired
    differences; "—" for one seed, and for a run not in ``summaries``)."""
    seeds = sorted({s["seed"] for s in summaries})
    recipes = list(dict.fromkeys(s["recipe"] for s in summaries))
    val = {(s["recipe"], s["seed"]): s["final_val_loss"] for s in summaries}
    lines = ["| recipe | " + " | ".join(f"val loss seed {n}" for n in seeds) + " | mean val loss | "
             + " | ".join(f"Δ % seed {n}" for n in seeds) + " | mean Δ % ± s.e. |",
             "|---|" + "---:|" * (2 * len(seeds) + 2)]
    for r in recipes:
        losses = [val.get((r, n)) for n in seeds]                      # None: that run has not finished
        deltas = [100 * (val[r, n] - val["bf16", n]) / val["bf16", n] if (r, n) in val and ("bf16", n) in val
                  else None for n in seeds]
        known = [d for d in deltas if d is not None]
        if len(known) > 1:
            mean = f"{statistics.mean(known):+.2f} % ± {statistics.stdev(known) / math.sqrt(len(known)):.2f}"
        else:
            mean = f"{known[0]:+.2f} %" if known else "—"
        done = [v for v in losses if v is not None]
        lines.append(f"| {r} | " + " | ".join("—" if v is None else f"{v:.4f}" for v in losses)
                     + f" | {statistics.mean(done):.4f} | "
                     + " | ".join("—" if d is None else f"{d:+.2f} %" for d in deltas) + f" | {mean} |")
    return "\n".join(lines) + "\n"


def table(summaries: list[dict], shared: bool = False, seeds: bool = False) -> str:
    """The markdown comparison table (Δ % and speed relative to the ``bf16`` run when there is one; with
    ``seeds``, to the ``bf16`` run of the same seed, each row labelled with its seed). ``shared``: the runs ran
    at the same time on one device, so their speeds are not compared."""
    def base(s, key):
        return next((b[key] for b in summaries if b["recipe"] == "bf16" and (not seeds or b["seed"] == s["seed"])),
                    None)

    lines = ["| recipe | final val loss | Δ % vs bf16 | tokens/s | speed vs bf16 | peak memory |",
             "|---|---:|---:|---:|---:|---:|"]
    for s in summaries:
        val, base_val, base_rate = s["final_val_loss"], base(s, "final_val_loss"), base(s, "tokens_per_s")
        delta = f"{100 * (val - base_val) / base_val:+.2f} %" if base_val else "—"
        speed = f"{s['tokens_per_s'] / base_rate:.2f}×" if base_rate and s["tokens_per_s"] and not shared else "—"
        mem = (f"{s['peak_memory_bytes'] / 2**30:.2f} GiB" if s["peak_memory_bytes"] is not None
               else "n/a (CPU)" if s.get("device") == "cpu" else "n/a")
        label = f"{s['recipe']} (seed {s['seed']})" if seeds else s["recipe"]
        lines.append(f"| {label} | {val:.4f} | {delta} | {s['tokens_per_s']:,.0f} | {speed} | {mem} |")
    return "\n".join(lines) + "\n"


def _train_one(cfg: TrainConfig, threads: int) -> dict:
    """One recipe's run in a worker process (``jobs > 1``). On a GPU it gets its share of the CPU threads (the
    host work is launches); on the CPU the thread count stays, as it decides the order of CPU float sums. Each
    line it prints starts with ``[its run folder's name]``: the runs' lines interleave."""
    if resolve_device(cfg.device).type != "cpu":
        torch.set_num_threads(threads)
    stdout = sys.stdout
    sys.stdout = _Prefixed(stdout, f"[{Path(cfg.out).name}] ")
    try:
        return train(cfg)
    finally:
        sys.stdout = stdout


class _Prefixed(io.TextIOBase):
    """A text stream that writes to ``stream`` with ``prefix`` at the start of every line."""

    def __init__(self, stream, prefix: str):
        self.stream, self.prefix, self.at_start = stream, prefix, True

    def write(self, text: str) -> int:
        for line in text.splitlines(keepends=True):
            self.stream.write((self.prefix if self.at_start else "") + line)
            self.at_start = line.endswith("\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def compare(cfg: TrainConfig, recipe_names: list[str], jobs: int = 1, seeds: list[int] | None = None) -> list[dict]:
    """Train one run per recipe (per seed of ``seeds``; default ``cfg.seed`` alone) under ``cfg.out`` and write the
    comparison; return the runs' summaries (each with its ``seed``). ``jobs``: how many runs train at once (each
    in a process of its own, on the same device)."""
    if jobs < 1:
        raise UserError(f"--jobs {jobs}: must be at least 1")
    if jobs > 1 and distributed.launched():
        raise UserError("--jobs runs recipes side by side in one process each; under torchrun use --jobs 1")
    if cfg.resume:
        raise UserError("compare does not resume: run it again (each recipe's folder holds its checkpoints, "
                        "which `qtrain train --resume` can continue)")
    world, _ = distributed.init(resolve_device(cfg.device))            # under torchrun: rank 0's folder
    if cfg.out:
        check_out(Path(cfg.out))                                         # new or empty, like a run folder
    out = Path(distributed.broadcast(cfg.out or str(unique_path(
        Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-compare-{cfg.model}")), world))
    # no folder yet: each run makes its own (and ``out`` with the first) once its model is built
    many = seeds is not None and len(seeds) > 1
    seeds = seeds or [cfg.seed]
    folders = {name: resolve_recipe(name).name for name in recipe_names}
    configs = [cfg.replace(recipe=name, seed=seed, out=str(out / (f"{folders[name]}-seed{seed}" if many
                                                                   else folders[name])))
               for name in recipe_names for seed in seeds]
    jobs = min(jobs, len(configs))
    finished: dict[int, dict] = {}

    def done(i: int, summary: dict) -> None:
        summary["seed"] = configs[i].seed
        finished[i] = summary
        if "rank" not in summary:        # under torchrun, rank 0 writes the comparison
            _write(cfg, out, [finished[k] for k in sorted(finished)], len(configs), jobs, many, seeds)

    if jobs > 1:
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            threads = max(1, (os.cpu_count() or 1) // jobs)
            for i, summary in pool.imap_unordered(functools.partial(_train_indexed, configs=configs,
                                                                    threads=threads), range(len(configs))):
                done(i, summary)
    else:
        for i, c in enumerate(configs):
            done(i, train(c))
    return [finished[i] for i in range(len(configs))]


def _train_indexed(i: int, configs: list[TrainConfig], threads: int) -> tuple[int, dict]:
    """``(i, summary)`` of run ``configs[i]`` (:func:`_train_one`): runs finish out of order under ``--jobs``."""
    return i, _train_one(configs[i], threads)


def _write(cfg: TrainConfig, out: Path, summaries: list[dict], total: int, jobs: int, many: bool,
           seeds: list[int]) -> None:
    """Write ``compare.md``, ``compare.json`` and ``compare.png`` of the runs finished so far (after each run: a
    comparison stopped by a time limit keeps the runs it finished)."""
    runs = {(f"{s['recipe']} seed {s['seed']}" if many else s["recipe"]): read_log(Path(s["out"]) / "log.jsonl")
            for s in summaries}
    first = summaries[0]
    title = f"{cfg.model} · {cfg.data}/{cfg.tokenizer} · {cfg.steps} steps · {first['device']} {first['precision']}"
    plot_runs(runs, out / "compare.png", title)
    header = (f"# qtrain compare: {cfg.model} on {cfg.data} ({cfg.tokenizer} tokens)\n\n"
              f"{cfg.steps} steps × {cfg.batch_size * cfg.grad_accum} × {cfg.seq_len} tokens, {cfg.optimizer}, "
              f"seed{'s ' + ', '.join(map(str, seeds)) if many else ' ' + str(seeds[0])}, {first['device']}, "
              f"{first['precision']}.\n\n"
              + (f"{jobs} runs trained at a time on one device: tokens/s and peak memory are those of runs sharing "
                 "it, not comparable between recipes.\n\n" if jobs > 1 else "")
              + (f"**{len(summaries)} of {total} runs finished** (this file is rewritten as each run ends).\n\n"
                 if len(summaries) < total else ""))
    body = (seeds_table(summaries) + "\nEvery run, speed and memory:\n\n" + table(summaries, shared=jobs > 1,
                                                                                   seeds=True)) if many \
        else table(summaries, shared=jobs > 1)
    (out / "compare.md").write_text(header + body + "\n![loss curves](compare.png)\n")
    (out / "compare.json").write_text(json.dumps(summaries, indent=1))
