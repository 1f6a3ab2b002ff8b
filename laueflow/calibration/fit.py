"""The mask pose from thin-film scans: a Levenberg-Marquardt fit of the forward model to film traces.

A thin film at a known depth z_f sends to each bright pixel p the trace

    I_n = a_p + b_p g_n + c_p e_n,   g_n = <gold(u_n(z))>,  e_n = <gold(u_n(z)) (1 - gold(u_n(z)))>,

with <.> the mean over the film's thickness and gold(u) the thick-bar gold fraction (model.md
section 3): exp(-mu gold) to second order, so that amplitude, background and contrast (the energy)
stay free per pixel.  Given the pose they are solved in closed form by weighted least squares
(variable projection), so the fit itself has only the 6-8 pose parameters.  Residuals are weighted
by the inverse Poisson variance; the Jacobian over the pose comes from ``jax.jacfwd``.

Coarse to fine, because the code's bars are 7.5 um wide and the pose may be off by 50 um:

1. each pixel's apparent film depth at the nominal pose (the depth whose code trace correlates best
   with its trace), which says where on the code the pixel really looks;
2. a fit of the pose that puts the film's code coordinate there (one smooth equation per pixel,
   outliers rejected);
3. the fit of every trace, frame by frame, from that start.

Uncertainties come from the curvature (J^T W J)^-1 times the reduced chi-square.  Directions of the
pose that the data do not fix (1-sigma beyond the plausible error :data:`SCALE`) are named, held at
their nominal values and left out of the final fit.  NumPy at the edges, JAX inside; no file I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import __version__
from .. import geometry as G
from ..config import Config
from ..errors import CalibrationError, CalibrationFailed
from ..forward import Setup
from ..mask import Mask, gold_before, gold_fraction, gold_fraction_np

PARAMETERS = ("cenx", "dist", "cenz", "anglex", "angley", "anglez", "shift", "thickness")
DEFAULT_FIT = PARAMETERS[:6]
UNITS = {
    "cenx": "mm",
    "dist": "mm",
    "cenz": "mm",
    "anglex": "deg",
    "angley": "deg",
    "anglez": "deg",
    "shift": "mm",
    "thickness": "um",
}
# plausible error of each parameter before calibration: the fit works in these units, and a direction
# whose 1-sigma exceeds UNDETERMINED of them is not determined by the data
SCALE = {
    "cenx": 0.05,
    "dist": 0.05,
    "cenz": 0.05,
    "anglex": 0.5,
    "angley": 0.5,
    "anglez": 0.5,
    "shift": 0.05,
    "thickness": 1.0,
}
UNDETERMINED = 1.0
# a fit that moves a parameter further than this from the nominal value has landed on a bound
BOUND = {
    "cenx": 1.0,
    "dist": 1.0,
    "cenz": 1.0,
    "anglex": 5.0,
    "angley": 5.0,
    "anglez": 5.0,
    "shift": 1.0,
    "thickness": 5.0,
}
FILM_THICKNESS = 1.5  # um, assumed when the caller gives none
SCAN_MARGIN = 100.0  # um beyond the depth grid searched for the apparent film depth
MIN_CORRELATION = 0.3  # a pixel whose trace correlates less with every film depth is dropped
CHI2_LIMIT = 4.0  # reduced chi-square above which the model does not describe the traces
MIN_PIXELS = 12


@dataclass(frozen=True)
class Film:
    """The bright pixels of one thin-film scan: what the fit needs of it."""

    rows: np.ndarray  # (P,) detector rows
    cols: np.ndarray  # (P,) detector columns
    traces: np.ndarray  # (P, N) counts per frame (monitor-normalised)
    spots: np.ndarray  # (P,) spot label of each pixel
    depth_um: float  # the film's centre on the output depth axis
    frames: np.ndarray  # (N,) frame offsets (0, step, ...)
    name: str = ""


@dataclass(frozen=True)
class SpotDepths:
    """A film's apparent depth per spot (median over its pixels), at the nominal and the fitted pose."""

    film: str
    depth_um: float
    spots: np.ndarray  # labels
    pixels: np.ndarray  # pixels per spot
    before: np.ndarray  # um
    after: np.ndarray  # um
    within_1um_before: float  # share of the film's pixels within 1 um of its depth
    within_1um_after: float


