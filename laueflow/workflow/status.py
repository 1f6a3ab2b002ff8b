"""What a run is doing, for other processes: ``OUT/status.json`` and the lock on the output folder.

The status file is rewritten atomically (temporary name, then rename) at most about once a second
while blocks finish, at every point event and at the end, so a notebook or a monitoring script can
read it at any time.  Its format (``laueflow-status/1``)::

    {"format", "laueflow_version", "state": running | finished | interrupted | failed,
     "scan", "out_dir", "command", "host", "pid", "started", "updated", "finished",
     "totals": {"points", "points_done", "points_failed", "points_kept", "points_computed", "blocks",
                "blocks_done", "pixels_done", "pixels_decoded", "pixels_reused", "pixels_kept",
                "pixels_failed", "pixels_per_second", "eta_seconds"},
     "points": {"<k>": {"state": pending | running | done | resumed | partial | skipped | failed,
                        "file", "blocks_total", "blocks_done", "blocks_failed", "blocks_reused", "n_pixels",
                        "pixels_decoded", "pixels_reused", "pixels_failed",
                        "started", "finished", "seconds", "reason"}},
     "transfers": {...}}          # only when results are sent with Globus Transfer

Pixels and points are counted by where they came from: ``kept`` (a point file of an earlier run that
is up to date, state ``resumed``), ``reused`` (finished block files of an earlier run, stitched into
this run's point file), ``decoded`` (by this run's block tasks) and ``failed`` (the tile pixels of
blocks that failed).  ``points_computed`` are the points whose file this run wrote (done or partial);
``pixels_done`` is every pixel of the points that were not kept, and the pace (``pixels_per_second``)
counts only the decoded ones.

A run that ends other than ``finished`` (``interrupted``: Ctrl-C or SIGTERM; ``failed``) leaves no point
``running``: a point whose file was not written is ``pending`` again, with its finished blocks counted
(``blocks_done``), which a rerun reuses.

This module is its only writer (:class:`StatusFile` for the driver, :func:`record_section` for a
section added after the run) and reader (:func:`load_status`).  Both go through the same frozen
records, whose fields are the file's keys in the file's order: :class:`StatusRecord` (the run), with
:class:`Totals` and a :class:`PointRecord` per point; keys they do not name (the sections such as
``transfers`` and ``watch``, or what a newer laueflow adds) travel in their ``extra`` mappings.  The
states are :class:`PointState` and :class:`RunState`.

The lock (``OUT/.lock``, an exclusive ``flock`` held for the whole run) refuses a second run on the
same output folder; the operating system drops it when the process dies, so a crashed run never
leaves a stale lock behind.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from .. import __version__, provenance
from ..errors import RunError, RunLocked  # noqa: F401 (RunLocked re-exported)
from ..io.atomic import atomic_path
from ..io.layout import LOCK_FILE, STATUS_FILE, RunFolder

__all__ = ["FILE_STATES", "FINAL_STATES", "FORMAT", "LOCK_FILE", "OK_STATES", "STATUS_FILE", "PointRecord",
           "PointState", "RunLock", "RunLocked", "RunState", "StatusFile", "StatusRecord", "Totals",
           "age_seconds", "driver_alive", "load_status", "out_dir_error", "read_status", "record_section"]

FORMAT = "laueflow-status/1"


class PointState(StrEnum):
    """A scan point's state in status.json (a str: it compares equal to, and is written as, its value)."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    RESUMED = "resumed"  # its file from an earlier run is up to date and kept
    PARTIAL = "partial"  # some blocks failed (their pixels are 0), or the run stopped before its file
    SKIPPED = "skipped"  # no file: every block was skipped or failed
    FAILED = "failed"


class RunState(StrEnum):
    """A run's state: the four status.json records, and two that only a reader tells."""

    RUNNING = "running"
    FINISHED = "finished"
    INTERRUPTED = "interrupted"
    FAILED = "failed"
    STALE = "stale"  # recorded as running, but its driver is gone
    UNKNOWN = "unknown"  # no status.json


# point states that have ended, that come with a point file, that ended well (a skipped point may too);
# a partial point of a run stopped before its file was written has none yet (Run.point says so)
FINAL_STATES = frozenset({PointState.DONE, PointState.RESUMED, PointState.PARTIAL, PointState.SKIPPED,
                          PointState.FAILED})
FILE_STATES = frozenset({PointState.DONE, PointState.RESUMED, PointState.PARTIAL})
OK_STATES = frozenset({PointState.DONE, PointState.RESUMED})
# a driver that has not rewritten status.json for this long is taken to be gone (while it runs it
# rewrites the file at least every few seconds)
STALE_AFTER_S = 600.0


