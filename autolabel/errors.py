"""The one exception type users see.

Every message names the thing that is wrong (file, field, shape) and how to fix
it; the CLI prints it without a traceback and exits non-zero.
"""


class AutolabelError(Exception):
    """A problem with the user's input or environment, not a bug in autolabel."""