@dataclass
class Calibration:
    """The fitted pose, its uncertainties and how well the data determine it."""

    names: tuple[str, ...]
    nominal: np.ndarray  # config units (mm, deg, um)
    fitted: np.ndarray
    sigma: np.ndarray  # 1-sigma, config units; NaN where not determined
    determined: np.ndarray  # bool
    correlation: np.ndarray  # (n, n) within the determined subspace
    undetermined: list[str]  # one line per undetermined direction, naming its parameters
    chi2_red: float
    iterations: int
    pixels: int
    films: list[SpotDepths] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def values(self) -> dict[str, float]:
        """The fitted parameters by name (config units)."""
        return {n: float(v) for n, v in zip(self.names, self.fitted, strict=True)}

    def strong_correlations(self, limit: float = 0.9) -> list[tuple[str, str, float]]:
        """Pairs of determined parameters with |correlation| >= limit."""
        out = []
        for i in range(len(self.names)):
            for j in range(i + 1, len(self.names)):
                rho = self.correlation[i, j]
                if self.determined[i] and self.determined[j] and abs(rho) >= limit:
                    out.append((self.names[i], self.names[j], float(rho)))
        return out

    def record(self, nominal: str | Path, scans: Sequence[str | Path], film_depths: Sequence[float],
               when: datetime | None = None) -> dict[str, Any]:
        """The ``calibration`` record of the calibrated configuration, in plain YAML types: the laueflow
        version and date (``when``, default now; UTC), the nominal file and the film scans (as given: the
        caller passes absolute paths) with their film depths (um), the nominal values, uncertainties and
        what the scans left open, and each film's apparent depth per spot (median over its pixels) at the
        nominal and the fitted pose."""
        if len(scans) != len(film_depths):
            raise CalibrationError(f"one film depth per scan: {len(scans)} scans, {len(film_depths)} depths")
        names = self.names
        return {
            "by": f"laueflow {__version__} calibrate",
            "date": (when or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "nominal": str(nominal),
            "scans": [{"path": str(s), "film_depth_um": float(d)}
                      for s, d in zip(scans, film_depths, strict=True)],
            "fitted": list(names),
            "nominal_values": {n: float(v) for n, v in zip(names, self.nominal, strict=True)},
            "sigma": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, self.sigma, strict=True)},
            "not_determined": [n for n, d in zip(names, self.determined, strict=True) if not d],
            "reduced_chi_square": float(self.chi2_red),
            "pixels": int(self.pixels),
            "films": [
                {"film": str(f.film), "film_depth_um": float(f.depth_um), "spots": [int(s) for s in f.spots],
                 "pixels": [int(n) for n in f.pixels], "before_um": [round(float(b), 3) for b in f.before],
                 "after_um": [round(float(a), 3) for a in f.after],
                 "within_1um_before": float(f.within_1um_before),
                 "within_1um_after": float(f.within_1um_after)}
                for f in self.films
            ],
        }


# ----------------------------------------------------------------------------------------------
# The model (JAX)


@dataclass(frozen=True)
class _Constants:
    """What the model needs of the set-up besides the pose (JAX arrays)."""

    scan_dir: jnp.ndarray
    step_mm: float
    code_length: float
    beta: float
    offset: float
    bars: jnp.ndarray
    gold: jnp.ndarray


def _rotation(deg, axis: int):
    c, s = jnp.cos(jnp.radians(deg)), jnp.sin(jnp.radians(deg))
    one, zero = jnp.ones_like(c), jnp.zeros_like(c)
    if axis == 0:
        rows = [[one, zero, zero], [zero, c, -s], [zero, s, c]]
    elif axis == 1:
        rows = [[c, zero, s], [zero, one, zero], [-s, zero, c]]
    else:
        rows = [[c, -s, zero], [s, c, zero], [zero, zero, one]]
    return jnp.stack([jnp.stack(r) for r in rows])


