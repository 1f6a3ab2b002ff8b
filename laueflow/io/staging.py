"""Staged points: one pass over a point's frames into a tile-major scratch file.

Reading a tile straight from the frame files costs every block task the headers of the point's
frame files and whole compressed chunks for a small tile; with many workers each holding a few
tiles of a point (GPU nodes) that is many times the work of reading the point once.  Staging reads
each frame's region once, at decompression speed, and writes the raw counts tile by tile
(``[tile][frame][pixel]`` uint16, about 2 bytes x frames x region pixels: 580 MB for a 1200 x 1200,
201-frame point), so that each block task reads its tile as one contiguous piece.

A staged point is a data file and a JSON description beside it (``<name>.json``), both written
atomically; the description also records which frames were read (file, index within it, the dataset
key, whether the I0 monitor applies), the frame files' sizes and modification times, and the host's
boot, so that a rerun reuses a staged point only while its inputs and their configuration are
unchanged and only if the machine that wrote it has not restarted since (the data file is not synced
to disk: it is scratch, and syncing 580 MB per point would cost more than reading the point again).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path
from .layout import stage_description
from .scan import MIB, Block, Scan, ScanError, Tile, make_block

STAGE_FORMAT = 2
# frames are read in batches of about this many bytes of raw counts (the memory staging needs)
BATCH_BYTES = 64 * MIB


def description_path(path: str | os.PathLike) -> Path:
    """The JSON description of a staged point's data file (its name: :func:`layout.stage_description`)."""
    return stage_description(path)


def _box(tile: Tile) -> list[int]:
    return [tile.r0, tile.r1, tile.c0, tile.c1]


def _sources(scan: Scan, point: int) -> list[list]:
    """Name, index within the file, size and modification time of the file of each of the point's
    frames, in order: which frames a staged point holds (``file.range`` picks them, also within one
    stack file), and whether their files changed since."""
    stats: dict[Path, tuple[int, int]] = {}
    out = []
    for file, index in scan.point_frames(point):
        if file not in stats:
            st = file.stat()
            stats[file] = (st.st_size, st.st_mtime_ns)
        out.append([file.name, int(index), *stats[file]])
    return out


def _settings(scan: Scan) -> dict[str, Any]:
    """The configuration that decides what is read from those frames: the dataset, and whether the I0
    monitor scales them (the scale is stored with the staged point)."""
    return {"h5_key": scan.cfg.file.h5_key, "monitor": bool(scan.cfg.file.monitor)}


