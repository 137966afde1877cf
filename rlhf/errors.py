"""The one exception type for mistakes a user can fix: bad config, missing files, bad data.

`rlhf.command` and the commands (`exit_on_user_error`) print its message as a single line and exit
non-zero, with no traceback.
"""

import contextlib
import sys


class UserError(Exception):
    """A problem in the user's input; the message says what is wrong, where, and how to fix it."""


class NonFiniteLoss(UserError):
    """Training diverged (NaN or infinite loss or weights); the message names the step."""


def first_line(err: Exception) -> str:
    """The first line of an exception's message (library errors can run to pages)."""
    message = str(err).strip()
    return message.splitlines()[0] if message else type(err).__name__


@contextlib.contextmanager
def exit_on_user_error():
    """A command's ending for a mistake the user can fix: `error: <message>` on stderr, one line,
    and exit status 2, with no traceback."""
    try:
        yield
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
