"""The task graph of a reconstruction and the :class:`Driver` that runs it on a Parsl configuration.

Per scan point: one ``stage_point`` task (executor ``stitch``) that reads the point's frames once
into a tile-major scratch file (:mod:`laueflow.io.staging`), one ``reconstruct_block`` task per
detector tile (executor ``decode``) that reads its tile from it, then one ``stitch_point`` task that
depends on all of them (executor ``stitch``) and writes ``OUT/point_<k:05d>.h5``.  Several points are
in flight at once, so that staging the next points overlaps decoding this one; their scratch files
are kept within a disk budget.  Block results go to ``OUT/.blocks/point_<k:05d>/`` so that an
interrupted run loses at most the blocks in progress.

Everything that can be checked before any task runs is checked first (scan, points, region,
whether the mask can resolve the depth grid), and nothing is written until those checks pass.
Front ends follow and extend a run through hooks (:mod:`laueflow.workflow.hooks`).

A run that cannot go on stops its tasks at once (:func:`laueflow.sites.base.stop_now`) rather than
letting Parsl wait for them: on Ctrl-C or SIGTERM (KeyboardInterrupt; status ``interrupted``, every
finished block kept for a rerun) and when the output disk is full (RunError; status ``failed``, the
scratch files removed, the space still needed said).
"""

from __future__ import annotations

import errno
import shutil
import signal
import socket
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import parsl
from parsl.errors import NoDataFlowKernelError

from .. import provenance, sites
from ..config import Config, ConfigWarning, load
from ..errors import RunError  # noqa: F401 (re-exported)
from ..forward import Setup
from ..geometry import check_reach
from ..io import staging
from ..io.atomic import atomic_path
from ..io.export import ExportError, export_point
from ..io.layout import STAGE_NAME, RunFolder
from ..io.scan import Scan, ScanError, open_scan, select_points
from ..sites.base import stop_now
from . import apps
from .hooks import PointFeed, ProgressCallback, ProgressEvent, RunHooks
from .outcomes import BlockOutcome, PointResult, StitchOutcome, StitchRequest
from .resume import resumable_point, reusable_blocks
from .status import FILE_STATES, PointState, RunLock, RunState, StatusFile, out_dir_error

__all__ = ["Driver", "PointFeed", "PointResult", "ProgressEvent", "RunError", "RunHooks", "RunOptions",
           "RunResult", "prepare", "run"]

# scratch disk that staged points in flight may take (OUT/.blocks/point_<k>/frames.stage)
STAGE_BUDGET_BYTES = 4 << 30
# seconds a stopping run gives Parsl's cleanup (see sites.base.stop_now)
STOP_TIMEOUT_S = 10.0
# what the operating system says when the output disk (or the user's quota on it) is full
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# what the final line calls a point in state PointState.RESUMED (status.json counts them as points_kept)
KEPT_LABEL = "kept"


@dataclass
class RunResult:
    """All points of a run, and the exit status the command line should return.

    ``pixels`` counts the pixels of the run's points by origin, as status.json's totals do:
    ``decoded`` by this run, ``reused`` from finished blocks of an earlier run, ``kept`` in point
    files of an earlier run that were up to date, ``failed`` in tiles whose block failed.
    """

    out_dir: str
    points: list[PointResult] = field(default_factory=list)
    seconds: float = 0.0
    transfers_failed: bool = False  # results were written but not all reached their Globus destination
    pixels: dict[str, int] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 0 if all(p.ok for p in self.points) and not self.transfers_failed else 1

    def summary(self) -> str:
        """One line: the points by state (``kept``: an up-to-date file of an earlier run), the pixels by
        origin, the time and where the results are."""
        counts: dict[str, int] = {}
        for p in self.points:
            state = KEPT_LABEL if p.status == PointState.RESUMED else str(p.status)
            counts[state] = counts.get(state, 0) + 1
        parts = ", ".join(f"{n} {s}" for s, n in counts.items())
        px = self.pixels or {"decoded": sum(p.n_pixels for p in self.points
                                            if p.status in FILE_STATES and p.status != PointState.RESUMED),
                             "kept": sum(p.n_pixels for p in self.points if p.status == PointState.RESUMED)}
        pixels = [f"{px.get('decoded', 0)} decoded"]
        for key, what in (("reused", "from finished blocks of an earlier run"), ("kept", "in kept files"),
                          ("failed", "in failed blocks")):
            if px.get(key):
                pixels.append(f"{px[key]} {what}")
        bad = sum(not p.ok for p in self.points)
        tail = f"; {bad} with errors" if bad else ""
        if self.transfers_failed:
            tail += "; some results did not reach their Globus destination (see above)"
        n = len(self.points)
        return (f"{n} point{'' if n == 1 else 's'} ({parts}); pixels: {', '.join(pixels)}; "
                f"{self.seconds:.1f} s, results in {self.out_dir}{tail}")


