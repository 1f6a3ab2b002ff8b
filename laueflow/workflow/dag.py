"""The task graph of a reconstruction and the driver loop that runs it on a Parsl configuration.

Per scan point: one ``stage_point`` task (executor ``stitch``) that reads the point's frames once
into a tile-major scratch file (:mod:`laueflow.io.staging`), one ``reconstruct_block`` task per
detector tile (executor ``decode``) that reads its tile from it, then one ``stitch_point`` task that
depends on all of them (executor ``stitch``) and writes ``OUT/point_<k:05d>.h5``.  Several points are
in flight at once, so that staging the next points overlaps decoding this one; their scratch files
are kept within a disk budget.  Block results go to ``OUT/.blocks/point_<k:05d>/`` so that an
interrupted run loses at most the blocks in progress.

Everything that can be checked before any task runs is checked first (scan, points, region,
whether the mask can resolve the depth grid), and nothing is written until those checks pass.
"""

from __future__ import annotations

import shutil
import socket
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .. import provenance
from ..config import Config, ConfigWarning, load
from ..errors import RunError  # noqa: F401 (re-exported)
from ..io import results, staging
from ..io.scan import Scan, ScanError, open_scan, select_points
from .status import RunLock, RunLocked, StatusFile

BLOCKS_DIR = ".blocks"
STAGE_NAME = "frames.stage"
# scratch disk that staged points in flight may take (OUT/.blocks/point_<k>/frames.stage)
STAGE_BUDGET_BYTES = 4 << 30
OK_STATUSES = ("done", "resumed")


@dataclass
class PointResult:
    """How one scan point ended: done, resumed (existing file still valid), skipped, partial, failed."""

    point: int
    status: str
    file: str | None = None
    n_pixels: int = 0
    depth_range_um: tuple[float, float] | None = None
    seconds: float = 0.0
    block_seconds: float = 0.0
    failed_blocks: int = 0
    reused_blocks: int = 0
    reason: str = ""

    @property
    def ok(self) -> bool:
        """False when something went wrong (a skipped point is fine when no block failed)."""
        return self.status in OK_STATUSES or (self.status == "skipped" and self.failed_blocks == 0)

    def line(self) -> str:
        """One line for humans."""
        head = f"point {self.point:5d}: {self.status:<8s}"
        if self.status in ("skipped", "failed"):
            return f"{head} {self.reason}"
        rng = (f"signal {self.depth_range_um[0]:.1f} to {self.depth_range_um[1]:.1f} um"
               if self.depth_range_um else "no signal")
        text = f"{head} {self.n_pixels} pixels, {rng}"
        if self.status != "resumed":
            text += f", {self.seconds:.1f} s (decoding {self.block_seconds:.1f} s)"
        if self.reason:
            text += f"; {self.reason}"
        return text


@dataclass
class RunResult:
    """All points of a run, and the exit status the command line should return."""

    out_dir: str
    points: list[PointResult] = field(default_factory=list)
    seconds: float = 0.0
    transfers_failed: bool = False  # results were written but not all reached their Globus destination

    @property
    def exit_code(self) -> int:
        return 0 if all(p.ok for p in self.points) and not self.transfers_failed else 1

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for p in self.points:
            counts[p.status] = counts.get(p.status, 0) + 1
        parts = ", ".join(f"{n} {s}" for s, n in counts.items())
        pixels = sum(p.n_pixels for p in self.points if p.status in ("done", "partial", "resumed"))
        bad = sum(not p.ok for p in self.points)
        tail = f"; {bad} with errors" if bad else ""
        if self.transfers_failed:
            tail += "; some results did not reach their Globus destination (see above)"
        n = len(self.points)
        return (f"{n} point{'' if n == 1 else 's'} ({parts}), {pixels} pixels reconstructed in "
                f"{self.seconds:.1f} s, results in {self.out_dir}{tail}")


@dataclass
class ProgressEvent:
    """Sent to the ``progress`` callback: ``start`` (totals known), ``block`` (one block finished, with
    its point and pixel count) and ``point`` (one point finished, with its result).  Totals grow when
    points are added while the run goes on."""

    kind: str
    blocks_done: int
    blocks_total: int
    points_total: int
    result: PointResult | None = None
    point: int | None = None
    n_pixels: int = 0
    reused: bool = False  # a "block" event for finished blocks kept from an earlier run


