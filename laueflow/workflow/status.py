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
section added after the run) and reader (:func:`load_status`); the states are :class:`PointState`
and :class:`RunState`.

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
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any

from .. import __version__, provenance
from ..errors import RunError, RunLocked  # noqa: F401 (RunLocked re-exported)
from ..io.atomic import atomic_path
from ..io.layout import LOCK_FILE, STATUS_FILE, RunFolder

__all__ = ["FILE_STATES", "FINAL_STATES", "FORMAT", "LOCK_FILE", "OK_STATES", "STATUS_FILE", "PointState",
           "RunLock", "RunLocked", "RunState", "StatusFile", "age_seconds", "driver_alive", "load_status",
           "out_dir_error", "read_status", "record_section"]

FORMAT = "laueflow-status/1"


class PointState(StrEnum):
    """A scan point's state in status.json (a str: it compares equal to, and is written as, its value)."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    RESUMED = "resumed"  # its file from an earlier run is up to date and kept
    PARTIAL = "partial"  # written, but some blocks failed (their pixels are 0)
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


# point states that have ended, that come with a point file, that ended well (a skipped point may too)
FINAL_STATES = frozenset({PointState.DONE, PointState.RESUMED, PointState.PARTIAL, PointState.SKIPPED,
                          PointState.FAILED})
FILE_STATES = frozenset({PointState.DONE, PointState.RESUMED, PointState.PARTIAL})
OK_STATES = frozenset({PointState.DONE, PointState.RESUMED})
# a driver that has not rewritten status.json for this long is taken to be gone (while it runs it
# rewrites the file at least every few seconds)
STALE_AFTER_S = 600.0


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


def load_status(out_dir: str | os.PathLike) -> tuple[dict[str, Any] | None, str]:
    """The status file of a run folder and a note on it: (None, "") when there is none, (None, why)
    when it is unreadable or not a laueflow status file, (data, why) when its format is a later
    version of this one, (data, "") when all is well."""
    path = RunFolder(out_dir).status
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


def read_status(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The status file of a run folder, or None when there is none (or it cannot be used)."""
    return load_status(out_dir)[0]


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
    Returns whether it was written."""
    status = read_status(out_dir)
    if status is None or driver_alive(status) is not False:
        return False
    status[key] = value
    _write(RunFolder(out_dir).status, status)
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


def driver_alive(status: dict[str, Any] | None) -> bool | None:
    """Whether the driver of a status that says ``running`` still runs: by its pid on this host, by the
    age of the last update elsewhere; False when the status is not ``running``; None when it cannot
    be told."""
    if not status or status.get("state") != RunState.RUNNING:
        return False
    age = age_seconds(status.get("updated"))
    if age is not None and age > STALE_AFTER_S:
        return False
    pid = status.get("pid")
    if status.get("host") == socket.gethostname() and isinstance(pid, int) and pid > 0:
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

    ``extra`` is called at each write and its dictionary merged in (e.g. ``{"transfers": ...}``).
    """

    def __init__(self, out_dir: str | os.PathLike, *, scan: str, command: str,
                 extra: Callable[[], dict[str, Any]] | None = None, min_interval: float = 1.0) -> None:
        self.path = RunFolder(out_dir).status
        self.extra = extra
        self.min_interval = min_interval
        self._last_write = 0.0
        self._t0 = time.monotonic()
        self.data: dict[str, Any] = {
            "format": FORMAT, "laueflow_version": __version__, "state": RunState.RUNNING,
            "scan": str(scan), "out_dir": str(Path(out_dir)), "command": command,
            "host": socket.gethostname(), "pid": os.getpid(),
            "started": provenance.now(), "updated": provenance.now(), "finished": None,
            "totals": {"points": 0, "points_done": 0, "points_failed": 0, "blocks": 0, "blocks_done": 0,
                       "pixels_done": 0, "pixels_per_second": 0.0, "eta_seconds": None},
            "points": {},
        }

    # -- changes ------------------------------------------------------------------------------

    def add_point(self, point: int, blocks_total: int) -> None:
        """A point joins the run (pending)."""
        self.data["points"][str(point)] = {
            "state": PointState.PENDING, "file": None, "blocks_total": int(blocks_total), "blocks_done": 0,
            "blocks_failed": 0, "blocks_reused": 0, "n_pixels": 0, "pixels_decoded": 0, "pixels_reused": 0,
            "pixels_failed": 0, "started": None, "finished": None, "seconds": None, "reason": ""}

    def point_running(self, point: int, reused_blocks: int = 0) -> None:
        """The point's tasks are submitted; ``reused_blocks`` finished blocks of an earlier run are kept."""
        entry = self.data["points"][str(point)]
        entry.update(state=PointState.RUNNING, started=provenance.now(), blocks_done=int(reused_blocks),
                     blocks_reused=int(reused_blocks))
        self.write()

    def blocks_on_disk(self, point: int, n_files: int) -> None:
        """A point that did not end: ``n_files`` of its block files are finished on disk (some may have
        been written after their task's result could reach the driver)."""
        entry = self.data["points"][str(point)]
        entry["blocks_done"] = max(entry["blocks_done"], int(n_files))

    def block_done(self, point: int, n_pixels: int = 0, failed: bool = False, failed_pixels: int = 0) -> None:
        """A block task of this run ended: ``n_pixels`` decoded, or (``failed``) ``failed_pixels`` lost."""
        entry = self.data["points"][str(point)]
        entry["blocks_done"] += 1
        entry["blocks_failed"] += int(failed)
        entry["n_pixels"] += int(n_pixels)
        entry["pixels_decoded"] += int(n_pixels)
        entry["pixels_failed"] += int(failed_pixels) if failed else 0
        self.write()

    def point_finished(self, result: Any, write: bool = True) -> None:
        """``result`` is a :class:`laueflow.workflow.outcomes.PointResult`; ``write``: write the file now
        (False while the points of a rerun are checked, which are written once at the end)."""
        entry = self.data["points"][str(result.point)]
        state = PointState(result.status)
        entry.update(state=state, file=Path(result.file).name if result.file else None,
                     n_pixels=int(result.n_pixels), finished=provenance.now(), reason=result.reason,
                     seconds=round(float(result.seconds), 3) if state != PointState.RESUMED else None)
        if state == PointState.RESUMED:
            entry["blocks_done"] = entry["blocks_total"]
        elif state in FILE_STATES:  # what this run did not decode came from finished blocks of an earlier run
            entry["pixels_reused"] = max(int(result.n_pixels) - entry["pixels_decoded"], 0)
        entry["blocks_failed"] = max(entry["blocks_failed"], int(result.failed_blocks))
        if write:
            self.write(force=True)

    def finish(self, state: RunState | str) -> None:
        """The run ended; unless it finished, its points still ``running`` are ``pending`` again (their
        finished blocks stay counted), so that the file says what is on disk."""
        state = RunState(state)
        if state != RunState.FINISHED:
            for entry in self.data["points"].values():
                if entry["state"] == PointState.RUNNING:
                    entry.update(state=PointState.PENDING,
                                 reason=f"{state}: {entry['blocks_done']} of {entry['blocks_total']} blocks "
                                        "finished (kept for a rerun)")
        self.data["state"] = state
        self.data["finished"] = provenance.now()
        try:
            self.write(force=True)
        except OSError:  # the last word must reach the file: without a second copy if need be
            _write(self.path, self.data, in_place=True)

    # -- writing ------------------------------------------------------------------------------

    def totals(self) -> dict[str, Any]:
        """The run's totals (points, blocks, pixels by origin, pace), as written into the file."""
        points = self.data["points"].values()
        done = [p for p in points if p["state"] in FINAL_STATES]
        blocks = sum(p["blocks_total"] for p in points)
        blocks_done = sum(p["blocks_total"] if p["state"] in FINAL_STATES else p["blocks_done"]
                          for p in points)
        pixels = sum(p["n_pixels"] for p in points if p["state"] != PointState.RESUMED)
        kept = [p for p in points if p["state"] == PointState.RESUMED]
        decoded = sum(p.get("pixels_decoded", 0) for p in points)
        elapsed = max(time.monotonic() - self._t0, 1e-6)
        rate = decoded / elapsed
        remaining = blocks - blocks_done
        fresh = sum(p["blocks_done"] - p["blocks_reused"] for p in points if p["state"] != PointState.RESUMED)
        eta = remaining * elapsed / fresh if fresh and remaining else (0.0 if not remaining else None)
        failed = sum(p["state"] == PointState.FAILED or p["blocks_failed"] > 0 for p in points)
        return {"points": len(self.data["points"]), "points_done": len(done), "points_failed": failed,
                "points_kept": len(kept),
                "points_computed": sum(p["state"] in FILE_STATES and p["state"] != PointState.RESUMED
                                       for p in points),
                "blocks": blocks, "blocks_done": blocks_done, "pixels_done": pixels,
                "pixels_decoded": decoded,
                "pixels_reused": sum(p.get("pixels_reused", 0) for p in points),
                "pixels_kept": sum(p["n_pixels"] for p in kept),
                "pixels_failed": sum(p.get("pixels_failed", 0) for p in points),
                "pixels_per_second": round(rate, 1), "eta_seconds": None if eta is None else round(eta, 1)}

    def write(self, force: bool = False) -> None:
        """Write the file now if ``force`` or the last write is more than ``min_interval`` old."""
        now = time.monotonic()
        if not force and now - self._last_write < self.min_interval:
            return
        self._last_write = now
        self.data["updated"] = provenance.now()
        self.data["totals"] = self.totals()
        if self.extra is not None:
            self.data.update(self.extra())
        _write(self.path, self.data)
