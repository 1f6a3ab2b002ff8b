"""Decoding pixel traces into depth profiles (the estimator of laueflow).

Model.  For a gold mask, T = 1 - c * goldfraction away from blurred bar edges, so a trace is

    I_n = b_n + sum_j f_j - c * sum_j f_j M(u_n(z_j)),     M = (1 - exp(-mu0 gf)) / c0,

a constant minus the code pattern M correlated with h = c f.  The energy (through c) only sets the
contrast, so each trace is centred (its constant absorbs background and the unknown contrast) and
h is solved from the modulation alone; the constant, minus the background measured in the block's
dark pixels, then gives the total intensity, hence c, hence the scale of f and (on request) the energy.

Structure.  A block is a compact tile of pixels.  Rays from depth z reach a pixel's mask crossing at
code coordinate u_0(z); the scan shifts every depth by the same code step per frame.  So the block
shares one dictionary D[n, k] = M(w_k + n * step) on a code-coordinate grid w covering all its
pixels, and each pixel's profile h(w) maps exactly onto its own depth grid through u_0(z).
The estimator, per pixel, on noise-normalised data d (Poisson: sigma^2 = mean counts):

    min_{h >= 0}  1/2 |d - D h|^2 + sparsity * sum h + 1/2 smoothness * |L h|^2

(sparse thin grains, whole extended grains), solved by over-relaxed ADMM that stops once converged.
Pass 1 fits the whole grid with one factorisation per dictionary shared by all pixels (a matrix product
per iteration for a batch of pixels); each pixel's support is then chosen by forward selection on refits
(the fewest pieces that explain the trace: _select_support), and passes 2 and 3 refit on it, a few tens
of columns, with one small factorisation per pixel.  Last, a pixel whose trace allows it takes the shape
of its neighbourhood's summed profile (a spot's pixels see the same depths: _spot_shapes), which
rids faint pixels of their noise.  Each solver is a jit-compiled function of padded shapes (rows and
support sizes in a few buckets), so few shapes are compiled.  While a block is decoded,
BLAS and LAPACK run on one thread (_OneBlasThread): the parallelism is across blocks.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from functools import cached_property, lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular
from threadpoolctl import threadpool_limits

from . import geometry as G
from .config import Config
from .errors import DecodeError  # noqa: F401 (re-exported)
from .forward import Setup
from .mask import contrast, gold_fraction_np, mu_thickness

# quality flag bits
NO_SIGNAL = 1  # no modulation above noise: a background pixel (profile is zero)
NO_BACKGROUND = 2  # no dark pixels in the block; the scale assumes the configured energy
CONTRAST = 4  # fitted contrast outside what any energy in the range gives; scale from the configured energy
POOR_FIT = 8  # reduced chi-square above 3
ENERGY_AMBIGUOUS = 16  # energy asked for but the contrast fits several energies

SATURATED = 65535.0


@dataclass
class Decoded:
    """Per-pixel results of one block (selected pixels, in input order)."""

    rows: np.ndarray
    cols: np.ndarray
    profiles: np.ndarray  # (P, J) counts per frame per depth bin
    background: np.ndarray  # (P,) counts per frame
    residual: np.ndarray  # (P,) reduced chi-square of the fit
    quality: np.ndarray  # (P,) uint8 flag bits
    energy: np.ndarray  # (P,) keV, NaN where not estimated or ambiguous
    energy_sigma: np.ndarray  # (P,) keV

    @classmethod
    def empty(cls, n_depth: int) -> Decoded:
        z = np.zeros(0, np.float32)
        return cls(
            np.zeros(0, np.int32),
            np.zeros(0, np.int32),
            np.zeros((0, n_depth), np.float32),
            z,
            z,
            np.zeros(0, np.uint8),
            z,
            z,
        )


@dataclass(frozen=True)
class Dictionary:
    """The code-coordinate dictionary shared by a block's pixels."""

    w: np.ndarray  # (K,) code coordinates of the columns, um
    gold: np.ndarray  # (S, N, K) thick-bar gold fraction at S points across bin w_k, shifted by n * step
    step: float  # code shift per frame, um
    u_lo: np.ndarray  # (P, J) code coordinate of each depth bin's lower edge, per pixel
    u_hi: np.ndarray  # (P, J) ... upper edge
    path_factor: np.ndarray  # (P,) 1 / cos(phi + alpha)

    def transmission(self, mu: float) -> np.ndarray:
        """T = exp(-mu gf) averaged over each column's bin (a depth bin is a continuous slab)."""
        return np.exp(-mu * self.gold).mean(axis=0)


# a support piece at depths where the neighbouring pixels agree on one needs only this fraction of the
# significance: the depth is given, so the test is of one location, not of all K
_NEIGHBOUR_FRACTION = 0.25
_BIN_SAMPLES = 4  # points across a code-grid bin when averaging its column


def _edges(depths: np.ndarray) -> np.ndarray:
    step = depths[1] - depths[0] if depths.size > 1 else 1e-3
    return np.concatenate([depths - step / 2, depths[-1:] + step / 2])


