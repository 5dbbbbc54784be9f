"""The one exception type that the CLI turns into a one-line message instead of a traceback."""


class UserError(Exception):
    """Bad input or an unmet precondition the user can fix (missing folder, bad bits, ...)."""
