"""Accuracy of reconstructed depth profiles against a simulated scan's truth.

The figures of the reconstruction issue: centroid error, profile correlation, both depth peaks
found in two-grain pixels, coverage of spot pixels, and phantom intensity in background pixels.
Plain functions on arrays: the truth file is written and read by :mod:`laueflow.io.truth`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Truth:
    pixels: np.ndarray  # (n, 2) row, col
    depth: np.ndarray  # (J,) um
    profiles: np.ndarray  # (n, J)
    grain: np.ndarray
    second_grain: np.ndarray
    energy: np.ndarray
    point: np.ndarray
    grain_top: np.ndarray  # per grain id, um
    grain_thickness: np.ndarray
    grain_decay: np.ndarray

    def for_point(self, k: int) -> Truth:
        m = self.point == k
        return Truth(
            self.pixels[m],
            self.depth,
            self.profiles[m],
            self.grain[m],
            self.second_grain[m],
            self.energy[m],
            self.point[m],
            self.grain_top,
            self.grain_thickness,
            self.grain_decay,
        )


@dataclass
class Scores:
    spot_pixels: int
    covered: float  # fraction of spot pixels with a non-zero reconstructed profile
    centroid_median: float  # um
    within_2um: float  # fraction of spot pixels with centroid error <= 2 um
    correlation_mean: float
    two_grain_pixels: int
    both_peaks: float  # fraction of two-grain pixels with both depth peaks found
    background_pixels: int
    phantom: float  # mean reconstructed intensity in background pixels relative to the spot pixels' mean
    finite: bool

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        s = (
            f"{self.spot_pixels} spot pixels, covered {self.covered:.1%}, centroid error median "
            f"{self.centroid_median:.2f} um, within 2 um {self.within_2um:.1%}, correlation "
            f"{self.correlation_mean:.3f}"
        )
        if self.two_grain_pixels:
            s += f", both peaks found in {self.both_peaks:.1%} of {self.two_grain_pixels} two-grain pixels"
        return s + f", phantom {self.phantom:.3%}"


def centroids(profiles: np.ndarray, depth: np.ndarray) -> np.ndarray:
    tot = profiles.sum(axis=1)
    return np.where(tot > 0, profiles @ depth / np.where(tot > 0, tot, 1), np.nan)


def correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > 0, (a * b).sum(axis=1) / np.where(den > 0, den, 1), 0.0)


def peak_found(
    profile: np.ndarray, depth: np.ndarray, at: float, frac: float = 0.2, tol: float = 5.0
) -> bool:
    """A local maximum of at least ``frac`` of the profile maximum within ``tol`` um of ``at``."""
    p = profile
    if p.max() <= 0:
        return False
    left = np.concatenate([[-np.inf], p[:-1]])
    right = np.concatenate([p[1:], [-np.inf]])
    is_max = (p >= left) & (p >= right) & (p >= frac * p.max()) & (p > 0)
    return bool((is_max & (np.abs(depth - at) <= tol)).any())


def score(truth: Truth, rows: np.ndarray, cols: np.ndarray, profiles: np.ndarray) -> Scores:
    """Compare reconstructed profiles (one per pixel rows/cols) with the truth of one point."""
    key = {(int(r), int(c)): i for i, (r, c) in enumerate(zip(rows, cols, strict=True))}
    n_depth = truth.depth.size
    rec = np.zeros((len(truth.pixels), n_depth))
    have = np.zeros(len(truth.pixels), bool)
    for i, (r, c) in enumerate(truth.pixels):
        j = key.get((int(r), int(c)))
        if j is not None:
            rec[i] = profiles[j]
            have[i] = profiles[j].sum() > 0
    err = np.abs(centroids(rec, truth.depth) - centroids(truth.profiles, truth.depth))
    err = np.where(have, err, np.inf)
    corr = np.where(have, correlations(rec, truth.profiles), 0.0)
    two = np.flatnonzero(truth.second_grain >= 0)
    found = []
    for i in two:
        peaks = []
        for gid in (truth.grain[i], truth.second_grain[i]):
            top, th, dec = truth.grain_top[gid], truth.grain_thickness[gid], truth.grain_decay[gid]
            peaks.append(top + (th / 2 if dec <= 0 else 0.0))
        found.append(all(peak_found(rec[i], truth.depth, p) for p in peaks))
    spot = set(key) & {(int(r), int(c)) for r, c in truth.pixels}
    bg = [j for k, j in key.items() if k not in spot]
    spot_mean = float(np.mean([profiles[key[k]].sum() for k in spot])) if spot else 0.0
    phantom = float(profiles[bg].sum(axis=1).mean() / spot_mean) if bg and spot_mean > 0 else 0.0
    return Scores(
        spot_pixels=len(truth.pixels),
        covered=float(have.mean()) if have.size else 0.0,
        centroid_median=float(np.median(err)) if err.size else float("nan"),
        within_2um=float((err <= 2.0).mean()) if err.size else 0.0,
        correlation_mean=float(corr.mean()) if corr.size else 0.0,
        two_grain_pixels=len(two),
        both_peaks=float(np.mean(found)) if found else 0.0,
        background_pixels=len(bg),
        phantom=phantom,
        finite=bool(np.isfinite(profiles).all()),
    )