@dataclass(frozen=True)
class RunOptions:
    """How a run goes, apart from what it reconstructs (scan, configuration, output folder).

    ``points``: a selection such as ``"0:4"`` or a list (default: all); ``block_pixels``: pixels per
    block task, rounded to whole decoder tiles (default: ``recon.block_pixels``; results do not
    depend on it); ``site_config``: a ``parsl.Config`` with executors
    labelled ``decode`` and ``stitch`` (default: the threads site); ``command_line``: recorded in the
    provenance (default: this process's); ``force``: recompute up-to-date points and blocks;
    ``per_depth_files``: also write one image file per depth for the indexing chain; ``staging``:
    read each point's frames once into a scratch file for its block tasks (the points in flight are
    limited so that their scratch files stay within ``stage_budget_bytes``, but at least two are),
    else each block task reads its tile from the frame files; ``poll_interval``: seconds between two
    looks at the feed, and between two hook ticks.
    """

    points: str | Sequence[int] | None = None
    block_pixels: int | None = None
    site_config: Any = None
    command_line: str | None = None
    force: bool = False
    per_depth_files: bool = False
    staging: bool = True
    stage_budget_bytes: int = STAGE_BUDGET_BYTES
    max_points_in_flight: int = 64
    max_blocks_in_flight: int = 4096
    poll_interval: float = 1.0


@dataclass
class _Plan:
    scan: Scan
    points: list[int]
    blocks: list[Any]  # the region cut into blocks of whole tiles: one task each per point


@dataclass
class _Point:
    """A point whose tasks are submitted."""

    point: int
    t0: float
    block_futures: list[Future] = field(default_factory=list)
    block_tiles: list[tuple[int, ...]] = field(default_factory=list)


@dataclass
class _Counts:
    """Blocks of the run, for the progress events (totals grow when points are added)."""

    blocks_total: int = 0
    blocks_done: int = 0
    blocks_live: int = 0


