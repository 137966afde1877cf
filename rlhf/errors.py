"""The one exception type for mistakes a user can fix: bad config, missing files, bad data.

`rlhf.command` and the commands (`exit_on_user_error`) print its message as a single line and exit
non-zero, with no traceback; a command with several mistakes (`UserErrors`: validation collects
them) prints one line for each.
"""

import contextlib
import sys


class UserError(Exception):
    """A problem in the user's input; the message says what is wrong, where, and how to fix it."""


class NonFiniteLoss(UserError):
    """Training diverged (NaN or infinite loss or weights); the message names the step."""


class UserErrors(UserError):
    """Several mistakes of one command, reported together: one line each."""

    def __init__(self, problems: list):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@contextlib.contextmanager
def collecting(problems: list):
    """Run the block; a mistake it raises joins `problems` instead of stopping the caller."""
    try:
        yield
    except UserError as err:
        problems.extend(str(err).splitlines())


def raise_problems(problems: list) -> None:
    """Raise what was collected: one UserError, several as UserErrors, nothing when none."""
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        raise UserErrors(problems)


def error_lines(err: UserError) -> str:
    """`error: <line>` for each mistake in `err`."""
    return "\n".join(f"error: {line}" for line in str(err).splitlines() or [""])


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
        print(error_lines(err), file=sys.stderr)
        raise SystemExit(2) from None