def _boot() -> str:
    """This host and its boot (Linux's boot id): a staged point written before a restart may have lost
    data that was still in the page cache."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()} {boot}" if boot else ""


def staged_bytes(n_frames: int, n_pixels: int) -> int:
    """Size of the data file of a staged point."""
    return 2 * n_frames * n_pixels


def stage(scan: Scan, point: int, tiles: Sequence[Tile], path: str | os.PathLike,
          batch_bytes: int = BATCH_BYTES) -> dict[str, Any]:
    """Read the point's frames once over the tiles' bounding box and write the tiles' raw counts to
    ``path`` (and its description); returns the description (a small dictionary).

    A staged point already at ``path`` is removed first: it is out of date (or it would have been
    reused), its description must not outlive it, and its disk space is needed.  The frame files'
    sizes and times are taken before they are read, so that a file that changes meanwhile makes the
    staged point out of date.

    Raises :class:`ScanError` for frame files that cannot be read and OSError when the scratch file
    cannot be written.
    """
    t0 = time.perf_counter()
    path = Path(path)
    if not tiles:
        raise ValueError("nothing to stage: no tiles")
    remove(path)
    sources = _sources(scan, point)
    n = scan.n_frames
    region = Tile(min(t.r0 for t in tiles), max(t.r1 for t in tiles),
                  min(t.c0 for t in tiles), max(t.c1 for t in tiles))
    offsets = np.concatenate([[0], np.cumsum([n * t.n_pixels for t in tiles])]).astype(np.int64)
    scale = scan.monitor_scale(point)
    per_frame = 2 * region.n_pixels
    step = max(1, min(n, batch_bytes // per_frame))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, int(offsets[-1]) * 2)
            for j0 in range(0, n, step):
                j1 = min(n, j0 + step)
                try:
                    batch = scan.read_region(point, region, slice(j0, j1))
                finally:  # each frame is read once: its file's chunk cache would only hold memory
                    scan.close()
                for t, off in zip(tiles, offsets[:-1], strict=True):
                    piece = np.ascontiguousarray(
                        batch[:, t.r0 - region.r0:t.r1 - region.r0, t.c0 - region.c0:t.c1 - region.c0])
                    _write_all(fd, memoryview(piece).cast("B"), 2 * (int(off) + j0 * t.n_pixels))
        finally:
            os.close(fd)
    info = {"format": STAGE_FORMAT, "file": str(path), "point": int(point), "n_frames": n,
            "frames": [int(v) for v in scan.frame_offsets()],
            "tiles": [_box(t) for t in tiles], "offsets": [int(v) for v in offsets[:-1]],
            "bytes": int(offsets[-1]) * 2, "scale": None if scale is None else [float(v) for v in scale],
            "sources": sources, "settings": _settings(scan), "boot": _boot(),
            "seconds": time.perf_counter() - t0}
    with atomic_path(description_path(path)) as tmp:
        tmp.write_text(json.dumps(info))
    return info


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    """os.pwrite until every byte is written (pwrite may write less than asked)."""
    while len(data):
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


def description(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON description of the staged point whose data file is ``path``; None if unreadable."""
    try:
        info = json.loads(description_path(path).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def matches_frames(info: dict[str, Any], scan: Scan, point: int) -> bool:
    """Whether a staged point (its description ``info``) was read from the point's frame files as they
    are now (the same files, sizes and modification times)."""
    try:
        return info.get("sources") == _sources(scan, point)
    except (OSError, ScanError):
        return False


def reusable(path: str | os.PathLike, scan: Scan, point: int, tiles: Sequence[Tile]) -> dict[str, Any] | None:
    """The description of a staged point at ``path`` that holds these tiles of this point, read from
    the same frames with the same settings, whose frame files are unchanged and whose host has not
    restarted since it was written, else None."""
    path = Path(path)
    info = description(path)
    try:
        size = path.stat().st_size
    except OSError:
        return None
    if info is None or info.get("format") != STAGE_FORMAT or info.get("point") != point:
        return None
    try:
        same = (info["bytes"] == size and info["settings"] == _settings(scan)
                and matches_frames(info, scan, point)
                and bool(info["boot"]) and info["boot"] == _boot())
    except (OSError, KeyError, ScanError):
        return None
    held = {tuple(b) for b in info.get("tiles", [])}
    if not same or any(tuple(_box(t)) not in held for t in tiles):
        return None
    return {**info, "file": str(path)}


# what a block task needs of a staged point's description (the rest only decides reuse)
READER_KEYS = ("format", "file", "point", "n_frames", "frames", "tiles", "offsets", "scale")


def for_readers(info: dict[str, Any]) -> dict[str, Any]:
    """The part of a staged point's description that :func:`read_tile` uses: what travels with each of
    the point's block tasks (without the per-frame sources: a few KiB instead of tens)."""
    return {k: info[k] for k in READER_KEYS}


def read_tile(info: dict[str, Any], tile: Tile, threshold: float) -> Block:
    """The block of one tile from a staged point (``info``: its description): one contiguous read."""
    box = _box(tile)
    try:
        i = info["tiles"].index(box)
    except ValueError:
        raise ScanError(f"{info['file']}: staged point {info['point']} does not hold tile {box}") from None
    n = int(info["n_frames"])
    count = n * tile.n_pixels
    data = np.fromfile(info["file"], dtype=np.uint16, count=count, offset=2 * int(info["offsets"][i]))
    if data.size != count:
        raise ScanError(f"{info['file']}: staged point {info['point']} is truncated at tile {box}")
    scale = None if info.get("scale") is None else np.asarray(info["scale"], np.float32)
    return make_block(int(info["point"]), tile, data.reshape(n, *tile.shape), scale, threshold,
                      np.asarray(info["frames"]))


def remove(path: str | os.PathLike) -> None:
    """Remove a staged point (data and description), if present (also when its folder is not one)."""
    path = Path(path)
    for p in (path, description_path(path)):
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            p.unlink()
