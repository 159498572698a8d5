"""A rich progress bar on stderr that is a no-op when disabled (library calls, tests, sweeps' inner runs)
or when stderr is not a terminal.

On stderr, so that a command's stdout holds only its results; and only on a terminal, where
it can redraw itself: elsewhere (a pipe, a log file, CI) rich shows nothing of a transient
bar but the blank line it leaves."""

from __future__ import annotations

import sys


def on_terminal(console) -> bool:
    """Whether a bar on ``console`` (rich, on stderr) can redraw itself: stderr is a terminal, or a
    notebook shows it.  Not rich's ``is_terminal``, which ``FORCE_COLOR`` (set by many CI
    systems) makes true in a log."""
    return console.is_jupyter or sys.stderr.isatty()


class ProgressBar:
    """``with ProgressBar(enabled, total, label) as bar: bar.advance(n)``."""

    def __init__(self, enabled: bool, total: int, label: str):
        self.bar = None
        if not (enabled and total > 0):
            return
        from rich.console import Console

        console = Console(stderr=True)
        if on_terminal(console):
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), transient=True, console=console)
            self.task = self.bar.add_task(label, total=total)

    def __enter__(self):
        if self.bar:
            self.bar.start()
        return self

    def advance(self, steps: int = 1, description: str | None = None) -> None:
        if self.bar:
            self.bar.update(self.task, advance=steps, **({"description": description} if description else {}))

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()
