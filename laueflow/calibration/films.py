"""Film scans for the pose fit: read a scan's region, find the film's spots, pick bright pixels over all.

The I/O side of the calibration (the fit itself is :mod:`laueflow.calibration.fit`): each scan is read
with the nominal configuration (its region and frame range), tile by tile, keeping only the traces of
pixels well above the background.  Spots are the 8-connected groups of those pixels; the pixels used
are the brightest of every spot, the same number from each, so that spots far apart (which fix the
tilts) weigh as much as the brightest.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..config import Config, ConfigWarning, load
from ..errors import CalibrationError
from ..io.layout import SCAN_CONFIG_FILE
from ..io.scan import open_scan
from .fit import Film

BRIGHT = 8.0  # a film pixel's mean is this many Poisson sigmas of the background above it
MIN_SPOT_PIXELS = 3
TILE_PIXELS = 256 * 256


def _scan_config(path: Path) -> Config | None:
    """The configuration a scan folder carries (config.yaml beside its frames), if any."""
    own = path / SCAN_CONFIG_FILE if path.is_dir() else None
    if own is None or not own.is_file():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        try:
            return load(own, check_files=False)
        except CalibrationError:
            raise
        except ValueError:
            return None


def check_scans(cfg: Config, paths: list[Path], depths_um: list[float]) -> None:
    """The scans go together with the nominal configuration: one film depth each, inside the depth
    grid, and no scan whose own config.yaml has another detector region or frame range."""
    if len(depths_um) != len(paths):
        raise CalibrationError(f"give one --film-depth per scan: {len(paths)} scans, {len(depths_um)} depths")
    grid = cfg.geo.source.depths * 1e3
    for p, d in zip(paths, depths_um, strict=True):
        if not grid[0] <= d <= grid[-1]:
            raise CalibrationError(
                f"{p}: film depth {d:g} um is outside the depth grid "
                f"[{grid[0]:g}, {grid[-1]:g}] um (geo.source.grid)"
            )
        own = _scan_config(Path(p))
        if own is None:
            continue
        for what, mine, theirs in (
            ("detector region (file.frame)", cfg.file.frame, own.file.frame),
            ("frame range (file.range)", cfg.file.range, own.file.range),
        ):
            if tuple(mine) != tuple(theirs):
                raise CalibrationError(
                    f"{p}: its {SCAN_CONFIG_FILE} has another {what}: {list(theirs)}, the "
                    f"nominal configuration {list(mine)}; calibrate scans of one region "
                    "and frame count"
                )


def read_film(cfg: Config, path: str | Path, depth_um: float, max_pixels: int = 600) -> Film:
    """The bright pixels of one film scan (point 0), at most ``max_pixels``, spread over its spots."""
    path = Path(path)
    with open_scan(cfg, path) as scan:
        if scan.n_points != 1:
            raise CalibrationError(
                f"{path}: {scan.n_total} frames hold {scan.n_points} scan points of "
                f"{scan.n_frames} frames; a film scan is one point (check file.range)"
            )
        r0, r1, c0, c1 = cfg.file.frame
        mean = np.zeros((r1 - r0, c1 - c0))
        kept_rc, kept_tr = [], []
        for tile in scan.tiles(TILE_PIXELS):
            blk = scan.read_block(0, tile)
            m = blk.traces.mean(axis=1, dtype=np.float64)
            mean[tile.r0 - r0 : tile.r1 - r0, tile.c0 - c0 : tile.c1 - c0] = m.reshape(tile.shape)
            bg = float(np.median(m[blk.selected])) if blk.selected.any() else 0.0
            hot = m >= bg + BRIGHT * math.sqrt(max(bg, 1.0))
            take = np.flatnonzero(hot & blk.selected)
            kept_rc.append(np.stack([blk.rows[take], blk.cols[take]], 1))
            kept_tr.append(blk.traces[take])
        frames = scan.frame_offsets()
    rc = np.concatenate(kept_rc)
    traces = np.concatenate(kept_tr).astype(np.float64)
    background = float(np.median(mean))
    bright = np.zeros(mean.shape, bool)
    bright[rc[:, 0] - r0, rc[:, 1] - c0] = True
    labels, n = ndimage.label(bright, structure=np.ones((3, 3)))
    spot = labels[rc[:, 0] - r0, rc[:, 1] - c0]
    sizes = np.bincount(spot, minlength=n + 1)
    ok = sizes[spot] >= MIN_SPOT_PIXELS
    rc, traces, spot = rc[ok], traces[ok], spot[ok]
    spots = np.unique(spot)
    if spots.size == 0:
        raise CalibrationError(
            f"{path}: no bright spots (no pixel's mean is {BRIGHT:g} sigma above the "
            f"background of {background:.0f} counts): is there a film in this scan?"
        )
    quota = max(1, max_pixels // spots.size)
    signal = traces.mean(1)
    pick = np.concatenate([np.flatnonzero(spot == s)[np.argsort(-signal[spot == s])[:quota]] for s in spots])
    pick = pick[np.argsort(-signal[pick])][:max_pixels]
    return Film(
        rows=rc[pick, 0],
        cols=rc[pick, 1],
        traces=traces[pick],
        spots=spot[pick],
        depth_um=float(depth_um),
        frames=np.asarray(frames, float),
        name=str(path),
    )


def read_films(cfg: Config, paths: Sequence[str | Path], depths_um: Sequence[float],
               max_pixels: int = 600) -> list[Film]:
    """The films of the scans ``paths`` (:func:`read_film`, one film depth each), checked first to go
    together with the nominal configuration (:func:`check_scans`); scans of different frame counts
    cannot be fitted together and raise :class:`CalibrationError`."""
    check_scans(cfg, [Path(p) for p in paths], list(depths_um))
    films: list[Film] = []
    for path, depth in zip(paths, depths_um, strict=True):
        film = read_film(cfg, path, depth, max_pixels)
        if films and film.traces.shape[1] != films[0].traces.shape[1]:
            raise CalibrationError(
                f"the scans have different frame counts: {films[0].name} {films[0].traces.shape[1]}, "
                f"{film.name} {film.traces.shape[1]}"
            )
        films.append(film)
    return films