def _mask_axes(anglex, angley, anglez):
    """m_x and m_y of R_m = R_y R_z R_x (geometry.mask_rotation, differentiable in the angles)."""
    r = _rotation(angley, 1) @ _rotation(anglez, 2) @ _rotation(anglex, 0)
    return r[:, 0], r[:, 1]


def _code_coordinates(theta, p, z_mm, frames, k: _Constants):
    """u[N, K] (um) of pixel centre p (3,) for depths z_mm (K,) at frames (N,), pose theta (PARAMETERS)."""
    cenx, dist, cenz, ax, ay, az, shift, _ = (theta[i] for i in range(len(PARAMETERS)))
    m_x, m_y = _mask_axes(ax, ay, az)
    c = jnp.stack([cenx, dist, cenz]) + (shift + frames * k.step_mm)[:, None] * k.scan_dir[None, :]
    s = jnp.stack([z_mm + k.offset, k.beta * z_mm, jnp.zeros_like(z_mm)], axis=-1)
    return G.code_coordinate(p[None, None, :], s[None, :, :], c[:, None, :], m_x, m_y, k.code_length)


def _film_basis(theta, p, depth_mm, thickness_mm, frames, k: _Constants):
    """(N, 3) columns 1, <gold>, <gold (1 - gold)> of a film of that thickness centred at depth_mm,
    averaged over the film's sub-samples (geometry.SUBSAMPLE_OFFSETS across its thickness)."""
    n_sub = G.SUBSAMPLE_OFFSETS.size
    offsets = jnp.asarray(G.SUBSAMPLE_OFFSETS)
    z = depth_mm + thickness_mm * jnp.concatenate([offsets, jnp.array([-0.5, 0.5])])
    u_all = _code_coordinates(theta, p, z, frames, k)
    u = u_all[:, :n_sub]
    m_x, m_y = _mask_axes(theta[3], theta[4], theta[5])
    blur = theta[7] * jnp.abs(jnp.dot(p, m_x) / jnp.dot(p, m_y))
    # each sub-sample stands for a slab of the film: its window is the bar blur plus the slab's extent
    slab = jnp.abs(u_all[0, -1] - u_all[0, -2]) / n_sub
    gold = gold_fraction(u, blur + slab, k.bars, k.gold)
    return jnp.stack([jnp.ones(u.shape[0], u.dtype), gold.mean(1), (gold * (1 - gold)).mean(1)], axis=1)


def _project(basis, y, sw):
    """Weighted residual of y after the least-squares fit of the basis columns (variable projection)."""
    a = basis * sw[:, None]
    b = y * sw
    gram = a.T @ a
    ridge = 1e-9 * jnp.trace(gram) / 3 * jnp.eye(3, dtype=gram.dtype)
    coef = jnp.linalg.solve(gram + ridge, a.T @ b)
    return b - a @ coef


# ----------------------------------------------------------------------------------------------
# Set-up


@dataclass(frozen=True)
class _Problem:
    """The fit's fixed inputs: nominal pose, chosen parameters and their scales, constants, films."""

    theta0: np.ndarray  # all PARAMETERS, config units (thickness in um)
    fit: np.ndarray  # indices into PARAMETERS
    scale: np.ndarray  # of the fitted ones
    consts: _Constants
    geo: G.Geometry
    mask: Mask
    films: list[Film]
    centres: list[np.ndarray]  # (P, 3) per film

    def theta(self, x, basis=None, base=None):
        """Full pose (JAX, config units with positions in mm) from scaled fitted offsets x."""
        x = x if basis is None else base + basis @ x
        t = jnp.asarray(self.theta0).at[self.fit].add(x * jnp.asarray(self.scale))
        return t


