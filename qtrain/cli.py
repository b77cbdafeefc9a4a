"""The ``qtrain`` command: argument parsing only. Each subsystem registers its sub-commands."""
from __future__ import annotations

import argparse
import sys

from qtrain.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from qtrain import bench, train
    from qtrain.train import inspection

    parser = argparse.ArgumentParser(prog="qtrain", description="Train transformers with INT8/INT4 GEMMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train.add_commands(sub)   # train, compare
    bench.add_commands(sub)   # bench
    inspection.add_commands(sub)   # inspect
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from qtrain import ops
        ops.get_backend()                  # a bad QTRAIN_BACKEND is reported now, before any run folder exists
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"qtrain {args.command}: error: {e}", file=sys.stderr)
        return 2
