"""Results of a reconstruction for scientists: ``laueflow.open_run(OUT)`` and what it gives.

A run folder holds one point file per scan point (``point_<k:05d>.h5``, see :mod:`laueflow.io.pointfile`)
and, while ``laueflow run`` or ``laueflow watch`` drives it, ``status.json`` with the state of every
point.  :class:`Run` joins the two: the points with their state, and for every point that has a file
a :class:`Point` giving lazy access to its depth axis, volume, depth slices, pixel profiles,
intensity versus depth, per-pixel diagnostics and provenance.  Only what is asked is read (h5py
slicing).

It works on a run that is still being written: point files appear under their final name only once
complete (written under a temporary name, then renamed), temporary files are never opened, and the
status file is replaced atomically.  A :class:`Point` keeps its file open from the first read, so it
stays a consistent snapshot even if a rerun replaces the file meanwhile; ``run.point(k)`` again gives
the new one.

For a simulated scan the truth (``truth.h5`` beside the scan, recorded in the provenance) can be
loaded beside the result, and for any point with its scan at hand, a pixel's measured trace can be
compared with the trace its reconstructed profile predicts (:meth:`Point.compare_traces`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import yaml

from .config import ConfigError, ConfigWarning, from_dict
from .errors import ResultError  # noqa: F401 (re-exported)
from .evaluate import score as score_profiles
from .flags import NO_SIGNAL, PIXEL_DECODED, PIXEL_STATES, QUALITY_FLAGS, Flag
from .io import header
from .io.blocks import PIXEL_FIELDS
from .io.layout import SCAN_CONFIG_FILE, TRUTH_FILE, RunFolder, point_of
from .io.pointfile import PointReader, signal_range
from .io.scan import ScanError, Tile, open_scan
from .io.truth import load_truth
from .workflow.status import (
    FILE_STATES,
    PointState,
    RunState,
    StatusRecord,
    Totals,
    age_seconds,
    driver_alive,
    load_status,
)

POINT_STATES = tuple(PointState)
# the sample position a 34-ID-E frame header records (laueflow.io.header), kept by every point file
SAMPLE_POSITIONS = ("entry1/sample/sampleX", "entry1/sample/sampleY", "entry1/sample/sampleZ")


def _open(path: Path) -> PointReader:
    """Open a finished result read-only (with HDF5's default file locking, so that other readers in the
    same process can open it too; set HDF5_USE_FILE_LOCKING=FALSE where the file system has no locks)."""
    try:
        return PointReader(path)
    except (OSError, ValueError) as exc:
        raise ResultError(f"{path}: not a readable HDF5 file: {exc}") from None


# ----------------------------------------------------------------------------------------------
# A run folder


@dataclass(frozen=True)
class PointStatus:
    """The state of one scan point of a run, from status.json and the files present.

    ``file`` is the point file at its final name when it exists (then it is complete), else None.
    ``blocks_*``, ``n_pixels``, ``seconds`` come from status.json (None when the run has none).
    """

    point: int
    state: str  # a PointState's value (a newer laueflow may write others)
    file: Path | None
    blocks_total: int | None = None
    blocks_done: int | None = None
    blocks_failed: int = 0
    n_pixels: int | None = None
    seconds: float | None = None
    reason: str = ""

    @property
    def ready(self) -> bool:
        """Whether the point has a result file to read."""
        return self.file is not None

    def line(self) -> str:
        """One row of :meth:`Run.table`."""
        blocks = f"{self.blocks_done or 0}/{self.blocks_total}" if self.blocks_total is not None else "-"
        pixels = "-" if self.n_pixels is None else str(self.n_pixels)
        seconds = "-" if self.seconds is None else f"{self.seconds:.1f}"
        note = self.file.name if self.file is not None else ""
        if self.reason:
            note = f"{note}  {self.reason}".strip()
        if self.blocks_failed:
            note = f"{note}  ({self.blocks_failed} blocks failed)".strip()
        return f"{self.point:>6d}  {self.state:<8s}  {blocks:>9s}  {pixels:>8s}  {seconds:>8s}  {note}"


class Run:
    """A run folder: its points and their state; :meth:`point` opens one point's result.

    The state is read when the Run is made; :meth:`refresh` reads it again (a running reconstruction
    moves on).  Without status.json (an older run, or one whose driver has not written it yet) the
    points are the point files present.  ``status`` is the status file's record
    (:class:`laueflow.workflow.status.StatusRecord`), None without one.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser().resolve()
        if not self.path.exists():
            raise ResultError(f"{self.path}: run folder does not exist")
        if not self.path.is_dir():
            raise ResultError(f"{self.path}: not a run folder (give the folder that holds point_<k>.h5 "
                              f"and status.json)")
        self.status: StatusRecord | None = None
        self.status_problem = ""
        self.points: dict[int, PointStatus] = {}
        self.refresh()

    # reading ------------------------------------------------------------------------------------
    def refresh(self) -> Run:
        """Read status.json and the list of point files again; returns self."""
        self.status, self.status_problem = load_status(self.path)
        folder = RunFolder(self.path)
        on_disk = folder.point_files()
        points: dict[int, PointStatus] = {}
        recorded = self.status.points if self.status is not None else {}
        for k, info in recorded.items():
            file = self.path / info.file if info.file else folder.point_file(k)
            points[k] = PointStatus(
                point=k, state=str(info.state), file=file if file.is_file() else None,
                blocks_total=info.blocks_total, blocks_done=info.blocks_done,
                blocks_failed=info.blocks_failed or 0, n_pixels=info.n_pixels, seconds=info.seconds,
                reason=info.reason)
        for k, file in on_disk.items():
            if k not in points:  # a file from an earlier run, or no status file at all
                points[k] = PointStatus(point=k, state=_file_state(file), file=file)
        self.points = dict(sorted(points.items()))
        return self

    # the run as a whole ---------------------------------------------------------------------------
    @property
    def recorded_state(self) -> str | None:
        """The state status.json records (running, finished, interrupted, failed), None without one."""
        return None if self.status is None else str(self.status.state)

    @property
    def driver_alive(self) -> bool | None:
        """Whether the process driving a recorded ``running`` state still runs: checked by its pid on
        this host, by the age of the last update elsewhere; None when it cannot be told."""
        if self.status is None or self.recorded_state != RunState.RUNNING:
            return None
        return driver_alive(self.status)

    @property
    def state(self) -> str:
        """running, finished, interrupted or failed as recorded; ``stale`` when the record says
        running but its driver is gone; ``unknown`` without a status file."""
        recorded = self.recorded_state
        if recorded is None:
            return RunState.UNKNOWN
        if recorded == RunState.RUNNING and self.driver_alive is False:
            return RunState.STALE
        return recorded

    @property
    def ready(self) -> list[int]:
        """Points with a result file, in order."""
        return [k for k, p in self.points.items() if p.ready]

    def counts(self) -> dict[str, int]:
        """Number of points in each state."""
        out: dict[str, int] = {}
        for p in self.points.values():
            out[p.state] = out.get(p.state, 0) + 1
        return out

    @property
    def totals(self) -> dict[str, Any]:
        """The run's totals: status.json's when there is one (None for a figure it does not record),
        else counted from the files."""
        return self._totals().to_json()

    def _totals(self) -> Totals:
        if self.status is not None and self.status.totals is not None:
            return self.status.totals
        return Totals(points=len(self.points), points_done=len(self.ready), points_failed=0)

    def progress(self) -> str:
        """One line on where the run stands."""
        t = self._totals()
        state = self.state
        total = t.points if t.points is not None else len(self.points)
        text = f"{state}: {t.points_done or 0} of {total} points finished"
        if t.points_failed:
            text += f" ({t.points_failed} with failures)"
        if t.blocks:
            text += f", {t.blocks_done or 0}/{t.blocks} blocks"
        if t.pixels_per_second:
            text += f", {t.pixels_per_second:.0f} pixels/s"
        if state == RunState.RUNNING and t.eta_seconds is not None:
            text += f", about {t.eta_seconds:.0f} s to go"
        if self.status is not None:
            age = age_seconds(self.status.updated)
            if self.status.finished and state != RunState.RUNNING:
                text += f"; ended {self.status.finished}"
            elif age is not None:
                text += f"; updated {max(age, 0):.0f} s ago"
            if state == RunState.STALE:
                text += (f" (status.json says running, but its driver, pid {self.status.pid} on "
                         f"{self.status.host}, is gone)")
        else:
            text += " (no status.json: points from the files present)"
        return text

    def table(self) -> str:
        """The points, one line each, under a header."""
        head = f"{'point':>6s}  {'state':<8s}  {'blocks':>9s}  {'pixels':>8s}  {'seconds':>8s}  file / reason"
        return "\n".join([head, *(p.line() for p in self.points.values())])

    def describe(self) -> str:
        """Progress line, then the table of points."""
        lines = [f"run {self.path}", self.progress()]
        if self.status_problem:
            lines.append(f"note: {self.status_problem}")
        if self.status is not None and self.status.scan:
            lines.append(f"scan {self.status.scan}")
        return "\n".join([*lines, self.table()])

    # points -------------------------------------------------------------------------------------
    def point(self, k: int) -> Point:
        """Open the result of scan point ``k`` (a fresh snapshot of its file)."""
        if k not in self.points:
            self.refresh()
        info = self.points.get(k)
        if info is None:
            known = ", ".join(str(p) for p in self.points) or "none"
            raise ResultError(f"{self.path}: no scan point {k} in this run (points: {known})")
        if info.file is None:
            why = f"; {info.reason}" if info.reason else ""
            if info.state in FILE_STATES and info.state != PointState.PARTIAL:
                raise ResultError(f"{self.path}: point {k} is {info.state} but its file is not here "
                                  f"(moved or removed?){why}")
            raise ResultError(f"{self.path}: point {k} has no result yet (state {info.state}){why}")
        return Point(info.file, point=k)

    __getitem__ = point

    def __iter__(self) -> Iterator[Point]:
        """The points that have a result file, opened one after the other."""
        for k in self.ready:
            yield self.point(k)

    def __len__(self) -> int:
        return len(self.points)

    def __repr__(self) -> str:
        return f"<Run {self.path}: {self.progress()}>"