def nominal_pose(cfg: Config) -> np.ndarray:
    """The configuration's values of :data:`PARAMETERS` (mm, degrees, um)."""
    f, m = cfg.geo.mask.focus, cfg.geo.mask
    return np.array([f.cenx, f.dist, f.cenz, f.anglex, f.angley, f.anglez, m.shift, m.thickness], float)


def _problem(cfg: Config, films: list[Film], fit: tuple[str, ...]) -> _Problem:
    setup = Setup.from_config(cfg)
    geo = setup.geo
    consts = _Constants(
        scan_dir=jnp.asarray(geo.scan_dir),
        step_mm=geo.step_mm,
        code_length=geo.code_length,
        beta=geo.beta,
        offset=geo.offset,
        bars=jnp.asarray(setup.mask.bars),
        gold=jnp.asarray(gold_before(setup.mask.bars)),
    )
    idx = np.array([PARAMETERS.index(n) for n in fit])
    centres = [G.pixel_centres(geo, f.rows, f.cols) for f in films]
    return _Problem(
        theta0=nominal_pose(cfg),
        fit=idx,
        scale=np.array([SCALE[n] for n in fit]),
        consts=consts,
        geo=geo,
        mask=setup.mask,
        films=films,
        centres=centres,
    )


# ----------------------------------------------------------------------------------------------
# Stage 1: where on the code each pixel looks


def _geometry(geo: G.Geometry, theta: np.ndarray) -> G.Geometry:
    """``geo`` with the pose ``theta`` (:data:`PARAMETERS`, config units)."""
    cenx, dist, cenz, ax, ay, az, shift, thickness = (float(v) for v in theta)
    return replace(
        geo,
        mask_rot=G.mask_rotation(ax, ay, az),
        mask_centre=np.array([cenx, dist, cenz]),
        shift_mm=shift,
        thickness=thickness,
        anglez=np.radians(az),
    )


def look_positions(
    geo: G.Geometry,
    mask: Mask,
    centres: np.ndarray,
    traces: np.ndarray,
    frames: np.ndarray,
    spots: np.ndarray,
    film_um: float,
    search_um: np.ndarray,
    thickness_um: float = FILM_THICKNESS,
    step: float = 0.25,
):
    """Where on the code each pixel sees the film: its code coordinate at the first frame (um), found as
    the position whose code trace correlates best with the pixel's trace, and the pixel's apparent film
    depth (um) at this geometry, with that correlation.

    The code traces are shared by a spot's pixels (their rays differ by a fraction of a degree):
    gold(u + delta_n) over a grid of u, with delta_n the code's shift at frame n, so the search is one
    matrix product per spot.  Each pixel searches the code positions of the depths ``search_um``."""
    n_p = len(centres)
    u0 = np.zeros(n_p)
    best = np.full(n_p, -1.0)
    depth = np.zeros(n_p)
    z_mm = np.asarray(search_um) * 1e-3
    film = np.array([film_um - thickness_um / 2, film_um, film_um + thickness_um / 2]) * 1e-3
    blur = G.pixel_optics(geo, centres).blur
    for s in np.unique(spots):
        idx = np.flatnonzero(spots == s)
        u_z = np.asarray(G.code_coordinates(geo, centres[idx], z_mm, frames[:1]))[:, 0, :]  # (P_s, J)
        ref = np.asarray(G.code_coordinates(geo, centres[idx[:1]], film, frames))[0]  # (N, 3)
        delta = ref[:, 1] - ref[0, 1]
        width = float(np.median(blur[idx])) + abs(ref[0, 2] - ref[0, 0])
        grid = np.arange(u_z.min(), u_z.max() + step, step)
        code = gold_fraction_np(grid[None, :] + delta[:, None], width, mask)  # (N, U)
        code = code - code.mean(0)
        y = traces[idx] - traces[idx].mean(1, keepdims=True)
        norms = np.linalg.norm(y, axis=1)[:, None] * np.linalg.norm(code, axis=0)[None, :]
        corr = -(y @ code) / (norms + 1e-30)
        lo, hi = u_z.min(1), u_z.max(1)
        corr = np.where((grid[None, :] >= lo[:, None]) & (grid[None, :] <= hi[:, None]), corr, -1.0)
        j = np.clip(np.argmax(corr, axis=1), 1, grid.size - 2)
        r = np.arange(idx.size)
        a, b, c = corr[r, j - 1], corr[r, j], corr[r, j + 1]
        den = a - 2 * b + c
        frac = np.where(den < 0, 0.5 * (a - c) / np.where(den < 0, den, 1.0), 0.0)
        u0[idx] = grid[j] + np.clip(frac, -0.5, 0.5) * step
        best[idx] = b
        for k, i in enumerate(idx):  # u is monotonic in depth along one ray
            order = np.argsort(u_z[k])
            depth[i] = np.interp(u0[i], u_z[k][order], search_um[order])
    return u0, depth, best


