"""Block files: one decoded tile of one point, the unit that stitching and resuming work with.

A block file (``OUT/.blocks/point_<k>/block_r<r0>_c<c0>.npz``, see laueflow.io.layout) is an
uncompressed NumPy archive written atomically::

    format                  4 (3 lacked the saturated pixels, 2 input_fingerprint)
    point, tile             the scan point and the tile [r0, r1, c0, c1]
    config_fingerprint      of the configuration that decoded it, tiling included (recon.block_pixels)
    input_fingerprint       of the point's frame files it was read from (laueflow.provenance)
    skipped, host, seconds  why it holds no pixels ("" when decoded), where and how long it took
    rows, cols              (P,) detector row, col of the decoded pixels
    lit, profiles           rows in rows/cols with a nonzero profile, and those (L, J) profiles
    background, residual, quality, energy, energy_sigma   (P,) per-pixel fields
    saturated_rows, saturated_cols   detector row, col of the tile's pixels not decoded for saturation

A rerun reuses a block only when point, tile and both fingerprints match its own (a late write of an
earlier run's worker, or a block of frames that changed since, is not); the archive's CRC-32 per
member lets :func:`read_block` tell a damaged file from a good one.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ResultError
from .atomic import atomic_path

PIXEL_FIELDS = ("background", "residual", "quality", "energy", "energy_sigma")
PIXEL_DTYPES = {"background": np.float32, "residual": np.float32, "quality": np.uint8,
                "energy": np.float32, "energy_sigma": np.float32}
# 2: profiles stored for the pixels with signal only ("lit": their rows in rows/cols); most are zero
# 3: input_fingerprint, the frames the block was read from
# 4: saturated_rows / saturated_cols, for the point file's pixel state map
BLOCK_FORMAT = 4
# what a damaged or foreign file raises inside np.load: a truncated or altered archive, a bad header
_UNREADABLE = (OSError, ValueError, KeyError, IndexError, EOFError, zipfile.BadZipFile, TypeError)


@dataclass
class BlockResult:
    """What a block file holds: the decoded pixels of one tile (possibly none) and why, if skipped."""

    point: int
    tile: tuple[int, int, int, int]
    config_fingerprint: str
    input_fingerprint: str
    skipped: str  # "" when decoded
    rows: np.ndarray
    cols: np.ndarray
    profiles: np.ndarray
    fields: dict[str, np.ndarray]
    saturated_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    saturated_cols: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    host: str = ""
    seconds: float = 0.0

    @property
    def n_pixels(self) -> int:
        return int(self.rows.size)


def write_block(path: str | os.PathLike, *, point: int, tile: Sequence[int], config_fingerprint: str,
                n_depths: int, input_fingerprint: str = "", decoded: Any = None, skipped: str = "",
                saturated: tuple[np.ndarray, np.ndarray] | None = None, host: str = "",
                seconds: float = 0.0) -> None:
    """Write one block result (``decoded`` has rows, cols, profiles and the per-pixel fields) atomically;
    ``saturated``: detector rows and columns of the tile's pixels left out for saturation."""
    if decoded is None:
        arrays: dict[str, np.ndarray] = {
            "rows": np.zeros(0, np.int32), "cols": np.zeros(0, np.int32), "lit": np.zeros(0, np.int32),
            "profiles": np.zeros((0, n_depths), np.float32),
            **{k: np.zeros(0, PIXEL_DTYPES[k]) for k in PIXEL_FIELDS}}
    else:
        profiles = np.asarray(decoded.profiles, np.float32).reshape(-1, n_depths)
        lit = np.flatnonzero(profiles.any(axis=1)).astype(np.int32)
        arrays = {"rows": np.asarray(decoded.rows, np.int32), "cols": np.asarray(decoded.cols, np.int32),
                  "lit": lit, "profiles": profiles[lit],
                  **{k: np.asarray(getattr(decoded, k), PIXEL_DTYPES[k]) for k in PIXEL_FIELDS}}
    sat_rows, sat_cols = saturated if saturated is not None else (np.zeros(0), np.zeros(0))
    arrays["saturated_rows"] = np.asarray(sat_rows, np.int32)
    arrays["saturated_cols"] = np.asarray(sat_cols, np.int32)
    meta = {"format": np.array(BLOCK_FORMAT), "point": np.array(point), "tile": np.asarray(tile, np.int64),
            "config_fingerprint": np.array(config_fingerprint),
            "input_fingerprint": np.array(input_fingerprint), "skipped": np.array(skipped),
            "host": np.array(host), "seconds": np.array(seconds)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays, **meta)
        fh.flush()


STAMP = ("point", "tile", "config_fingerprint", "input_fingerprint")  # what decides reuse


def _meta(z: Any, path: str | os.PathLike) -> dict[str, Any]:
    """The small fields of an open block file; :class:`ResultError` for a file of another format."""
    if int(z["format"]) != BLOCK_FORMAT:
        raise ResultError(f"{path}: block file of format {int(z['format'])}, this laueflow writes format "
                          f"{BLOCK_FORMAT}")
    return {"point": int(z["point"]), "tile": tuple(int(v) for v in z["tile"]),
            "config_fingerprint": str(z["config_fingerprint"]),
            "input_fingerprint": str(z["input_fingerprint"]),
            "skipped": str(z["skipped"]), "host": str(z["host"]), "seconds": float(z["seconds"])}


def read_block_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """The small fields of a block file (its stamp, skipped, host, seconds, n_pixels); None if unreadable
    or of another format (the arrays are not checked: :func:`read_block` does)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {**_meta(z, path), "n_pixels": int(z["rows"].size)}
    except (*_UNREADABLE, ResultError):
        return None


def read_block(path: str | os.PathLike) -> BlockResult:
    """Load a block file completely (profiles of every decoded pixel, zeros where there is no signal).

    Every member is read whole, so its CRC-32 is checked; a file that is truncated, altered, of another
    format or inconsistent raises :class:`ResultError` naming it.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            rows, cols, lit, stored = z["rows"], z["cols"], z["lit"], z["profiles"]
            fields = {k: z[k] for k in PIXEL_FIELDS}
            sat_rows, sat_cols = z["saturated_rows"], z["saturated_cols"]
            profiles = np.zeros((rows.size, stored.shape[1]), np.float32)
            profiles[lit] = stored
            meta = _meta(z, path)
    except _UNREADABLE as exc:
        raise ResultError(f"{path}: unreadable block file ({type(exc).__name__}: {exc})") from None
    n = rows.size
    if (cols.shape != (n,) or lit.size != stored.shape[0] or any(v.shape != (n,) for v in fields.values())
            or sat_rows.shape != sat_cols.shape):
        raise ResultError(f"{path}: inconsistent block file (array lengths differ)")
    return BlockResult(**meta, rows=rows, cols=cols, profiles=profiles, fields=fields,
                       saturated_rows=sat_rows, saturated_cols=sat_cols)