def _corner_pixels(frame: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Corners and centre of a region [r0, r1, c0, c1]."""
    r0, r1, c0, c1 = frame
    rows = np.array([r0, r0, r1 - 1, r1 - 1, (r0 + r1) // 2], dtype=np.int32)
    cols = np.array([c0, c1 - 1, c0, c1 - 1, (c0 + c1) // 2], dtype=np.int32)
    return rows, cols


def _loaded_dfk() -> Any | None:
    """The Parsl configuration loaded in this process (None if none is): the one a run started, also
    when ``parsl.load`` was cut short after it registered it."""
    try:
        return parsl.dfk()
    except NoDataFlowKernelError:
        return None


def _is_inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def prepare(scan_path: str | Path, cfg: Config, out_dir: str | Path,
            points: str | Sequence[int] | None = None, block_pixels: int | None = None,
            growing: bool = False) -> _Plan:
    """All checks that need no task: the scan opens, the points exist, the first point's files are
    sound, the output is not inside the input, and the mask can resolve the depth grid.  ``growing``:
    the scan is still being taken (watched), so frames after its last complete point are expected."""
    scan = open_scan(cfg, scan_path, check=False, warn_trailing=not growing)
    if points is None or isinstance(points, str):
        chosen = select_points(points, scan.n_points)
    else:
        chosen = [int(k) for k in points]
        bad = [k for k in chosen if not 0 <= k < scan.n_points]
        if bad:
            raise ScanError(f"{scan_path}: points {bad} are out of range, "
                            f"the scan has {scan.n_points} points")
    scan.check(chosen[:1])
    scan_root = Path(scan_path).resolve()
    if scan_root.is_dir() and _is_inside(Path(out_dir).resolve(), scan_root):
        raise RunError(f"output folder {out_dir} is inside the scan folder {scan_root}; choose another")
    bp = int(block_pixels or cfg.recon.block_pixels)
    if bp < 1:
        raise RunError(f"block_pixels must be >= 1, got {bp}")
    rows, cols = _corner_pixels(cfg.file.frame)
    message = check_reach(Setup.from_config(cfg), cfg, rows, cols)
    if message:
        raise RunError(f"{cfg.source_file or 'configuration'}: {message}")
    return _Plan(scan=scan, points=chosen, blocks=scan.blocks(cfg.recon.tile_pixels, bp))


def _worker_config(cfg: Config, out_dir: Path) -> tuple[str, str]:
    """A configuration file the workers can load, and its fingerprint as they will see it.

    The run's own file when it still holds exactly ``cfg``; otherwise ``cfg`` written out (with an
    absolute mask path) into the blocks folder.
    """
    if cfg.source_file and Path(cfg.source_file).is_file():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConfigWarning)
            on_disk = load(cfg.source_file)
        if on_disk.fingerprint() == cfg.fingerprint():
            return str(Path(cfg.source_file).resolve()), on_disk.fingerprint()
    mask = cfg.geo.mask
    if mask.path is not None:
        mask = replace(mask, path=str(cfg.resolve(mask.path).resolve()))
    fixed = replace(cfg, geo=replace(cfg.geo, mask=mask))
    path = RunFolder(out_dir).config
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(fixed.to_yaml())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        return str(path), load(path).fingerprint()


def _root_cause(state: _Point) -> str:
    """The first failed block of a point, named by its tile [r0, r1, c0, c1], with its exception."""
    for f, box in zip(state.block_futures, state.block_tiles, strict=True):
        if f.done() and f.exception() is not None:
            exc = f.exception()
            return f"block {list(box)}: {type(exc).__name__}: {exc}"
    return ""


def _export_kept(result: PointResult) -> None:
    """Per-depth files of a point file that is kept: a failed export is noted, the point stays done."""
    try:
        export_point(result.file)
    except (ExportError, OSError) as exc:
        result.reason += f"; per-depth export failed: {exc}"


def _remove_stale_temporaries(out_dir: Path, keep_staged: Sequence[int] = ()) -> None:
    """Remove files an interrupted run left half-written under their temporary names, and its staged
    points except those of ``keep_staged`` (this run may reuse them; the others would only hold disk
    space).  Safe: this run holds the folder's lock, so no other run is writing there."""
    run_folder = RunFolder(out_dir)
    for tmp in run_folder.temporaries():
        tmp.unlink(missing_ok=True)
    keep = {run_folder.blocks(k) for k in keep_staged}
    for folder in run_folder.block_dirs():
        if folder not in keep:
            staging.remove(folder / STAGE_NAME)


def _disk_full(exc: BaseException | None) -> bool:
    """Whether an error (or the one that caused it) is the operating system's "no space left" or
    "quota exceeded"; HDF5 reports it only in its message."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and (exc.errno in DISK_FULL or "No space left on device" in str(exc)
                                         or "errno = 28" in str(exc)):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _size(n: float) -> str:
    """Bytes for people: 1.5 GB, 320 kB."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _points(n: int) -> str:
    return f"{n} point" if n == 1 else f"{n} points"


class _DiskFull(Exception):
    """A task or the driver found the output disk full (raised inside the loop, turned into RunError)."""


