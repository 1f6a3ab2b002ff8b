"""Synthetic coded-aperture scans in the beamline layout, with the truth beside them.

Grains at known depths produce Laue spots (2-D Gaussian peaks a few pixels wide) in a region of the
detector; every pixel's trace comes from the forward model with the spot's energy, plus a background
that drifts a little from frame to frame (recorded as the monitor ``entry1/monitor/I0``), Poisson
noise and a few saturated (hot) pixels.  Outside the region frames are zero (not simulated), so they
compress to almost nothing.

:func:`simulate_large` makes one production-size point (whole detector frames, a 1200 x 1200 region)
with the same physics in minutes rather than hours: see its docstring for what it does differently.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import yaml

from . import config as C
from . import geometry as G
from .errors import SimulateError
from .forward import Setup, traces
from .geometry import SATURATED
from .io.atomic import atomic_h5
from .io.layout import SCAN_CONFIG_FILE, TRUTH_FILE
from .io.truth import load_truth, write_truth  # noqa: F401 (load_truth: the reader beside the writer)
from .mask import debruijn, load_code

PRESETS = ("thin", "extended", "overlap", "multipoint", "film")
FILM_THICKNESS = 1.5  # um, the film preset's membrane
FILM_DEPTH = 50.0  # um, the film preset's default depth
POSE_KEYS = ("cenx", "dist", "cenz", "anglex", "angley", "anglez")  # geo.mask.focus: mm and degrees
GEOMETRIES = {
    # anglez about 44 deg, diagonal scan axis, 1 um steps
    "tilted": {"anglez": 44.0, "axis": [0.707, 0.707, 0.0], "step": 1.0},
    # anglez about -1.3 deg, scan along the beam, 0.5 um steps
    "flat": {"anglez": -1.3, "axis": [1.0, 0.0, 0.0], "step": 0.5},
}
DETECTOR_KEY = "/entry1/data/data"
MASK_FILE = "mask.npy"  # the mask code beside a simulated scan's config.yaml (its geo.mask.path)
OVERLAP_GAP = 40.0  # um: the overlap preset's pixels see two grains at least this far apart
MIN_REGION = 8  # pixels, side of the simulated region
MIN_FRAMES = 8  # frames per scan point
DETECTOR_SIDE = 2048  # pixels, the built-in detector (default_config_dict)


def default_config_dict(geometry: str = "tilted", frames: int = 261, region: int = 64) -> dict:
    """A beamline-schema configuration for a synthetic scan (34-ID-E-like detector)."""
    if geometry not in GEOMETRIES:
        raise SimulateError(f"unknown geometry {geometry!r}; choose one of {', '.join(GEOMETRIES)}")
    g = GEOMETRIES[geometry]
    r0 = DETECTOR_SIDE // 2 - region // 2
    return {
        "file": {"path": ".", "stacked": True, "ext": "h5", "h5": {"key": DETECTOR_KEY},
                 "range": [0, frames, 1], "threshold": 0, "frame": [r0, r0 + region, r0, r0 + region]},
        "geo": {
            "mask": {"path": MASK_FILE, "reversed": False, "bitsizes": [15.0, 7.5], "thickness": 3.7,
                     "resolution": 0.5, "widening": 0.0, "pad": 150.0, "stretch": 1.0, "shift": 0.0,
                     "focus": {"cenx": 0.0, "dist": 1.0, "anglez": g["anglez"], "angley": 0.0,
                               "anglex": 0.0, "cenz": 0.0}},
            "scanner": {"step": g["step"], "rot": [0.0, 0.0, 0.0], "axis": g["axis"]},
            "detector": {"shape": [DETECTOR_SIDE, DETECTOR_SIDE], "size": [409.6, 409.6],
                         "rot": [-1.20, -1.21, -1.22], "pos": [28.8, 2.7, 513.0]},
            "source": {"offset": 0.0, "grid": [-0.15, 0.2, 0.001]},
        },
    }


@dataclass
class Grain:
    """A crystallite along the beam: its depth profile shape and the spots it sends to the detector."""

    top: float  # um, start of the grain along the beam
    thickness: float  # um
    decay: float = 0.0  # um; > 0 gives an exponentially decaying profile (absorption)
    # r, c, sigma, amp, keV
    spots: list[tuple[float, float, float, float, float]] = field(default_factory=list)

    def profile(self, depth_um: np.ndarray) -> np.ndarray:
        """Unit-sum profile on the depth grid: bin overlap with [top, top + thickness], times decay."""
        step = depth_um[1] - depth_um[0] if depth_um.size > 1 else 1.0
        lo, hi = depth_um - step / 2, depth_um + step / 2
        overlap = np.clip(np.minimum(hi, self.top + self.thickness) - np.maximum(lo, self.top), 0, None)
        overlap = overlap / step
        if self.decay > 0:
            overlap = overlap * np.exp(-np.clip(depth_um - self.top, 0, None) / self.decay)
        return overlap / overlap.sum()


def _grains(preset: str, rng: np.random.Generator, region: tuple[int, int, int, int],
            depth_um: np.ndarray, film_depth: float = FILM_DEPTH) -> list[Grain]:
    """Random grains and spots for a preset, within the region and well inside the depth grid.

    ``film``: one thin film (FILM_THICKNESS) centred at ``film_depth`` um, all spots from it.
    """
    r0, r1, c0, c1 = region
    area = (r1 - r0) * (c1 - c0)
    n_spots = max(3, int(round(area / 4096 * 12)))
    lo_d, hi_d = depth_um[0] + 40, depth_um[-1] - 90

    def spot(r: float | None = None, c: float | None = None) -> tuple[float, float, float, float, float]:
        r = rng.uniform(r0 + 3, r1 - 3) if r is None else r
        c = rng.uniform(c0 + 3, c1 - 3) if c is None else c
        return (r, c, rng.uniform(1.2, 2.2), rng.uniform(2000, 8000), rng.uniform(8.0, 30.0))

    def spread(n: int, gap: float) -> np.ndarray:
        """n depths in [lo_d, hi_d] at least `gap` apart."""
        for _ in range(1000):
            d = np.sort(rng.uniform(lo_d, hi_d, n))
            if n < 2 or np.diff(d).min() >= gap:
                return d
        return np.linspace(lo_d, hi_d, n)

    grains: list[Grain] = []
    if preset in ("thin", "multipoint"):
        tops = spread(3, 30.0)
        for t in tops:
            grains.append(Grain(top=t, thickness=rng.uniform(5, 12)))
    elif preset == "extended":
        tops = spread(2, 80.0)
        for t in tops:
            grains.append(Grain(top=t, thickness=rng.uniform(30, 60), decay=rng.uniform(20, 50)))
    elif preset == "film":
        grains.append(Grain(top=film_depth - FILM_THICKNESS / 2, thickness=FILM_THICKNESS))
    elif preset == "overlap":
        # two pairs, each of two grains 45+ um apart; where the depth grid allows, every grain is also
        # 40+ um from the grains of the other pair (their spots are kept apart besides, below)
        for _ in range(1000):
            tops = []
            for _ in range(2):
                a = rng.uniform(lo_d, hi_d - 60)
                tops += [a, a + rng.uniform(45, min(120, hi_d - a))]
            if np.diff(np.sort(tops)).min() >= OVERLAP_GAP:
                break
        for t in tops:
            grains.append(Grain(top=t, thickness=rng.uniform(6, 12)))
    else:
        raise SimulateError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")

    def apart(new: list[tuple], placed: list[tuple]) -> bool:
        """Whether every spot in `new` keeps clear of every placed one: centres 4 (sigma1 + sigma2) apart."""
        return all(np.hypot(s[0] - q[0], s[1] - q[1]) >= 4 * (s[2] + q[2]) for s in new for q in placed)

    if preset == "overlap":
        # each pair shares spot positions (within a pixel): those pixels see both grains; the spots of
        # different pairs keep apart, so that no pixel sees grains of both pairs
        placed_by_pair: list[list[tuple]] = [[] for _ in range(len(grains) // 2)]
        for _ in range(max(2, n_spots // 2)):
            for p in range(len(placed_by_pair)):
                i = 2 * p
                others = [q for j, qs in enumerate(placed_by_pair) if j != p for q in qs]
                for _ in range(200):
                    s = spot()
                    s2 = spot(s[0] + rng.uniform(-0.7, 0.7), s[1] + rng.uniform(-0.7, 0.7))
                    if apart([s, s2], others):
                        break
                else:
                    continue  # region too crowded for another separate spot
                placed_by_pair[p] += [s, s2]
                grains[i].spots.append(s)
                grains[i + 1].spots.append(s2)
    else:
        # spots of single-grain presets keep apart, so that each pixel sees one grain
        placed: list[tuple] = []
        for k in range(n_spots):
            for _ in range(200):
                s = spot()
                if apart([s], placed):
                    break
            else:
                continue  # region too crowded for another separate spot
            placed.append(s)
            grains[k % len(grains)].spots.append(s)
    return grains


def _spot_weights(spot: tuple, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    r, c, sigma, amp, _ = spot
    return amp * np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * sigma**2))


SCAN_NUMBER = 1  # entry1/scanNum of simulated frames
SCAN_STEP_UM = 1.0  # sample X step between simulated scan points, um


def _write_header(f: Any, shape: tuple[int, int], i0: float | np.ndarray, point: int | None,
                  name: str) -> None:
    """The header a 34-ID-E frame file carries, as datasets where the detector writes them (LaueGo's
    readers and the indexing chain read ``entry1/detector/startx`` etc. as datasets): detector and
    region, monitor, sample position and energy, scan number.  ``point`` None: a stack of several."""
    text = h5py.string_dtype()
    f.attrs["file_name"] = name
    det = f.require_group("entry1/detector")
    for key, value in {"Nx": shape[1], "Ny": shape[0], "startx": 0, "endx": shape[1] - 1, "starty": 0,
                       "endy": shape[0] - 1, "binx": 1, "biny": 1}.items():
        det.create_dataset(key, data=np.int32(value))
    det.create_dataset("ID", data="laueflow simulated detector", dtype=text)
    det.create_dataset("make", data="laueflow", dtype=text)
    det.create_dataset("model", data="simulate", dtype=text)
    det.create_dataset("exposure", data=np.float64(1.0)).attrs["units"] = "s"
    mon = f.require_group("entry1/monitor")
    mon.create_dataset("I0", data=np.asarray(i0, dtype=np.float64))
    mon.create_dataset("mode", data="timer", dtype=text)
    sample = f.require_group("entry1/sample")
    sample.create_dataset("name", data="laueflow synthetic sample", dtype=text)
    position = {"sampleX": SCAN_STEP_UM * (point or 0), "sampleY": 0.0, "sampleZ": 0.0}
    for key, value in position.items():
        sample.create_dataset(key, data=np.float64(value)).attrs["units"] = "micron"
    sample.create_dataset("incident_energy", data=np.float64(20.0)).attrs["units"] = "keV"
    md = f.require_group("entry1/microDiffraction")
    md.create_dataset("MonoMode", data="white slitted", dtype=text)
    f["entry1"].create_dataset("scanNum", data=np.int32(SCAN_NUMBER))
    f["entry1"].create_dataset("title", data="laueflow simulate", dtype=text)


def _write_frame(path: Path, image: np.ndarray, region: tuple[int, int, int, int], shape: tuple[int, int],
                 i0: float, chunks: tuple[int, int] = (256, 256), point: int = 0) -> None:
    """One detector frame in the beamline layout; only the region's chunks are stored."""
    r0, r1, c0, c1 = region
    with atomic_h5(path) as f:
        d = f.create_dataset(DETECTOR_KEY, shape=shape, dtype="uint16", chunks=chunks,
                             compression="gzip", compression_opts=1, shuffle=True, fillvalue=0)
        d[r0:r1, c0:c1] = image
        _write_header(f, shape, i0, point, path.name)