@dataclass
class _Plan:
    scan: Scan
    points: list[int]
    tiles: list[Any]
    block_pixels: int


@dataclass
class _Point:
    point: int
    t0: float
    block_futures: list[Future] = field(default_factory=list)
    block_tiles: list[tuple[int, ...]] = field(default_factory=list)


def _corner_pixels(frame: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Corners and centre of a region [r0, r1, c0, c1]."""
    r0, r1, c0, c1 = frame
    rows = np.array([r0, r0, r1 - 1, r1 - 1, (r0 + r1) // 2], dtype=np.int32)
    cols = np.array([c0, c1 - 1, c0, c1 - 1, (c0 + c1) // 2], dtype=np.int32)
    return rows, cols


def _is_inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def prepare(scan_path: str | Path, cfg: Config, out_dir: str | Path,
            points: str | Sequence[int] | None = None, block_pixels: int | None = None) -> _Plan:
    """All checks that need no task: the scan opens, the points exist, the first point's files are
    sound, the output is not inside the input, and the mask can resolve the depth grid."""
    from ..decode import check_reach
    from ..forward import Setup

    scan = open_scan(cfg, scan_path, check=False)
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
    return _Plan(scan=scan, points=chosen, tiles=scan.tiles(bp), block_pixels=bp)


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
    from dataclasses import replace

    mask = cfg.geo.mask
    if mask.path is not None:
        mask = replace(mask, path=str(cfg.resolve(mask.path).resolve()))
    fixed = replace(cfg, geo=replace(cfg.geo, mask=mask))
    path = out_dir / BLOCKS_DIR / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    with results.atomic_path(path) as tmp:
        tmp.write_text(fixed.to_yaml())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        return str(path), load(path).fingerprint()


def _resumable(scan: Scan, cfg: Config, point: int, out_file: Path, block_dir: Path) -> PointResult | None:
    """A result for a point whose file exists, is complete and matches the configuration and the inputs."""
    if not out_file.is_file():
        return None
    prov = results.read_provenance(out_file)
    if (not prov or not prov.get("complete") or prov.get("point") != point
            or prov.get(provenance.CONFIG_FINGERPRINT) != cfg.fingerprint()):
        return None
    try:
        current = provenance.input_fingerprint(scan.fingerprints(point))
    except ScanError:
        return None
    if current != prov.get(provenance.INPUT_FINGERPRINT):
        shutil.rmtree(block_dir, ignore_errors=True)  # inputs changed: their blocks are stale too
        return None
    info = results.point_summary(out_file)
    return PointResult(point=point, status="resumed", file=str(out_file), n_pixels=info["n_pixels"],
                       depth_range_um=info["depth_range_um"], reason="file up to date, kept")


def _reusable_block(block_file: Path, point: int, box: tuple[int, ...], fingerprint: str) -> dict | None:
    """The summary of a finished block file that can be reused, else None."""
    from .tasks import block_summary

    if not block_file.is_file():
        return None
    meta = results.read_block_meta(block_file)
    if not meta or meta["config_fingerprint"] != fingerprint or meta["point"] != point or meta["tile"] != box:
        return None
    return block_summary(point, box, n_pixels=meta["n_pixels"], seconds=meta["seconds"],
                         skipped=meta["skipped"], block_file=str(block_file), host=meta["host"], reused=True)


def _root_cause(state: _Point) -> str:
    """The first failed block of a point, named by its tile [r0, r1, c0, c1], with its exception."""
    for f, box in zip(state.block_futures, state.block_tiles, strict=True):
        if f.done() and f.exception() is not None:
            exc = f.exception()
            return f"block {list(box)}: {type(exc).__name__}: {exc}"
    return ""


class PointFeed(Protocol):
    """Points that become ready while a run goes on (``laueflow watch``): ``poll`` returns the points
    that became ready since the last call; ``done`` is True once no more will come."""

    def poll(self) -> Sequence[int]: ...

    @property
    def done(self) -> bool: ...


def run(scan_path: str | Path, cfg: Config, out_dir: str | Path, points: str | Sequence[int] | None = None,
        block_pixels: int | None = None, site_config: Any = None,
        progress: Callable[[ProgressEvent], None] | None = None, command_line: str | None = None,
        max_points_in_flight: int = 64, max_blocks_in_flight: int = 4096, force: bool = False,
        per_depth_files: bool = False, feed: PointFeed | None = None,
        tick: Callable[[], None] | None = None, status_extra: Callable[[], dict] | None = None,
        poll_interval: float = 1.0, staging: bool = True,
        stage_budget_bytes: int = STAGE_BUDGET_BYTES) -> RunResult:
    """Reconstruct the chosen points of a scan into ``out_dir``; returns what happened to each point.

    ``site_config`` is a ``parsl.Config`` with executors labelled ``decode`` and ``stitch`` (see
    :mod:`laueflow.sites`; default: the threads site).  Raises ScanError or RunError, before
    writing anything, when the run cannot start, and RunError when another run holds ``out_dir``.
    Existing complete point files whose configuration and input fingerprints match are kept and
    finished block files are reused, unless ``force``.  ``per_depth_files`` also writes one image
    file per depth for the indexing chain.  ``feed`` adds points while the run goes on; ``tick`` is
    called about every ``poll_interval`` seconds; ``status_extra`` adds entries to ``status.json``.
    ``staging``: read each point's frames once into a scratch file for its block tasks (the points
    in flight are limited so that their scratch files stay within ``stage_budget_bytes``, but at least
    two are); without it each block task reads its tile from the frame files.
    """
    import parsl

    from .apps import reconstruct_block, stage_point, stitch_point

    t_start = time.perf_counter()
    start_time = provenance.now()
    scan_path = Path(scan_path).resolve()
    out_dir = Path(out_dir).resolve()
    plan = prepare(scan_path, cfg, out_dir, points, block_pixels)
    emit = progress or (lambda event: None)
    try:
        parsl.dfk()
    except parsl.errors.NoDataFlowKernelError:
        pass
    else:
        raise RunError("a Parsl configuration is already loaded in this process; "
                       "call parsl.dfk().cleanup() first (laueflow loads its site itself)")

    out_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out_dir)
    try:
        lock.acquire()
    except RunLocked as exc:
        raise RunError(str(exc)) from None
    try:
        return _drive(plan=plan, scan_path=scan_path, cfg=cfg, out_dir=out_dir, site_config=site_config,
                      emit=emit, command_line=command_line, start_time=start_time, t_start=t_start,
                      max_points_in_flight=max_points_in_flight, max_blocks_in_flight=max_blocks_in_flight,
                      force=force, per_depth_files=per_depth_files, feed=feed, tick=tick,
                      status_extra=status_extra, poll_interval=poll_interval,
                      stage_point=stage_point if staging else None, stage_budget_bytes=stage_budget_bytes,
                      reconstruct_block=reconstruct_block, stitch_point=stitch_point)
    finally:
        lock.release()


def _drive(*, plan: _Plan, scan_path: Path, cfg: Config, out_dir: Path, site_config: Any,
           emit: Callable[[ProgressEvent], None], command_line: str | None, start_time: str, t_start: float,
           max_points_in_flight: int, max_blocks_in_flight: int, force: bool, per_depth_files: bool,
           feed: PointFeed | None, tick: Callable[[], None] | None, status_extra: Callable[[], dict] | None,
           poll_interval: float, stage_point: Any, stage_budget_bytes: int, reconstruct_block: Any,
           stitch_point: Any) -> RunResult:
    """The body of :func:`run`, once the output folder is locked (``stage_point`` None: no staging)."""
    import parsl

    if site_config is None:
        from .. import sites

        site_config = sites.site_config("threads", run_dir=str(out_dir / ".runinfo"))
    cfg_path, worker_fp = _worker_config(cfg, out_dir)
    source = Path(cfg.source_file) if cfg.source_file else None
    source_text = source.read_text() if source is not None and source.is_file() else None
    command = command_line if command_line is not None else provenance.command_line()
    meta_common = {
        "scan_path": str(scan_path), "cfg_path": cfg_path, "frame": [int(v) for v in cfg.file.frame],
        "depths_mm": [float(z) for z in cfg.geo.source.depths], "config_yaml": cfg.to_yaml(),
        "config_fingerprint": cfg.fingerprint(), "start_time": start_time,
        "command_line": command, "host": socket.gethostname(), "config_file": cfg.source_file or "",
        "config_source": source_text, "per_depth_files": per_depth_files,
    }
    _remove_stale_temporaries(out_dir, keep_staged=plan.points if stage_point is not None else ())
    status = StatusFile(out_dir, scan=str(scan_path), command=command, extra=status_extra)
    outcome = RunResult(out_dir=str(out_dir))
    n_tiles = len(plan.tiles)
    done_results: dict[int, PointResult] = {}
    order: list[int] = []
    seen: set[int] = set()
    queue: deque[int] = deque()
    counts = {"blocks_total": 0, "blocks_done": 0}
    if stage_point is not None:
        r0, r1, c0, c1 = cfg.file.frame
        per_point = staging.staged_bytes(cfg.file.n_frames, (r1 - r0) * (c1 - c0))
        max_points_in_flight = min(max_points_in_flight, max(2, stage_budget_bytes // max(per_point, 1)))

    def event(kind: str, result: PointResult | None = None, point: int | None = None,
              n_pixels: int = 0, reused: bool = False) -> ProgressEvent:
        return ProgressEvent(kind, counts["blocks_done"], counts["blocks_total"], len(order), result,
                             point=point, n_pixels=n_pixels, reused=reused)

    def add_points(new: Sequence[int]) -> None:
        """Queue points (skipping those already in the run); points with up-to-date files are done."""
        for k in new:
            if k in seen:
                continue
            seen.add(k)
            if k >= plan.scan.n_points:  # a scan that grows while it is watched
                plan.scan = open_scan(cfg, scan_path, check=False)
            order.append(k)
            status.add_point(k, n_tiles)
            resumed = None if force else _resumable(plan.scan, cfg, k, out_dir / results.point_name(k),
                                                     _block_dir(out_dir, k))
            if resumed is not None:
                if per_depth_files:
                    _export_kept(resumed)
                done_results[k] = resumed
                status.point_finished(resumed, write=started)
                if started:  # points of the initial selection are announced after "start"
                    emit(event("point", resumed))
            else:
                if force:
                    shutil.rmtree(_block_dir(out_dir, k), ignore_errors=True)
                queue.append(k)
                counts["blocks_total"] += n_tiles

    started = False
    final_state = "failed"
    try:
        add_points(plan.points)
        started = True
        emit(event("start"))
        for k in order:
            if k in done_results:
                emit(event("point", done_results[k]))
        status.write(force=True)
        if queue or (feed is not None and not feed.done):
            with warnings.catch_warnings(), parsl.load(site_config):
                # JAX warns on every fork; Parsl's providers fork only to exec shell commands, which is safe
                warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
                live: dict[Future, tuple[str, int]] = {}
                last_stage: list[Future] = []  # the latest point's staging: the next one waits for it
                active: dict[int, _Point] = {}
                blocks_live = 0
                last_tick = time.monotonic()

                def submit(k: int) -> int:
                    """Submit one point's blocks and its stitching; returns the number of block tasks."""
                    block_dir = _block_dir(out_dir, k)
                    state = _Point(point=k, t0=time.perf_counter())
                    deps: list[Any] = []
                    files: list[str] = []
                    todo = []
                    for tile in plan.tiles:
                        box = (tile.r0, tile.r1, tile.c0, tile.c1)
                        bf = block_dir / f"block_r{tile.r0:05d}_c{tile.c0:05d}.npz"
                        files.append(str(bf))
                        reused = _reusable_block(bf, k, box, worker_fp)
                        deps.append(reused)
                        if reused is None:
                            todo.append((len(deps) - 1, tile, box, bf))
                    stage = None
                    if stage_point is not None and todo:
                        stage = stage_point(str(scan_path), cfg_path, k, [t for _, t, _, _ in todo],
                                            str(block_dir / STAGE_NAME), inputs=last_stage[-1:])
                        last_stage[:] = [stage]
                    for i, tile, box, bf in todo:
                        fut = reconstruct_block(str(scan_path), cfg_path, k, tile, str(bf), stage)
                        live[fut] = ("block", k)
                        state.block_futures.append(fut)
                        state.block_tiles.append(box)
                        deps[i] = fut
                    meta = {**meta_common, "point": k}
                    stitch = stitch_point(files, str(out_dir / results.point_name(k)), meta, inputs=deps)
                    live[stitch] = ("point", k)
                    active[k] = state
                    return len(state.block_futures)

                while True:
                    if feed is not None and not feed.done:
                        add_points(feed.poll())
                    while queue and len(active) < max_points_in_flight and (
                            blocks_live < max_blocks_in_flight or not active):
                        k = queue.popleft()
                        n_new = submit(k)
                        blocks_live += n_new
                        reused = n_tiles - n_new
                        status.point_running(k, reused_blocks=reused)
                        if reused:
                            counts["blocks_done"] += reused
                            emit(event("block", point=k, reused=True))
                    if not live and not queue and (feed is None or feed.done):
                        break
                    if tick is not None and time.monotonic() - last_tick >= poll_interval:
                        tick()
                        last_tick = time.monotonic()
                    if live:
                        finished, _ = wait(list(live), timeout=poll_interval, return_when=FIRST_COMPLETED)
                    else:  # waiting for the feed: wait() on no futures would return at once (a busy loop)
                        finished = set()
                        time.sleep(poll_interval)
                    if not finished:
                        status.write()
                    for fut in finished:
                        kind, k = live.pop(fut)
                        if kind == "block":
                            blocks_live -= 1
                            counts["blocks_done"] += 1
                            info = fut.result() if fut.exception() is None else {"error": "task failed"}
                            n_pixels = int(info.get("n_pixels", 0))
                            status.block_done(k, n_pixels=n_pixels, failed=bool(info.get("error")))
                            emit(event("block", point=k, n_pixels=n_pixels))
                            continue
                        state = active.pop(k)
                        result = _point_result(k, fut, state)
                        if result.status == "done":
                            shutil.rmtree(_block_dir(out_dir, k), ignore_errors=True)
                        else:  # the block files stay for a rerun; the scratch frames need not
                            staging.remove(_block_dir(out_dir, k) / STAGE_NAME)
                        done_results[k] = result
                        status.point_finished(result)
                        emit(event("point", result))
        final_state = "finished"
    except KeyboardInterrupt:
        final_state = "interrupted"
        raise
    finally:
        blocks_root = out_dir / BLOCKS_DIR
        if blocks_root.is_dir() and not any(p.is_dir() for p in blocks_root.iterdir()):
            shutil.rmtree(blocks_root, ignore_errors=True)
        status.finish(final_state)
    outcome.points = [done_results[k] for k in order]
    outcome.seconds = time.perf_counter() - t_start
    return outcome


