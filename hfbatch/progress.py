"""Progress reporting as injected objects: a rich bar for people, a null one for --quiet/--json."""

from __future__ import annotations

from typing import Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn


class ProgressReporter(Protocol):
    def start(self, total_rows: int | None) -> None: ...
    def advance(self, rows: int, *, hit_rate: float) -> None: ...
    def finish(self) -> None: ...


class NullProgress:
    """Reports nothing; the library default."""

    def start(self, total_rows: int | None) -> None:
        pass

    def advance(self, rows: int, *, hit_rate: float) -> None:
        pass

    def finish(self) -> None:
        pass


class RichProgress:
    """Rows done / total, rows per second and cache hit rate, on stderr."""

    def __init__(self, console: Console | None = None):
        self._bar = Progress(
            TextColumn("[bold]embedding"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]} rows/s · cache hits {task.fields[hits]}"),
            TimeElapsedColumn(),
            console=console or Console(stderr=True),
            transient=False,
        )
        self._task = None

    def start(self, total_rows: int | None) -> None:
        self._bar.start()
        self._task = self._bar.add_task("embed", total=total_rows, rate="-", hits="-")

    def advance(self, rows: int, *, hit_rate: float) -> None:
        if self._task is None:
            return
        self._bar.advance(self._task, rows)
        task = self._bar.tasks[0]
        speed = task.speed
        self._bar.update(self._task, rate=f"{speed:,.0f}" if speed else "-", hits=f"{hit_rate:.0%}")

    def finish(self) -> None:
        self._bar.stop()
