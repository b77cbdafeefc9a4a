"""``python -m qtrain.bench SUITE``: the bench command on its own (same arguments as ``qtrain bench``)."""
import argparse
import sys

from qtrain.bench import add_commands

parser = argparse.ArgumentParser(prog="python -m qtrain.bench")
add_commands(parser.add_subparsers(dest="command"))
args = parser.parse_args(["bench"] + sys.argv[1:])
sys.exit(args.func(args))
