"""The one progress-bar style of every long step (merge, align, fuse, compare)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_bar(console: Console | None, enabled: bool = True, *counts: ProgressColumn, eta: bool = True) -> Progress:
    """Description, bar, `counts` (default: done/total), elapsed time and ETA; `enabled=False`
    keeps the same calls working without drawing anything. `eta=False` for many short bars with
    long descriptions (compare's one per candidate and suite), which the ETA would squeeze out of
    an 80-column terminal."""
    remaining = (TextColumn("ETA"), TimeRemainingColumn()) if eta else ()
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), *(counts or (MofNCompleteColumn(),)),
        TimeElapsedColumn(), *remaining, console=console, disable=not enabled,
    )
