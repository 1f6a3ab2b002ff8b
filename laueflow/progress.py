"""Progress of a run for people: a live bar on a terminal, quiet lines in logs and batch jobs.

Both reporters are run hooks (:class:`ProgressHooks`) that take the
:class:`laueflow.workflow.hooks.ProgressEvent` stream of a run and show points and pixels done of the
total, pixels per second, the time left and the failures.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .workflow.hooks import ProgressEvent, RunHooks

if TYPE_CHECKING:  # only for annotations: the driver loads Parsl and JAX
    from .workflow.dag import RunResult


def plural(n: int, word: str) -> str:
    """``1 point``, ``2 points``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _Tally:
    """Counts shared by both reporters."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.points_total = 0
        self.points_done = 0
        self.failed = 0
        self.pixels = 0
        self.blocks_done = 0
        self.blocks_total = 0
        self.reused = 0  # blocks kept from an earlier run: no work, so no part of the pace

    def update(self, event: Any) -> None:
        self.points_total = event.points_total
        self.blocks_total = event.blocks_total
        if event.kind == "block":
            if event.reused:
                self.reused += event.blocks_done - self.blocks_done
            self.pixels += event.n_pixels
            self.blocks_done = event.blocks_done
        elif event.kind == "point":
            self.points_done += 1
            self.failed += not event.result.ok
            self.blocks_done = event.blocks_done

    @property
    def rate(self) -> float:
        """Pixels per second since the run started."""
        return self.pixels / max(time.monotonic() - self.t0, 1e-6)

    @property
    def eta(self) -> float | None:
        """Seconds left, from the pace of the blocks decoded so far (None before the first one)."""
        left = self.blocks_total - self.blocks_done
        if left <= 0:
            return 0.0
        fresh = self.blocks_done - self.reused
        if fresh <= 0:
            return None
        return left * (time.monotonic() - self.t0) / fresh

    def line(self) -> str:
        fails = f", {self.failed} failed" if self.failed else ""
        return (f"progress: {self.points_done}/{self.points_total} points, "
                f"{self.blocks_done}/{self.blocks_total} blocks, {self.pixels:,} pixels, "
                f"{self.rate:,.0f} pixels/s, ETA {_duration(self.eta)}{fails}")


class ProgressHooks(RunHooks):
    """A reporter as a run hook: ``report`` takes each progress event, ``close`` ends the display when
    the run ends (also when it was interrupted)."""

    def __init__(self, report: Callable[[ProgressEvent], None], close: Callable[[], None]) -> None:
        self.report = report
        self.close = close

    def on_event(self, event: ProgressEvent) -> None:
        self.report(event)

    def on_finish(self, result: RunResult | None) -> None:
        self.close()


def plain_reporter(every: float = 30.0, echo: Callable[[str], None] = click.echo) -> ProgressHooks:
    """Line-based progress for logs: the totals, one line per point, and a progress line every
    ``every`` seconds while blocks finish."""
    tally = _Tally()
    last = [time.monotonic()]

    def report(event: Any) -> None:
        tally.update(event)
        if event.kind == "start":
            echo(f"{plural(event.points_total, 'point')}, {plural(event.blocks_total, 'block')} to decode")
        elif event.kind == "point":
            echo(event.result.line())
        elif event.kind == "block" and time.monotonic() - last[0] >= every:
            last[0] = time.monotonic()
            echo(tally.line())

    def close() -> None:
        if tally.blocks_done:
            echo(tally.line())

    return ProgressHooks(report, close)


def live_reporter(console: Any) -> ProgressHooks:
    """A rich progress bar (blocks), with points, pixels, pixels per second, time left and failures;
    each finished point is printed above the bar (failures in red)."""
    tally = _Tally()
    bar = Progress(TextColumn("[bold]decoding"), BarColumn(), MofNCompleteColumn(), TextColumn("blocks"),
                   TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console)
    task: list[Any] = []

    def info() -> str:
        fails = f", [red]{tally.failed} failed[/red]" if tally.failed else ""
        return (f"{tally.points_done}/{tally.points_total} points, {tally.pixels:,} px, "
                f"{tally.rate:,.0f} px/s, ETA {_duration(tally.eta)}{fails}")

    def report(event: Any) -> None:
        tally.update(event)
        if event.kind == "start":
            bar.start()
            task.append(bar.add_task("decode", total=max(event.blocks_total, 1), info=info()))
            return
        if event.kind == "point":
            style = "" if event.result.ok else "[red]"
            bar.console.print(style + event.result.line(), markup=bool(style), highlight=False)
        if task:
            bar.update(task[0], completed=event.blocks_done, total=max(event.blocks_total, 1), info=info())

    return ProgressHooks(report, bar.stop)


def reporter(console: Any) -> ProgressHooks:
    """The live bar on a terminal, plain lines otherwise."""
    return live_reporter(console) if console.is_terminal else plain_reporter()
