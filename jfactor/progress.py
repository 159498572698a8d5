"""A rich progress bar on stderr that is a no-op when disabled (library calls, tests, sweeps' inner runs).

On stderr, so that a command's stdout holds only its results (a pipe or file gets no blank
lines where a transient bar stood)."""

from __future__ import annotations


class ProgressBar:
    """``with ProgressBar(enabled, total, label) as bar: bar.advance(n)``."""

    def __init__(self, enabled: bool, total: int, label: str):
        self.bar = None
        if enabled and total > 0:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), transient=True, console=Console(stderr=True))
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
