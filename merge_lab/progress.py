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


def progress_bar(console: Console | None, enabled: bool = True, *counts: ProgressColumn) -> Progress:
    """Description, bar, `counts` (default: done/total), elapsed time and ETA; `enabled=False`
    keeps the same calls working without drawing anything."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), *(counts or (MofNCompleteColumn(),)),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, disable=not enabled,
    )
