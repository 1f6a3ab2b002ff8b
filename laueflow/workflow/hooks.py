"""How front ends follow and extend a run: the progress events, the hooks the driver calls, the point feed.

A hook is an object with the methods of :class:`RunHooks` (subclass it and override what you need);
``run(..., hooks=[...])`` calls every hook in order:

- ``on_event`` for each :class:`ProgressEvent` (``start``, ``block``, ``point``);
- ``on_point_done`` for each point that ended, the kept (resumed) ones included;
- ``tick`` about every ``poll_interval`` seconds while tasks run;
- ``status_section`` at each write of ``OUT/status.json`` (its entries are merged in);
- ``on_finish`` once the run has ended (``None`` when it was interrupted or failed).

The hooks live beside what they serve: :class:`laueflow.progress.ProgressHooks` (the bar or the log
lines), :class:`laueflow.watch.WatchHooks` (the lag of each point) and
:class:`laueflow.transfer.TransferHooks` (Globus Transfer of the finished files).  A :class:`PointFeed`
(``laueflow watch``) adds points while the run goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # only for annotations: dag imports this module
    from .dag import RunResult
    from .outcomes import PointResult


@dataclass
class ProgressEvent:
    """Sent to ``on_event``: ``start`` (totals known), ``block`` (one block finished, with its point and
    pixel count) and ``point`` (one point finished, with its result).  Totals grow when points are
    added while the run goes on."""

    kind: str
    blocks_done: int
    blocks_total: int
    points_total: int
    result: PointResult | None = None
    point: int | None = None
    n_pixels: int = 0
    reused: bool = False  # a "block" event for finished blocks kept from an earlier run


class RunHooks:
    """What a front end adds to a run; every method does nothing unless overridden."""

    def on_event(self, event: ProgressEvent) -> None:
        """A progress event."""

    def on_point_done(self, result: PointResult) -> None:
        """A point ended (done, partial, skipped, failed, or resumed: its file was kept)."""

    def tick(self) -> None:
        """Called about every ``poll_interval`` seconds while tasks run."""

    def status_section(self) -> dict[str, Any]:
        """Entries to merge into ``OUT/status.json`` at each write."""
        return {}

    def on_finish(self, result: RunResult | None) -> None:
        """The run ended (``None``: interrupted or failed); called after the output folder is unlocked."""


class ProgressCallback(RunHooks):
    """A plain callable that receives every progress event (``run(..., progress=f)``)."""

    def __init__(self, callback: Callable[[ProgressEvent], None]) -> None:
        self.callback = callback

    def on_event(self, event: ProgressEvent) -> None:
        self.callback(event)


class PointFeed(Protocol):
    """Points that become ready while a run goes on (``laueflow watch``): ``poll`` returns the points
    that became ready since the last call; ``done`` is True once no more will come."""

    def poll(self) -> Sequence[int]: ...

    @property
    def done(self) -> bool: ...
