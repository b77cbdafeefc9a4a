"""``python -m qtrain.bench SUITE``: the bench command on its own (same arguments as ``qtrain bench``), plus
``python -m qtrain.bench e2e [options]``, the end-to-end training-step suite (``qtrain.bench.e2e``; its options
are its own: ``python -m qtrain.bench e2e -h``). A user error (no GPU, unknown name) is one line on stderr,
exit status 2."""
import argparse
import sys

from qtrain.bench import add_commands
from qtrain.errors import UserError


def main(argv: list[str]) -> int:
    if argv[:1] == ["e2e"]:
        from qtrain.bench import e2e

        parser = argparse.ArgumentParser(prog="python -m qtrain.bench e2e", description=e2e.__doc__.split("\n\n")[0])
        e2e.add_arguments(parser)
        args = parser.parse_args(argv[1:])
        func = e2e.run
    else:
        parser = argparse.ArgumentParser(prog="python -m qtrain.bench", epilog="python -m qtrain.bench e2e -h: the "
                                         "end-to-end training-step suite")
        add_commands(parser.add_subparsers(dest="command"))
        args = parser.parse_args(["bench"] + argv)
        func = args.func
    try:
        return int(func(args) or 0)
    except UserError as e:
        print(f"qtrain bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