def _file_state(path: Path) -> PointState:
    """done or partial, from a point file's ``complete`` flag (a file is done when unreadable here)."""
    try:
        with _open(path) as r:
            return PointState.DONE if r.complete() else PointState.PARTIAL
    except (ResultError, KeyError, OSError):
        return PointState.DONE


def open_run(path: str | os.PathLike) -> Run:
    """The run in folder ``path`` (the ``--out`` of ``laueflow run``)."""
    return Run(path)


def open_point(path: str | os.PathLike) -> Point:
    """One point file, wherever it lies."""
    return Point(path)


# ----------------------------------------------------------------------------------------------
# One point


@dataclass
class Pixels:
    """Per-pixel diagnostics of the reconstructed pixels of a point (detector row and column)."""

    rows: np.ndarray
    cols: np.ndarray
    background: np.ndarray  # counts per frame
    residual: np.ndarray  # reduced chi-square of the fit
    quality: np.ndarray  # flag bits (laueflow.decode), 0 = good
    energy: np.ndarray  # keV, NaN where not estimated
    energy_sigma: np.ndarray  # keV

    def __len__(self) -> int:
        return int(self.rows.size)

    def find(self, row: int, col: int) -> int | None:
        """Index of the pixel at (row, col), None when it was not reconstructed."""
        hit = np.flatnonzero((self.rows == row) & (self.cols == col))
        return int(hit[0]) if hit.size else None

    def image(self, field: str, frame: tuple[int, int, int, int]) -> np.ndarray:
        """One field as a (rows, cols) float image over ``frame``, NaN where no pixel was reconstructed."""
        r0, r1, c0, c1 = frame
        out = np.full((r1 - r0, c1 - c0), np.nan)
        out[self.rows - r0, self.cols - c0] = getattr(self, field)
        return out