def _export_kept(result: PointResult) -> None:
    """Per-depth files of a point file that is kept: a failed export is noted, the point stays done."""
    from ..io.export import ExportError, export_point

    try:
        export_point(result.file)
    except (ExportError, OSError) as exc:
        result.reason += f"; per-depth export failed: {exc}"


def _remove_stale_temporaries(out_dir: Path, keep_staged: Sequence[int] = ()) -> None:
    """Remove files an interrupted run left half-written under their temporary names, and its staged
    points except those of ``keep_staged`` (this run may reuse them; the others would only hold disk
    space).  Safe: this run holds the folder's lock, so no other run is writing there."""
    keep = {_block_dir(out_dir, k) for k in keep_staged}
    for folder in (out_dir, *(p for p in out_dir.joinpath(BLOCKS_DIR).glob("point_*") if p.is_dir())):
        for tmp in folder.glob(f"*{results.TMP_MARK}*"):
            tmp.unlink(missing_ok=True)
        if folder != out_dir and folder not in keep:
            staging.remove(folder / STAGE_NAME)


def _block_dir(out_dir: Path, point: int) -> Path:
    return out_dir / BLOCKS_DIR / f"point_{point:05d}"


def _point_result(k: int, fut: Future, state: _Point) -> PointResult:
    """Turn a finished stitching future into a PointResult (a failed block shows up as its cause)."""
    seconds = time.perf_counter() - state.t0
    exc = fut.exception()
    if exc is not None:
        cause = _root_cause(state) or f"{type(exc).__name__}: {exc}"
        failed = sum(1 for f in state.block_futures if f.exception() is not None)
        return PointResult(point=k, status="failed", seconds=seconds, failed_blocks=max(failed, 1),
                           reason=cause)
    r = fut.result()
    rng = r.get("depth_range_um")
    return PointResult(point=k, status=r["status"], file=r.get("file"), n_pixels=int(r.get("n_pixels", 0)),
                       depth_range_um=tuple(rng) if rng else None, seconds=seconds,
                       block_seconds=float(r.get("block_seconds", 0.0)),
                       failed_blocks=int(r.get("failed_blocks", 0)),
                       reused_blocks=int(r.get("reused_blocks", 0)),
                       reason=r.get("reason", ""))