def simulate(out_dir: str | Path, preset: str = "thin", seed: int = 0, frames: int | None = None,
             points: int = 1, noise: bool = True, single_file: bool = False, config: str | Path | None = None,
             region: int = 64, geometry: str = "tilted", background: float = 50.0,
             prefix: str = "scan", film_depth: float | None = None,
             pose_error: dict[str, float] | None = None) -> dict:
    """Write a synthetic scan to ``out_dir`` and return a summary (paths and counts).

    ``config`` names a beamline YAML whose geometry (and mask, region, frames) is used instead of the
    built-in ``geometry`` ("tilted" or "flat").  ``multipoint`` is the thin preset over several
    points (at least 3), each with its own grains; point k uses frames [kN, (k+1)N).  ``film`` is
    one thin film centred at ``film_depth`` um (calibration data).

    ``pose_error`` ({cenx: mm, ..., anglez: deg}, see :data:`POSE_KEYS`) is added to the mask pose
    written to config.yaml, while the frames are simulated with the true pose, which the truth file
    keeps (attribute ``focus``): a nominal configuration that is off, as after a mask installation.
    """
    if preset not in PRESETS:
        raise SimulateError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if film_depth is not None and preset != "film":
        raise SimulateError(f"a film depth is for the film preset, not {preset!r}")
    pose_error = _check_pose(pose_error)
    # arguments are checked before anything is written
    if points < 1:
        raise SimulateError(f"points must be >= 1, got {points}")
    if config is None and not MIN_REGION <= region <= DETECTOR_SIDE:
        raise SimulateError(f"region must be between {MIN_REGION} and {DETECTOR_SIDE} pixels (the detector's "
                            f"side), got {region}")
    if frames is not None and frames < MIN_FRAMES:
        raise SimulateError(f"frames must be >= {MIN_FRAMES} per scan point, got {frames}")
    if preset == "multipoint":
        points = max(points, 3)
    out = Path(out_dir)
    rng = np.random.default_rng(seed)

    if config is not None:
        user = C.load(config)
        data = yaml.safe_load(Path(config).read_text())
        code = load_code(user.resolve(user.geo.mask.path)) if user.geo.mask.path else debruijn(8)
        data = copy.deepcopy(data)
        data.setdefault("file", {})
        # the frames are written as <prefix>_<n>.h5 with the data at DETECTOR_KEY: say so
        h5 = data["file"].get("h5")
        h5 = dict(h5) if isinstance(h5, dict) else {}
        h5["key"] = DETECTOR_KEY
        data["file"].update({"path": ".", "stacked": not single_file, "ext": "h5", "h5": h5})
        data.setdefault("geo", {}).setdefault("mask", {})["path"] = MASK_FILE
        if frames is not None:
            data["file"]["range"] = [0, frames, 1]
    else:
        data = default_config_dict(geometry, frames or 261, region)
        code = debruijn(8)
    if single_file:
        data["file"].update({"stacked": False, "path": f"{prefix}.h5"})
    n_frames = len(range(*data["file"].get("range", [0, 261, 1])))
    if data["file"].get("range", [0])[0] != 0 or data["file"].get("range", [0, 0, 1])[2] != 1:
        data["file"]["range"] = [0, n_frames, 1]
    if config is not None:  # frames and region from the given configuration
        if n_frames < MIN_FRAMES:
            raise SimulateError(f"frames must be >= {MIN_FRAMES} per scan point, got {n_frames} "
                                f"(file.range of {config})")
        fr0, fr1, fc0, fc1 = user.file.frame
        if min(fr1 - fr0, fc1 - fc0) < MIN_REGION:
            raise SimulateError(f"region must be at least {MIN_REGION} x {MIN_REGION} pixels, got "
                                f"{fr1 - fr0} x {fc1 - fc0} (file.frame of {config})")

    written = _posed(data, pose_error)
    if preset == "film":
        grid_cfg = user if config is not None else C.from_dict(data, check_files=False)
        film_depth = _film_depth(grid_cfg, film_depth)

    out.mkdir(parents=True, exist_ok=True)
    np.save(out / MASK_FILE, code)
    config_path = out / SCAN_CONFIG_FILE
    config_path.write_text(
        f"# Synthetic scan written by laueflow simulate (preset {preset}, seed {seed})\n"
        + yaml.safe_dump(written, sort_keys=False))
    cfg = C.load(config_path)
    if pose_error:
        cfg = C.from_dict(data, source=str(config_path))
    setup = Setup.from_config(cfg)
    reg = tuple(cfg.file.frame)
    r0, r1, c0, c1 = reg
    h, w = r1 - r0, c1 - c0
    shape = (cfg.geo.detector.shape[1], cfg.geo.detector.shape[0])
    depths_mm = cfg.geo.source.depths
    depth_um = depths_mm * 1e3
    dz_mm = cfg.geo.source.grid[2]
    frame_idx = np.arange(n_frames) * 1
    rows, cols = np.mgrid[r0:r1, c0:c1]
    rows, cols = rows.ravel(), cols.ravel()
    centres = G.pixel_centres(setup.geo, rows, cols)

    truth = {"pixels": [], "profiles": [], "grain": [], "grain2": [], "energy": [], "point": []}
    grain_rows = []
    with contextlib.ExitStack() as files:  # the stack file appears only once complete
        stack = None
        if single_file:
            stack = files.enter_context(atomic_h5(out / f"{prefix}.h5"))
            dset = stack.create_dataset(DETECTOR_KEY, shape=(points * n_frames, *shape), dtype="uint16",
                                        chunks=(1, 256, 256), compression="gzip", compression_opts=1,
                                        shuffle=True, fillvalue=0)
            i0_all = np.empty(points * n_frames)
        n_written = 0
        for k in range(points):
            grains = _grains("thin" if preset == "multipoint" else preset, rng, reg, depth_um,
                             FILM_DEPTH if film_depth is None else film_depth)
            signal = np.zeros((h * w, n_frames))
            prof_total = np.zeros((h * w, depth_um.size))
            contrib = np.zeros((h * w, len(grains)))  # each grain's total counts per frame in each pixel
            energy = np.full(h * w, np.nan)
            for gi, grain in enumerate(grains):
                shape_z = grain.profile(depth_um)
                grain_rows.append((k, grain.top, grain.thickness, grain.decay))
                # a grain is continuous in depth: each bin's share is spread over the sub-samples
                # inside the bin (only over the grain's bins, which also keeps this fast)
                on = np.flatnonzero(shape_z > 0)
                sub_z, sub_f = G.subsample_depths(depths_mm[on], dz_mm, shape_z[on])
                for s in grain.spots:
                    wgt = _spot_weights(s, rows, cols)
                    near = np.flatnonzero(wgt >= 0.5)  # pixels receiving at least half a count per frame
                    if near.size == 0:
                        continue
                    signal[near] += traces(setup, centres[near], wgt[near, None] * sub_f[None, :], sub_z,
                                           frame_idx, s[4])
                    prof_total[near] += wgt[near, None] * shape_z[None, :]
                    # the pixel's energy is that of its strongest spot
                    energy[near] = np.where(wgt[near] > contrib[near].max(1, initial=0), s[4], energy[near])
                    contrib[near, gi] += wgt[near]
            order = np.argsort(-contrib, axis=1)
            first = order[:, 0] + len(grain_rows) - len(grains)
            top2 = np.take_along_axis(contrib, order[:, :2], 1) if len(grains) > 1 else np.zeros((h * w, 2))
            second = np.where(top2[:, 1] >= 0.2 * top2[:, 0], order[:, min(1, len(grains) - 1)]
                              + len(grain_rows) - len(grains), -1)
            # background: smooth across the region, drifting with the incident intensity (the monitor)
            ramp = (1.0 + 0.1 * ((rows - r0) / max(h - 1, 1) - 0.5)
                    + 0.05 * ((cols - c0) / max(w - 1, 1) - 0.5))
            drift = 1.0 + 0.03 * np.sin(2 * np.pi * np.arange(n_frames) / max(n_frames, 2) * 1.7 + k)
            expected = (background * ramp[:, None] + signal) * drift[None, :]
            counts = rng.poisson(expected) if noise else np.rint(expected)
            counts = np.minimum(counts, SATURATED).astype(np.uint16)
            free = np.flatnonzero(prof_total.sum(1) == 0)
            hot = rng.choice(free, size=min(3, free.size), replace=False)
            counts[hot] = SATURATED
            images = counts.reshape(h, w, n_frames).transpose(2, 0, 1)
            i0 = 1.0e5 * drift
            for n in range(n_frames):
                idx = k * n_frames + n
                if single_file:
                    dset[idx, r0:r1, c0:c1] = images[n]
                    i0_all[idx] = i0[n]
                else:
                    _write_frame(out / f"{prefix}_{idx}.h5", images[n], reg, shape, i0[n], point=k)
                n_written += 1
            spot_px = np.flatnonzero(prof_total.sum(1) >= 4 * np.sqrt(background))
            truth["pixels"].append(np.stack([rows[spot_px], cols[spot_px]], 1))
            truth["profiles"].append(prof_total[spot_px])
            truth["grain"].append(first[spot_px])
            truth["grain2"].append(second[spot_px])
            truth["energy"].append(energy[spot_px])
            truth["point"].append(np.full(spot_px.size, k))
        if single_file:
            _write_header(stack, shape, i0_all, None, f"{prefix}.h5")

    attrs = {"preset": preset, "seed": seed, "noise": noise, "points": points,
             "frames_per_point": n_frames, "background": background,
             **_pose_attrs(cfg, preset, film_depth, pose_error)}
    write_truth(out / TRUTH_FILE, truth, grain_rows, depth_um, attrs)
    n_truth = int(sum(len(p) for p in truth["pixels"]))
    return {"out_dir": str(out), "config": str(config_path), "truth": str(out / TRUTH_FILE),
            "frames": n_written, "points": points, "frames_per_point": n_frames, "region": list(reg),
            "spot_pixels": n_truth, "layout": "stack" if single_file else "frames",
            "grains": len(grain_rows), "film_depth": film_depth, "pose_error": pose_error}


