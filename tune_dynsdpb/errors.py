"""The one error type users see.

Anything raised as :class:`UserError` is a problem with the user's input (a flag, a file, a
config key). The CLI prints it as a single line and exits with status 2; library callers get an
ordinary ``ValueError`` subclass they can catch.
"""


class UserError(ValueError):
    """Bad input. The message is one line and names the offending field or file."""


class StoreError(RuntimeError):
    """A store (the MLflow artifact store, the storage path) failed in the middle of a command. The
    message is one line naming the store and the cause; the CLI prints it and exits with status 1.
    What the command made is kept, and running it again finishes the job."""


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:limit]