@dataclass
class TraceComparison:
    """A pixel's measured trace beside the trace its reconstructed profile predicts (I = b + G f)."""

    row: int
    col: int
    frames: np.ndarray  # frame offsets used by the geometry
    measured: np.ndarray  # counts (monitor-normalised when the scan has I0)
    predicted: np.ndarray
    background: float  # counts per frame
    energy_kev: float
    energy_source: str  # "estimated" (recorded by the decoder), "best fit", "configured" or "given"
    depth: np.ndarray  # um
    profile: np.ndarray  # counts per frame per depth bin
    chi2: float  # reduced chi-square of predicted against measured, Poisson weights

    @property
    def residual(self) -> np.ndarray:
        return self.measured - self.predicted


class Point:
    """Lazy access to one point file; opens it on first use and keeps it open (a consistent snapshot).

    Detector coordinates (row, col) are used throughout; ``frame`` = (r0, r1, c0, c1) is the region the
    volume covers.  Depths are in um.  Use as a context manager, or call :meth:`close`, to release
    the file early.
    """

    def __init__(self, path: str | os.PathLike, point: int | None = None) -> None:
        self.path = Path(path).expanduser().resolve()
        if not self.path.is_file():
            raise ResultError(f"{self.path}: point file does not exist")
        self._reader: PointReader | None = None
        self._point = point
        rec = self._rec  # check the layout now, so a wrong file fails here and not later
        if "volume" not in rec or "depth" not in rec:
            raise ResultError(f"{self.path}: not a laueflow point file (no /entry/reconstruction/volume)")
        if self.volume_data.ndim != 3 or self.volume_data.shape[0] != rec["depth"].shape[0]:
            raise ResultError(f"{self.path}: volume {self.volume_data.shape} does not match "
                              f"{rec['depth'].shape[0]} depth bins")

    # file ---------------------------------------------------------------------------------------
    @property
    def _file(self) -> PointReader:
        if self._reader is None or not self._reader.valid:
            self._reader = _open(self.path)
        return self._reader

    @property
    def _rec(self) -> h5py.Group:
        try:
            return self._file.rec
        except KeyError:
            raise ResultError(f"{self.path}: not a laueflow point file (no /entry/reconstruction)") from None

    def close(self) -> None:
        """Close the file (a later read opens it again, possibly a newer version of it)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __enter__(self) -> Point:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        j, h, w = self.shape
        return f"<Point {self.point} {self.path.name}: {j} depths x {h} x {w} pixels>"

    # layout -------------------------------------------------------------------------------------
    @property
    def point(self) -> int:
        """The scan point index (from the provenance, else the file name)."""
        if self._point is None:
            p = self.provenance.get("point")
            named = point_of(self.path)
            self._point = int(p) if p is not None else named if named is not None else -1
        return self._point

    @property
    def volume_data(self) -> h5py.Dataset:
        """The volume dataset (depth, row, col) itself, for any h5py slicing."""
        return self._file.volume

    @cached_property
    def depth(self) -> np.ndarray:
        """Depth bin centres, um."""
        return self._file.depth()

    @cached_property
    def frame(self) -> tuple[int, int, int, int]:
        """Detector region (r0, r1, c0, c1) of the volume."""
        return self._file.frame()

    @property
    def shape(self) -> tuple[int, int, int]:
        """(depths, rows, cols) of the volume."""
        return tuple(int(v) for v in self.volume_data.shape)  # type: ignore[return-value]

    @property
    def complete(self) -> bool:
        """False when some blocks of the point failed (their pixels are 0)."""
        return self._file.complete()

    @property
    def n_pixels(self) -> int:
        """Number of reconstructed pixels."""
        return self._file.n_pixels()

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """(left, right, bottom, top) of the region in detector pixels, for ``imshow(extent=...)``."""
        r0, r1, c0, c1 = self.frame
        return (c0 - 0.5, c1 - 0.5, r1 - 0.5, r0 - 0.5)

    # reading ------------------------------------------------------------------------------------
    def depth_index(self, depth_um: float) -> int:
        """Index of the depth bin holding ``depth_um``."""
        z = self.depth
        half = abs(z[1] - z[0]) / 2 if z.size > 1 else 0.5
        if not (z.min() - half <= depth_um <= z.max() + half):
            raise ResultError(f"{self.path.name}: depth {depth_um} um is outside the grid "
                              f"{z.min():g} to {z.max():g} um")
        return int(np.abs(z - depth_um).argmin())

    def _local(self, row: int, col: int) -> tuple[int, int]:
        r0, r1, c0, c1 = self.frame
        if not (r0 <= row < r1 and c0 <= col < c1):
            raise ResultError(f"{self.path.name}: pixel (row {row}, col {col}) is outside the region "
                              f"rows {r0}-{r1 - 1}, cols {c0}-{c1 - 1}")
        return row - r0, col - c0

    def _range(self, span: tuple[int, int] | None, lo: int, hi: int, what: str) -> slice:
        if span is None:
            return slice(0, hi - lo)
        a, b = (int(v) for v in span)
        if not (lo <= a < b <= hi):
            raise ResultError(f"{self.path.name}: {what} {a}-{b} is not within {lo}-{hi}")
        return slice(a - lo, b - lo)

    def depth_range(self, depth: tuple[float, float] | None) -> slice:
        """Bins whose centres lie within [lo, hi] um (all bins when None)."""
        if depth is None:
            return slice(0, self.depth.size)
        lo, hi = sorted(float(v) for v in depth)
        inside = np.flatnonzero((self.depth >= lo) & (self.depth <= hi))
        if inside.size == 0:
            raise ResultError(f"{self.path.name}: no depth bin between {lo:g} and {hi:g} um")
        return slice(int(inside[0]), int(inside[-1]) + 1)

    def volume(self, depth: tuple[float, float] | None = None, rows: tuple[int, int] | None = None,
               cols: tuple[int, int] | None = None) -> np.ndarray:
        """The volume (depth, row, col), or the part within ``depth`` = (lo, hi) um, detector ``rows`` =
        (r0, r1) and ``cols`` = (c0, c1) (end exclusive); reads only that part."""
        r0, r1, c0, c1 = self.frame
        sel = (self.depth_range(depth), self._range(rows, r0, r1, "rows"), self._range(cols, c0, c1, "cols"))
        return self.volume_data[sel]

    def depth_slice(self, depth_um: float | None = None, *, index: int | None = None) -> np.ndarray:
        """The (rows, cols) image at depth ``depth_um`` (nearest bin) or at bin ``index``."""
        if (depth_um is None) == (index is None):
            raise ValueError("give depth_um or index")
        j = self.depth_index(depth_um) if index is None else int(index)
        if not 0 <= j < self.depth.size:
            raise ResultError(f"{self.path.name}: depth index {j} is outside 0-{self.depth.size - 1}")
        return self.volume_data[j]

    def slab(self, index: slice | np.ndarray | list[int]) -> np.ndarray:
        """The (rows, cols) image summed over depth bins ``index``."""
        idx = np.arange(self.depth.size)[index]
        out = np.zeros(self.shape[1:], dtype=np.float64)
        for run in np.split(idx, np.flatnonzero(np.diff(idx) != 1) + 1):  # contiguous reads
            if run.size:
                out += self.volume_data[int(run[0]):int(run[-1]) + 1].sum(axis=0, dtype=np.float64)
        return out

    def profile(self, row: int, col: int) -> np.ndarray:
        """The depth profile of detector pixel (row, col), counts per frame per depth bin."""
        i, j = self._local(row, col)
        return self.volume_data[:, i, j]

    @cached_property
    def intensity_vs_depth(self) -> np.ndarray:
        """The volume summed over pixels, per depth bin."""
        try:
            stored = self._file.intensity_vs_depth()
        except KeyError:
            raise ResultError(f"{self.path}: not a laueflow point file (no intensity_vs_depth)") from None
        return np.asarray(stored, dtype=np.float64)

    def signal_range(self, fraction: float = 0.1) -> tuple[float, float] | None:
        """Depth interval (um) where the summed intensity stands out (see io.pointfile.signal_range)."""
        return signal_range(self.depth, self.intensity_vs_depth, fraction)

    def _depth_blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """The volume a few depth chunks at a time (bounded memory, each chunk decompressed once)."""
        vol = self.volume_data
        step = max(1, (vol.chunks or (16,))[0])
        for j0 in range(0, vol.shape[0], step):
            yield j0, vol[j0:j0 + step]

    @cached_property
    def _maps(self) -> tuple[np.ndarray, np.ndarray]:
        total = np.zeros(self.shape[1:], dtype=np.float64)
        best = np.zeros(self.shape[1:], dtype=np.float32)
        where = np.zeros(self.shape[1:], dtype=np.int64)
        for j0, block in self._depth_blocks():
            total += block.sum(axis=0, dtype=np.float64)
            bmax = block.max(axis=0)
            better = bmax > best
            where[better] = j0 + block.argmax(axis=0)[better]
            best = np.maximum(best, bmax)
        peak = np.where(best > 0, self.depth[where], np.nan)
        return total, peak

    def integrated_image(self) -> np.ndarray:
        """The (rows, cols) image summed over depth, counts per frame (read once, depth chunk by chunk)."""
        return self._maps[0]

    def depth_map(self) -> np.ndarray:
        """Depth (um) of maximum intensity of each pixel, NaN where a pixel has none."""
        return self._maps[1]

    @cached_property
    def pixels(self) -> Pixels:
        """The per-pixel diagnostics of the reconstructed pixels."""
        rows, cols = self._file.pixel_index()
        return Pixels(rows=rows, cols=cols, **self._file.pixel_fields())

    def pixel_state(self) -> np.ndarray:
        """(rows, cols) uint8 map over the region of what became of each pixel: decoded, saturated, not
        selected (below the threshold) or in a failed block (values and meanings:
        :meth:`pixel_states`, laueflow.flags.PIXEL_STATES)."""
        return self._file.pixel_state()

    def pixel_states(self) -> tuple[Flag, ...]:
        """The pixel states as the file defines them: (value, name, meaning)."""
        return self._file.flag_table("states")

    def quality_flags(self) -> tuple[Flag, ...]:
        """The quality bits of :attr:`pixels` as the file defines them: (bit, name, meaning)."""
        return self._file.flag_table("quality")

    def pixel(self, row: int, col: int) -> dict[str, Any] | None:
        """The diagnostics of pixel (row, col) as a dictionary, None when it was not reconstructed."""
        self._local(row, col)
        i = self.pixels.find(row, col)
        if i is None:
            return None
        return {"row": int(row), "col": int(col),
                **{k: getattr(self.pixels, k)[i].item() for k in PIXEL_FIELDS}}

    @cached_property
    def provenance(self) -> dict[str, Any]:
        """What produced the file (laueflow.provenance), plus its ``complete`` flag."""
        out = self._file.provenance()
        out["complete"] = self.complete
        return out

    def sample_position(self) -> dict[str, tuple[float, str]]:
        """The sample position in the frame header the point file keeps (:data:`SAMPLE_POSITIONS`, as the
        detector wrote them; the first value of a per-frame array): ``{"sampleX": (value, units), ...}``
        for those present as numbers, empty when the file keeps no header."""
        try:
            acquisition = self._file.acquisition()
        except KeyError:
            return {}
        out: dict[str, tuple[float, str]] = {}
        for key in SAMPLE_POSITIONS:
            value = header.number(acquisition, key)
            if value is not None:
                units = acquisition[key].attrs.get("units", "")
                units = units.decode() if isinstance(units, bytes) else str(units)
                out[key.rsplit("/", 1)[1]] = (value, units)
        return out

    # the scan behind the point --------------------------------------------------------------------
    @property
    def scan_path(self) -> Path | None:
        """The scan data the point was reconstructed from (a folder or a stack file), as recorded."""
        scan = self.provenance.get("scan")
        return Path(scan) if scan else None

    @property
    def scan_dir(self) -> Path | None:
        """The scan's folder (where config.yaml and, for a simulated scan, truth.h5 lie)."""
        p = self.scan_path
        if p is None:
            return None
        return p.parent if p.suffix in (".h5", ".hdf5", ".nxs") or p.is_file() else p

    def config(self) -> Any:
        """The configuration the point was reconstructed with (from the provenance); relative paths in it
        (the mask) resolve against the recorded configuration file, else against the scan folder."""
        text = self.provenance.get("config")
        if not text:
            raise ResultError(f"{self.path}: no configuration in the provenance")
        data = yaml.safe_load(text)
        sources = [s for s in (self.provenance.get("config_file"),
                               str(self.scan_dir / SCAN_CONFIG_FILE) if self.scan_dir else None) if s]
        problem = ""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConfigWarning)
            for source in sources or ["<provenance>"]:
                try:
                    return from_dict(data, source=source)
                except ConfigError as exc:
                    problem = str(exc)
        raise ResultError(f"{self.path}: the recorded configuration cannot be used here: {problem}")

    @property
    def truth_path(self) -> Path | None:
        """``truth.h5`` beside the scan, when it exists (simulated scans)."""
        d = self.scan_dir
        if d is None or not (d / TRUTH_FILE).is_file():
            return None
        return d / TRUTH_FILE

    def truth(self, path: str | os.PathLike | None = None) -> Any:
        """The truth of this point (laueflow.evaluate.Truth) from ``path`` or from truth.h5 beside the
        scan; None when there is none."""
        where = Path(path) if path is not None else self.truth_path
        if where is None:
            return None
        try:
            return load_truth(where).for_point(self.point)
        except (OSError, KeyError) as exc:
            raise ResultError(f"{where}: not a truth file written by `laueflow simulate`: {exc}") from None

    def truth_profile(self, row: int, col: int, truth: Any = None) -> np.ndarray | None:
        """The true depth profile of pixel (row, col) (zeros where it has no spot); None without truth."""
        truth = truth if truth is not None else self.truth()
        if truth is None:
            return None
        hit = np.flatnonzero((truth.pixels[:, 0] == row) & (truth.pixels[:, 1] == col))
        return truth.profiles[hit[0]].astype(np.float64) if hit.size else np.zeros(truth.depth.size)

    def score(self, truth: Any = None) -> Any:
        """Accuracy against the truth (laueflow.evaluate.Scores), None without truth."""
        truth = truth if truth is not None else self.truth()
        if truth is None:
            return None
        return score_profiles(truth, *self._file.profiles())

    @cached_property
    def _scan_and_setup(self) -> tuple[Any, Any, Any]:
        from .forward import Setup  # JAX: imported when a trace is asked for, not with laueflow.runs

        cfg = self.config()
        if self.scan_path is None:
            raise ResultError(f"{self.path}: the provenance does not record the scan")
        try:
            scan = open_scan(cfg, self.scan_path, check=False)
        except ScanError as exc:
            raise ResultError(f"{self.path}: its scan cannot be opened: {exc}") from None
        return cfg, scan, Setup.from_config(cfg)

    def measured_trace(self, row: int, col: int) -> np.ndarray:
        """The pixel's trace over the point's frames, as the decoder saw it (read from the scan)."""
        self._local(row, col)
        _, scan, _ = self._scan_and_setup
        try:
            block = scan.read_block(self.point, Tile(row, row + 1, col, col + 1))
        except ScanError as exc:
            raise ResultError(f"{self.path}: cannot read the trace of ({row}, {col}): {exc}") from None
        return block.traces[0].astype(np.float64)

    def compare_traces(self, row: int, col: int, energy_kev: float | None = None) -> TraceComparison:
        """The measured trace of pixel (row, col) and the trace its reconstructed profile predicts.

        The prediction is b + G f (laueflow.forward) with the pixel's background b and profile f, at
        ``energy_kev`` if given, else the energy the decoder estimated, else the energy in
        ``recon.energy_range`` whose gold contrast fits the measured trace best (the decoder chooses the
        contrast per pixel and records an energy only when asked to estimate it).
        """
        from . import geometry as G  # JAX: imported when a trace is asked for, not with laueflow.runs
        from .forward import traces

        cfg, scan, setup = self._scan_and_setup
        measured = self.measured_trace(row, col)
        f = np.asarray(self.profile(row, col), dtype=np.float64)
        info = self.pixel(row, col) or {}
        b = float(info.get("background", 0.0))
        b = b if np.isfinite(b) else 0.0
        frames = scan.frame_offsets()
        depth_mm = self.depth / 1000.0
        dz = float(depth_mm[1] - depth_mm[0]) if depth_mm.size > 1 else 1e-3
        on = np.flatnonzero(f > 0)
        centre = G.pixel_centres(setup.geo, np.array([row]), np.array([col]))
        weights = 1.0 / np.maximum(measured, 1.0)

        def predict(energies: np.ndarray) -> np.ndarray:
            if on.size == 0:
                return np.full((energies.size, frames.size), b)
            z, fz = G.subsample_depths(depth_mm[on], dz, f[on])
            n = energies.size
            return traces(setup, np.repeat(centre, n, axis=0), np.tile(fz, (n, 1)), z, frames, energies, b)

        recorded = float(info.get("energy", np.nan))
        if energy_kev is not None:
            energies, source = np.array([float(energy_kev)]), "given"
        elif np.isfinite(recorded):
            energies, source = np.array([recorded]), "estimated"
        elif on.size:
            lo, hi = cfg.recon.energy_range
            energies, source = np.linspace(lo, hi, 40), "best fit"
        else:
            energies, source = np.array([float(cfg.recon.energy)]), "configured"
        candidates = predict(energies)
        chi = ((candidates - measured[None, :]) ** 2 * weights[None, :]).sum(axis=1)
        best = int(np.argmin(chi))
        return TraceComparison(row=row, col=col, frames=np.asarray(frames), measured=measured,
                               predicted=candidates[best], background=b, energy_kev=float(energies[best]),
                               energy_source=source, depth=self.depth, profile=f,
                               chi2=float(chi[best] / max(frames.size - 1, 1)))

    # summary ------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """The figures :meth:`describe` prints, as a dictionary."""
        z = self.depth
        px = self.pixels
        q = px.quality.astype(np.int64)
        flags = {f.name.replace("_", " "): f.value for f in QUALITY_FLAGS}
        ivd = self.intensity_vs_depth
        with_signal = (q & NO_SIGNAL) == 0
        prov = self.provenance
        counts = np.bincount(self.pixel_state().ravel(), minlength=len(PIXEL_STATES))
        return {
            "point": self.point, "file": str(self.path), "complete": self.complete,
            "region": list(self.frame), "depth_bins": int(z.size),
            "depth_grid_um": (float(z[0]), float(z[-1]), float(z[1] - z[0]) if z.size > 1 else 0.0),
            "pixels": len(px), "pixels_with_signal": int(with_signal.sum()),
            "signal_range_um": self.signal_range(),
            "peak_depth_um": float(z[int(np.argmax(ivd))]) if ivd.size and ivd.max() > 0 else None,
            "total_intensity": float(ivd.sum()),
            "median_residual": float(np.median(px.residual[with_signal])) if with_signal.any() else None,
            "flags": {name: int(((q & bit) != 0).sum()) for name, bit in flags.items()},
            "energies_estimated": int(np.isfinite(px.energy).sum()),
            "not_decoded": {f.name.replace("_", " "): int(counts[f.value]) for f in PIXEL_STATES
                            if f.value != PIXEL_DECODED},
            "laueflow_version": prov.get("laueflow_version"), "finished": prov.get("end_time"),
            "scan": prov.get("scan"),
        }

    def describe(self) -> str:
        """A short table of the point: region, depth grid, pixels, signal, flags, provenance."""
        s = self.summary()
        z0, z1, dz = s["depth_grid_um"]
        r0, r1, c0, c1 = s["region"]
        rng = s["signal_range_um"]
        rows = [
            ("point", f"{s['point']}  ({Path(s['file']).name}{'' if s['complete'] else ', INCOMPLETE'})"),
            ("region", f"rows {r0}-{r1 - 1}, cols {c0}-{c1 - 1} ({r1 - r0} x {c1 - c0} pixels)"),
            ("depth grid", f"{z0:g} to {z1:g} um, step {dz:g} um ({s['depth_bins']} bins)"),
            ("pixels", f"{s['pixels']} reconstructed, {s['pixels_with_signal']} with signal"),
            ("not decoded", ", ".join(f"{k} {v}" for k, v in s["not_decoded"].items() if v) or "none"),
            ("signal", f"{rng[0]:.1f} to {rng[1]:.1f} um" if rng else "none above the floor"),
            ("peak depth", "-" if s["peak_depth_um"] is None else f"{s['peak_depth_um']:.1f} um"),
            ("total", f"{s['total_intensity']:.4g} counts per frame"),
            ("residual", "-" if s["median_residual"] is None
             else f"median reduced chi-square {s['median_residual']:.2f} (pixels with signal)"),
            ("flags", ", ".join(f"{k} {v}" for k, v in s["flags"].items() if v) or "none"),
            ("energies", f"{s['energies_estimated']} pixels with an estimated energy"),
            ("made by", f"laueflow {s['laueflow_version']}, finished {s['finished']}"),
            ("scan", str(s["scan"])),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