def _check_pose(pose_error: dict[str, float] | None) -> dict[str, float]:
    pose_error = dict(pose_error or {})
    bad = sorted(set(pose_error) - set(POSE_KEYS))
    if bad:
        raise SimulateError(f"unknown pose parameter(s) {', '.join(bad)}; choose from {', '.join(POSE_KEYS)}")
    return pose_error


def _posed(data: dict, pose_error: dict[str, float]) -> dict:
    """The configuration to write: ``data`` with its mask pose off by ``pose_error``."""
    written = copy.deepcopy(data)
    focus = written["geo"]["mask"].setdefault("focus", {})
    for k, v in pose_error.items():
        focus[k] = float(focus.get(k, getattr(C.Focus(), k))) + float(v)
    return written


def _film_depth(cfg: C.Config, film_depth: float | None) -> float:
    """The film's depth (um; FILM_DEPTH by default), checked to lie inside the configuration's grid."""
    film_depth = FILM_DEPTH if film_depth is None else float(film_depth)
    grid_um = cfg.geo.source.depths * 1e3
    if not grid_um[0] + FILM_THICKNESS <= film_depth <= grid_um[-1] - FILM_THICKNESS:
        raise SimulateError(f"film depth {film_depth:g} um is outside the depth grid "
                            f"[{grid_um[0]:g}, {grid_um[-1]:g}] um")
    return film_depth