def build_dictionary(setup: Setup, cfg: Config, rows, cols, frames) -> Dictionary:
    """Code-coordinate grid, shared gold-fraction matrix and per-pixel depth maps for a block."""
    geo, mask = setup.geo, setup.mask
    depths = cfg.geo.source.depths
    frames = np.asarray(frames, dtype=np.float64)
    pix = G.pixel_centres(geo, rows, cols)
    u = np.asarray(G.code_coordinates(geo, pix, _edges(depths), np.array([0.0, 1.0])), dtype=np.float64)
    u0 = u[:, 0, :]  # (P, J+1) at frame 0
    step = float(np.mean(u[:, 1, :] - u0))  # exact per-frame code shift, averaged over the block
    optics = G.pixel_optics(geo, pix)
    dz_um = abs(depths[1] - depths[0]) * 1e3 if depths.size > 1 else 1.0
    slope = np.median(np.abs(np.diff(u0, axis=1))) / dz_um  # |du/dz|, about kappa
    dw = max(slope * dz_um / cfg.recon.oversample, 1e-3)
    lo, hi = u0.min() - 2 * dw, u0.max() + 2 * dw
    k = int(np.ceil((hi - lo) / dw)) + 1
    k = -(-k // 32) * 32  # a multiple of 32, so blocks share compiled shapes
    w = lo + dw * np.arange(k)
    sub = ((np.arange(_BIN_SAMPLES) + 0.5) / _BIN_SAMPLES - 0.5) * dw
    gold = gold_fraction_np(
        w[None, None, :] + sub[:, None, None] + step * frames[None, :, None],
        float(np.mean(optics.blur)),
        mask,
    )
    return Dictionary(
        w=w, gold=gold, step=step, u_lo=u0[:, :-1], u_hi=u0[:, 1:], path_factor=optics.path_factor
    )


def check_reach(setup: Setup, cfg: Config, rows, cols, frames=None) -> str | None:
    """None when the mask code crosses every depth of the grid for these pixels during the scan;
    otherwise a message saying which depths the mask can resolve."""
    geo = setup.geo
    depths = cfg.geo.source.depths
    n = cfg.file.n_frames if frames is None else len(frames)
    step = cfg.file.range[2]
    pix = G.pixel_centres(geo, np.asarray(rows), np.asarray(cols))
    u = np.asarray(G.code_coordinates(geo, pix, depths, np.array([0.0, (n - 1) * step])))
    lo, hi = np.minimum(u[:, 0], u[:, 1]), np.maximum(u[:, 0], u[:, 1])
    # a depth is resolvable when its rays see some code (bars) in at least one frame
    bars = setup.mask.bars
    first, last = bars[0, 0], bars[-1, 1]
    ok = ((hi > first) & (lo < last)).all(axis=0)
    if ok.all():
        return None
    um = depths * 1e3
    if not ok.any():
        return (
            f"the mask never crosses the rays during the scan for any depth of the grid "
            f"[{um[0]:.1f}, {um[-1]:.1f}] um (code coordinates {lo.min():.0f}-{hi.max():.0f} um "
            f"vs bars at {first:.0f}-{last:.0f} um): check geo.mask.focus and geo.scanner"
        )
    good = um[ok]
    return (
        f"the mask resolves only depths {good.min():.1f} to {good.max():.1f} um of the grid "
        f"[{um[0]:.1f}, {um[-1]:.1f}] um for these pixels: narrow geo.source.grid or check the geometry"
    )


def _band(dct: Dictionary, cfg: Config) -> int:
    """Columns over which the code pattern stays correlated: about one wide bit plus the blur."""
    dw = dct.w[1] - dct.w[0]
    return int(min(np.ceil(2 * max(cfg.geo.mask.bitsizes) / dw), len(dct.w) - 1))


# ADMM settings, measured against converged solutions on simulated blocks of both geometries.  Pass 1
# (whole grid, from zero): a penalty of three times the mean diagonal of the Gram matrix with
# over-relaxation stops after 60-80 iterations, 40 times closer to the solution than 150 iterations of
# penalty = mean diagonal without relaxation.  Support refits (warm-started): penalty = mean diagonal.
# Iterations run in sweeps of _SWEEP until no pixel's solution moves by more than the tolerance
# (relative) over a sweep, at most recon.iterations.
_RHO_FULL, _TOL_FULL = 3.0, 3e-4
_RHO_SUPPORT, _TOL_SUPPORT = 1.0, 1e-5
_RELAX = 1.8
_SWEEP = 10


def _admm(solve, b, ok, z0, threshold, rho, iterations: int, tol: float):
    """Over-relaxed ADMM for min 1/2 h'Qh - b'h + sparsity sum h, h >= 0, h = 0 where not ``ok``, for a
    batch of rows (the last axis is h's).  ``solve(v)`` applies (Q + rho I)^-1 (Q includes the smoothness
    prior) to each row; ``threshold`` = sparsity / rho.  Runs sweeps of _SWEEP iterations until no row
    moves by more than ``tol`` relative to its size, at most ``iterations`` in all.  Pure JAX, for jit."""

    def step(_, carry):
        z, u = carry
        x = _RELAX * solve(b + rho * (z - u)) + (1.0 - _RELAX) * z
        z_new = jnp.where(ok, jnp.maximum(x + u - threshold, 0.0), 0.0)
        return z_new, u + x - z_new

    def sweep(carry):
        z, u, done, _ = carry
        n = jnp.minimum(_SWEEP, iterations - done)
        z_new, u = jax.lax.fori_loop(0, n, step, (z, u))
        size = jnp.maximum(jnp.linalg.norm(z_new, axis=-1), 1e-6)
        moved = jnp.max(jnp.linalg.norm(z_new - z, axis=-1) / size)
        return z_new, u, done + n, moved

    def unfinished(carry):
        return (carry[2] < iterations) & (carry[3] > tol)

    start = (z0, jnp.zeros_like(z0), jnp.int32(0), jnp.asarray(jnp.inf, z0.dtype))
    return jax.lax.while_loop(unfinished, sweep, start)[0]


def _spd_inverse(m):
    """Inverse of symmetric positive definite matrices (..., s, s) through their Cholesky factors."""
    c = jnp.linalg.cholesky(m)
    eye = jnp.broadcast_to(jnp.eye(m.shape[-1], dtype=m.dtype), m.shape)
    c_inv = solve_triangular(c, eye, lower=True)
    return jnp.swapaxes(c_inv, -1, -2) @ c_inv


def _difference_gram(adjacent, dtype):
    """L'L (..., s, s) of the first differences between neighbouring columns; ``adjacent`` (..., s-1)
    says whether columns i and i+1 are neighbours (a difference is taken only between those)."""
    w = adjacent.astype(dtype)
    edge = [(0, 0)] * (w.ndim - 1)
    diag = jnp.pad(w, [*edge, (1, 0)]) + jnp.pad(w, [*edge, (0, 1)])  # differences each column is in
    off = jnp.pad(w, [*edge, (0, 1)])
    s = diag.shape[-1]
    eye, upper = jnp.eye(s, dtype=dtype), jnp.eye(s, k=1, dtype=dtype)
    return diag[..., :, None] * eye - off[..., :, None] * upper - off[..., None, :] * upper.T


@jax.jit
def _gram(a):
    """A'A of a dictionary (N, K)."""
    return a.T @ a


@jax.jit
def _full_inverse(gram, smooth, rho):
    """(A'A + smoothness L'L + rho I)^-1 over the whole code grid: pass 1's factorisation, shared by all
    pixels fitted with this dictionary."""
    k = gram.shape[0]
    lap = _difference_gram(jnp.ones(k - 1, bool), gram.dtype)
    return _spd_inverse(gram + smooth * lap + rho * jnp.eye(k, dtype=gram.dtype))


@partial(jax.jit, static_argnames=("iterations",))
def _fit_full(a, minv, data, threshold, rho, iterations: int):
    """The estimator over the whole code grid for a batch of rows: data (P, N) -> h (P, K).  Each
    iteration is one product of the batch with the shared inverse."""
    b = data @ a
    return _admm(lambda v: v @ minv, b, True, jnp.zeros_like(b), threshold, rho, iterations, _TOL_FULL)


@partial(jax.jit, static_argnames=("iterations",))
def _fit_support(a, gram, data, idx, valid, init, smooth, sparsity, iterations: int):
    """The same estimator restricted to each row's support: s << K columns ``idx`` (R, s) of the
    dictionary a (N, K), of which ``valid`` (R, s) are used, warm-started from ``init`` (R, s).  One small
    factorisation per row; the smoothness links only neighbouring columns of the support.  Returns h
    on the whole grid (R, K) and the misfit |d - A h|^2 (R,), from the residual itself (no cancellation
    in float32)."""
    dtype = gram.dtype
    rows = jnp.arange(idx.shape[0])[:, None]
    q = jnp.where(valid[:, :, None] & valid[:, None, :], gram[idx[:, :, None], idx[:, None, :]], 0.0)
    b = jnp.where(valid, (data @ a)[rows, idx], 0.0)
    adjacent = (idx[:, 1:] == idx[:, :-1] + 1) & valid[:, 1:] & valid[:, :-1]
    used = jnp.maximum(jnp.sum(valid, axis=1), 1)
    rho = _RHO_SUPPORT * jnp.sum(jnp.where(valid, jnp.diagonal(q, axis1=1, axis2=2), 0.0), axis=1) / used
    rho = jnp.maximum(rho, 1e-6)[:, None]
    # unused columns get a unit diagonal (and stay zero), so every system is positive definite
    diagonal = (jnp.where(valid, 0.0, 1.0) + rho)[:, :, None] * jnp.eye(idx.shape[1], dtype=dtype)
    minv = _spd_inverse(q + smooth * _difference_gram(adjacent, dtype) + diagonal)

    def solve(v):
        return jnp.einsum("rij,rj->ri", minv, v)

    z = _admm(solve, b, valid, init * valid, sparsity / rho, rho, iterations, _TOL_SUPPORT)
    h = jnp.zeros((idx.shape[0], a.shape[1]), dtype).at[rows, idx].add(jnp.where(valid, z, 0.0))
    return h, jnp.sum((data - h @ a.T) ** 2, axis=1)


# support sizes (columns) and rows per call of the support fit, and rows per call of the full fit:
# padded up to these, so that few shapes are compiled
_SUPPORT_SIZES = (16, 32, 48, 64, 96, 128, 192, 256)
_SUPPORT_ROWS = (8, 32, 128)
_FULL_ROWS = (16, 32, 64)


def _row_chunks(n: int, sizes: tuple[int, ...]):
    """Split n rows into calls of at most sizes[-1] rows; yields (start, stop, padded rows)."""
    for start in range(0, n, sizes[-1]):
        stop = min(start + sizes[-1], n)
        yield start, stop, next(s for s in sizes if s >= stop - start)


def _padded(x: np.ndarray, rows: int, dtype=None) -> np.ndarray:
    """``x`` with zero rows appended up to ``rows``."""
    out = np.zeros((rows, *x.shape[1:]), dtype=x.dtype if dtype is None else dtype)
    out[: len(x)] = x
    return out


class _Level:
    """One dictionary of a block (an attenuation level; centred for traces with a free constant,
    or the transmission itself for traces with the background subtracted) and its solvers."""

    def __init__(self, transmission: np.ndarray, mu: float, cfg: Config, dtype, centred: bool = True):
        m = (1.0 - transmission) / -np.expm1(-mu)  # M = (1 - T) / (1 - exp(-mu)): the dip a unit of h makes
        self.mean = m.mean(axis=0)
        self.a = m - self.mean if centred else transmission
        self.centred, self.contrast = centred, float(-np.expm1(-mu))
        k = self.a.shape[1]
        # L1 weights are given in units of the universal threshold: the largest correlation of pure
        # unit-variance noise with any of the K (centred) columns is about |a| sqrt(2 ln K)
        self.unit = float(np.median(np.linalg.norm(m - self.mean, axis=0)) * np.sqrt(2 * np.log(k)))
        self.cfg, self.dtype = cfg, dtype

    @cached_property
    def a_dev(self) -> jax.Array:
        """The dictionary as a JAX array of the working precision."""
        return jnp.asarray(self.a.astype(self.dtype))

    @cached_property
    def gram_dev(self) -> jax.Array:
        """A'A, computed by XLA."""
        return _gram(self.a_dev)

    @cached_property
    def gram(self) -> np.ndarray:
        """A'A as a NumPy array."""
        return np.asarray(self.gram_dev, dtype=np.float64)

    def full(self, d: np.ndarray, sparsity: float) -> np.ndarray:
        """Fit rows d (P, N) over the whole code grid (every column allowed), in batches of _FULL_ROWS
        that stop separately; all are dispatched before any result is read."""
        n, k = d.shape[0], self.a.shape[1]
        if n == 0:
            return np.zeros((0, k))
        t = self.dtype
        rho = _RHO_FULL * float(np.trace(self.gram)) / k
        minv = _full_inverse(self.gram_dev, t(self.cfg.recon.smoothness), t(rho))
        threshold = t(sparsity * self.unit / rho)
        parts = [
            (start, stop, _fit_full(self.a_dev, minv, _padded(d[start:stop], rows, t), threshold, t(rho),
                                    self.cfg.recon.iterations))
            for start, stop, rows in _row_chunks(n, _FULL_ROWS)
        ]
        h = np.zeros((n, k))
        for start, stop, part in parts:
            h[start:stop] = np.asarray(part)[: stop - start]
        return h


def _fit_supports(
    levels: list[_Level], level: np.ndarray, pixel: np.ndarray, data: np.ndarray, allowed: np.ndarray,
    init: np.ndarray, sparsity: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Fit rows r = (pixel[r], dictionary levels[level[r]]): the trace data[pixel[r]] restricted to the
    columns allowed[pixel[r]], warm-started from init[pixel[r]] (divided by the level's contrast for
    uncentred dictionaries).  Returns h (R, K) and the misfit |d - A h|^2 (R,); rows without support
    get h = 0 and |d|^2.

    Rows are grouped by dictionary and support size (padded up to _SUPPORT_SIZES), and every call is
    dispatched before any result is read, so that NumPy's gathering overlaps the solves."""
    n, k = len(level), allowed.shape[1]
    h = np.zeros((n, k))
    chi = np.einsum("rn,rn->r", data[pixel], data[pixel])
    size = allowed.sum(axis=1)[pixel]
    fit = np.flatnonzero(size > 0)
    if fit.size == 0:
        return h, chi
    caps = np.array([c for c in _SUPPORT_SIZES if c < k] + [k])
    need, where = np.unique(pixel[fit], return_inverse=True)
    order = np.argsort(~allowed[need], axis=1, kind="stable")  # each pixel's allowed columns first, in order
    group = level[fit] * len(caps) + np.searchsorted(caps, size[fit])
    sort = np.argsort(group, kind="stable")
    fit, where, group = fit[sort], where[sort], group[sort]
    starts = np.flatnonzero(np.diff(group, prepend=-1))
    pending = []
    for first, last in zip(starts, [*starts[1:], fit.size], strict=True):
        lev, cap = levels[group[first] // len(caps)], int(caps[group[first] % len(caps)])
        t = lev.dtype
        for start, stop, pad in _row_chunks(last - first, _SUPPORT_ROWS):
            rows = slice(first + start, first + stop)
            m = stop - start
            idx = np.zeros((pad, cap), np.int32)
            idx[:m] = order[where[rows], :cap]
            valid = np.zeros((pad, cap), bool)
            valid[:m] = np.arange(cap)[None, :] < size[fit[rows], None]
            p = pixel[fit[rows]]
            z0 = np.zeros((pad, cap), t)
            z0[:m] = np.take_along_axis(init[p], idx[:m], axis=1) / (1.0 if lev.centred else lev.contrast)
            d = np.zeros((pad, data.shape[1]), t)
            d[:m] = data[p]
            recon = lev.cfg.recon
            res = _fit_support(
                lev.a_dev, lev.gram_dev, d, idx, valid, z0, t(recon.smoothness), t(sparsity * lev.unit),
                recon.iterations,
            )
            pending.append((fit[rows], res))
    for r, (hr, c) in pending:
        h[r] = np.asarray(hr)[: r.size]
        chi[r] = np.asarray(c)[: r.size]
    return h, chi


def _components(h: np.ndarray, rel: float = 1e-3, gap: int = 2) -> np.ndarray:
    """Label the runs of the support of each row of h (gaps of up to ``gap`` bins bridged); 0 = off."""
    on = h > rel * np.maximum(h.max(axis=1, keepdims=True), 1e-30)
    grown = on.copy()
    for s in range(1, gap // 2 + 1 + gap % 2):
        grown[:, s:] |= on[:, :-s]
        grown[:, :-s] |= on[:, s:]
    starts = grown & ~np.concatenate([np.zeros((h.shape[0], 1), bool), grown[:, :-1]], axis=1)
    return np.where(grown, np.cumsum(starts, axis=1), 0)


def _component_energy(h: np.ndarray, labels: np.ndarray, gram: np.ndarray, band: int) -> np.ndarray:
    """|A h_c|^2 of every component c (the chi-square it explains), with A'A taken as banded.

    Returns (P, C+1) indexed by label.  Only pairs of non-zero entries contribute, so it runs over
    those (h is sparse) rather than over the whole (P, K) grid."""
    p, k = h.shape
    n_lab = int(labels.max(initial=0)) + 1
    r, i = np.nonzero(h)
    lab = labels[r, i]
    acc = np.zeros(r.size)
    for o in range(-band, band + 1):
        j = np.clip(i + o, 0, k - 1)
        same = (i + o >= 0) & (i + o < k) & (labels[r, j] == lab)
        acc += np.where(same, h[r, j] * gram[i, j], 0.0)
    return np.bincount(r * n_lab + lab, weights=h[r, i] * acc, minlength=p * n_lab).reshape(p, n_lab)


def _rebin(h: np.ndarray, w: np.ndarray, u_lo: np.ndarray, u_hi: np.ndarray) -> np.ndarray:
    """Mass-conserving map of h on the code grid w onto each pixel's depth bins [u_lo, u_hi]."""
    dw = w[1] - w[0]
    edges = np.concatenate([w - dw / 2, w[-1:] + dw / 2])
    cum = np.concatenate([np.zeros((h.shape[0], 1)), np.cumsum(h, axis=1)], axis=1)  # at edges
    pos_lo = (u_lo - edges[0]) / dw
    pos_hi = (u_hi - edges[0]) / dw

    def cum_at(pos):
        pos = np.clip(pos, 0, len(edges) - 1)
        i = np.minimum(np.floor(pos).astype(int), len(edges) - 2)
        t = pos - i
        r = np.arange(h.shape[0])[:, None]
        return cum[r, i] * (1 - t) + cum[r, i + 1] * t

    return np.abs(cum_at(pos_hi) - cum_at(pos_lo))


def estimate_background(traces: np.ndarray, rows, cols, dark: np.ndarray) -> np.ndarray | None:
    """Per-pixel background level (counts per frame) from the block's dark pixels: a plane in
    (row, col) fitted to their mean counts, refitted without pixels that stand above it (a broad
    depth profile modulates little but still raises the mean).  None with fewer than 8 dark pixels."""
    use = dark.copy()
    design = np.stack([np.ones(len(rows)), rows, cols], axis=1).astype(np.float64)
    m = traces.mean(axis=1)
    full = None
    for _ in range(3):
        if use.sum() < 8:
            return full
        if np.ptp(rows[use]) == 0 or np.ptp(cols[use]) == 0:
            coef = np.array([np.median(m[use]), 0.0, 0.0])
        else:
            coef, *_ = np.linalg.lstsq(design[use], m[use], rcond=None)
        full = np.maximum(design @ coef, 0.0)
        tol = 4 * np.sqrt(np.maximum(full, 1.0) / traces.shape[1]) + 0.01 * full
        use = dark & (m - full <= tol)
    return full


def _dark_pixels(traces: np.ndarray, usable: np.ndarray, dictionary: np.ndarray) -> np.ndarray:
    """Pixels whose trace shows no code modulation: their centred trace is no closer to the
    dictionary than noise would be.  Judged by the largest normalised correlation with any column."""
    mean = traces.mean(axis=1, keepdims=True)
    sig = np.sqrt(np.maximum(mean, 1.0))
    d = (traces - mean) / sig
    a = dictionary - dictionary.mean(axis=0, keepdims=True)
    a = a / np.maximum(np.linalg.norm(a, axis=0, keepdims=True), 1e-12)
    score = np.abs(d @ a).max(axis=1)  # ~ max of K unit normals for pure noise
    n = traces.shape[1]
    k = dictionary.shape[1]
    limit = np.sqrt(2 * np.log(max(k, 2))) + 2.0
    var_ok = np.abs(d.var(axis=1) - 1.0) < 4 * np.sqrt(2.0 / max(n, 2)) + 0.3
    return usable & (score < limit) & var_ok


# attenuation levels (mu along the path) that share a dictionary: within a level the bar-edge shape
# differs by too little to move a depth; the contrast itself is free in every level
_MU_LEVELS = np.geomspace(0.05, 5.0, 26)  # ratio 1.2 between levels


def _component_contrasts(
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
        a = h[near] @ masks.T  # (Q, C): each neighbour's modulation within this pixel's components
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


def _nearest_level(mu):
    """Index of the attenuation level nearest (in log) to mu."""
    return np.abs(np.log(np.asarray(mu, float))[..., None] - np.log(_MU_LEVELS)).argmin(axis=-1)


def _trace_contrast(
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


def _fill_gaps(mask: np.ndarray, width: int) -> np.ndarray:
    """Set the runs of False no longer than ``width`` that lie between two True runs of a row."""
    out = mask.copy()
    k = mask.shape[1]
    idx = np.arange(k)
    last_on = np.maximum.accumulate(np.where(mask, idx, -1), axis=1)  # last True at or before
    next_on = np.flip(np.minimum.accumulate(np.flip(np.where(mask, idx, k), axis=1), axis=1), axis=1)
    gap = (last_on >= 0) & (next_on < k) & (next_on - last_on - 1 <= width)
    out |= gap
    return out


def _neighbourhood(values: np.ndarray, ri: np.ndarray, ci: np.ndarray, radius: int, how: str) -> np.ndarray:
    """Combine each pixel's values with those of the pixels within ``radius`` (a square) in the tile:
    ``how`` = "any" (boolean OR of (P, K) masks), "sum" (of numbers, itself included) or "median"
    (nan-median of (P,) values)."""
    h, w = ri.max() + 1, ci.max() + 1
    shape = (h + 2 * radius, w + 2 * radius) + values.shape[1:]
    grid = np.full(shape, np.nan) if how == "median" else np.zeros(shape, values.dtype)
    grid[ri + radius, ci + radius] = values
    stack = [
        grid[radius + dr + ri, radius + dc + ci]
        for dr in range(-radius, radius + 1)
        for dc in range(-radius, radius + 1)
    ]
    if how == "any":
        return np.logical_or.reduce(stack)
    if how == "sum":
        return np.sum(stack, axis=0)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmedian(np.stack(stack), axis=0)


def _grow(mask: np.ndarray, by: int) -> np.ndarray:
    out = mask.copy()
    for s in range(1, by + 1):
        out[:, s:] |= mask[:, :-s]
        out[:, :-s] |= mask[:, s:]
    return out


class _OneBlasThread:
    """BLAS and LAPACK (NumPy's, and those behind JAX's CPU factorisations) held to one thread while any
    block is decoded in this process.

    The decoder's factorisations are small (a pixel's support, or a few hundred columns shared by a
    block): more threads do not speed them up, and idle OpenBLAS threads busy-wait, taking the cores
    from XLA's threads and from the other workers (measured several times slower on a loaded node).
    Thread-safe and re-entrant: the limits in force before come back when the last decode finishes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._limits: threadpool_limits | None = None

    def __enter__(self) -> _OneBlasThread:
        with self._lock:
            if self._active == 0:
                # JAX's CPU factorisations call SciPy's LAPACK, loaded on first use: load it now so that
                # the limit covers it from the first block on
                importlib.import_module("scipy.linalg.cython_lapack")
                self._limits = threadpool_limits(limits=1, user_api="blas")
            self._active += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0 and self._limits is not None:
                self._limits.restore_original_limits()
                self._limits = None


_ONE_BLAS_THREAD = _OneBlasThread()


class _Block:
    """What the passes share about one block: its dictionary, the decoded pixels' traces (noise-normalised
    and centred: d), their places in the tile, and the dictionaries of the attenuation levels, each made
    once."""

    def __init__(self, cfg: Config, traces, rows, cols, out, dct: Dictionary, dtype) -> None:
        self.cfg, self.dct, self.dtype = cfg, dct, dtype
        self.y = traces[out]
        self.mean = self.y.mean(axis=1)
        self.sigma = np.sqrt(np.maximum(self.mean, 1.0))  # Poisson: variance = mean counts
        self.d = -(self.y - self.mean[:, None]) / self.sigma[:, None]  # gold removes intensity: dips positive
        self.ri, self.ci = rows[out] - rows[out].min(), cols[out] - cols[out].min()
        self.band = _band(dct, cfg)
        self.sparsity = cfg.recon.sparsity
        self.weak = cfg.recon.sparsity * cfg.recon.refit_sparsity
        self._transmissions: dict[int, np.ndarray] = {}
        self._levels: dict[tuple[int, bool], _Level] = {}

    def level(self, lev: int, centred: bool = True) -> _Level:
        """The dictionary of attenuation level ``lev`` (see _MU_LEVELS)."""
        key = (int(lev), centred)
        if key not in self._levels:
            if key[0] not in self._transmissions:
                self._transmissions[key[0]] = self.dct.transmission(_MU_LEVELS[key[0]])
            t = self._transmissions[key[0]]
            self._levels[key] = _Level(t, float(_MU_LEVELS[key[0]]), self.cfg, self.dtype, centred)
        return self._levels[key]


def decode(traces, rows, cols, frames, setup: Setup, cfg: Config, selected=None) -> Decoded:
    """Depth profiles (on ``cfg.geo.source.depths``) and diagnostics for a block of pixel traces.

    ``traces`` (P, N) counts for every pixel of a compact tile, ``rows``/``cols`` their detector
    indices, ``frames`` the frame offsets (0, step, ...), ``selected`` the pixels to return (default:
    all).  All pixels, selected or not, help to measure the background.
    """
    traces = np.asarray(traces, dtype=np.float64)
    rows, cols = np.asarray(rows), np.asarray(cols)
    frames = np.asarray(frames, dtype=np.float64)
    n_p, n_f = traces.shape
    n_depth = cfg.geo.source.depths.size
    sel = np.ones(n_p, bool) if selected is None else np.asarray(selected, bool)
    if n_f < 8:
        raise DecodeError(f"only {n_f} frames: too few to decode")
    if not np.isfinite(traces).all():
        raise DecodeError("traces contain NaN or infinity")
    if not traces.any():
        raise DecodeError("all traces are zero (no signal and no background)")
    usable = ~(traces >= SATURATED).any(axis=1) & (traces.std(axis=1) > 0)
    out = np.flatnonzero(sel & usable)
    if out.size == 0:
        return Decoded.empty(n_depth)
    dtype = np.float64 if cfg.recon.dtype == "float64" else np.float32
    if cfg.recon.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    with _ONE_BLAS_THREAD:
        return _decode(traces, rows, cols, frames, setup, cfg, usable, out, dtype)


def _decode(traces, rows, cols, frames, setup: Setup, cfg: Config, usable, out, dtype) -> Decoded:
    """decode() of the usable selected pixels ``out``, its input checked."""
    n_f = traces.shape[1]
    dct = build_dictionary(setup, cfg, rows[out], cols[out], frames)
    thick = setup.geo.thickness
    mu_nominal = float(mu_thickness(cfg.recon.energy, thick)[0]) * float(np.mean(dct.path_factor))
    nominal = _Level(dct.transmission(mu_nominal), mu_nominal, cfg, dtype)
    dark = _dark_pixels(traces, usable, nominal.a)
    bg_all = estimate_background(traces, rows, cols, dark)
    blk = _Block(cfg, traces, rows, cols, out, dct, dtype)
    background = bg_all[out] if bg_all is not None else np.full(out.size, np.nan)
    c_lo, c_hi = _contrast_range(setup, cfg, dct.path_factor)

    level1 = _first_levels(blk, background, mu_nominal, (c_lo, c_hi), bg_all is not None)
    h, gain, own = _pass_support(blk, level1, ~dark[out])
    h, chi = _pass_refit(blk, level1, own, h)

    # the contrast c = (sum of h) / (intensity above the background) of each pixel
    h_counts = h * blk.sigma[:, None]
    total_h = h_counts.sum(axis=1)
    mean_pattern = np.stack([blk.level(lev).mean for lev in np.unique(level1)])[
        np.searchsorted(np.unique(level1), level1)
    ]
    level_f = blk.mean + (h_counts * mean_pattern).sum(axis=1)  # the trace's constant: sum f + background
    total_f = level_f - np.nan_to_num(background, nan=0.0)
    c_fit = np.where(total_f > 0, total_h / np.maximum(total_f, 1e-12), np.nan)
    c_nominal = contrast(cfg.recon.energy, thick, dct.path_factor)
    bg0 = np.nan_to_num(background, nan=0.0)
    excess_tol = 4 * np.sqrt(np.maximum(bg0, 1.0) / n_f) + 0.01 * bg0
    has_signal = (total_f > excess_tol) | own.any(axis=1) if bg_all is not None else own.any(axis=1)

    quality = np.zeros(out.size, np.uint8)
    if bg_all is None:
        # no dark pixels to measure the background: keep the contrast-free fit, scale at the nominal energy
        quality |= NO_BACKGROUND
        profiles_w = h_counts / c_nominal[:, None]
        background = level_f - profiles_w.sum(axis=1)
        c_final = np.full(out.size, np.nan)
        c_sigma = np.full(out.size, np.nan)
    else:
        profiles_w, chi, c_final, c_sigma = _pass_pinned(
            blk, h, h_counts, chi, own, gain, has_signal, background, c_fit, c_nominal, total_f, (c_lo, c_hi)
        )
    chi2 = chi / max(n_f - 1, 1)
    no_signal = ~has_signal | (profiles_w.sum(axis=1) <= 0)
    quality[no_signal] |= NO_SIGNAL
    profiles_w[no_signal] = 0.0
    plausible = (bg_all is not None) & (c_fit >= c_lo) & (c_fit <= c_hi)
    quality[~plausible & ~no_signal & (bg_all is not None)] |= CONTRAST
    quality[chi2 > 3.0] |= POOR_FIT
    profiles = np.zeros((out.size, dct.u_lo.shape[1]))
    lit = np.flatnonzero(~no_signal)
    profiles[lit] = _rebin(profiles_w[lit], dct.w, dct.u_lo[lit], dct.u_hi[lit])

    energy = np.full(out.size, np.nan)
    energy_sigma = np.full(out.size, np.nan)
    if cfg.recon.estimate_energy and bg_all is not None:
        energy, energy_sigma, ambiguous = estimate_energy(
            setup, cfg, rows[out], cols[out], c_final, c_sigma, ~no_signal & np.isfinite(c_sigma)
        )
        quality[ambiguous & ~no_signal] |= ENERGY_AMBIGUOUS
    return Decoded(
        rows=rows[out].astype(np.int32),
        cols=cols[out].astype(np.int32),
        profiles=profiles.astype(np.float32),
        background=background.astype(np.float32),
        residual=chi2.astype(np.float32),
        quality=quality,
        energy=energy.astype(np.float32),
        energy_sigma=energy_sigma.astype(np.float32),
    )


def _first_levels(blk: _Block, background, mu_nominal: float, c_range, has_background: bool) -> np.ndarray:
    """The attenuation level of each pixel for passes 1 and 2 (the bar-edge shape depends on it): from a
    first contrast estimate, (high - low) / (high - background) of the smoothed trace, shared within
    the spot (one spot, one energy); the nominal energy's where there is none."""
    level1 = np.full(blk.y.shape[0], _nearest_level(mu_nominal))
    if not has_background:
        return level1
    c_trace, reliable = _trace_contrast(blk.y, background, blk.sigma)
    ok = reliable & (c_trace >= c_range[0]) & (c_trace <= c_range[1])
    c_near = _neighbourhood(np.where(ok, c_trace, np.nan), blk.ri, blk.ci, 2, "median")
    return np.where(np.isfinite(c_near), _nearest_level(-np.log1p(-np.clip(c_near, 0, 1 - 1e-6))), level1)


def _pass_support(blk: _Block, level1: np.ndarray, active: np.ndarray):
    """Pass 1: the sparse, smooth fit over the whole code grid of the pixels whose traces show modulation
    (``active``), then the support each pixel's trace supports (_select_support).

    Returns h (P, K), the chi-square gain of each pass-1 component (P, C+1, indexed by label) and the
    support to refit (P, K)."""
    band = blk.band
    n, k = blk.d.shape[0], blk.dct.w.size
    h = np.zeros((n, k))
    labels = np.zeros((n, k), int)
    parts = []
    for lev in np.unique(level1):
        act = np.flatnonzero((level1 == lev) & active)
        if act.size == 0:
            continue
        level = blk.level(lev)
        h[act] = level.full(blk.d[act], blk.sparsity)
        labels[act] = _components(h[act])
        parts.append((act, _component_energy(h[act], labels[act], level.gram, band)))
    gain = np.zeros((n, int(labels.max()) + 1))
    for act, g in parts:
        gain[act, : g.shape[1]] = g
    gain[:, 0] = 0.0
    return h, gain, _select_support(blk, level1, h, labels, gain)


# support selection: the components of pass 1 a pixel may build its support from (the largest first),
# and the additions to a support at most
_CANDIDATES = 6
_STEPS = 6


def _select_support(blk: _Block, level1: np.ndarray, h: np.ndarray, labels: np.ndarray, gain: np.ndarray):
    """Each pixel's support by forward selection on refits, the fewest pieces that explain its trace.

    With 0.5 um steps a scan sees little code per depth, and a sparse fit of the whole grid explains
    the smooth tail of an extended grain as well by pieces tens of um away: their energies in pass 1
    pass any fixed test.  So the support starts from the one pass-1 component that alone explains most
    chi-square (the refit of every candidate on its own), then grows by the candidate whose refit gains
    most: another component, or the band of columns on either side of a piece (an extended grain's
    tail), while that gain exceeds ``significance``.  A second round redoes the pixels whose neighbours
    agree on depths the pixel left out (a spot's pixels see the same grains): there a candidate those
    neighbours hold, or the columns they hold, need only a fraction of the gain.

    Returns the support (P, K): the selected pieces, components grown by a quarter band."""
    sig = blk.cfg.recon.significance
    band = blk.band
    n, k = h.shape
    grow = max(1, band // 4)
    # candidates: each pixel's largest components, grown by a quarter band
    top = np.argsort(-gain, axis=1, kind="stable")[:, :_CANDIDATES]
    top_gain = np.take_along_axis(gain, top, axis=1)
    cand_pix, slot = np.nonzero(top_gain >= sig * _NEIGHBOUR_FRACTION)
    cand_gain = top_gain[cand_pix, slot]
    cand_mask = _grow(labels[cand_pix] == top[cand_pix, slot][:, None], grow)
    own = np.zeros((n, k), bool)
    chi = np.zeros(n)
    sel = _Selection(blk, level1, h, own, chi, band)
    first = np.unique(cand_pix[cand_gain >= sig])
    sel.primary(first, cand_pix, cand_mask)
    sel.forward(first, cand_pix, cand_mask, None, lambda rows, new: np.full(rows.size, sig))

    # the neighbours' consensus: columns in the supports of at least a third of the neighbours that
    # have one (and at least two)
    count, with_support = _neighbour_count(own, blk.ri, blk.ci)
    near = count >= np.maximum(2, np.ceil(with_support / 3))[:, None]

    def seen(rows, new):
        return (near[rows] & new).sum(axis=1) > 0.5 * new.sum(axis=1)

    fresh = (near & ~_grow(own, grow)).sum(axis=1) >= 3
    useful = (cand_gain >= sig) | seen(cand_pix, cand_mask)
    cand_pix, cand_mask = cand_pix[useful], cand_mask[useful]
    redo = np.intersect1d(np.flatnonzero(fresh), cand_pix)
    if redo.size:
        own[redo] = False
        sel.primary(redo, cand_pix, cand_mask)
        sel.forward(redo, cand_pix, cand_mask, _grow(near, grow),
                    lambda rows, new: np.where(seen(rows, new), sig * _NEIGHBOUR_FRACTION, sig))
    return own


def _neighbour_count(mask: np.ndarray, ri: np.ndarray, ci: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each pixel, how many of its 8 neighbours in the tile have each column set in ``mask`` (P, K),
    and how many have any set."""
    own = mask.astype(np.int32)
    has = own.max(axis=1, initial=0)
    return _neighbourhood(own, ri, ci, 1, "sum") - own, _neighbourhood(has, ri, ci, 1, "sum") - has


def _runs(mask: np.ndarray, min_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The runs of True of each row of ``mask`` (P, K) at least ``min_size`` long, one row each:
    (the row they come from (R,), the run (R, K))."""
    starts = mask & ~np.pad(mask, ((0, 0), (1, 0)))[:, :-1]
    lab = np.where(mask, np.cumsum(starts, axis=1), 0)
    per_row = lab.max(axis=1, initial=0)
    rows = np.repeat(np.arange(mask.shape[0]), per_row)
    ids = np.arange(rows.size) - np.repeat(np.cumsum(per_row) - per_row, per_row) + 1
    runs = lab[rows] == ids[:, None]
    long = runs.sum(axis=1) >= min_size
    return rows[long], runs[long]


def _best_per_pixel(pixels: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Index of the highest score of each distinct pixel (first of equals)."""
    order = np.lexsort((-score, pixels))
    return order[np.r_[True, pixels[order][1:] != pixels[order][:-1]]]


class _Selection:
    """The state of the support selection: each pixel's support ``own`` (P, K) and the misfit of its
    contrast-free refit ``chi`` (P,), updated in place."""

    def __init__(self, blk: _Block, level1, h, own, chi, band: int) -> None:
        self.blk, self.level1, self.h, self.own, self.chi, self.band = blk, level1, h, own, chi, band

    def _misfit(self, pixels: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """|d - A h|^2 of the refit (pass 2's estimator) of each pixel's trace on the columns of masks."""
        levs = np.unique(self.level1[pixels])
        blk = self.blk
        return _fit_supports(
            [blk.level(lev) for lev in levs], np.searchsorted(levs, self.level1[pixels]),
            np.arange(pixels.size), blk.d[pixels], masks, self.h[pixels], blk.weak,
        )[1]

    def primary(self, pixels: np.ndarray, cand_pix: np.ndarray, cand_mask: np.ndarray) -> None:
        """Start each of ``pixels`` from its candidate that alone leaves the least misfit."""
        rows = np.isin(cand_pix, pixels)
        if not rows.any():
            return
        rp, masks = cand_pix[rows], cand_mask[rows]
        chi = self._misfit(rp, masks)
        best = _best_per_pixel(rp, -chi)
        self.own[rp[best]] = masks[best]
        self.chi[rp[best]] = chi[best]

    def forward(self, pixels, cand_pix, cand_mask, near: np.ndarray | None, threshold) -> None:
        """Grow the supports of ``pixels`` by the addition (a candidate component, the band beside a
        piece, or a run of ``near`` columns) whose refit gains most over ``threshold(rows, new columns)``,
        while one does."""
        own = self.own
        active = np.intersect1d(pixels, np.flatnonzero(own.any(axis=1)))
        for _ in range(_STEPS):
            if active.size == 0:
                return
            rows = np.isin(cand_pix, active)
            cp, new = cand_pix[rows], cand_mask[rows] & ~own[cand_pix[rows]]
            mostly_new = new.sum(axis=1) > 0.5 * cand_mask[rows].sum(axis=1)
            parts = [(cp[mostly_new], new[mostly_new])]
            side, run = _runs(_grow(own[active], self.band) & ~own[active])
            parts.append((active[side], run))
            if near is not None:
                side, run = _runs(near[active] & ~own[active], 3)
                parts.append((active[side], run))
            rp = np.concatenate([p for p, _ in parts])
            if rp.size == 0:
                return
            new = np.concatenate([m for _, m in parts])
            masks = own[rp] | new
            chi = self._misfit(rp, masks)
            score = self.chi[rp] - chi - threshold(rp, new)
            best = _best_per_pixel(rp, score)
            best = best[score[best] >= 0]
            own[rp[best]] = masks[best]
            self.chi[rp[best]] = chi[best]
            active = rp[best]


def _pass_refit(blk: _Block, level1: np.ndarray, own: np.ndarray, h: np.ndarray):
    """Pass 2: refit on the kept support with a weak L1, contrast free (centred dictionaries), warm-started
    from pass 1: the depth of thin grains.  Returns h (P, K) and the misfit |d - A h|^2 (P,)."""
    levs = np.unique(level1)
    return _fit_supports(
        [blk.level(lev) for lev in levs], np.searchsorted(levs, level1), np.arange(len(level1)), blk.d, own,
        h, blk.weak,
    )


def _pass_pinned(blk: _Block, h, h_counts, chi, own, gain, has_signal, background, c_fit, c_nominal, total_f,
                 c_range):
    """Pass 3: the background pinned, exact transmission; the attenuation of each pixel chosen by
    chi-square among the three levels around its estimate and refined between them.  A spot has one
    energy, so the estimate and the depth support of faint pixels come from their neighbours, and so
    may their profile's shape (_spot_shapes).

    Returns the profiles on the code grid in counts (P, K), the misfit (P,), the contrast and its
    1-sigma uncertainty (P,)."""
    cfg, ri, ci, band = blk.cfg, blk.ri, blk.ci, blk.band
    c_lo, c_hi = c_range
    n, k = h.shape
    plausible = (c_fit >= c_lo) & (c_fit <= c_hi)
    strong = (gain[:, 1:].max(axis=1, initial=0) >= 4 * cfg.recon.significance) & plausible
    c_near = _neighbourhood(np.where(strong, c_fit, np.nan), ri, ci, 2, "median")
    c_px = np.where(np.isfinite(c_near), c_near, np.where(plausible, c_fit, c_nominal))
    mu_px = -np.log1p(-np.clip(c_px, 1e-6, 1 - 1e-6))
    allowed = _fill_gaps(own, 2 * band)
    lone = ~own.any(axis=1)
    allowed[lone] = _neighbourhood(own, ri, ci, 1, "any")[lone]
    allowed[~has_signal] = False
    e = (blk.y - background[:, None]) / blk.sigma[:, None]
    centre = np.abs(np.log(mu_px)[:, None] - np.log(_MU_LEVELS)[None, :]).argmin(axis=1)
    centre = np.clip(centre, 1, len(_MU_LEVELS) - 2)

    # every pixel with signal at its three levels, all in one batch of fits
    sig = np.flatnonzero(has_signal)
    row_lev = (centre[sig, None] + np.arange(-1, 2)[None, :]).ravel()
    levs = np.unique(row_lev)
    fits, misfit = _fit_supports(
        [blk.level(lev, centred=False) for lev in levs], np.searchsorted(levs, row_lev), np.repeat(sig, 3), e,
        allowed, h, blk.weak,
    )
    chis = np.full((n, len(_MU_LEVELS)), np.inf)
    chis[np.repeat(sig, 3), row_lev] = misfit
    pick = misfit.reshape(-1, 3).argmin(axis=1)  # the first of equals, as the levels go up
    hw = np.zeros_like(h)
    hw[sig] = fits.reshape(-1, 3, k)[np.arange(sig.size), pick]
    profiles_w = hw * blk.sigma[:, None]
    chi = chi.copy()
    chi[sig] = misfit.reshape(-1, 3)[np.arange(sig.size), pick]
    # attenuation refined between levels: a parabola through chi-square at the three levels around
    # the estimate, in log(mu); its curvature gives the 1-sigma (delta chi-square = 1) uncertainty
    mu_fit, mu_sig = _refine_attenuation(chis, centre)
    c_final = np.where(np.isfinite(mu_fit), -np.expm1(-mu_fit), c_px)
    c_sigma = np.where(np.isfinite(mu_fit), np.exp(-mu_fit) * mu_fit * mu_sig, np.nan)
    # pixels seeing several grains: each depth component with its own contrast, when the
    # neighbourhood tells them apart (the pinned fit above assumes one energy per pixel)
    runs = _components(own.astype(float), rel=0.5, gap=0)
    cc = _component_contrasts(h_counts, runs, total_f, ri, ci, c_range)
    multi = np.isfinite(cc[:, 1:]).any(axis=1)
    if multi.any():
        # the pinned fit's shapes, each component rescaled from the pixel's contrast to its own
        per_bin = np.take_along_axis(cc[multi], runs[multi], axis=1)
        scale = np.where(
            np.isfinite(per_bin), c_final[multi, None] / np.where(np.isfinite(per_bin), per_bin, 1.0), 1.0
        )
        profiles_w[multi] = profiles_w[multi] * scale
    lev_px = np.zeros(n, int)
    lev_px[sig] = row_lev.reshape(-1, 3)[np.arange(sig.size), pick]
    _spot_shapes(blk, profiles_w, chi, e, lev_px, has_signal & ~multi)
    return profiles_w, chi, c_final, c_sigma


def _unbin(profiles: np.ndarray, w: np.ndarray, u_lo: np.ndarray, u_hi: np.ndarray) -> np.ndarray:
    """Mass-conserving map of depth profiles (P, J) onto the code grid w, through each pixel's depth bins
    [u_lo, u_hi] (the inverse of _rebin, each depth bin's mass spread evenly over its code interval)."""
    n = profiles.shape[0]
    dw = w[1] - w[0]
    edges = np.concatenate([w - dw / 2, w[-1:] + dw / 2])
    cum = np.concatenate([np.zeros((n, 1)), np.cumsum(profiles, axis=1)], axis=1)
    ue = np.concatenate([u_lo, u_hi[:, -1:]], axis=1)
    falling = ue[:, 0] > ue[:, -1]  # code coordinates fall with depth in some geometries
    ue[falling], cum[falling] = ue[falling, ::-1], cum[falling, ::-1]
    # the cumulative mass at the code grid's edges, interpolated row by row: one search over all rows,
    # each row's coordinates offset past the previous row's
    span = max(ue.max() - ue.min(), edges[-1] - edges[0]) + 1.0
    offset = span * np.arange(n)[:, None]
    x = np.clip(edges[None, :], ue[:, :1], ue[:, -1:])
    i = np.searchsorted((ue + offset).ravel(), (x + offset).ravel()).reshape(x.shape)
    i = np.clip(i - np.arange(n)[:, None] * ue.shape[1], 1, ue.shape[1] - 1)
    x0, x1 = np.take_along_axis(ue, i - 1, axis=1), np.take_along_axis(ue, i, axis=1)
    c0, c1 = np.take_along_axis(cum, i - 1, axis=1), np.take_along_axis(cum, i, axis=1)
    t = np.where(x1 > x0, (x - x0) / np.where(x1 > x0, x1 - x0, 1.0), 0.0)
    return np.abs(np.diff(c0 + t * (c1 - c0), axis=1))


def _spot_shapes(blk: _Block, profiles_w, chi, e, lev_px, candidates) -> None:
    """Faint pixels take their spot's depth profile where their trace allows it (in place).

    A spot's pixels see the same grains through the same depths, only with different intensities, so
    the sum of the depth profiles of a pixel's 3 x 3 neighbourhood (dominated by the bright pixels) is
    its profile's shape with far less noise.  That shape, scaled by one factor, replaces the pixel's
    own fit where it explains a significant chi-square and the misfit rises by less than ``significance``:
    noise-dominated detail of the own fit goes, real differences (another grain, a depth the neighbours
    lack) stay."""
    px = np.flatnonzero(candidates)
    if px.size == 0:
        return
    dct = blk.dct
    depth = np.zeros(dct.u_lo.shape)
    lit = np.flatnonzero(profiles_w.any(axis=1))
    depth[lit] = _rebin(profiles_w[lit], dct.w, dct.u_lo[lit], dct.u_hi[lit])
    summed = _neighbourhood(depth, blk.ri, blk.ci, 1, "sum")
    shape = _unbin(summed[px], dct.w, dct.u_lo[px], dct.u_hi[px]) / blk.sigma[px, None]
    model = np.zeros((px.size, e.shape[1]))
    for lev in np.unique(lev_px[px]):
        m = lev_px[px] == lev
        model[m] = shape[m] @ blk.level(lev, centred=False).a.T
    norm = np.einsum("rn,rn->r", model, model)
    scale = np.where(norm > 0, np.einsum("rn,rn->r", model, e[px]) / np.maximum(norm, 1e-30), 0.0)
    scale = np.maximum(scale, 0.0)
    misfit = np.einsum("rn,rn->r", e[px] - scale[:, None] * model, e[px] - scale[:, None] * model)
    sig = blk.cfg.recon.significance
    explained = np.einsum("rn,rn->r", e[px], e[px]) - misfit
    take = (scale > 0) & (explained >= sig) & (misfit <= chi[px] + sig)
    rows = px[take]
    profiles_w[rows] = scale[take, None] * shape[take] * blk.sigma[rows, None]
    chi[rows] = misfit[take]


_ENERGY_GRID = np.linspace(4.0, 80.0, 761)


@lru_cache(maxsize=16)
def _grid_mu(thickness: float, low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """Energies of the grid within [low, high] keV and mu t of gold at each (cached: xraydb is slow)."""
    e = _ENERGY_GRID[(_ENERGY_GRID >= low) & (_ENERGY_GRID <= high)]
    return e, mu_thickness(e, thickness)


def _contrast_range(setup: Setup, cfg: Config, path_factor: np.ndarray) -> tuple[float, float]:
    """Lowest and highest contrast any energy of ``recon.energy_range`` gives (with 10 % slack)."""
    _, mu = _grid_mu(setup.geo.thickness, *cfg.recon.energy_range)
    c = -np.expm1(-np.multiply.outer(path_factor, mu))
    return float(c.min() * 0.9), float(min(c.max() * 1.1, 1.0))


def _refine_attenuation(chis: np.ndarray, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mu at the minimum of a parabola through chi-square at levels centre-1, centre, centre+1 (in
    log mu), and its 1-sigma uncertainty in log mu; NaN where the three are not all finite or the
    parabola opens downwards.  A minimum outside the bracket is clipped to it."""
    rows = np.arange(chis.shape[0])
    lo, mid, hi = chis[rows, centre - 1], chis[rows, centre], chis[rows, centre + 1]
    step = np.log(_MU_LEVELS[1] / _MU_LEVELS[0])
    with np.errstate(all="ignore"):  # pixels not fitted have infinite chi-square
        curv = (lo - 2 * mid + hi) / step**2
        offset = np.clip(step * (lo - hi) / (2 * (lo - 2 * mid + hi)), -step, step)
        ok = np.isfinite(lo) & np.isfinite(mid) & np.isfinite(hi) & (curv > 0)
        mu = np.where(ok, np.exp(np.log(_MU_LEVELS[centre]) + offset), np.nan)
        sig = np.where(ok, np.sqrt(2.0 / curv), np.nan)
    return mu, sig


def estimate_energy(
    setup: Setup, cfg: Config, rows, cols, c, c_sigma, usable
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Energy from the fitted contrast, only where it is unambiguous.

    The contrast c = 1 - exp(-mu(E) t / cos) is not monotonic in E across the Au L edges, so a
    contrast with its uncertainty (2 sigma, plus 2 % for the model) maps to a set of energies; a single
    connected set gives the energy (its middle) and uncertainty (half its width); several sets, or one
    spanning more than half the range, are reported as ambiguous."""
    lo_e, hi_e = cfg.recon.energy_range
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
