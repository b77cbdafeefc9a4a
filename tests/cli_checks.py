"""Shared check for CLI tests: a user error is one ``qtrain <command>: error:`` line, no traceback."""
from qtrain.cli import main


def one_error_line(capsys, argv, *expected) -> str:
    """Run ``qtrain argv``: exit status 2 and exactly one stderr line holding every ``expected`` text."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"qtrain {argv[0]}: error: "), lines[0]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]