def _pose_attrs(cfg: C.Config, preset: str, film_depth: float | None, pose_error: dict[str, float]) -> dict:
    """Truth attributes of calibration data: the true pose (``cfg``'s), the error written, the film."""
    attrs: dict = {}
    if preset == "film" or pose_error:
        f = cfg.geo.mask.focus
        attrs["focus"] = json.dumps({k: getattr(f, k) for k in POSE_KEYS})
        attrs["pose_error"] = json.dumps(pose_error)
    if preset == "film":
        attrs.update({"film_depth_um": film_depth, "film_thickness_um": FILM_THICKNESS})
    return attrs


def parse_pose(text: str) -> dict[str, float]:
    """``cenx=0.02,dist=-0.03,angley=0.3`` (mm and degrees) as a dict; ValueError names a bad item."""
    out: dict[str, float] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in POSE_KEYS:
            raise SimulateError(f"{item!r}: expected NAME=VALUE with NAME one of {', '.join(POSE_KEYS)}")
        try:
            out[key] = float(value)
        except ValueError:
            raise SimulateError(f"{item!r}: {value.strip()!r} is not a number") from None
    return out


# ----------------------------------------------------------------------------------------------
# Production-size scan points, fast

LARGE_PRESETS = ("thin", "extended", "film")
SPOT_SEPARATION = 8 * 2.2  # px: 4 (sigma1 + sigma2) for the widest spots, as _grains keeps them apart
LARGE_CHUNK = 1024  # pixels per forward-model call (one shape, so one compilation per grain)