# ----------------------------------------------------------------------------------------------
# The records: status.json's layout, read and written through the same fields

_Record = TypeVar("_Record", "Totals", "PointRecord", "StatusRecord")


def _json_value(value: Any, kind: str, default: Any) -> Any:
    """A JSON value as a field of ``kind`` (int, float, str) takes it; ``default`` when it is missing or
    of another type (a bool is no number)."""
    if kind in ("int", "float"):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return int(value) if kind == "int" else float(value)
        return default
    return value if isinstance(value, str) else default


def _record_from_json(cls: type[_Record], data: Any, **given: Any) -> _Record:
    """One record from its JSON object: each named field converted (:func:`_json_value`; the kind is
    the first type of its annotation), the other keys into ``extra``; ``given`` fields are set as such."""
    data = data if isinstance(data, dict) else {}
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name != "extra" and f.name not in given:
            values[f.name] = _json_value(data.get(f.name), str(f.type).split("|")[0].strip(), f.default)
    known = {f.name for f in fields(cls)} - {"extra"}
    return cls(**values, **given, extra={k: v for k, v in data.items() if k not in known})


def _record_to_json(record: Totals | PointRecord | StatusRecord) -> dict[str, Any]:
    """A record's fields in their order (the file's), then its ``extra`` keys."""
    out = {f.name: getattr(record, f.name) for f in fields(record) if f.name != "extra"}
    return {**out, **record.extra}


def _frozen(record: Any, name: str) -> None:
    """Make a record's mapping field read-only (a frozen dataclass still holds a mutable dict)."""
    object.__setattr__(record, name, MappingProxyType(dict(getattr(record, name))))


@dataclass(frozen=True)
class Totals:
    """``totals``: points, blocks and pixels counted by origin, and the pace.  A field is None where
    the file does not record it (a laueflow before points_kept and the pixels by origin wrote fewer)."""

    points: int | None = None
    points_done: int | None = None
    points_failed: int | None = None
    points_kept: int | None = None
    points_computed: int | None = None
    blocks: int | None = None
    blocks_done: int | None = None
    pixels_done: int | None = None
    pixels_decoded: int | None = None
    pixels_reused: int | None = None
    pixels_kept: int | None = None
    pixels_failed: int | None = None
    pixels_per_second: float | None = None
    eta_seconds: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # keys this laueflow does not name

    def __post_init__(self) -> None:
        _frozen(self, "extra")

    @classmethod
    def from_json(cls, data: Any) -> Totals:
        return _record_from_json(cls, data)

    def to_json(self) -> dict[str, Any]:
        return _record_to_json(self)


@dataclass(frozen=True)
class PointRecord:
    """One scan point's entry of ``points``; ``file`` is the point file's name (no folder).  A number is
    None where the file does not record it; the writer sets them all."""

    state: str = PointState.PENDING  # a PointState, or the word of a newer laueflow
    file: str | None = None
    blocks_total: int | None = None
    blocks_done: int | None = None
    blocks_failed: int | None = None
    blocks_reused: int | None = None
    n_pixels: int | None = None
    pixels_decoded: int | None = None
    pixels_reused: int | None = None
    pixels_failed: int | None = None
    started: str | None = None
    finished: str | None = None
    seconds: float | None = None
    reason: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _frozen(self, "extra")

    @classmethod
    def new(cls, blocks_total: int) -> PointRecord:
        """A point as it joins a run: pending, every count 0."""
        return cls(state=PointState.PENDING, blocks_total=int(blocks_total), blocks_done=0, blocks_failed=0,
                   blocks_reused=0, n_pixels=0, pixels_decoded=0, pixels_reused=0, pixels_failed=0)

    @classmethod
    def from_json(cls, data: Any) -> PointRecord:
        state = data.get("state") if isinstance(data, dict) else None
        return _record_from_json(cls, data, state=_state(PointState, state, PointState.PENDING))

    def to_json(self) -> dict[str, Any]:
        return _record_to_json(self)


