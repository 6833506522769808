"""One exception type for every problem a user can fix: the CLI prints it and exits non-zero."""

from __future__ import annotations


class MergeLabError(Exception):
    """A user-facing error: the message names the file, tensor or recipe key, and what to do."""