def _layered_grains(preset: str, n: int, rng: np.random.Generator, depth_um: np.ndarray) -> list[Grain]:
    """``n`` grains at depths drawn uniformly subject to a minimum gap (30 um thin, 80 um extended, less
    when the depth grid cannot hold that many), within the same margins of the grid as :func:`_grains`."""
    lo, hi = depth_um[0] + 40, depth_um[-1] - 90
    gap = min(30.0 if preset == "thin" else 80.0, (hi - lo) / max(n - 1, 1))
    # uniform among all arrangements with the gap: n sorted draws from a range shortened by the gaps
    tops = np.sort(rng.uniform(lo, hi - (n - 1) * gap, n)) + gap * np.arange(n)
    if preset == "thin":
        return [Grain(top=t, thickness=rng.uniform(5, 12)) for t in tops]
    return [Grain(top=t, thickness=rng.uniform(30, 60), decay=rng.uniform(20, 50)) for t in tops]


def _large_grains(preset: str, n: int, rng: np.random.Generator, depth_um: np.ndarray,
                  film_depth: float) -> list[Grain]:
    """The grains of a large scan: :func:`_layered_grains`, or the film preset's one film."""
    if preset == "film":
        return [Grain(top=film_depth - FILM_THICKNESS / 2, thickness=FILM_THICKNESS)]
    return _layered_grains(preset, n, rng, depth_um)


