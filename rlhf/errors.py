"""The one exception type for mistakes a user can fix: bad config, missing files, bad data.

`rlhf.run` prints its message as a single line and exits non-zero, with no traceback.
"""


class UserError(Exception):
    """A problem in the user's input; the message says what is wrong, where, and how to fix it."""


class NonFiniteLoss(UserError):
    """Training diverged (NaN or infinite loss or weights); the message names the step."""


def first_line(err: Exception) -> str:
    """The first line of an exception's message (library errors can run to pages)."""
    message = str(err).strip()
    return message.splitlines()[0] if message else type(err).__name__
