"""The project's one exception type, turned into a one-line message at the CLI boundary."""

from __future__ import annotations


class MhcLabError(Exception):
    """A user-facing error: bad input, a missing file, a locked results folder.

    `str(error)` is one line that names the file and the field; the CLI prints it and exits
    with `exit_code` (2 for bad input), without a traceback.
    """

    exit_code: int = 2
