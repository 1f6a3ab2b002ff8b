"""Calibration benchmark: time per stage and pose error reached, against a reference-style baseline.

Simulates two film scans (--region, --frames; --spots N for the issue's large scans) with a known pose
error, and a third film that the fit does not see, then

- laueflow's fit (laueflow.calibration): reading, code search, code fit, trace fit, film depths;
- the reference decoder's way: a grid search of dist alone, keeping the value that maximises the
  norm of the summed depth profile of the film pixels (each pixel's profile here its correlation
  with the code over the depth grid, a cheap decode), the other parameters left nominal.

Prints each stage's time and, for both, the error left in each pose parameter and the films'
apparent depths; for the fit also the third film's depths (share of its pixels within 1 um).

Usage: python benchmarks/bench_calibrate.py [--region 64] [--frames 201] [--spots N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from laueflow.calibration import fit as F
from laueflow.calibration.films import read_film
from laueflow.config import load
from laueflow.simulate import simulate, simulate_large

ERROR = {"cenx": 0.03, "dist": -0.04, "cenz": 0.02, "anglex": 0.3, "angley": 0.4, "anglez": -0.3}
DEPTHS = (20.0, 80.0)
CHECK_DEPTH = 50.0


def baseline_dist(cfg, films, grid_um: float = 100.0, steps: int = 41) -> tuple[float, float]:
    """The reference's calibrate: dist on a grid around the nominal value, maximising the norm of the
    summed depth profile; returns the best dist (mm) and the seconds taken."""
    t0 = time.perf_counter()
    setup_geo = F._problem(cfg, films, F.DEFAULT_FIT)
    theta = setup_geo.theta0.copy()
    depths = cfg.geo.source.depths * 1e3
    best, best_norm = theta[1], -np.inf
    for dist in theta[1] + np.linspace(-grid_um, grid_um, steps) * 1e-3:
        theta[1] = dist
        geo = F._geometry(setup_geo.geo, theta)
        total = np.zeros(depths.size)
        for f, c in zip(films, setup_geo.centres, strict=True):
            _, z, corr = F.look_positions(
                geo, setup_geo.mask, c, f.traces, f.frames, f.spots, f.depth_um, depths
            )
            hist, _ = np.histogram(
                z, bins=depths.size, range=(depths[0], depths[-1]), weights=np.clip(corr, 0, None)
            )
            total += hist
        norm = float(np.linalg.norm(total))
        if norm > best_norm:
            best, best_norm = dist, norm
    return float(best), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--region", type=int, default=64)
    ap.add_argument("--frames", type=int, default=201)
    ap.add_argument("--pixels", type=int, default=600)
    ap.add_argument("--out", type=Path)
    ap.add_argument(
        "--spots",
        type=int,
        help="Simulate with simulate_large and about this many spots (e.g. --region 900 --spots 20, the "
        "issue's calibration scans); default: simulate's spot density",
    )
    args = ap.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="bench_calibrate_"))
    t0 = time.perf_counter()
    scans = []
    for seed, depth in enumerate((*DEPTHS, CHECK_DEPTH)):
        folder = root / f"film_{depth:g}"
        if not (folder / "truth.h5").exists():
            kw = {
                "preset": "film",
                "film_depth": depth,
                "seed": seed,
                "frames": args.frames,
                "region": args.region,
                "pose_error": ERROR,
            }
            if args.spots:
                # about 100 spot pixels per spot (sigma 1.2-2.2 px, 2000-8000 counts over background 50)
                simulate_large(
                    folder, spot_fraction=100 * args.spots / args.region**2, full_frames=False, **kw
                )
            else:
                simulate(folder, **kw)
        scans.append(folder)
    check = scans.pop()
    print(
        f"simulate: {time.perf_counter() - t0:.1f} s ({args.region} x {args.region} px, {args.frames} frames)"
    )
    cfg = load(scans[0] / "config.yaml")
    with h5py.File(scans[0] / "truth.h5", "r") as f:
        truth = json.loads(f["truth"].attrs["focus"])
    t0 = time.perf_counter()
    films = [read_film(cfg, s, d, args.pixels) for s, d in zip(scans, DEPTHS, strict=True)]
    t_read = time.perf_counter() - t0
    result = F.fit_pose(cfg, films)
    print(
        f"laueflow fit: reading {t_read:.1f} s, "
        + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    )
    print(f"{'parameter':<10s} {'nominal err':>12s} {'fitted err':>12s} {'1-sigma':>10s} determined")
    for i, n in enumerate(result.names):
        print(
            f"{n:<10s} {result.nominal[i] - truth[n]:12.5f} {result.fitted[i] - truth[n]:12.5f} "
            f"{result.sigma[i]:10.2g} {bool(result.determined[i])}"
        )
    for film in result.films:
        print(
            f"film {film.depth_um:g} um: pixels within 1 um {film.within_1um_before:.0%} -> "
            f"{film.within_1um_after:.0%}"
        )
    # a film at a third depth, not used in the fit: its pixels' depths with the fitted pose
    third = read_film(cfg, check, CHECK_DEPTH, 100000)
    prob = F._problem(cfg, [third], F.DEFAULT_FIT)
    theta = prob.theta0.copy()
    theta[prob.fit] = result.fitted
    for what, pose in (("nominal", prob.theta0), ("fitted", theta)):
        _, z, _ = F.look_positions(
            F._geometry(prob.geo, pose),
            prob.mask,
            prob.centres[0],
            third.traces,
            third.frames,
            third.spots,
            CHECK_DEPTH,
            F._search_depths(cfg),
        )
        within = np.mean(np.abs(z - CHECK_DEPTH) <= 1)
        print(
            f"film at {CHECK_DEPTH:g} um (not fitted), {what} pose: {within:.1%} of {z.size} pixels within "
            f"1 um, median error {np.median(z - CHECK_DEPTH):+.2f} um"
        )
    dist, t_base = baseline_dist(cfg, films)
    print(
        f"baseline (grid search of dist): {t_base:.1f} s, dist error {dist - truth['dist']:+.5f} mm "
        f"(nominal {cfg.geo.mask.focus.dist - truth['dist']:+.5f}); the other parameters keep their nominal "
        "errors"
    )


if __name__ == "__main__":
    main()