def _search_depths(cfg: Config) -> np.ndarray:
    grid = cfg.geo.source.depths * 1e3
    step = min(float(grid[1] - grid[0]), 1.0) if grid.size > 1 else 1.0
    return np.arange(grid[0] - SCAN_MARGIN, grid[-1] + SCAN_MARGIN + step / 2, step)


# ----------------------------------------------------------------------------------------------
# Levenberg-Marquardt


@dataclass
class _Fit:
    x: np.ndarray
    r: np.ndarray
    jac: np.ndarray
    iterations: int
    converged: bool


def _levenberg_marquardt(
    residual: Callable, n: int, max_iter: int = 50, tol: float = 1e-4, chi2_tol: float = 1e-2
) -> _Fit:
    """Minimise |residual(x)|^2 over x (n,) from 0: damped Gauss-Newton steps, Jacobian by jax.jacfwd.

    Converged when a step moves no scaled parameter by more than ``tol`` (of its plausible error) or
    lowers the chi-square by less than ``chi2_tol`` (a hundredth of one standard deviation's worth)."""
    fun = jax.jit(residual)
    jac = jax.jit(jax.jacfwd(residual))
    x = np.zeros(n)
    r = np.asarray(fun(jnp.asarray(x)))
    chi2 = float(r @ r)
    jm = np.asarray(jac(jnp.asarray(x)))
    lam = 1e-3
    for it in range(1, max_iter + 1):
        h, g = jm.T @ jm, jm.T @ r
        scale = max(float(np.trace(h)) / n, 1e-30)
        for _ in range(30):
            step = -np.linalg.solve(h + lam * scale * np.eye(n), g)
            r_new = np.asarray(fun(jnp.asarray(x + step)))
            chi2_new = float(r_new @ r_new)
            if np.isfinite(chi2_new) and chi2_new <= chi2:
                break
            lam *= 4.0
        else:
            return _Fit(x, r, jm, it, False)
        gain = chi2 - chi2_new
        x, r, chi2 = x + step, r_new, chi2_new
        jm = np.asarray(jac(jnp.asarray(x)))
        lam = max(lam / 3.0, 1e-9)
        if np.max(np.abs(step)) < tol or gain < chi2_tol:
            return _Fit(x, r, jm, it, True)
    return _Fit(x, r, jm, max_iter, False)


# ----------------------------------------------------------------------------------------------
# The fit


def _trace_residual(prob: _Problem, basis=None, base=None) -> Callable:
    """Poisson-weighted projected residuals of every film pixel, as a function of scaled offsets."""
    data = []
    for film, centres in zip(prob.films, prob.centres, strict=True):
        y = np.asarray(film.traces, np.float64)
        sw = 1.0 / np.sqrt(np.maximum(y, 1.0))
        data.append(
            (
                jnp.asarray(centres),
                jnp.asarray(y),
                jnp.asarray(sw),
                film.depth_um * 1e-3,
                jnp.asarray(film.frames, dtype=jnp.float64),
            )
        )
    k = prob.consts

    def residual(x):
        theta = prob.theta(x, basis, base)
        parts = []
        for centres, y, sw, depth, frames in data:

            def one(p, yy, ss, depth=depth, frames=frames):
                b = _film_basis(theta, p, depth, FILM_THICKNESS * 1e-3, frames, k)
                return _project(b, yy, ss)

            parts.append(jax.vmap(one)(centres, y, sw).ravel())
        return jnp.concatenate(parts)

    return residual


