"""The one error type users see.

Anything raised as :class:`UserError` is a problem with the user's input (a flag, a file, a
config key). The CLI prints it as a single line and exits with status 2; library callers get an
ordinary ``ValueError`` subclass they can catch.
"""


class UserError(ValueError):
    """Bad input. The message is one line and names the offending field or file."""
