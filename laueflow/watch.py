"""Watching a scan folder while the beamline writes it (``laueflow watch``).

:class:`PointFeed` lists the folder every ``poll_interval`` seconds and hands the run driver
(:func:`laueflow.workflow.dag.run`, its ``feed``) the scan points whose frame files are all complete.
A frame file is complete when its size and modification time did not change between two listings
and it opens as HDF5 with the image dataset at ``file.h5.key`` (uint16, the detector's shape, its
last pixel readable): a file that is still being copied or written, or was cut short when the beamline
stopped, never is.  A frame that never completes holds back only its own point.

:class:`LagBook` keeps, per point, when its last frame arrived, when it was handed to the driver and
when its output came, and says when the lag grows (the reconstruction falling behind the beamline).
:func:`watch_status` is what ``laueflow watch`` adds to ``OUT/status.json`` (the ``watch`` entry).
:class:`WatchHooks` joins the two to a run as a hook: each point's lag is printed and recorded.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py

from .config import Config
from .errors import WatchError  # noqa: F401 (re-exported)
from .io.scan import _frame_files
from .workflow.hooks import RunHooks
from .workflow.status import PointState

if TYPE_CHECKING:  # only for annotations: the driver loads Parsl and JAX
    from .workflow.outcomes import PointResult

# Frame files of points that are not ready yet, listed in status.json (the rest are counted).
MAX_LISTED = 10


def _iso(t: float | None) -> str | None:
    """Epoch seconds as local ISO 8601 with milliseconds (None stays None)."""
    if t is None or not math.isfinite(t):
        return None
    return _dt.datetime.fromtimestamp(t).astimezone().isoformat(timespec="milliseconds")


def _clock_time(t: float) -> str:
    return _dt.datetime.fromtimestamp(t).strftime("%H:%M:%S.%f")[:-5]


def frame_problem(path: Path, key: str, frame_shape: tuple[int, int]) -> str | None:
    """Why a frame file cannot be used yet, or None when it opens with the expected image dataset.

    A truncated HDF5 file does not open (its superblock records the full length), a file still held
    open for writing by HDF5 is locked, and the last pixel is read so that its chunk must be there.
    """
    try:
        with h5py.File(path, "r") as f:
            node = f.get(key)
            if node is None:
                return f"no dataset {key}"
            if not isinstance(node, h5py.Dataset):
                return f"{key} is not a dataset"
            shape = tuple(node.shape)
            if len(shape) not in (2, 3) or shape[-2:] != tuple(frame_shape) or shape[:-2] not in ((), (1,)):
                return f"dataset {key} has shape {list(shape)}, expected one frame {list(frame_shape)}"
            if node.dtype != "uint16":
                return f"dataset {key} has dtype {node.dtype}, expected uint16"
            node[(-1,) * node.ndim]
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        return f"not a readable HDF5 file yet ({str(exc).splitlines()[0][:160]})"
    return None


@dataclass
class _Frame:
    """What the feed knows about one frame file."""

    path: Path
    size: int
    mtime_ns: int
    changed_after: float  # the last listing that saw the file absent or with another size or time
    changed_by: float  # the first listing that saw its current size and time
    complete: bool = False
    arrival: float = math.nan
    problem: str = "being written"

    def arrival_time(self) -> float:
        """When the file's last byte landed: its modification time, kept between the two listings that
        bracket its last change (a copy that keeps an old time, a file server with a skewed clock)."""
        return min(max(self.mtime_ns / 1e9, self.changed_after), self.changed_by)


class PointFeed:
    """The scan points of a growing folder of frame files, as they become ready.

    ``poll()`` lists the folder (at most once per ``poll_interval``; sooner calls return nothing) and
    returns the points that became ready since the last call, in order; ``done`` turns True once all
    of points 0 to ``max_points`` - 1 were handed out, after ``until_idle`` seconds without a new or
    growing frame file, or after :meth:`stop`.  ``clock`` gives epoch seconds (file times are compared
    with it).
    """

    def __init__(self, cfg: Config, location: str | Path, *, poll_interval: float = 2.0,
                 until_idle: float | None = None, max_points: int | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if not cfg.file.stacked:
            raise WatchError(f"{location}: watching needs one file per frame (file.stacked: true); a stack "
                             "file cannot be read while it is written, so reconstruct it with `laueflow run`")
        where = Path(location)
        if where.is_file():
            raise WatchError(f"{where}: is a file; watch the folder the frame files arrive in")
        if where.is_dir():
            self.folder, self._prefix = where, None
        elif where.parent.is_dir():
            self.folder, self._prefix = where.parent, where.name
        else:
            raise WatchError(f"{where}: no such folder to watch")
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval}")
        self.cfg = cfg
        self.poll_interval = float(poll_interval)
        self.until_idle = None if until_idle is None else float(until_idle)
        self.max_points = max_points
        self.clock = clock
        b, e, s = cfg.file.range
        self._begin, self._span, self._step = b, e - b, s
        self.n_frames = cfg.file.n_frames
        shape = cfg.geo.detector.shape
        self.frame_shape = (shape[1], shape[0])
        self.started = clock()
        self._frames: dict[int, _Frame] = {}
        self._first: int | None = None
        self._counts: dict[int, int] = {}
        self._arrival: dict[int, float] = {}
        self._ready_at: dict[int, float] = {}
        self._waiting: list[int] = []  # ready, held back while the numbering has a gap
        self._gap: list[int] = []
        self._last_scan = -math.inf
        self._last_activity = self.started
        self._stop_reason: str | None = None
        self._listing()  # settles the prefix now when frame files are already there

    # -- what it watches ----------------------------------------------------------------------------

    @property
    def prefix(self) -> str | None:
        """The frame files' prefix (None until the first frame file is seen, unless the path names it)."""
        return self._prefix

    def describe(self) -> str:
        """One line for humans: where, what, and when it stops."""
        name = f"{self._prefix or '<prefix>'}_<n>.{self.cfg.file.ext}"
        stops = []
        if self.until_idle is not None:
            stops.append(f"after {self.until_idle:g} s without new frames")
        if self.max_points is not None:
            stops.append(f"once points 0-{self.max_points - 1} are ready")
        stops.append("on Ctrl-C")
        return (f"{self.folder / name}, {self.n_frames} frames per point, every {self.poll_interval:g} s; "
                f"stops {' or '.join(stops)}")

    # -- the PointFeed protocol of the driver -------------------------------------------------------

    @property
    def done(self) -> bool:
        """True once no more points will be handed out."""
        return self._stop_reason is not None

    @property
    def stop_reason(self) -> str | None:
        return self._stop_reason

    def stop(self, reason: str = "stopped") -> None:
        """Hand out no more points."""
        if self._stop_reason is None:
            self._stop_reason = reason

    def poll(self) -> list[int]:
        """The points that became ready since the last call (empty when called within ``poll_interval``)."""
        if self.done or self.clock() - self._last_scan < self.poll_interval:
            return []
        return self._scan()

    def wait_first(self, sleep: Callable[[float], None] = time.sleep) -> list[int]:
        """Poll until some point is ready (returns them) or the feed is done (returns what it has)."""
        while True:
            ready = self.poll()
            if ready or self.done:
                return ready
            sleep(max(0.0, self._last_scan + self.poll_interval - self.clock()))

    # -- per point ----------------------------------------------------------------------------------

    def arrival(self, point: int) -> float | None:
        """Epoch seconds at which the last frame of a ready point arrived."""
        return self._arrival.get(point) if point in self._ready_at else None

    def ready_at(self, point: int) -> float | None:
        """Epoch seconds at which the point was handed to the driver."""
        return self._ready_at.get(point)

    @property
    def points_ready(self) -> list[int]:
        return sorted(self._ready_at)

    def incomplete(self) -> list[tuple[Path, str]]:
        """Frame files that are not complete (yet), in frame order, with what is wrong."""
        return [(f.path, f.problem) for _, f in sorted(self._frames.items()) if not f.complete]

    def unfinished_points(self) -> list[int]:
        """Points that have frame files but were not handed out (frames missing, incomplete, or a gap)."""
        seen = {self._point_of(n) for n in self._frames} | set(self._waiting)
        return sorted(k for k in seen if k is not None and k not in self._ready_at
                      and (self.max_points is None or k < self.max_points))

    @property
    def idle_seconds(self) -> float:
        """Seconds since a frame file last appeared or grew."""
        return self.clock() - self._last_activity

    def summary(self) -> dict[str, Any]:
        """The feed's state for status.json."""
        pending = self.incomplete()
        return {
            "folder": str(self.folder), "prefix": self._prefix, "frames_per_point": self.n_frames,
            "poll_interval": self.poll_interval, "until_idle": self.until_idle, "max_points": self.max_points,
            "state": self._stop_reason or "watching", "idle_seconds": round(self.idle_seconds, 1),
            "frames_complete": sum(f.complete for f in self._frames.values()),
            "frames_incomplete": len(pending),
            "incomplete": {p.name: why for p, why in pending[:MAX_LISTED]},
            "numbering_gap": self._gap[:MAX_LISTED], "points_ready": len(self._ready_at),
        }

    # -- listing ------------------------------------------------------------------------------------

    def _point_of(self, number: int) -> int | None:
        """The point frame file ``number`` belongs to (None for frames outside every point)."""
        q = number - (self._first or 0) - self._begin
        if q < 0:
            return None
        k, r = divmod(q, self._span)
        return k if r % self._step == 0 and r // self._step < self.n_frames else None

    def _listing(self) -> list[tuple[int, Path]]:
        groups = _frame_files(self.folder, self.cfg.file.ext)
        if self._prefix is None:
            if not groups:
                return []
            if len(groups) == 1:
                self._prefix = next(iter(groups))
            else:
                wanted = [n for n in (Path(self.cfg.file.path).name, self.folder.name) if n in groups]
                if not wanted:
                    raise WatchError(f"{self.folder}: frame files with several prefixes: "
                                     f"{', '.join(sorted(groups))}; give the prefix in file.path")
                self._prefix = wanted[0]
        items = sorted(groups.get(self._prefix, []))
        for (n1, f1), (n2, f2) in zip(items, items[1:], strict=False):
            if n1 == n2:
                raise WatchError(f"{self.folder}: {f1.name} and {f2.name} have the same frame number {n1}")
        return items

    def _scan(self) -> list[int]:
        now = self.clock()
        items = self._listing()
        numbers = [n for n, _ in items]
        if numbers:
            if self._first is None:
                self._first = numbers[0]
            elif numbers[0] < self._first:
                raise WatchError(f"{items[0][1]}: appeared after frames numbered from {self._first} were "
                                 "already used; the numbering of the scan changed while it was watched")
        present = set(numbers)
        for n in [n for n, f in self._frames.items() if n not in present and not f.complete]:
            del self._frames[n]  # removed before it completed (e.g. a writer's retry)
            self._last_activity = now
        newly: list[int] = []
        for n, path in items:
            frame = self._frames.get(n)
            if frame is not None and frame.complete:
                continue
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            seen = self.clock()
            if frame is None:
                self._frames[n] = _Frame(path, st.st_size, st.st_mtime_ns, changed_after=self._last_scan,
                                         changed_by=seen)
                self._last_activity = now
                continue
            if (st.st_size, st.st_mtime_ns) != (frame.size, frame.mtime_ns):
                frame.size, frame.mtime_ns, frame.problem = st.st_size, st.st_mtime_ns, "being written"
                frame.changed_after, frame.changed_by = self._last_scan, seen
                self._last_activity = now
                continue
            if st.st_size == 0:
                frame.problem = "empty file"
                continue
            problem = frame_problem(path, self.cfg.file.h5_key, self.frame_shape)
            if problem is not None:
                frame.problem = problem
                continue
            frame.complete, frame.problem, frame.arrival = True, "", frame.arrival_time()
            k = self._point_of(n)
            if k is None or (self.max_points is not None and k >= self.max_points):
                continue
            self._counts[k] = self._counts.get(k, 0) + 1
            self._arrival[k] = max(self._arrival.get(k, -math.inf), frame.arrival)
            if self._counts[k] == self.n_frames:
                newly.append(k)
        self._last_scan = now
        self._waiting.extend(newly)
        self._gap = sorted(set(range(numbers[0], numbers[-1] + 1)) - present) if numbers else []
        ready: list[int] = []
        if not self._gap:  # the run driver cannot open a folder with a gap in the numbering
            ready, self._waiting = sorted(self._waiting), []
            handed = self.clock()
            for k in ready:
                self._ready_at[k] = handed
        if self.max_points is not None and len(self._ready_at) >= self.max_points:
            self.stop(f"points 0-{self.max_points - 1} are ready")
        elif self.until_idle is not None and now - self._last_activity >= self.until_idle and not ready:
            self.stop(f"no new frames for {self.until_idle:g} s")
        return ready