@dataclass(frozen=True)
class StatusRecord:
    """A whole status file.  ``state`` is a RunState as recorded (``unknown`` when the file has none);
    ``totals`` is None when the file has none; ``points`` are by point number; ``extra`` holds the
    sections the driver's hooks or :func:`record_section` add (``transfers``, ``watch``, ...)."""

    format: str = FORMAT
    laueflow_version: str | None = None
    state: str = RunState.UNKNOWN
    scan: str | None = None
    out_dir: str | None = None
    command: str | None = None
    host: str | None = None
    pid: int | None = None
    started: str | None = None
    updated: str | None = None
    finished: str | None = None
    totals: Totals | None = None
    points: Mapping[int, PointRecord] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _frozen(self, "points")
        _frozen(self, "extra")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StatusRecord:
        """The record of a status file's JSON (points whose key is not a number are left out)."""
        totals = data.get("totals")
        points = data.get("points") if isinstance(data.get("points"), dict) else {}
        return _record_from_json(
            cls, data, state=_state(RunState, data.get("state"), RunState.UNKNOWN),
            totals=Totals.from_json(totals) if isinstance(totals, dict) else None,
            points={int(k): PointRecord.from_json(v) for k, v in points.items() if _is_int(k)})

    def to_json(self) -> dict[str, Any]:
        """The file's JSON object (``totals`` left out when None)."""
        out = _record_to_json(self)
        out["totals"] = None if self.totals is None else self.totals.to_json()
        out["points"] = {str(k): p.to_json() for k, p in self.points.items()}
        if self.totals is None:
            del out["totals"]
        return out


def _state(kind: type[StrEnum], value: Any, default: StrEnum) -> str:
    """A recorded state: the member of ``kind`` it names, the word itself when this laueflow does not
    know it (a newer one wrote it), ``default`` when it is missing or not a word."""
    if not isinstance(value, str):
        return default
    return kind(value) if value in kind._value2member_map_ else value


def _is_int(key: str) -> bool:
    try:
        int(key)
    except ValueError:
        return False
    return True


class RunLock:
    """An exclusive lock on an output folder, held from ``acquire`` to ``release``."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.path = RunFolder(out_dir).lock
        self._fh: Any = None

    def acquire(self) -> RunLock:
        """Create the output folder if needed and lock it; RunLocked when another run holds it, RunError
        when the folder cannot be created or written (read-only, below a file, no space)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "a+")  # noqa: SIM115 (held open for the life of the run)
        except OSError as exc:
            raise out_dir_error(self.path.parent, exc) from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunLocked(f"output folder {self.path.parent} is in use by {holder}; wait for that run "
                                "to end (or stop it) before starting another on the same folder") from None
            raise RunLocked(f"cannot lock {self.path} ({exc.strerror}): the file system does not support "
                            "flock (e.g. Lustre mounted without -o flock); use an output folder on one "
                            "that does") from None
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(f"laueflow pid {os.getpid()} on {socket.gethostname()} since {provenance.now()}\n")
            fh.flush()
        except OSError as exc:
            fh.close()
            raise out_dir_error(self.path.parent, exc) from None
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def out_dir_error(out_dir: str | os.PathLike, exc: OSError) -> RunError:
    """An operating-system error on the output folder as one line for the user: the folder, what the
    system said, and about which path."""
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(out_dir) else ""
    if isinstance(exc, FileExistsError) and not Path(out_dir).is_dir():
        return RunError(f"output folder {out_dir} is a file, not a folder; choose another --out")
    if isinstance(exc, NotADirectoryError) or exc.errno == errno.ENOTDIR:
        blocker = next((p for p in Path(out_dir).parents if p.exists() and not p.is_dir()), None)
        what = f"{blocker} is a file, not a folder" if blocker else "a part of its path is not a folder"
        return RunError(f"output folder {out_dir} cannot be created: {what}; choose another --out")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return RunError(f"output folder {out_dir} cannot be written: {exc.strerror}{where}; give a folder "
                        "you can write to with --out")
    return RunError(f"output folder {out_dir} cannot be used: {exc.strerror}{where}")


def _read(path: Path) -> tuple[dict[str, Any] | None, str]:
    """A status file's JSON object and a note on it, as :func:`load_status` describes."""
    if not path.is_file():
        return None, ""
    for attempt in range(3):  # the file is replaced atomically; retry only in case it was not
        try:
            data = json.loads(path.read_text())
            break
        except FileNotFoundError:
            return None, ""
        except (OSError, ValueError) as exc:
            if attempt == 2:
                return None, f"{path}: unreadable ({exc}); showing the point files only"
            time.sleep(0.05)
    fmt = data.get("format") if isinstance(data, dict) else None
    if not isinstance(fmt, str) or fmt.split("/")[0] != FORMAT.split("/")[0] or \
            not isinstance(data.get("points"), dict):
        return None, f"{path}: not a laueflow status file (format {fmt!r}); showing the point files only"
    if fmt != FORMAT:
        return data, f"{path}: format {fmt!r}, this laueflow reads {FORMAT!r}"
    return data, ""