def _point_result(k: int, fut: Future, state: _Point) -> PointResult:
    """Turn a finished stitching future into a PointResult (a failed block shows up as its cause)."""
    seconds = time.perf_counter() - state.t0
    exc = fut.exception()
    if exc is not None:
        cause = _root_cause(state) or f"{type(exc).__name__}: {exc}"
        failed = sum(1 for f in state.block_futures if f.exception() is not None)
        return PointResult(point=k, status=PointState.FAILED, seconds=seconds, failed_blocks=max(failed, 1),
                           reason=cause)
    r: StitchOutcome = fut.result()
    return PointResult(point=k, status=r.status, file=r.file, n_pixels=r.n_pixels,
                       depth_range_um=r.depth_range_um, seconds=seconds, block_seconds=r.block_seconds,
                       failed_blocks=r.failed_blocks, reused_blocks=r.reused_blocks, reason=r.reason)


class Driver:
    """One run of the task graph; its steps, in order:

    - :meth:`prepare`: every check that needs no task, and the plan (points, tiles);
    - then, with the output folder locked, :meth:`start` (worker configuration, status.json) and
      :meth:`drive`: points are queued (:meth:`add_points`; up-to-date points are kept), and while
      tasks run, the points that fit are submitted (:meth:`submit`: their :meth:`stage` task, their
      block tasks and their :meth:`stitch` task), finished tasks are collected (:meth:`collect`), and
      each point that ends is reported (:meth:`report`) to ``status.json`` and to the hooks.
    """

    def __init__(self, scan_path: str | Path, cfg: Config, out_dir: str | Path, options: RunOptions,
                 hooks: Sequence[RunHooks] = (), feed: PointFeed | None = None,
                 lock: RunLock | None = None) -> None:
        self.scan_path = Path(scan_path).resolve()
        self.cfg = cfg
        self.out_dir = Path(out_dir).resolve()
        self.folder = RunFolder(self.out_dir)  # every path this run writes
        self.options = options
        self.hooks = list(hooks)
        self.feed = feed
        self.t_start = time.perf_counter()
        self.start_time = provenance.now()
        self.plan: _Plan | None = None
        self.counts = _Counts()
        self.done: dict[int, PointResult] = {}  # the points that ended, by point
        self.order: list[int] = []  # the points of the run, in the order they came
        self.seen: set[int] = set()  # the same, to look up
        self.queue: deque[int] = deque()  # points waiting for their tasks
        self.active: dict[int, _Point] = {}  # points whose tasks are submitted
        self.live: dict[Future, tuple[str, int]] = {}  # unfinished tasks: ("block" | "point", point)
        self.last_stage: Future | None = None  # the latest point's staging: the next one waits for it
        self.started = False
        self.status: StatusFile | None = None
        self.cfg_path = ""  # set by drive(): the configuration file the workers load
        self.worker_fp = ""  # its fingerprint as the workers see it
        self.stitch_request: Callable[..., StitchRequest] | None = None  # set by start(); takes point=k
        self.max_points_in_flight = options.max_points_in_flight
        self.lock = lock  # held by the caller (laueflow watch takes it before its first point)

    # -- the run ----------------------------------------------------------------------------------

    def run(self) -> RunResult:
        """Check, lock the output folder (unless the caller holds its lock), drive the tasks; the hooks'
        ``on_finish`` follows the unlock."""
        self.prepare()
        outcome: RunResult | None = None
        try:
            lock = self.lock if self.lock is not None else RunLock(self.out_dir).acquire()
            try:
                outcome = self.drive()
            finally:
                if lock is not self.lock:
                    lock.release()
        finally:
            for hook in self.hooks:
                hook.on_finish(outcome)
        return outcome

    def prepare(self) -> None:
        """Everything that can be checked before anything is written (raises ScanError or RunError)."""
        o = self.options
        self.plan = prepare(self.scan_path, self.cfg, self.out_dir, o.points, o.block_pixels,
                            growing=self.feed is not None)
        try:
            parsl.dfk()
        except parsl.errors.NoDataFlowKernelError:
            pass
        else:
            raise RunError("a Parsl configuration is already loaded in this process; "
                           "call parsl.dfk().cleanup() first (laueflow loads its site itself)")

    def start(self) -> None:
        """Once the output folder is locked: the configuration the workers read, what every point file
        records, no half-written files of an interrupted run, status.json, and how many points may be
        in flight (their staged frames within the scratch budget)."""
        o, cfg = self.options, self.cfg
        self.cfg_path, self.worker_fp = _worker_config(cfg, self.out_dir)
        source = Path(cfg.source_file) if cfg.source_file else None
        source_text = source.read_text() if source is not None and source.is_file() else None
        command = o.command_line if o.command_line is not None else provenance.command_line()
        # what every stitching task is told, short of its point
        self.stitch_request = partial(
            StitchRequest, scan_path=str(self.scan_path), cfg_path=self.cfg_path,
            frame=tuple(int(v) for v in cfg.file.frame),
            depths_mm=tuple(float(z) for z in cfg.geo.source.depths),
            config_yaml=cfg.to_yaml(), config_fingerprint=cfg.fingerprint(), start_time=self.start_time,
            command_line=command, host=socket.gethostname(), config_file=cfg.source_file or "",
            config_source=source_text, per_depth_files=o.per_depth_files)
        _remove_stale_temporaries(self.out_dir, keep_staged=self.plan.points if o.staging else ())
        self.status = StatusFile(self.out_dir, scan=str(self.scan_path), command=command,
                                 extra=self.status_sections)
        if o.staging:
            r0, r1, c0, c1 = cfg.file.frame
            per_point = staging.staged_bytes(cfg.file.n_frames, (r1 - r0) * (c1 - c0))
            self.max_points_in_flight = min(self.max_points_in_flight,
                                            max(2, o.stage_budget_bytes // max(per_point, 1)))

    def drive(self) -> RunResult:
        """Run the tasks of every point (the output folder is locked) and return what became of them."""
        try:
            self.start()
        except OSError as exc:  # the worker configuration, or a leftover that cannot be removed
            raise (RunError(self.disk_full_message()) if _disk_full(exc)
                   else out_dir_error(self.out_dir, exc)) from None
        site_config = self.options.site_config
        if site_config is None:
            site_config = sites.site_config("threads", run_dir=str(self.folder.runinfo))
        final_state = RunState.FAILED
        try:
            self.add_points(self.plan.points)
            self.started = True
            self.emit("start")
            for k in self.order:  # points of the initial selection are announced after "start"
                if k in self.done:
                    self.announce(self.done[k])
            self.status.write(force=True)
            if self.queue or self.feed_open:
                with warnings.catch_warnings():
                    # JAX warns on every fork; Parsl's providers fork only to exec shell commands (safe)
                    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called",
                                            category=RuntimeWarning)
                    other = _loaded_dfk()  # one loaded before is not this run's to stop
                    try:
                        dfk = parsl.load(site_config)
                        self.loop()
                    except BaseException:
                        # also a Ctrl-C while Parsl starts: what it had started is stopped
                        ours = _loaded_dfk()
                        self.stop(ours if ours is not other else None)
                        raise
                    dfk.cleanup()
            final_state = RunState.FINISHED
        except KeyboardInterrupt:
            final_state = RunState.INTERRUPTED
            raise
        except _DiskFull:
            self.remove_scratch()
            raise RunError(self.disk_full_message()) from None
        except OSError as exc:  # the driver's own writes into the output folder
            if _disk_full(exc):
                self.remove_scratch()
                raise RunError(self.disk_full_message()) from None
            if exc.filename is not None and _is_inside(Path(exc.filename).resolve(), self.out_dir):
                raise out_dir_error(self.out_dir, exc) from None
            raise
        finally:
            blocks_root = self.folder.blocks_root
            if blocks_root.is_dir() and not any(p.is_dir() for p in blocks_root.iterdir()):
                shutil.rmtree(blocks_root, ignore_errors=True)
            try:
                self.status.finish(final_state)
            except OSError as exc:  # a run that failed already says why; one that finished must say this
                if final_state == RunState.FINISHED:
                    raise (RunError(self.disk_full_message()) if _disk_full(exc)
                           else out_dir_error(self.out_dir, exc)) from None
        return RunResult(out_dir=str(self.out_dir), points=[self.done[k] for k in self.order],
                         seconds=time.perf_counter() - self.t_start, pixels=self.pixel_counts())

    def stop(self, dfk: Any | None) -> None:
        """The loop ended early (Ctrl-C, SIGTERM, a full disk, an error): stop every task at once (``dfk``,
        the loaded Parsl configuration; None when Parsl had not started), keep what finished meanwhile,
        and count the finished block files of the points that did not end.

        A second Ctrl-C does not cut this short in a plain Python session (it is ignored for the few
        seconds this takes); the command line's own handler ends the process on a second signal."""
        main = threading.current_thread() is threading.main_thread()
        plain = main and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        if plain:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if dfk is not None:
                stop_now(dfk, timeout=STOP_TIMEOUT_S)
            for fut in [f for f in self.live if f.done()]:
                if fut.exception() is None:
                    self.collect(fut)
            for k in self.active:
                on_disk = sum(self.folder.block_file(k, t.r0, t.c0).is_file() for t in self.plan.blocks)
                self.status.blocks_on_disk(k, on_disk)
        except _DiskFull:
            pass
        finally:
            if plain:
                signal.signal(signal.SIGINT, signal.default_int_handler)

    def remove_scratch(self) -> None:
        """A run that stops for want of disk space: remove its staged frames and half-written files
        (finished point and block files stay for the rerun)."""
        for k in self.order:
            staging.remove(self.folder.staged(k))
        for tmp in self.folder.temporaries():
            tmp.unlink(missing_ok=True)

    def disk_full_message(self) -> str:
        """No space left on the output disk: how much is free, and about how much the points still to do
        need (their point files, like those written so far or at most a float32 volume each, and their
        staged frames in flight)."""
        left = [k for k in (self.order or self.plan.points) if k not in self.done]
        free = shutil.disk_usage(self.out_dir).free
        written = [Path(r.file).stat().st_size for r in self.done.values()
                   if r.file and r.status != PointState.RESUMED and Path(r.file).is_file()]
        r0, r1, c0, c1 = self.cfg.file.frame
        pixels = (r1 - r0) * (c1 - c0)
        if written:
            per_point = sum(written) / len(written)
            text = f"point files about {_size(per_point)} each, like those written so far"
        else:  # none written yet: an uncompressed float32 volume, the most one can take
            per_point = 4 * pixels * len(self.cfg.geo.source.depths)
            text = f"point files up to {_size(per_point)} each"
        need = per_point * len(left)
        if self.options.staging and left:
            in_flight = min(len(left), self.max_points_in_flight)
            staged = staging.staged_bytes(self.cfg.file.n_frames, pixels) * in_flight
            need += staged
            text += f", staged frames {_size(staged)} for {_points(in_flight)} at a time"
        return (f"no space left on the disk of the output folder {self.out_dir} ({_size(free)} free); "
                f"the {_points(len(left))} still to do need about {_size(need)} more ({text}); free some "
                "space and run again: finished points and blocks are kept")

    def pixel_counts(self) -> dict[str, int]:
        """The run's pixels by origin (decoded, reused, kept, failed), from status.json's totals."""
        t = self.status.totals()
        return {"decoded": t.pixels_decoded, "reused": t.pixels_reused, "kept": t.pixels_kept,
                "failed": t.pixels_failed}

    @property
    def feed_open(self) -> bool:
        """Whether the feed may still add points."""
        return self.feed is not None and not self.feed.done

    def loop(self) -> None:
        """Submit what fits, wait for tasks, collect them, until no point is left or to come."""
        o = self.options
        last_tick = time.monotonic()
        while True:
            if self.feed_open:
                self.add_points(self.feed.poll())
            self.submit_ready()
            if not self.live and not self.queue and not self.feed_open:
                break
            if time.monotonic() - last_tick >= o.poll_interval:
                for hook in self.hooks:
                    hook.tick()
                last_tick = time.monotonic()
            if self.live:
                finished, _ = wait(list(self.live), timeout=o.poll_interval, return_when=FIRST_COMPLETED)
            else:  # waiting for the feed: wait() on no futures would return at once (a busy loop)
                finished = set()
                time.sleep(o.poll_interval)
            if not finished:
                self.status.write()
            for fut in finished:
                self.collect(fut)

    # -- the steps --------------------------------------------------------------------------------

    def add_points(self, new: Sequence[int]) -> None:
        """Queue points (skipping those already in the run); points with up-to-date files are done."""
        cfg, plan, n_tiles = self.cfg, self.plan, len(self.plan.blocks)
        for k in new:
            if k in self.seen:
                continue
            self.seen.add(k)
            if k >= plan.scan.n_points:  # a scan that grows while it is watched
                plan.scan = open_scan(cfg, self.scan_path, check=False, warn_trailing=False)
            self.order.append(k)
            self.status.add_point(k, n_tiles)
            block_dir = self.folder.blocks(k)
            resumed = None if self.options.force else resumable_point(
                plan.scan, cfg, k, self.folder.point_file(k), block_dir)
            if resumed is not None:
                if self.options.per_depth_files:
                    _export_kept(resumed)
                self.done[k] = resumed
                self.status.point_finished(resumed, write=self.started)
                if self.started:
                    self.announce(resumed)
            else:
                if self.options.force:
                    shutil.rmtree(block_dir, ignore_errors=True)
                self.queue.append(k)
                self.counts.blocks_total += n_tiles

    def submit_ready(self) -> None:
        """Submit the queued points that fit within the limits on points and blocks in flight."""
        n_tiles = len(self.plan.blocks)
        while self.queue and len(self.active) < self.max_points_in_flight and (
                self.counts.blocks_live < self.options.max_blocks_in_flight or not self.active):
            k = self.queue.popleft()
            n_new = self.submit(k)
            self.counts.blocks_live += n_new
            reused = n_tiles - n_new
            self.status.point_running(k, reused_blocks=reused)
            if reused:
                self.counts.blocks_done += reused
                self.emit("block", point=k, reused=True)

    def submit(self, k: int) -> int:
        """Submit one point's staging, blocks and stitching; returns the number of block tasks."""
        state = _Point(point=k, t0=time.perf_counter())
        deps: list[Any] = []
        files: list[str] = []
        todo = []
        kept = reusable_blocks(self.folder, self.plan.scan, k, self.plan.blocks, self.worker_fp)
        for tile in self.plan.blocks:
            box = (tile.r0, tile.r1, tile.c0, tile.c1)
            bf = self.folder.block_file(k, tile.r0, tile.c0)
            files.append(str(bf))
            reused = kept.get(box)
            deps.append(reused)
            if reused is None:
                todo.append((len(deps) - 1, tile, box, bf))
        stage = self.stage(k, [t for _, t, _, _ in todo]) if todo else None
        for i, tile, box, bf in todo:
            fut = apps.reconstruct_block(str(self.scan_path), self.cfg_path, k, tile, str(bf), stage)
            self.live[fut] = ("block", k)
            state.block_futures.append(fut)
            state.block_tiles.append(box)
            deps[i] = fut
        self.stitch(k, files, deps)
        self.active[k] = state
        return len(state.block_futures)

    def stage(self, k: int, tiles: Sequence[Any]) -> Future | None:
        """Submit the staging of a point's frames for the tiles to decode (None without staging); it
        waits for the previous point's staging, so that one point is staged at a time."""
        if not self.options.staging:
            return None
        stage = apps.stage_point(str(self.scan_path), self.cfg_path, k, tiles,
                                 str(self.folder.staged(k)),
                                 inputs=[self.last_stage] if self.last_stage is not None else [])
        self.last_stage = stage
        return stage

    def stitch(self, k: int, files: Sequence[str], deps: Sequence[Future | BlockOutcome]) -> Future:
        """Submit the stitching of a point, to run once its block tasks (``deps``) have finished."""
        fut = apps.stitch_point(list(files), str(self.folder.point_file(k)), self.stitch_request(point=k),
                                inputs=list(deps))
        self.live[fut] = ("point", k)
        return fut

    def collect(self, fut: Future) -> None:
        """A finished task: a block is counted, a stitching ends its point."""
        if _disk_full(fut.exception()):
            raise _DiskFull()
        kind, k = self.live.pop(fut)
        if kind == "block":
            self.counts.blocks_live -= 1
            self.counts.blocks_done += 1
            info: BlockOutcome | None = fut.result() if fut.exception() is None else None
            n_pixels = info.n_pixels if info is not None else 0
            failed = info is None or bool(info.error)
            self.status.block_done(k, n_pixels=n_pixels, failed=failed,
                                   failed_pixels=self.tile_pixels(k, fut) if failed else 0)
            self.emit("block", point=k, n_pixels=n_pixels)
            return
        state = self.active.pop(k)
        result = _point_result(k, fut, state)
        if result.status == PointState.DONE:
            shutil.rmtree(self.folder.blocks(k), ignore_errors=True)
        else:  # the block files stay for a rerun; the scratch frames need not
            staging.remove(self.folder.staged(k))
        self.report(result)

    def tile_pixels(self, k: int, fut: Future) -> int:
        """The pixels of the tile of a block task of point ``k``."""
        state = self.active.get(k)
        if state is None or fut not in state.block_futures:
            return 0
        r0, r1, c0, c1 = state.block_tiles[state.block_futures.index(fut)]
        return (r1 - r0) * (c1 - c0)

    def report(self, result: PointResult) -> None:
        """A point ended: into status.json, then to the hooks."""
        self.done[result.point] = result
        self.status.point_finished(result)
        self.announce(result)

    # -- the hooks --------------------------------------------------------------------------------

    def emit(self, kind: str, result: PointResult | None = None, point: int | None = None,
             n_pixels: int = 0, reused: bool = False) -> None:
        """Send a progress event to every hook."""
        event = ProgressEvent(kind, self.counts.blocks_done, self.counts.blocks_total, len(self.order),
                              result, point=point, n_pixels=n_pixels, reused=reused)
        for hook in self.hooks:
            hook.on_event(event)

    def announce(self, result: PointResult) -> None:
        """A point that ended, to the hooks: its progress event, then ``on_point_done``."""
        self.emit("point", result)
        for hook in self.hooks:
            hook.on_point_done(result)

    def status_sections(self) -> dict[str, Any]:
        """The hooks' entries of status.json."""
        extra: dict[str, Any] = {}
        for hook in self.hooks:
            extra.update(hook.status_section())
        return extra


def run(scan_path: str | Path, cfg: Config, out_dir: str | Path, options: RunOptions | None = None, *,
        hooks: Sequence[RunHooks] = (), feed: PointFeed | None = None,
        progress: Callable[[ProgressEvent], None] | None = None, lock: RunLock | None = None,
        **overrides: Any) -> RunResult:
    """Reconstruct the chosen points of a scan into ``out_dir``; returns what happened to each point.

    ``options`` (:class:`RunOptions`), or its fields given by name here (``points=``,
    ``block_pixels=``, ``site_config=``, ...), say how.  Raises ScanError or RunError, before writing
    anything, when the run cannot start, and RunError when another run holds ``out_dir``.  Existing
    complete point files whose configuration and input fingerprints match are kept and finished
    block files are reused, unless ``force``.  ``hooks`` follow and extend the run (see
    :mod:`laueflow.workflow.hooks`); ``progress`` is a plain callable for the progress events (it
    comes before the hooks); ``feed`` adds points while the run goes on (``laueflow watch``); ``lock``:
    the output folder's lock when the caller already holds it (it stays held).

    Ctrl-C (or SIGTERM made a KeyboardInterrupt) stops every task at once and raises
    KeyboardInterrupt, with status.json ``interrupted``; a full output disk stops the run the same way
    and raises RunError saying how much space is needed.
    """
    opts = replace(options or RunOptions(), **overrides)
    chain = [*([ProgressCallback(progress)] if progress is not None else []), *hooks]
    return Driver(scan_path, cfg, out_dir, opts, chain, feed, lock).run()