@dataclass
class PointLag:
    """When a point's last frame arrived, when it was handed to the driver, when its output came."""

    point: int
    last_frame_at: float
    ready_at: float
    output_at: float
    status: str = PointState.DONE

    @property
    def lag(self) -> float:
        """Seconds from the arrival of the point's last frame to its output."""
        return self.output_at - self.last_frame_at

    def line(self) -> str:
        return (f"point {self.point:5d}: lag {self.lag:.1f} s (last frame {_clock_time(self.last_frame_at)}, "
                f"ready {_clock_time(self.ready_at)}, output {_clock_time(self.output_at)})")

    def to_dict(self) -> dict[str, Any]:
        return {"last_frame_at": _iso(self.last_frame_at), "ready_at": _iso(self.ready_at),
                "output_at": _iso(self.output_at), "lag_seconds": round(self.lag, 3), "status": self.status}


class LagBook:
    """The lag of every point reconstructed while watching, and whether it grows.

    The lag grows when, over the last ``window`` points, it rose by ``margin`` seconds or more with a
    positive trend: the points arrive faster than they are reconstructed.  :meth:`falling_behind`
    says so once, and again each time the lag has grown by another ``margin``.
    """

    def __init__(self, window: int = 4, margin: float = 10.0) -> None:
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        self.window = window
        self.margin = float(margin)
        self.entries: dict[int, PointLag] = {}
        self.kept: set[int] = set()  # points whose up-to-date output was kept (no lag: nothing was done)
        self._order: list[int] = []
        self._warned_at: float | None = None
        self.warning: str | None = None

    def record(self, point: int, last_frame_at: float, ready_at: float, output_at: float,
               status: str = PointState.DONE) -> PointLag:
        entry = PointLag(point, last_frame_at, ready_at, output_at, status)
        self.entries[point] = entry
        self._order.append(point)
        return entry

    def keep(self, point: int) -> None:
        """A point whose output from an earlier run was kept."""
        self.kept.add(point)

    def lags(self) -> list[float]:
        """Lags in the order the points came out."""
        return [self.entries[k].lag for k in self._order]

    def falling_behind(self) -> str | None:
        """A message when the lag has grown (see the class); None otherwise."""
        recent = self.lags()[-self.window:]
        if len(recent) < self.window:
            return None
        n = len(recent)
        mean_x, mean_y = (n - 1) / 2, statistics.fmean(recent)
        slope = sum((i - mean_x) * (y - mean_y) for i, y in enumerate(recent))
        growth = recent[-1] - recent[0]
        if slope <= 0 or growth < self.margin:
            self._warned_at = None if recent[-1] <= recent[0] else self._warned_at
            return None
        if self._warned_at is not None and recent[-1] < self._warned_at + self.margin:
            return None
        self._warned_at = recent[-1]
        self.warning = (f"falling behind the beamline: the lag grew from {recent[0]:.0f} s to "
                        f"{recent[-1]:.0f} s over the last {n} points (more decode workers would keep up)")
        return self.warning

    def summary(self) -> dict[str, Any]:
        lags = self.lags()
        return {
            "last_seconds": round(lags[-1], 3) if lags else None,
            "median_seconds": round(statistics.median(lags), 3) if lags else None,
            "max_seconds": round(max(lags), 3) if lags else None,
            "falling_behind": self._warned_at is not None, "warning": self.warning,
        }