def load_status(out_dir: str | os.PathLike) -> tuple[StatusRecord | None, str]:
    """The status file of a run folder and a note on it: (None, "") when there is none, (None, why)
    when it is unreadable or not a laueflow status file, (record, why) when its format is a later
    version of this one (read as far as its fields are this one's), (record, "") when all is well."""
    data, note = _read(RunFolder(out_dir).status)
    return (None if data is None else StatusRecord.from_json(data)), note


def read_status(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The status file's JSON object as it stands (None when there is none or it cannot be used), for
    checks of the layout itself; laueflow's readers take :func:`load_status`'s record."""
    return _read(RunFolder(out_dir).status)[0]


def _write(path: Path, data: dict[str, Any], in_place: bool = False) -> None:
    """Write a status file under a temporary name, then rename it; ``in_place``: when that failed
    (a full disk: a new copy needs space the old one still holds), overwrite the file itself."""
    text = json.dumps(data, indent=1)
    if in_place:
        with open(path, "r+" if path.exists() else "w") as fh:
            fh.truncate(0)
            fh.write(text)
        return
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def record_section(out_dir: str | os.PathLike, key: str, value: Any) -> bool:
    """Put ``value`` into ``status.json[key]`` of a finished run (e.g. its transfers, sent again later),
    unless a live driver owns the file (it records its own sections) or there is no status file.
    Returns whether it was written; the rest of the file is written back as it was read."""
    path = RunFolder(out_dir).status
    data, _ = _read(path)
    if data is None or driver_alive(StatusRecord.from_json(data)) is not False:
        return False
    data[key] = value
    _write(path, data)
    return True


def age_seconds(stamp: Any) -> float | None:
    """Seconds since an ISO 8601 time stamp (None when missing or unreadable)."""
    if not isinstance(stamp, str):
        return None
    try:
        t = _dt.datetime.fromisoformat(stamp)
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.astimezone()
    return (_dt.datetime.now(_dt.UTC) - t).total_seconds()


def driver_alive(status: StatusRecord | None) -> bool | None:
    """Whether the driver of a status that says ``running`` still runs: by its pid on this host, by the
    age of the last update elsewhere; False when the status is not ``running``; None when it cannot
    be told."""
    if status is None or status.state != RunState.RUNNING:
        return False
    age = age_seconds(status.updated)
    if age is not None and age > STALE_AFTER_S:
        return False
    pid = status.pid
    if status.host == socket.gethostname() and pid is not None and pid > 0:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # someone else's process: it exists
            return True
        return True
    return None if age is None else True


class StatusFile:
    """Keeps the state of every point of a run and writes it to ``OUT/status.json``.

    ``extra`` is called at each write and its dictionary merged into the sections (e.g.
    ``{"transfers": ...}``); a section once written stays.  The points are :class:`PointRecord`s
    with every number set.
    """

    def __init__(self, out_dir: str | os.PathLike, *, scan: str, command: str,
                 extra: Callable[[], dict[str, Any]] | None = None, min_interval: float = 1.0) -> None:
        self.path = RunFolder(out_dir).status
        self.extra = extra
        self.min_interval = min_interval
        self._last_write = 0.0
        self._t0 = time.monotonic()
        self.record = StatusRecord(
            format=FORMAT, laueflow_version=__version__, state=RunState.RUNNING, scan=str(scan),
            out_dir=str(Path(out_dir)), command=command, host=socket.gethostname(), pid=os.getpid(),
            started=provenance.now(), updated=provenance.now(), finished=None, totals=Totals())
        self.points: dict[int, PointRecord] = {}
        self.sections: dict[str, Any] = {}

    # -- changes ------------------------------------------------------------------------------

    def _update(self, point: int, **changes: Any) -> PointRecord:
        entry = self.points[int(point)] = replace(self.points[int(point)], **changes)
        return entry

    def add_point(self, point: int, blocks_total: int) -> None:
        """A point joins the run (pending)."""
        self.points[int(point)] = PointRecord.new(blocks_total)

    def point_running(self, point: int, reused_blocks: int = 0) -> None:
        """The point's tasks are submitted; ``reused_blocks`` finished blocks of an earlier run are kept."""
        self._update(point, state=PointState.RUNNING, started=provenance.now(),
                     blocks_done=int(reused_blocks), blocks_reused=int(reused_blocks))
        self.write()

    def blocks_on_disk(self, point: int, n_files: int) -> None:
        """A point that did not end: ``n_files`` of its block files are finished on disk (some may have
        been written after their task's result could reach the driver)."""
        self._update(point, blocks_done=max(self.points[int(point)].blocks_done, int(n_files)))

    def block_done(self, point: int, n_pixels: int = 0, failed: bool = False, failed_pixels: int = 0) -> None:
        """A block task of this run ended: ``n_pixels`` decoded, or (``failed``) ``failed_pixels`` lost."""
        e = self.points[int(point)]
        self._update(point, blocks_done=e.blocks_done + 1, blocks_failed=e.blocks_failed + int(failed),
                     n_pixels=e.n_pixels + int(n_pixels), pixels_decoded=e.pixels_decoded + int(n_pixels),
                     pixels_failed=e.pixels_failed + (int(failed_pixels) if failed else 0))
        self.write()

    def point_finished(self, result: Any, write: bool = True) -> None:
        """``result`` is a :class:`laueflow.workflow.outcomes.PointResult`; ``write``: write the file now
        (False while the points of a rerun are checked, which are written once at the end)."""
        state = PointState(result.status)
        e = self._update(result.point, state=state, file=Path(result.file).name if result.file else None,
                         n_pixels=int(result.n_pixels), finished=provenance.now(), reason=result.reason,
                         seconds=round(float(result.seconds), 3) if state != PointState.RESUMED else None)
        if state == PointState.RESUMED:
            e = self._update(result.point, blocks_done=e.blocks_total)
        elif state in FILE_STATES:  # what this run did not decode came from finished blocks of an earlier run
            e = self._update(result.point, pixels_reused=max(e.n_pixels - e.pixels_decoded, 0))
        self._update(result.point, blocks_failed=max(e.blocks_failed, int(result.failed_blocks)))
        if write:
            self.write(force=True)

    def finish(self, state: RunState | str) -> None:
        """The run ended; unless it finished, its points still ``running`` are ``partial`` when some of
        their blocks are finished on disk (counted; no point file yet) and ``pending`` again when none
        is, so that the file says what is on disk."""
        state = RunState(state)
        if state != RunState.FINISHED:
            for k, e in self.points.items():
                if e.state == PointState.RUNNING:
                    self._update(k, state=PointState.PARTIAL if e.blocks_done else PointState.PENDING,
                                 reason=f"{state}: {e.blocks_done} of {e.blocks_total} blocks finished (kept "
                                        "for a rerun), no point file yet")
        self.record = replace(self.record, state=state, finished=provenance.now())
        try:
            self.write(force=True)
        except OSError:  # the last word must reach the file: without a second copy if need be
            _write(self.path, self.record.to_json(), in_place=True)

    # -- writing ------------------------------------------------------------------------------

    def totals(self) -> Totals:
        """The run's totals (points, blocks, pixels by origin, pace), as written into the file."""
        points = self.points.values()
        done = [p for p in points if p.state in FINAL_STATES]
        blocks = sum(p.blocks_total for p in points)
        blocks_done = sum(p.blocks_total if p.state in FINAL_STATES else p.blocks_done for p in points)
        pixels = sum(p.n_pixels for p in points if p.state != PointState.RESUMED)
        kept = [p for p in points if p.state == PointState.RESUMED]
        decoded = sum(p.pixels_decoded for p in points)
        elapsed = max(time.monotonic() - self._t0, 1e-6)
        rate = decoded / elapsed
        remaining = blocks - blocks_done
        fresh = sum(p.blocks_done - p.blocks_reused for p in points if p.state != PointState.RESUMED)
        eta = remaining * elapsed / fresh if fresh and remaining else (0.0 if not remaining else None)
        failed = sum(p.state == PointState.FAILED or p.blocks_failed > 0 for p in points)
        return Totals(points=len(self.points), points_done=len(done), points_failed=failed,
                      points_kept=len(kept),
                      points_computed=sum(p.state in FILE_STATES and p.state != PointState.RESUMED
                                          for p in points),
                      blocks=blocks, blocks_done=blocks_done, pixels_done=pixels, pixels_decoded=decoded,
                      pixels_reused=sum(p.pixels_reused for p in points),
                      pixels_kept=sum(p.n_pixels for p in kept),
                      pixels_failed=sum(p.pixels_failed for p in points),
                      pixels_per_second=round(rate, 1), eta_seconds=None if eta is None else round(eta, 1))

    def write(self, force: bool = False) -> None:
        """Write the file now if ``force`` or the last write is more than ``min_interval`` old."""
        now = time.monotonic()
        if not force and now - self._last_write < self.min_interval:
            return
        self._last_write = now
        if self.extra is not None:
            self.sections.update(self.extra())
        self.record = replace(self.record, updated=provenance.now(), totals=self.totals(), points=self.points,
                              extra=self.sections)
        _write(self.path, self.record.to_json())
