"""Attenuation and energy: the attenuation levels that share a dictionary, the contrast of a pixel's
trace and of each of its depth components, the contrasts the energy range allows, and the energy that
a fitted contrast implies (where it is unambiguous across the Au L edges)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .. import geometry as G
from ..forward import Setup
from ..mask import mu_thickness

# attenuation levels (mu along the path) that share a dictionary: within a level the bar-edge shape
# differs by too little to move a depth; the contrast itself is free in every level
MU_LEVELS = np.geomspace(0.05, 5.0, 26)  # ratio 1.2 between levels


def nearest_level(mu):
    """Index of the attenuation level nearest (in log) to mu."""
    return np.abs(np.log(np.asarray(mu, float))[..., None] - np.log(MU_LEVELS)).argmin(axis=-1)


def trace_contrast(
    y: np.ndarray, background: np.ndarray, sigma: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Contrast straight from the traces: (high - low) / (high - background), from robust quantiles
    of the 3-frame running mean; reliable where the signal stands well above the noise."""
    sm = (y[:, :-2] + y[:, 1:-1] + y[:, 2:]) / 3
    hi = np.percentile(sm, 97, axis=1)
    lo = np.percentile(sm, 3, axis=1)
    above = hi - background
    c = np.where(above > 0, (hi - lo) / np.maximum(above, 1e-9), np.nan)
    return c, above > 20 * sigma / np.sqrt(3)


def component_contrasts(
    h: np.ndarray,
    labels: np.ndarray,
    total_f: np.ndarray,
    ri: np.ndarray,
    ci: np.ndarray,
    c_range: tuple[float, float],
    radius: int = 2,
) -> np.ndarray:
    """Contrast of each depth component of pixels that see several (NaN where it cannot be told).

    Components of one pixel usually come from different grains, whose spots have different energies,
    hence different contrasts c.  Over a pixel's neighbourhood the spots keep their energies but not
    their relative weights, so the intensity above background F_q = sum_c h_qc / c_c (h_qc: pixel q's
    modulation within component c's depths) is linear in the 1/c_c: a small least-squares fit.
    Returns (P, C+1) indexed by label."""
    n_lab = int(labels.max()) + 1
    out = np.full((h.shape[0], n_lab), np.nan)
    grid = -np.ones((ri.max() + 1, ci.max() + 1), int)
    grid[ri, ci] = np.arange(h.shape[0])
    lo, hi = 1.0 / c_range[1], 1.0 / max(c_range[0], 1e-6)
    for p in np.flatnonzero(labels.max(axis=1) >= 2):
        labs = np.unique(labels[p][labels[p] > 0])
        near = grid[
            max(ri[p] - radius, 0) : ri[p] + radius + 1, max(ci[p] - radius, 0) : ci[p] + radius + 1
        ].ravel()
        near = near[near >= 0]
        masks = labels[p][None, :] == labs[:, None]  # (C, K)
        # (Q, C): each neighbour's modulation within this pixel's components
        a = np.einsum("qk,ck->qc", h[near], masks)
        inside = a.sum(axis=1)
        ok = (inside > 0.9 * h[near].sum(axis=1)) & (total_f[near] > 0)  # nothing elsewhere in q
        if ok.sum() < len(labs) + 2:
            continue
        a, f = a[ok], total_f[near][ok]
        if np.linalg.cond(a / np.maximum(np.linalg.norm(a, axis=0), 1e-12)) > 30:
            continue  # the components keep the same ratio everywhere: contrasts not separable
        x, *_ = np.linalg.lstsq(a, f, rcond=None)
        if np.all((x >= lo) & (x <= hi)):
            out[p, labs] = 1.0 / x
    return out


_ENERGY_GRID = np.linspace(4.0, 80.0, 761)


@lru_cache(maxsize=16)
def _grid_mu(thickness: float, low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """Energies of the grid within [low, high] keV and mu t of gold at each (cached: xraydb is slow)."""
    e = _ENERGY_GRID[(_ENERGY_GRID >= low) & (_ENERGY_GRID <= high)]
    return e, mu_thickness(e, thickness)


def contrast_range(
    setup: Setup, energy_range: tuple[float, float], path_factor: np.ndarray
) -> tuple[float, float]:
    """Lowest and highest contrast any energy of ``energy_range`` (keV) gives (with 10 % slack)."""
    _, mu = _grid_mu(setup.geo.thickness, *energy_range)
    c = -np.expm1(-np.multiply.outer(path_factor, mu))
    return float(c.min() * 0.9), float(min(c.max() * 1.1, 1.0))


def refine_attenuation(chis: np.ndarray, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mu at the minimum of a parabola through chi-square at levels centre-1, centre, centre+1 (in
    log mu), and its 1-sigma uncertainty in log mu; NaN where the three are not all finite or the
    parabola opens downwards.  A minimum outside the bracket is clipped to it."""
    rows = np.arange(chis.shape[0])
    lo, mid, hi = chis[rows, centre - 1], chis[rows, centre], chis[rows, centre + 1]
    step = np.log(MU_LEVELS[1] / MU_LEVELS[0])
    with np.errstate(all="ignore"):  # pixels not fitted have infinite chi-square
        curv = (lo - 2 * mid + hi) / step**2
        offset = np.clip(step * (lo - hi) / (2 * (lo - 2 * mid + hi)), -step, step)
        ok = np.isfinite(lo) & np.isfinite(mid) & np.isfinite(hi) & (curv > 0)
        mu = np.where(ok, np.exp(np.log(MU_LEVELS[centre]) + offset), np.nan)
        sig = np.where(ok, np.sqrt(2.0 / curv), np.nan)
    return mu, sig


def estimate_energy(
    setup: Setup, energy_range: tuple[float, float], rows, cols, c, c_sigma, usable
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Energy from the fitted contrast, only where it is unambiguous.

    The contrast c = 1 - exp(-mu(E) t / cos) is not monotonic in E across the Au L edges, so a
    contrast with its uncertainty (2 sigma, plus 2 % for the model) maps to a set of energies; a single
    connected set gives the energy (its middle) and uncertainty (half its width); several sets, or one
    spanning more than half the range, are reported as ambiguous."""
    lo_e, hi_e = energy_range
    e, mu = _grid_mu(setup.geo.thickness, lo_e, hi_e)
    pf = G.pixel_optics(setup.geo, G.pixel_centres(setup.geo, rows, cols)).path_factor
    c_of_e = -np.expm1(-np.multiply.outer(pf, mu))  # (P, E)
    tol = 2 * np.nan_to_num(c_sigma, nan=1.0) + 0.02
    energy = np.full(len(rows), np.nan)
    esig = np.full(len(rows), np.nan)
    ambiguous = np.zeros(len(rows), bool)
    for i in np.flatnonzero(usable):
        ok = np.abs(c_of_e[i] - c[i]) <= tol[i]
        if not ok.any():
            continue
        runs = np.flatnonzero(np.diff(np.concatenate([[0], ok.astype(int), [0]])) != 0).reshape(-1, 2)
        a, b = e[runs[0, 0]], e[runs[-1, 1] - 1]
        if len(runs) > 1 or b - a > 0.5 * (hi_e - lo_e):
            ambiguous[i] = True
            continue
        energy[i], esig[i] = (a + b) / 2, max((b - a) / 2, e[1] - e[0])
    return energy, esig, ambiguous