def watch_status(feed: PointFeed, book: LagBook) -> dict[str, Any]:
    """The ``watch`` entry of status.json: the feed's state, the lag figures, and per point when its
    last frame arrived, when it was ready, when its output came and the lag (``lag_seconds``)."""
    points: dict[str, Any] = {}
    for k in feed.points_ready:
        entry = book.entries.get(k)
        points[str(k)] = entry.to_dict() if entry is not None else {
            "last_frame_at": _iso(feed.arrival(k)), "ready_at": _iso(feed.ready_at(k)), "output_at": None,
            "lag_seconds": None, "status": PointState.RESUMED if k in book.kept else PointState.PENDING}
    return {"watch": {**feed.summary(), "lag": book.summary(), "points": points}}


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


class WatchHooks(RunHooks):
    """What watching adds to a run: each point's lag (from its last frame to its output) is recorded
    in ``book`` and printed (``say``), a growing lag is warned about (``warn``), and status.json gets
    the ``watch`` entry.  ``clock`` gives epoch seconds (the time of each output)."""

    def __init__(self, feed: PointFeed, book: LagBook | None = None, *, say: Callable[[str], None] = print,
                 warn: Callable[[str], None] = _warn, clock: Callable[[], float] = time.time) -> None:
        self.feed = feed
        self.book = book if book is not None else LagBook()
        self.say = say
        self.warn = warn
        self.clock = clock

    def on_point_done(self, result: PointResult) -> None:
        arrival = self.feed.arrival(result.point)
        if arrival is None:
            return
        if result.status == PointState.RESUMED:
            self.book.keep(result.point)
            return
        entry = self.book.record(result.point, arrival, self.feed.ready_at(result.point), self.clock(),
                                 result.status)
        self.say(entry.line())
        warning = self.book.falling_behind()
        if warning:
            self.warn(warning)

    def status_section(self) -> dict[str, Any]:
        return watch_status(self.feed, self.book)


class Stopped(KeyboardInterrupt):
    """A stop signal (SIGINT, SIGTERM, SIGHUP) raised like Ctrl-C's KeyboardInterrupt; ``signum`` names it,
    and ``exit_status`` is the shell's 128 + its number (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM (a batch system's stop, ``kill``) and SIGHUP (a closed terminal) like Ctrl-C while
    the block runs: the first of them raises :class:`Stopped` (a KeyboardInterrupt), so that the run
    stops its workers, leaves status.json ``interrupted`` and a restart resumes; a second one while
    that stop is under way ends the process at once (``os._exit``, no clean-up)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if fired:
            os._exit(128 + signum)
        fired.append(signum)
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
