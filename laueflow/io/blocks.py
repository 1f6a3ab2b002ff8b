"""Block files: one decoded tile of one point, the unit that stitching and resuming work with.

A block file (``OUT/.blocks/point_<k>/block_r<r0>_c<c0>.npz``, see laueflow.io.layout) is an
uncompressed NumPy archive written atomically::

    format                  2 (profiles stored for the pixels with signal only)
    point, tile             the scan point and the tile [r0, r1, c0, c1]
    config_fingerprint      of the configuration that decoded it (a rerun reuses only a match)
    skipped, host, seconds  why it holds no pixels ("" when decoded), where and how long it took
    rows, cols              (P,) detector row, col of the decoded pixels
    lit, profiles           rows in rows/cols with a nonzero profile, and those (L, J) profiles
    background, residual, quality, energy, energy_sigma   (P,) per-pixel fields
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path

PIXEL_FIELDS = ("background", "residual", "quality", "energy", "energy_sigma")
PIXEL_DTYPES = {"background": np.float32, "residual": np.float32, "quality": np.uint8,
                "energy": np.float32, "energy_sigma": np.float32}
# 2: profiles stored for the pixels with signal only ("lit": their rows in rows/cols); most are zero
BLOCK_FORMAT = 2


@dataclass
class BlockResult:
    """What a block file holds: the decoded pixels of one tile (possibly none) and why, if skipped."""

    point: int
    tile: tuple[int, int, int, int]
    config_fingerprint: str
    skipped: str  # "" when decoded
    rows: np.ndarray
    cols: np.ndarray
    profiles: np.ndarray
    fields: dict[str, np.ndarray]
    host: str = ""
    seconds: float = 0.0

    @property
    def n_pixels(self) -> int:
        return int(self.rows.size)


def write_block(path: str | os.PathLike, *, point: int, tile: Sequence[int], config_fingerprint: str,
                n_depths: int, decoded: Any = None, skipped: str = "", host: str = "",
                seconds: float = 0.0) -> None:
    """Write one block result (``decoded`` has rows, cols, profiles and the per-pixel fields) atomically."""
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
    meta = {"format": np.array(BLOCK_FORMAT), "point": np.array(point), "tile": np.asarray(tile, np.int64),
            "config_fingerprint": np.array(config_fingerprint), "skipped": np.array(skipped),
            "host": np.array(host), "seconds": np.array(seconds)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays, **meta)
        fh.flush()


def _meta(z: Any) -> dict[str, Any]:
    return {"point": int(z["point"]), "tile": tuple(int(v) for v in z["tile"]),
            "config_fingerprint": str(z["config_fingerprint"]), "skipped": str(z["skipped"]),
            "host": str(z["host"]), "seconds": float(z["seconds"])}


def read_block_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """The small fields of a block file (point, tile, fingerprint, skipped, n_pixels); None if unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["format"]) != BLOCK_FORMAT:
                return None
            return {**_meta(z), "n_pixels": int(z["rows"].size)}
    except (OSError, ValueError, KeyError, EOFError):
        return None


def read_block(path: str | os.PathLike) -> BlockResult:
    """Load a block file completely (profiles of every decoded pixel, zeros where there is no signal)."""
    with np.load(path, allow_pickle=False) as z:
        rows, lit, stored = z["rows"], z["lit"], z["profiles"]
        profiles = np.zeros((rows.size, stored.shape[1]), np.float32)
        profiles[lit] = stored
        return BlockResult(**_meta(z), rows=rows, cols=z["cols"], profiles=profiles,
                           fields={k: z[k] for k in PIXEL_FIELDS})
