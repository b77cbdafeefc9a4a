"""Errors a user can cause and fix: the CLI prints them as one line and exits non-zero, without a traceback."""


class UserError(Exception):
    """Bad input from the user (unknown name, missing file, corrupt checkpoint): the message says what was
    wrong and what is accepted."""
