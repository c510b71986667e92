"""The one error type that the CLI reports as a message instead of a traceback."""


class UserError(Exception):
    """Something the user can fix: a bad config value, an unreadable file, a checkpoint that does not fit.

    The CLI prints its message and exits with status 2; every other exception is a bug and keeps its
    traceback.
    """
