"""The scan reader: where the frames of a scan are, which belong to which point, and tile reads.

Two layouts exist at the beamline (model.md section 6): a folder of one-frame files
``<prefix>_<n>.<ext>`` ordered by ``n`` (``file.stacked: true``), or one file holding
``[N, H, W]`` (``file.stacked: false``).  :func:`open_scan` finds the data and checks every
header it will read (names, numbering, shapes, dtypes, dataset keys, the I0 monitor) before
any pixel is read, so that bad input stops before anything is written.  :meth:`Scan.read_block`
then reads only one detector tile of each frame of one point, which is what one reconstruction
task needs; whole frames are never read.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from laueflow.config import Config

from ..errors import ScanError  # noqa: F401 (re-exported)


class ScanWarning(UserWarning):
    """Frames of a scan that laueflow will not use (trailing frames that make no complete point)."""


MONITOR_KEY = "/entry1/monitor/I0"
MIB = 1 << 20
# Open-file cache of a Scan: reading all tiles of a point re-opens every frame file once per tile
# without it.  Each open file also keeps an HDF5 chunk cache of CHUNK_CACHE_BYTES.
MAX_OPEN_FILES = 256
CHUNK_CACHE_BYTES = 4 * MIB
# Larger chunks (a whole 2048 x 2048 frame is 8 MiB) get a cache that holds one, up to this size, so that
# the tiles of a frame decompress its chunk once, not once per tile; then fewer files stay open, so that
# the caches of one scan never hold more than OPEN_CACHE_BUDGET (2 GiB: 227 open whole-frame files, a
# 201-frame point).
MAX_CHUNK_CACHE_BYTES = 32 * MIB
OPEN_CACHE_BUDGET = 2048 * MIB


@dataclass(frozen=True)
class Tile:
    """A detector region: rows [r0, r1), columns [c0, c1)."""

    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.r1 - self.r0, self.c1 - self.c0)

    @property
    def n_pixels(self) -> int:
        return (self.r1 - self.r0) * (self.c1 - self.c0)


def square_side(pixels: int, name: str = "pixels") -> int:
    """The side of a near-square of about ``pixels`` pixels."""
    if pixels < 1:
        raise ValueError(f"{name} must be >= 1, got {pixels}")
    return max(1, round(math.sqrt(pixels)))


def _grid(frame: Sequence[int], side: int) -> list[Tile]:
    """The region ``frame`` (r0, r1, c0, c1) in squares of ``side`` from its first pixel, row-major."""
    r0, r1, c0, c1 = frame
    return [Tile(r, min(r + side, r1), c, min(c + side, c1))
            for r in range(r0, r1, side) for c in range(c0, c1, side)]


@dataclass
class Block:
    """The traces of every pixel of one rectangle (``tile``: a block of whole decoder tiles, or one tile)
    for one scan point: what one reconstruction task gets.

    ``traces`` is (P, N) float32, pixels row-major over the rectangle, normalised frame by frame by
    I0 / mean(I0) when the monitor is present and enabled.  ``frames`` are the frame offsets the
    geometry uses (0, s, 2s, ... for ``file.range`` step s).
    """

    point: int
    tile: Tile
    traces: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    selected: np.ndarray
    saturated: np.ndarray
    frames: np.ndarray

    def part(self, tile: Tile) -> Block:
        """The block of ``tile``, a part of this block's tile: the same traces, row-major over ``tile``
        as if it had been read alone."""
        keep = (self.rows >= tile.r0) & (self.rows < tile.r1) & (self.cols >= tile.c0) & (self.cols < tile.c1)
        return Block(self.point, tile, self.traces[keep], self.rows[keep], self.cols[keep],
                     self.selected[keep], self.saturated[keep], self.frames)


def make_block(point: int, tile: Tile, data: np.ndarray, scale: np.ndarray | None, threshold: float,
               frames: np.ndarray) -> Block:
    """The block of a tile from its raw counts ``data`` (N, h, w) uint16.

    A pixel is selected when its mean over the point's frames (raw counts) is >= ``threshold`` and no
    frame is saturated (65535).  Traces are multiplied frame by frame by ``scale`` (mean(I0) / I0)
    when given.
    """
    from ..geometry import SATURATED  # geometry loads JAX, which `laueflow status` need not wait for

    n = data.shape[0]
    h, w = tile.shape
    flat = data.reshape(n, h * w)
    saturated = (flat == SATURATED).any(axis=0)
    mean = flat.mean(axis=0, dtype=np.float64)
    selected = (mean >= threshold) & ~saturated
    traces = np.empty((h * w, n), np.float32)
    for k in range(0, n, 8):  # a few frames at a time: the transpose stays in cache (4x faster)
        traces[:, k:k + 8] = flat[k:k + 8].T
    if scale is not None:
        traces *= scale[None, :]
    rr, cc = np.meshgrid(np.arange(tile.r0, tile.r1, dtype=np.int32),
                         np.arange(tile.c0, tile.c1, dtype=np.int32), indexing="ij")
    return Block(point=int(point), tile=tile, traces=traces, rows=rr.reshape(-1), cols=cc.reshape(-1),
                 selected=selected, saturated=saturated, frames=np.asarray(frames))


# ----------------------------------------------------------------------------------------------
# Point selection


def select_points(spec: str | None, points: int | Iterable[int], what: str = "the scan") -> list[int]:
    """Parse a point selection among ``points`` (a count n: points 0 to n-1, or the point numbers that
    exist, e.g. a run's): None or "all" (every point), "5", "0,2,4", a slice "3:7" / "::2", or a list
    of both ("0:3,7").

    Numbers name points; slices follow Python semantics over the numbers 0 to the last point (end
    exclusive, negative counts from the end) and take the points among them that exist.  A point
    that does not exist, or a slice bound beyond the last point, is an error rather than silently
    dropped.  The order given is kept, repeats are dropped.  ``what`` names the points' owner in errors.
    """
    known = list(range(points)) if isinstance(points, int) else sorted(set(points))
    if spec is None or spec.strip().lower() == "all":
        return known
    text = spec.strip()
    if not text:
        raise ScanError("point selection is empty (give e.g. '5', '0,2,4' or '3:7')")
    n = known[-1] + 1 if known else 0  # the number line the selection counts on
    exists = set(known)
    where = (f"{what} has {n} points (0-{n - 1})" if len(known) == n
             else f"{what} has points {', '.join(map(str, known)) or 'none'}")

    def index(s: str) -> int:
        try:
            return int(s)
        except ValueError:
            raise ScanError(f"point selection {spec!r}: {s!r} is not an integer") from None

    chosen: list[int] = []
    missing: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if ":" in part:
            bounds = [b.strip() for b in part.split(":")]
            if len(bounds) > 3:
                raise ScanError(f"point selection {spec!r}: a slice has at most start:stop:step")
            start, stop, step = (index(b) if b else None for b in bounds + [""] * (3 - len(bounds)))
            if step == 0:
                raise ScanError(f"point selection {spec!r}: slice step must not be 0")
            for bound in (start, stop):
                if bound is not None and not -n <= bound <= n:
                    raise ScanError(f"point selection {spec!r}: {bound} is out of range, {where}")
            picked = [k for k in range(n)[slice(start, stop, step)] if k in exists]
        else:
            k = index(part)
            k = k + n if -n <= k < 0 else k
            if k not in exists:
                missing.append(k)
            picked = [k]
        chosen += [k for k in picked if k not in chosen]
    if missing:
        raise ScanError(f"point selection {spec!r}: point {missing[0]} is out of range, {where} "
                        f"(missing: {missing})")
    if not chosen:
        raise ScanError(f"point selection {spec!r} selects no point of {what}")
    return chosen


# ----------------------------------------------------------------------------------------------
# The scan


class Scan:
    """A validated scan: its files, its points, and tile reads.

    Build it with :func:`open_scan`.  Scans pickle (open HDF5 handles are dropped and re-opened
    on demand), so they can be sent to workers.
    """

    def __init__(self, cfg: Config, path: Path, layout: str, files: list[Path], n_total: int,
                 numbers: list[int] | None = None, prefix: str | None = None):
        self.cfg = cfg
        self.path = path
        self.layout = layout
        self.files = files
        self.prefix = prefix
        self.numbers = numbers
        self.n_total = n_total  # frames available (files, or stack length)
        b, e, s = cfg.file.range
        self.n_frames = cfg.file.n_frames
        self._begin, self._span, self._step = b, e - b, s
        last = n_total - 1 - b - (self.n_frames - 1) * s
        self.n_points = last // self._span + 1 if last >= 0 else 0
        shape = cfg.geo.detector.shape
        self.frame_shape = (shape[1], shape[0])  # rows run along shape[1], columns along shape[0]
        self.has_monitor = False
        self._i0 = np.full(n_total, np.nan)
        self._ndim = np.zeros(len(files), np.int8)  # 2 or 3 per frame file once checked
        self._checked = np.zeros(len(files), bool)
        self._monitor_ref: Path | None = None  # the file that decided whether the monitor exists
        self._handles: OrderedDict[Path, tuple[h5py.File, h5py.Dataset]] = OrderedDict()
        self._lock = threading.RLock()
        self._chunk_cache = CHUNK_CACHE_BYTES

    # pickling: drop open files -------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self._chunk_cache = CHUNK_CACHE_BYTES

    def close(self) -> None:
        """Close the cached HDF5 files (reads re-open them)."""
        with self._lock:
            for f, _ in self._handles.values():
                f.close()
            self._handles.clear()

    def __enter__(self) -> Scan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # points ------------------------------------------------------------------------------------
    def _where(self) -> str:
        if self.layout == "frames":
            return f"{self.path / (self.prefix or '')}_<n>.{self.cfg.file.ext}"
        return str(self.path)

    def _positions(self, k: int) -> np.ndarray:
        """Frame positions (file order, or stack index) of point k."""
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 0 <= k < self.n_points:
            raise ScanError(f"{self._where()}: point {k} is out of range: the scan holds {self.n_points} "
                            f"complete points of {self.n_frames} frames ({self.n_total} frames, "
                            f"file.range {list(self.cfg.file.range)})")
        return self._begin + int(k) * self._span + self._step * np.arange(self.n_frames)

    def point_frames(self, k: int) -> list[tuple[Path, int]]:
        """(file, index within the file) of each frame of point k, in scan order."""
        pos = self._positions(k)
        if self.layout == "frames":
            return [(self.files[p], 0) for p in pos]
        return [(self.files[0], int(p)) for p in pos]

    @property
    def trailing_frames(self) -> int:
        """Frames after the last complete point: too few for another point, so never read."""
        return max(0, self.n_total - self._begin - self.n_points * self._span)

    def frame_offsets(self) -> np.ndarray:
        """The frame offsets the geometry uses for every point: 0, s, 2s, ..."""
        return self._step * np.arange(self.n_frames)

    def tiles(self, tile_pixels: int) -> list[Tile]:
        """Cover the region ``file.frame`` with near-square tiles of about ``tile_pixels`` pixels: the
        decoder's tiles (``recon.tile_pixels``), each decoded on its own.

        The side is round(sqrt(tile_pixels)), counted from the region's first row and column; tiles at
        the bottom and right edges are smaller.  Every pixel of the region is in exactly one tile, in
        row-major tile order.
        """
        return _grid(self.cfg.file.frame, square_side(tile_pixels, "tile_pixels"))

    def blocks(self, tile_pixels: int, block_pixels: int) -> list[Tile]:
        """The region cut into blocks of whole tiles (see :meth:`tiles`) of about ``block_pixels``
        pixels: one task's work.  A block is a square of n x n tiles, n = round(block side / tile side)
        and at least 1, so a block never splits a tile and the result does not depend on the blocks."""
        tile = square_side(tile_pixels, "tile_pixels")
        n = max(1, round(square_side(block_pixels, "block_pixels") / tile))
        return _grid(self.cfg.file.frame, n * tile)

    @staticmethod
    def tiles_in(block: Tile, tile_pixels: int) -> list[Tile]:
        """The tiles (see :meth:`tiles`) of a block of :meth:`blocks`, in row-major order: the block cut
        from its first pixel, as the region is (a block starts on a tile's corner)."""
        return _grid((block.r0, block.r1, block.c0, block.c1), square_side(tile_pixels, "tile_pixels"))

    # validation ---------------------------------------------------------------------------------
    def check(self, points: Iterable[int] | None = None) -> None:
        """Check the headers of the frame files of these points (all complete points if None).

        Opens each file once (headers and the I0 scalar only, no pixel data); files already
        checked are skipped.  Raises :class:`ScanError` naming the first bad file.
        """
        if self.layout != "frames":
            return
        ks = range(self.n_points) if points is None else points
        todo = sorted({int(p) for k in ks for p in self._positions(k) if not self._checked[p]})
        for p in todo:
            self._check_frame_file(p)

    def _check_frame_file(self, p: int) -> None:
        file = self.files[p]
        key = self.cfg.file.h5_key
        with _open(file) as f:
            dset = _dataset(f, file, key)
            shape = dset.shape
            if len(shape) == 3 and shape[0] != 1:
                raise ScanError(f"{file}: dataset {key} holds {shape[0]} frames {list(shape)}; a frame file "
                                f"must hold one frame (for a stack file set file.stacked: false)")
            if len(shape) not in (2, 3):
                raise ScanError(f"{file}: dataset {key} has shape {list(shape)}, "
                                f"expected one frame [rows, cols]")
            self._check_frame(file, dset, shape[-2:])
            self._ndim[p] = len(shape)
            if self.cfg.file.monitor:
                i0 = self._read_monitor(f, file, expect=1)
                if self._monitor_ref is None:
                    self._monitor_ref, self.has_monitor = file, i0 is not None
                elif self.has_monitor != (i0 is not None):
                    have, lack = (self._monitor_ref, file) if self.has_monitor else (file, self._monitor_ref)
                    raise ScanError(f"{lack}: has no monitor {MONITOR_KEY} while {have.name} has one "
                                    f"(set file.monitor: false to ignore the monitor)")
                if i0 is not None:
                    self._i0[p] = i0[0]
        self._checked[p] = True

    def _check_frame(self, file: Path, dset: h5py.Dataset, shape: tuple[int, ...]) -> None:
        if tuple(shape) != self.frame_shape:
            d = self.cfg.geo.detector.shape
            raise ScanError(f"{file}: frame shape {list(shape)} of {dset.name} does not match the "
                            f"detector: expected [rows, cols] = {list(self.frame_shape)} "
                            f"(geo.detector.shape {list(d)})")
        if dset.dtype != np.uint16:
            raise ScanError(f"{file}: dataset {dset.name} has dtype {dset.dtype}, "
                            f"expected uint16 detector counts")

    def _read_monitor(self, f: h5py.File, file: Path, expect: int) -> np.ndarray | None:
        """The I0 values in this file (``expect`` of them), or None when there is no monitor."""
        if MONITOR_KEY not in f:
            return None
        node = f[MONITOR_KEY]
        if not isinstance(node, h5py.Dataset):
            raise ScanError(f"{file}: {MONITOR_KEY} is not a dataset")
        try:
            i0 = np.asarray(node[()], dtype=np.float64).reshape(-1)
        except (OSError, ValueError, TypeError) as exc:
            raise ScanError(f"{file}: cannot read monitor {MONITOR_KEY}: {exc}") from None
        if i0.size != expect:
            raise ScanError(f"{file}: monitor {MONITOR_KEY} holds {i0.size} values, expected {expect} "
                            f"(one per frame)")
        bad = np.flatnonzero(~(np.isfinite(i0) & (i0 > 0)))
        if bad.size:
            where = "" if expect == 1 else f" at frame {bad[0]}"
            raise ScanError(f"{file}: monitor {MONITOR_KEY} is {i0[bad[0]]:g}{where}; it must be > 0 to "
                            f"normalise frames (set file.monitor: false to ignore the monitor)")
        return i0

    # reading ------------------------------------------------------------------------------------
    def _dataset_for(self, file: Path) -> h5py.Dataset:
        """The image dataset of a file from the open-file cache (call with the lock held)."""
        hit = self._handles.get(file)
        if hit is not None:
            self._handles.move_to_end(file)
            return hit[1]
        f = _open(file, rdcc_nbytes=self._chunk_cache)
        try:
            dset = _dataset(f, file, self.cfg.file.h5_key)
            need = _chunk_bytes(dset)
            if self._chunk_cache < need <= MAX_CHUNK_CACHE_BYTES:
                self._chunk_cache = need + MIB  # the frames of a scan share their layout: sized once
                f.close()
                f = _open(file, rdcc_nbytes=self._chunk_cache)
                dset = _dataset(f, file, self.cfg.file.h5_key)
        except ScanError:
            f.close()
            raise
        self._handles[file] = (f, dset)
        while len(self._handles) > min(MAX_OPEN_FILES, OPEN_CACHE_BUDGET // self._chunk_cache):
            _, (old, _dset) = self._handles.popitem(last=False)
            old.close()
        return dset

    def _forget(self, file: Path) -> None:
        hit = self._handles.pop(file, None)
        if hit is not None:
            hit[0].close()

    def read_region(self, point: int, tile: Tile, frames: slice = slice(None)) -> np.ndarray:
        """Raw counts (m, h, w) uint16 of the tile's region in the point's frames ``frames`` (all by
        default); only ``dset[r0:r1, c0:c1]`` of each frame is read."""
        pos = self._positions(point)[frames]
        rows_n, cols_n = self.frame_shape
        if not (0 <= tile.r0 < tile.r1 <= rows_n and 0 <= tile.c0 < tile.c1 <= cols_n):
            raise ScanError(f"{self._where()}: tile {tile} is empty or outside the "
                            f"{rows_n} x {cols_n} frames")
        self.check([point])
        rs, cs = slice(tile.r0, tile.r1), slice(tile.c0, tile.c1)
        h, w = tile.shape
        if pos.size == 0:
            return np.empty((0, h, w), np.uint16)
        if self.layout == "frames":
            data = np.empty((pos.size, h, w), np.uint16)
            for j, p in enumerate(pos):
                file = self.files[p]
                with self._lock:
                    try:
                        dset = self._dataset_for(file)
                        data[j] = dset[0, rs, cs] if self._ndim[p] == 3 else dset[rs, cs]
                    except (OSError, RuntimeError, ValueError) as exc:
                        self._forget(file)
                        raise ScanError(f"{file}: cannot read frame pixels (corrupt or truncated file?): "
                                        f"{exc}") from None
            return data
        file = self.files[0]
        with self._lock:
            try:
                dset = self._dataset_for(file)
                return dset[int(pos[0]):int(pos[-1]) + 1:self._step, rs, cs]
            except (OSError, RuntimeError, ValueError) as exc:
                self._forget(file)
                raise ScanError(f"{file}: cannot read frames {pos[0]}-{pos[-1]} of point {point} "
                                f"(corrupt or truncated file?): {exc}") from None

    def monitor_scale(self, point: int) -> np.ndarray | None:
        """The factor mean(I0) / I0 of each frame of the point (float32), or None without a monitor."""
        pos = self._positions(point)
        self.check([point])
        if not self.has_monitor:
            return None
        i0 = self._i0[pos]
        return (i0.mean() / i0).astype(np.float32)

    def read_block(self, point: int, tile: Tile) -> Block:
        """Read the tile's region of every frame of one point, and select the pixels to decode
        (see :func:`make_block`)."""
        data = self.read_region(point, tile)
        return make_block(point, tile, data, self.monitor_scale(point), self.cfg.file.threshold,
                          self.frame_offsets())

    # provenance ---------------------------------------------------------------------------------
    def fingerprints(self, point: int | None = None) -> list[dict]:
        """{name, size, sha256} of the point's files (all files if None).

        The hash covers the first and last MiB of each file: cheap for large files, and it
        changes when a file is rewritten, truncated or replaced.
        """
        if point is None:
            files = list(self.files)
        else:
            files = list(dict.fromkeys(f for f, _ in self.point_frames(point)))
        out = []
        for file in files:
            try:
                size = file.stat().st_size
                h = hashlib.sha256()
                with open(file, "rb") as fh:
                    h.update(fh.read(MIB))
                    if size > MIB:
                        fh.seek(max(MIB, size - MIB))
                        h.update(fh.read(MIB))
            except OSError as exc:
                raise ScanError(f"{file}: cannot read for fingerprinting: {exc}") from None
            out.append({"name": file.name, "size": size, "sha256": h.hexdigest()})
        return out

    def describe(self) -> str:
        """One line for humans."""
        b, e, s = self.cfg.file.range
        rows, cols = self.frame_shape
        if self.layout == "frames":
            nums = self.numbers or [0]
            what = (f"{self.n_total} frame files {self.prefix}_<n>.{self.cfg.file.ext} "
                    f"(n = {nums[0]}-{nums[-1]}) in {self.path}")
        else:
            what = f"stack file {self.path} with {self.n_total} frames"
        mon = "I0 monitor" if self.has_monitor else "no I0 normalisation"
        return (f"{what}: {self.n_points} points x {self.n_frames} frames (range [{b}, {e}, {s}]), "
                f"{rows} x {cols} uint16 frames, region {list(self.cfg.file.frame)}, {mon}")

    def __repr__(self) -> str:
        return f"<Scan {self.describe()}>"


# ----------------------------------------------------------------------------------------------
# Opening


def _open(file: Path, **kwargs: Any) -> h5py.File:
    try:
        return h5py.File(file, "r", **kwargs)
    except FileNotFoundError:
        raise ScanError(f"{file}: file does not exist (removed while reading?)") from None
    except OSError as exc:
        raise ScanError(f"{file}: not a readable HDF5 file (truncated or corrupt?): {exc}") from None


def _chunk_bytes(dset: h5py.Dataset) -> int:
    """Bytes of one chunk of a dataset (0 when it is not chunked)."""
    return int(np.prod(dset.chunks)) * dset.dtype.itemsize if dset.chunks else 0


def _dataset(f: h5py.File, file: Path, key: str) -> h5py.Dataset:
    try:
        node = f.get(key)
    except (OSError, KeyError, RuntimeError) as exc:
        raise ScanError(f"{file}: cannot read dataset {key} (corrupt file?): {exc}") from None
    if node is None:
        raise ScanError(f"{file}: no dataset {key} in the file (file.h5.key)")
    if not isinstance(node, h5py.Dataset):
        raise ScanError(f"{file}: {key} is a group, not a dataset (file.h5.key)")
    return node


def _frame_files(folder: Path, ext: str) -> dict[str, list[tuple[int, Path]]]:
    """Files ``<prefix>_<n>.<ext>`` in a folder, grouped by prefix."""
    pattern = re.compile(rf"^(.+)_(\d+)\.{re.escape(ext)}$")
    groups: dict[str, list[tuple[int, Path]]] = {}
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise ScanError(f"{folder}: cannot list the folder: {exc}") from None
    for entry in entries:
        m = pattern.match(entry.name)
        if m and entry.is_file():
            groups.setdefault(m.group(1), []).append((int(m.group(2)), Path(entry.path)))
    return groups


def _numbered(folder: Path, prefix: str, items: list[tuple[int, Path]],
              ext: str) -> tuple[list[int], list[Path]]:
    """Sort frame files by number; refuse duplicate numbers and gaps."""
    items = sorted(items)
    for (n1, f1), (n2, f2) in zip(items, items[1:], strict=False):
        if n1 == n2:
            raise ScanError(f"{folder}: {f1.name} and {f2.name} have the same frame number {n1}")
    numbers = [n for n, _ in items]
    missing = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
    if missing:
        shown = ", ".join(str(n) for n in missing[:10])
        if len(missing) > 10:
            shown += f" ... ({len(missing)} in all)"
        raise ScanError(f"{folder}: gap in the frame numbering of {prefix}_<n>.{ext}: missing {shown} "
                        f"(between {numbers[0]} and {numbers[-1]})")
    return numbers, [f for _, f in items]


def _find_stack(folder: Path, cfg: Config) -> Path:
    """The single file in a folder whose dataset at the key is 3-D."""
    key, ext = cfg.file.h5_key, cfg.file.ext
    candidates = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(f".{ext}"))
    if not candidates:
        raise ScanError(f"{folder}: no *.{ext} file in the folder "
                        f"(file.stacked: false expects one stack file)")
    found, why = [], []
    for p in candidates:
        try:
            with h5py.File(p, "r") as f:
                node = f.get(key)
                if node is None:
                    why.append(f"{p.name} (no dataset)")
                elif not isinstance(node, h5py.Dataset):
                    why.append(f"{p.name} (a group)")
                elif node.ndim != 3:
                    why.append(f"{p.name} ({node.ndim}-D)")
                else:
                    found.append(p)
        except OSError:
            why.append(f"{p.name} (unreadable)")
    if len(found) > 1:
        raise ScanError(f"{folder}: several stack files hold a 3-D dataset {key}: "
                        f"{', '.join(p.name for p in found)}; give the file in file.path")
    if not found:
        listed = ", ".join(why[:8]) + (f" ... ({len(why)} files)" if len(why) > 8 else "")
        hint = " (for a folder of one-frame files set file.stacked: true)"
        raise ScanError(f"{folder}: no file holds a 3-D dataset {key}: {listed}{hint}")
    return found[0]


def _open_stack(cfg: Config, file: Path) -> Scan:
    key = cfg.file.h5_key
    with _open(file) as f:
        dset = _dataset(f, file, key)
        if dset.ndim != 3:
            raise ScanError(f"{file}: dataset {key} has shape {list(dset.shape)}, expected a stack "
                            f"[N, rows, cols] (for one-frame files give their folder or prefix and set "
                            f"file.stacked: true)")
        scan = Scan(cfg, file, "stack", [file], n_total=dset.shape[0])
        scan._check_frame(file, dset, dset.shape[1:])
        if cfg.file.monitor:
            i0 = scan._read_monitor(f, file, expect=dset.shape[0])
            if i0 is not None:
                scan.has_monitor, scan._i0 = True, i0
    return scan


def open_scan(cfg: Config, path: str | Path | None = None, *, check: bool = True,
              warn_trailing: bool = True) -> Scan:
    """Find and validate the scan data: ``path`` if given, else ``file.path`` of the configuration.

    A file is a stack ``[N, rows, cols]``.  A folder holds one-frame files ``<prefix>_<n>.<ext>``
    (``file.stacked: true``) or one stack file (``file.stacked: false``).  A path that does not
    exist but whose parent holds ``<name>_<n>.<ext>`` files names the prefix of one-frame files.

    With ``check`` (the default) every frame file of every complete point has its header checked
    now; with ``check=False`` only names and numbering are checked, and :meth:`Scan.check`
    (called by :meth:`Scan.read_block` for its point) checks the files of chosen points, which
    suits folders of tens of thousands of files that are still growing.

    Frames after the last complete point are ignored, with a :class:`ScanWarning` saying how many
    unless ``warn_trailing`` is false (a folder that is still growing, whose next point is expected).
    """
    where = Path(path) if path is not None else cfg.resolve(cfg.file.path)
    ext = cfg.file.ext
    if where.is_file():
        scan = _open_stack(cfg, where)
    else:
        if where.is_dir():
            folder, forced = where, None
        elif where.parent.is_dir() and where.name in _frame_files(where.parent, ext):
            folder, forced = where.parent, where.name
        else:
            raise ScanError(f"{where}: scan data does not exist (no such file or folder, and no "
                            f"{where.name}_<n>.{ext} files beside it)")
        if forced is None and not cfg.file.stacked:
            scan = _open_stack(cfg, _find_stack(folder, cfg))
        else:
            groups = _frame_files(folder, ext)
            if forced is not None:
                prefix = forced
            elif not groups:
                raise ScanError(f"{folder}: no frame files named <prefix>_<n>.{ext} in the folder "
                                f"(for one stack file set file.stacked: false)")
            elif len(groups) == 1:
                prefix = next(iter(groups))
            else:
                wanted = [n for n in (Path(cfg.file.path).name, where.name) if n in groups]
                if not wanted:
                    names = sorted(groups)
                    raise ScanError(f"{folder}: frame files with several prefixes: {', '.join(names)}; "
                                    f"give the prefix in file.path (e.g. {folder / names[0]})")
                prefix = wanted[0]
            numbers, files = _numbered(folder, prefix, groups[prefix], ext)
            scan = Scan(cfg, folder, "frames", files, n_total=len(files), numbers=numbers, prefix=prefix)
    if scan.n_points == 0:
        b, e, s = cfg.file.range
        need = b + (scan.n_frames - 1) * s + 1
        raise ScanError(f"{scan._where()}: too few frames for one scan point: {scan.n_total} frames, "
                        f"one point with file.range [{b}, {e}, {s}] needs {need}")
    if warn_trailing and scan.trailing_frames:
        b, e, s = cfg.file.range
        warnings.warn(f"{scan._where()}: the last {scan.trailing_frames} of {scan.n_total} frames are "
                      f"ignored: too few for another point ({scan.n_points} complete points, file.range "
                      f"[{b}, {e}, {s}])", ScanWarning, stacklevel=2)
    if check:
        scan.check()
    return scan