def _spot_grid(rng: np.random.Generator, region: tuple[int, int, int, int], fraction: float,
               threshold: float) -> list[tuple[float, float, float, float, float]]:
    """Spots (r, c, sigma, amp, keV) drawn as in :func:`_grains` until their truth pixels (summed profile
    >= ``threshold``) cover about ``fraction`` of the region, one per cell of a square grid in random
    cells, jittered within the cell so that any two stay 4 (sigma1 + sigma2) apart."""
    r0, r1, c0, c1 = region
    h, w = r1 - r0, c1 - c0
    target = fraction * h * w
    params: list[tuple[float, float, float]] = []
    covered = 0.0
    while covered < target:
        sigma, amp, kev = rng.uniform(1.2, 2.2), rng.uniform(2000, 8000), rng.uniform(8.0, 30.0)
        params.append((sigma, amp, kev))
        covered += 2 * np.pi * sigma**2 * np.log(amp / threshold)  # area where amp e^(-r^2/2s^2) >= threshold
    n = len(params)
    cell = int(np.sqrt(h * w / n))
    while cell >= 1 and (h // cell) * (w // cell) < n:
        cell -= 1
    if cell < np.ceil(SPOT_SEPARATION):
        most = fraction * (h // int(np.ceil(SPOT_SEPARATION))) * (w // int(np.ceil(SPOT_SEPARATION))) / n
        raise SimulateError(f"spot_fraction {fraction:g} does not fit a {h} x {w} region with spots kept "
                            f"apart; at most about {most:.2f}")
    n_r, n_c = h // cell, w // cell
    cells = rng.choice(n_r * n_c, size=n, replace=False)
    jitter = (cell - SPOT_SEPARATION) / 2
    spots = []
    for (sigma, amp, kev), k in zip(params, cells, strict=True):
        i, j = divmod(int(k), n_c)
        r = r0 + (i + 0.5) * cell + rng.uniform(-jitter, jitter)
        c = c0 + (j + 0.5) * cell + rng.uniform(-jitter, jitter)
        spots.append((r, c, sigma, amp, kev))
    return spots


def simulate_large(out_dir: str | Path, *, region: int = 1200, frames: int = 201, spot_fraction: float = 0.05,
                   preset: str = "thin", grains: int | None = None, seed: int = 0, geometry: str = "tilted",
                   background: float = 50.0, noise: bool = True, full_frames: bool = True,
                   chunks: tuple[int, int] = (256, 256), prefix: str = "scan",
                   progress: Callable[[str], None] | None = None, film_depth: float | None = None,
                   pose_error: dict[str, float] | None = None) -> dict:
    """One scan point of production size (e.g. 1200 x 1200 pixels, 201 frames of 2048 x 2048), fast.

    The physics is that of :func:`simulate`: every pixel that receives at least half a count per
    frame from a spot gets its trace from the forward model (:func:`laueflow.forward.traces`) at its
    own position and the spot's energy, each depth bin integrated over sub-samples; every pixel gets
    the drifting background, Poisson noise and the monitor; a few hot pixels saturate.  What makes it
    fast: spots are laid on a jittered grid (no pairwise placement); each grain's spot pixels go
    through the forward model in calls of one shape (one compilation per grain, not per spot); only
    those pixels do (the rest of the frame is background); and frames are written one at a time.

    ``spot_fraction`` is the share of the region's pixels that the truth counts as spot pixels (summed
    profile >= 4 sqrt(background)); spots come from ``grains`` grains of the preset ("thin": 6 by
    default, "extended": 3, "film": one film at ``film_depth`` um; ``pose_error`` as for
    :func:`simulate`).  ``full_frames`` writes whole detector frames (background and noise
    outside the region too, as the detector does), compressed as :func:`simulate` writes them (gzip
    level 1 with byte shuffle) in ``chunks``; otherwise only the region's chunks are stored.
    ``progress`` receives a line now and then.  Returns a summary like :func:`simulate`'s.
    """
    if preset not in LARGE_PRESETS:
        raise SimulateError(f"unknown preset {preset!r} for a large scan; "
                            f"choose one of {', '.join(LARGE_PRESETS)}")
    if not MIN_REGION <= region <= DETECTOR_SIDE:
        raise SimulateError(f"region must be between {MIN_REGION} and {DETECTOR_SIDE} pixels, got {region}")
    if frames < MIN_FRAMES:
        raise SimulateError(f"frames must be >= {MIN_FRAMES} per scan point, got {frames}")
    if not 0 < spot_fraction < 1:
        raise SimulateError(f"spot_fraction must be between 0 and 1, got {spot_fraction}")
    n_grains = 1 if preset == "film" else grains if grains is not None else (6 if preset == "thin" else 3)
    if n_grains < 1:
        raise SimulateError(f"grains must be >= 1, got {n_grains}")
    if len(chunks) != 2 or min(chunks) < 1:
        raise SimulateError(f"chunks must be two positive sizes (rows, cols), got {chunks}")
    say = progress or (lambda line: None)
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    data = default_config_dict(geometry, frames, region)
    pose_error = _check_pose(pose_error)
    if preset == "film":
        film_depth = _film_depth(C.from_dict(data, check_files=False), film_depth)
    elif film_depth is not None:
        raise SimulateError(f"a film depth is for the film preset, not {preset!r}")
    threshold = 4 * np.sqrt(background)  # the truth's spot pixels, as in simulate()
    # spots first: a fraction that does not fit stops before anything is written
    spots = _spot_grid(rng, tuple(data["file"]["frame"]), spot_fraction, threshold)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / MASK_FILE, debruijn(8))
    config_path = out / SCAN_CONFIG_FILE
    config_path.write_text(
        f"# Synthetic scan point written by laueflow.simulate.simulate_large (preset {preset}, seed {seed}, "
        f"spot fraction {spot_fraction:g})\n" + yaml.safe_dump(_posed(data, pose_error), sort_keys=False))
    cfg = C.from_dict(data, source=str(config_path))  # the true pose
    setup = Setup.from_config(cfg)
    r0, r1, c0, c1 = reg = tuple(cfg.file.frame)
    h, w = r1 - r0, c1 - c0
    shape = (cfg.geo.detector.shape[1], cfg.geo.detector.shape[0])
    depths_mm = cfg.geo.source.depths
    depth_um = depths_mm * 1e3
    dz_mm = cfg.geo.source.grid[2]
    frame_idx = np.arange(frames)

    t0 = time.perf_counter()
    grain_list = _large_grains(preset, n_grains, rng, depth_um, film_depth)
    for k, s in enumerate(spots):
        grain_list[k % n_grains].spots.append(s)

    # pixels near each spot (>= 0.5 counts per frame), grain by grain, and their traces
    per_grain = []
    for gi, grain in enumerate(grain_list):
        idx, wgt, kev = [], [], []
        for s in grain.spots:
            rad = int(np.ceil(s[2] * np.sqrt(2 * np.log(2 * s[3])))) + 1
            rr, cc = np.mgrid[max(r0, int(s[0]) - rad):min(r1, int(s[0]) + rad + 1),
                              max(c0, int(s[1]) - rad):min(c1, int(s[1]) + rad + 1)]
            rr, cc = rr.ravel(), cc.ravel()
            wt = _spot_weights(s, rr, cc)
            near = wt >= 0.5
            idx.append((rr[near] - r0) * w + (cc[near] - c0))
            wgt.append(wt[near])
            kev.append(np.full(int(near.sum()), s[4]))
        idx_g, wgt_g, kev_g = (np.concatenate(a) if a else np.zeros(0) for a in (idx, wgt, kev))
        idx_g = idx_g.astype(np.int64)
        shape_z = grain.profile(depth_um)
        on = np.flatnonzero(shape_z > 0)
        sub_z, sub_f = G.subsample_depths(depths_mm[on], dz_mm, shape_z[on])
        n_g = idx_g.size
        signal_g = np.zeros((0, frames))
        if n_g:
            pad = -n_g % LARGE_CHUNK  # whole chunks only: one compiled shape
            take = np.concatenate([np.arange(n_g), np.zeros(pad, np.int64)])
            centres = G.pixel_centres(setup.geo, idx_g[take] // w + r0, idx_g[take] % w + c0)
            signal_g = traces(setup, centres, wgt_g[take, None] * sub_f[None, :], sub_z, frame_idx,
                              kev_g[take], chunk=LARGE_CHUNK)[:n_g]
        per_grain.append((idx_g, wgt_g, kev_g, shape_z, signal_g))
        say(f"forward model: grain {gi + 1}/{n_grains}, {n_g} pixels ({time.perf_counter() - t0:.0f} s)")

    # one row per pixel that receives any signal
    near_idx = np.unique(np.concatenate([g[0] for g in per_grain]))
    n_near = near_idx.size
    signal = np.zeros((n_near, frames))
    prof_total = np.zeros((n_near, depth_um.size))
    contrib = np.zeros((n_near, n_grains))
    energy = np.full(n_near, np.nan)
    strongest = np.zeros(n_near)
    for gi, (idx_g, wgt_g, kev_g, shape_z, signal_g) in enumerate(per_grain):
        row = np.searchsorted(near_idx, idx_g)
        np.add.at(signal, row, signal_g)
        np.add.at(prof_total, row, wgt_g[:, None] * shape_z[None, :])
        np.add.at(contrib[:, gi], row, wgt_g)
        better = wgt_g > strongest[row]  # the pixel's energy is that of its strongest spot
        energy[row[better]], strongest[row[better]] = kev_g[better], wgt_g[better]
    del per_grain
    near_r, near_c = near_idx // w + r0, near_idx % w + c0
    t_forward = time.perf_counter() - t0

    # frames: background everywhere (drifting with the monitor), signal near the spots, Poisson noise
    t1 = time.perf_counter()
    fr0, fr1, fc0, fc1 = (0, shape[0], 0, shape[1]) if full_frames else reg
    # the ramp of simulate() over the region, level beyond it
    rr = np.clip((np.arange(fr0, fr1) - r0) / max(h - 1, 1), 0, 1) - 0.5
    cc = np.clip((np.arange(fc0, fc1) - c0) / max(w - 1, 1), 0, 1) - 0.5
    base = background * (1.0 + 0.1 * rr[:, None] + 0.05 * cc[None, :])
    drift = 1.0 + 0.03 * np.sin(2 * np.pi * frame_idx / max(frames, 2) * 1.7)
    i0 = 1.0e5 * drift
    in_near = np.zeros(h * w, bool)
    in_near[near_idx] = True
    free = np.flatnonzero(~in_near)
    hot = rng.choice(free, size=min(3, free.size), replace=False)
    hot_r, hot_c = hot // w + r0 - fr0, hot % w + c0 - fc0
    nr, nc = near_r - fr0, near_c - fc0
    for n in range(frames):
        expected = base * drift[n]
        expected[nr, nc] += signal[:, n] * drift[n]
        counts = rng.poisson(expected) if noise else np.rint(expected)
        image = np.minimum(counts, SATURATED).astype(np.uint16)
        image[hot_r, hot_c] = SATURATED
        _write_frame(out / f"{prefix}_{n}.h5", image, (fr0, fr1, fc0, fc1), shape, i0[n], chunks=chunks)
        if (n + 1) % 20 == 0 or n + 1 == frames:
            say(f"frames: {n + 1}/{frames} written ({time.perf_counter() - t1:.0f} s)")
    t_frames = time.perf_counter() - t1

    spot = prof_total.sum(1) >= threshold
    order = np.argsort(-contrib, axis=1)
    first = order[:, 0]
    top2 = np.take_along_axis(contrib, order[:, :2], 1) if n_grains > 1 else np.zeros((n_near, 2))
    second = np.where(top2[:, 1] >= 0.2 * top2[:, 0], order[:, min(1, n_grains - 1)], -1)
    truth = {"pixels": [np.stack([near_r[spot], near_c[spot]], 1)], "profiles": [prof_total[spot]],
             "grain": [first[spot]], "grain2": [second[spot]], "energy": [energy[spot]],
             "point": [np.zeros(int(spot.sum()), np.int64)]}
    grain_rows = [(0, g.top, g.thickness, g.decay) for g in grain_list]
    write_truth(out / TRUTH_FILE, truth, grain_rows, depth_um,
                 {"preset": preset, "seed": seed, "noise": noise, "points": 1, "frames_per_point": frames,
                  "background": background, "spot_fraction": spot_fraction, "method": "simulate_large",
                  **_pose_attrs(cfg, preset, film_depth, pose_error)})
    n_spot = int(spot.sum())
    return {"out_dir": str(out), "config": str(config_path), "truth": str(out / TRUTH_FILE),
            "frames": frames, "points": 1, "frames_per_point": frames, "region": list(reg),
            "spot_pixels": n_spot, "spot_fraction": n_spot / (h * w), "signal_pixels": n_near,
            "spots": len(spots), "grains": n_grains, "layout": "frames", "full_frames": full_frames,
            "chunks": list(chunks), "forward_seconds": t_forward, "frames_seconds": t_frames}