def _code_residual(prob: _Problem, keep: list[np.ndarray], targets: list[np.ndarray]) -> Callable:
    """Code coordinate of each film's centre at the first frame minus where its pixel looks (um)."""
    k = prob.consts
    data = [
        (
            jnp.asarray(c[m]),
            jnp.asarray(t[m]),
            f.depth_um * 1e-3,
            jnp.asarray(f.frames[:1], dtype=jnp.float64),
        )
        for f, c, m, t in zip(prob.films, prob.centres, keep, targets, strict=True)
    ]

    def residual(x):
        theta = prob.theta(x)
        parts = []
        for centres, target, depth, first in data:

            def u(p, depth=depth, first=first):
                return _code_coordinates(theta, p, jnp.array([depth]), first, k)[0, 0]

            parts.append(jax.vmap(u)(centres) - target)
        return jnp.concatenate(parts)

    return residual


def _times(ratio: float) -> str:
    return f"{ratio:.1f} x" if ratio < 1000 else "over 1000 x"


def _directions(jm: np.ndarray, chi2_red: float, names: tuple[str, ...]):
    """Eigen-decomposition of the scaled Fisher matrix: the determined subspace, its covariance (scaled
    units) and a line per undetermined direction naming the parameters it mixes."""
    h = jm.T @ jm
    evals, evecs = np.linalg.eigh(h)
    sig = np.sqrt(chi2_red / np.maximum(evals, 1e-300))
    det = sig <= UNDETERMINED
    v = evecs[:, det]
    cov = (v / evals[det]) @ v.T * chi2_red
    lines = []
    for i in np.flatnonzero(~det):
        vec = evecs[:, i]
        big = np.argsort(-np.abs(vec))
        parts = [names[j] for j in big if abs(vec[j]) >= 0.3]
        if len(parts) == 1:
            lines.append(
                f"{parts[0]} is not determined by these scans (1-sigma {_times(sig[i])} its "
                "plausible error); kept at its nominal value"
            )
        else:
            combo = " ".join(
                f"{'+' if vec[j] * vec[big[0]] > 0 else '-'}{names[j]}" for j in big if abs(vec[j]) >= 0.3
            ).lstrip("+")
            lines.append(
                f"{', '.join(parts)} trade off (direction {combo}, 1-sigma {_times(sig[i])} the "
                "plausible errors): that combination is kept at its nominal value"
            )
    return det, evecs, cov, lines


