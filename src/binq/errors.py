"""The one exception type binq raises for problems a user can fix (bad input, bad files, bad numbers)."""


class BinqError(Exception):
    """A user-facing error: the command line prints its message on one line and exits with code 2."""
