"""The planners' progress bar (rich, on stderr). ``enabled`` comes from ``--progress`` or a
terminal on stderr; with ``--progress`` the bar is drawn even when stderr is not a terminal."""
from __future__ import annotations

import sys


def progress_bar(enabled: bool):
    """A transient :class:`rich.progress.Progress` on stderr (disabled: draws nothing)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
    return Progress("[progress.description]{task.description}", BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(file=sys.stderr, force_terminal=enabled or None),
                    transient=True, disable=not enabled)