def fit_pose(
    cfg: Config,
    films: list[Film],
    fit: tuple[str, ...] = DEFAULT_FIT,
    progress: Callable[[str], None] | None = None,
) -> Calibration:
    """Fit the mask pose of ``cfg`` (the nominal one) to thin-film scans; see the module docstring.

    ``progress`` receives a line per stage and each warning (also kept in the result's ``warnings``).

    Raises CalibrationError for input the fit cannot use (no film pixels, unknown parameters), and
    CalibrationFailed when the fit ran but did not converge, landed on a bound or does not describe
    the traces.
    """
    say = progress or (lambda line: None)
    bad = [n for n in fit if n not in PARAMETERS]
    if bad or not fit:
        raise CalibrationError(
            f"cannot fit {', '.join(bad) or 'nothing'}; choose from {', '.join(PARAMETERS)}"
        )
    if not films:
        raise CalibrationError("no film scans given")
    for f in films:
        if len(f.rows) < MIN_PIXELS:
            raise CalibrationError(
                f"{f.name or 'a film scan'}: only {len(f.rows)} bright film pixels; "
                f"need {MIN_PIXELS} or more (is there a film in this scan?)"
            )
    seconds: dict[str, float] = {}
    warn: list[str] = []
    if len({round(f.depth_um, 6) for f in films}) < 2:
        warn.append(
            "all scans have the film at one depth: the depth scale rests on the nominal geometry "
            "alone; give two or more scans at different film depths to fix it"
        )
    for line in warn:  # said now: they matter also when the fit fails
        say(f"warning: {line}")
    with jax.enable_x64(True):
        prob = _problem(cfg, films, tuple(fit))
        search = _search_depths(cfg)

        # 1. where on the code each pixel looks, and its apparent film depth at the nominal pose
        t0 = time.perf_counter()
        geo0 = _geometry(prob.geo, prob.theta0)
        before, targets, keep = [], [], []
        for f, c in zip(films, prob.centres, strict=True):
            u0, z, corr = look_positions(geo0, prob.mask, c, f.traces, f.frames, f.spots, f.depth_um, search)
            before.append(z)
            targets.append(u0)
            keep.append(corr >= MIN_CORRELATION)
        if sum(int(k.sum()) for k in keep) < MIN_PIXELS:
            raise CalibrationError(
                f"only {sum(int(k.sum()) for k in keep)} pixels carry the code's pattern "
                f"(correlation >= {MIN_CORRELATION}); are these film scans?"
            )
        seconds["code search"] = time.perf_counter() - t0
        say(f"where each pixel looks on the code: {seconds['code search']:.1f} s")

        # 2. the pose that puts each film where its pixels look, outliers rejected
        t0 = time.perf_counter()
        n = len(fit)
        start = np.zeros(n)
        for _ in range(4):
            first = _levenberg_marquardt(_code_residual(prob, keep, targets), n, max_iter=100)
            start = first.x
            geo = _geometry(prob.geo, np.asarray(prob.theta(jnp.asarray(start))))
            changed = False
            for i, (f, c) in enumerate(zip(films, prob.centres, strict=True)):
                u = np.asarray(G.code_coordinates(geo, c, np.array([f.depth_um * 1e-3]), f.frames[:1]))[
                    :, 0, 0
                ]
                err = np.abs(u - targets[i])
                med = np.median(err[keep[i]]) if keep[i].any() else 0.0
                new = keep[i] & (err <= max(3.0, 5 * 1.4826 * med))
                changed |= bool((new != keep[i]).any())
                keep[i] = new
            if not changed:
                break
        seconds["code fit"] = time.perf_counter() - t0
        _check_bounds(fit, prob.theta0[prob.fit], np.asarray(prob.theta(jnp.asarray(start)))[prob.fit])
        say(f"start from the code coordinates: {seconds['code fit']:.1f} s")

        # 3. every trace, frame by frame, from that start; then without the undetermined directions
        t0 = time.perf_counter()
        used = [
            Film(f.rows[k], f.cols[k], f.traces[k], f.spots[k], f.depth_um, f.frames, f.name)
            for f, k in zip(films, keep, strict=True)
        ]
        prob = _problem(cfg, used, tuple(fit))
        n_pix = sum(len(f.rows) for f in used)
        base = jnp.asarray(start)
        ident = jnp.eye(n)
        full = _levenberg_marquardt(_trace_residual(prob, ident, base), n)
        x = start + full.x
        dof = max(full.r.size - n - 3 * n_pix, 1)
        chi2_red = float(full.r @ full.r) / dof
        det, evecs, cov, lines = _directions(full.jac, chi2_red, tuple(fit))
        iterations = full.iterations
        converged = full.converged
        if not det.all():
            v = evecs[:, det]
            x = v @ (v.T @ x)  # undetermined directions back to the nominal pose
            if det.any():
                sub = _levenberg_marquardt(
                    _trace_residual(prob, jnp.asarray(v), jnp.asarray(x)), int(det.sum())
                )
                x = x + v @ sub.x
                r = sub.r
                iterations += sub.iterations
                converged = sub.converged
                jm = sub.jac @ v.T  # back to the parameters' own axes (undetermined ones carry nothing)
            else:
                r = np.asarray(jax.jit(_trace_residual(prob, ident, jnp.asarray(x)))(jnp.zeros(n)))
                jm = full.jac
            chi2_red = float(r @ r) / dof
            det, _, cov, _ = _directions(jm, chi2_red, tuple(fit))
        seconds["trace fit"] = time.perf_counter() - t0
        say(f"fit of {n_pix} pixels' traces: {iterations} iterations, {seconds['trace fit']:.1f} s")

        theta_fit = np.asarray(prob.theta(jnp.asarray(x)))
        fitted = theta_fit[prob.fit]
        nominal = prob.theta0[prob.fit]
        std = np.sqrt(np.clip(np.diag(cov), 0, None))
        corr = cov / np.maximum(np.outer(std, std), 1e-300)
        sigma = std * prob.scale
        weight_undet = 1.0 - (evecs[:, det] ** 2).sum(1) if det.any() else np.ones(n)
        determined = weight_undet < 0.1
        sigma = np.where(determined, sigma, np.nan)

        if not converged:
            raise CalibrationFailed(
                f"the fit did not converge in {iterations} iterations "
                f"(reduced chi-square {chi2_red:.2f}); check the film depths and the "
                "nominal pose (within 50 um and 0.5 deg of the truth)"
            )
        _check_bounds(fit, nominal, fitted)
        if chi2_red > CHI2_LIMIT:
            raise CalibrationFailed(
                f"the fitted model does not describe the film traces (reduced chi-square "
                f"{chi2_red:.1f} > {CHI2_LIMIT:g}): is each scan's film at the depth given?"
            )

        # film depths per spot, before and after
        t0 = time.perf_counter()
        reports = []
        geo_fit = _geometry(prob.geo, theta_fit)
        for f, c, z_before, k in zip(used, prob.centres, before, keep, strict=True):
            _, z_after, _ = look_positions(
                geo_fit, prob.mask, c, f.traces, f.frames, f.spots, f.depth_um, search
            )
            reports.append(_spot_depths(f, z_before[k], z_after))
        seconds["film depths"] = time.perf_counter() - t0
    return Calibration(
        names=tuple(fit),
        nominal=nominal,
        fitted=fitted,
        sigma=sigma,
        determined=determined,
        correlation=corr,
        undetermined=lines,
        chi2_red=chi2_red,
        iterations=iterations,
        pixels=n_pix,
        films=reports,
        seconds=seconds,
        warnings=warn,
    )


