"""The one exception type for mistakes a user can fix: bad config, missing files, bad data.

`rlhf.run` prints its message as a single line and exits non-zero, with no traceback.
"""


class UserError(Exception):
    """A problem in the user's input; the message says what is wrong, where, and how to fix it."""