def _check_bounds(names: tuple[str, ...], nominal: np.ndarray, fitted: np.ndarray) -> None:
    """CalibrationFailed when a parameter moved further than :data:`BOUND` or left its physical range."""
    for name, nom, val in zip(names, nominal, fitted, strict=True):
        if abs(val - nom) > BOUND[name] or (name in ("dist", "thickness") and val <= 0):
            raise CalibrationFailed(
                f"the fit landed on a bound: {name} {nom:g} -> {val:g} {UNITS[name]} "
                f"(at most {BOUND[name]:g} from the nominal value)"
            )


def _spot_depths(film: Film, before: np.ndarray, after: np.ndarray) -> SpotDepths:
    labels = np.unique(film.spots)
    med_b = np.array([np.median(before[film.spots == s]) for s in labels])
    med_a = np.array([np.median(after[film.spots == s]) for s in labels])
    count = np.array([int((film.spots == s).sum()) for s in labels])
    return SpotDepths(
        film=film.name,
        depth_um=film.depth_um,
        spots=labels,
        pixels=count,
        before=med_b,
        after=med_a,
        within_1um_before=float(np.mean(np.abs(before - film.depth_um) <= 1)),
        within_1um_after=float(np.mean(np.abs(after - film.depth_um) <= 1)),
    )
