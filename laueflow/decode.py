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

(sparse thin grains, whole extended grains), solved by ADMM with one cached factorisation per block:
one jit-compiled function per block shape, vmapped over pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np

from . import geometry as G
from .config import Config
from .forward import Setup
from .mask import contrast, gold_fraction_np, mu_thickness

# quality flag bits
NO_SIGNAL = 1  # no modulation above noise: a background pixel (profile is zero)
NO_BACKGROUND = 2  # no dark pixels in the block; the scale assumes the configured energy
CONTRAST = 4  # fitted contrast outside what any energy in the range gives; scale from the configured energy
POOR_FIT = 8  # reduced chi-square above 3
ENERGY_AMBIGUOUS = 16  # energy asked for but the contrast fits several energies

SATURATED = 65535.0


class DecodeError(ValueError):
    """A block whose data cannot be decoded (all zero, no usable pixel, mask never crosses the rays)."""


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

    def pattern(self, mu: float) -> np.ndarray:
        """M = (1 - T) / (1 - exp(-mu)): the dip a unit of h makes, for attenuation mu."""
        return (1.0 - self.transmission(mu)) / -np.expm1(-mu)


# a component at a depth where a neighbouring pixel already has a significant one needs only this
# fraction of the significance: the depth is given, so the test is of one location, not of all K
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


def _admm(minv, b, ok, z0, sparsity, rho, iterations: int):
    """ADMM iterations for min 1/2 h'Qh - b'h + sparsity sum h, h >= 0, h = 0 where not ``ok``;
    ``minv`` = (Q + rho I)^-1 (Q includes the smoothness prior).  Pure JAX, for use inside jit."""

    def step(carry, _):
        z, u = carry
        x = minv @ (b + rho * (z - u))
        z = jnp.where(ok, jnp.maximum(x + u - sparsity / rho, 0.0), 0.0)
        return (z, u + x - z), None

    (z, _), _ = jax.lax.scan(step, (z0, jnp.zeros_like(z0)), None, length=iterations)
    return z


@partial(jax.jit, static_argnames=("iterations",))
def _solve(matrix, minv, data, sparsity, rho, iterations: int):
    """The estimator over the whole code grid: data (P, N) -> h (P, K), one factorisation for all."""
    ok = jnp.ones(matrix.shape[1], bool)

    def one(d):
        return _admm(minv, matrix.T @ d, ok, jnp.zeros(matrix.shape[1], d.dtype), sparsity, rho, iterations)

    return jax.vmap(one)(data)


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

    Returns (P, C+1) indexed by label."""
    p, k = h.shape
    n_lab = int(labels.max()) + 1
    acc = np.zeros((p, k))
    for o in range(-band, band + 1):
        lo, hi = max(0, -o), min(k, k - o)
        same = labels[:, lo:hi] == labels[:, lo + o : hi + o]
        q = np.diagonal(gram, offset=o)[: hi - lo] if o >= 0 else np.diagonal(gram, offset=o)[: hi - lo]
        acc[:, lo:hi] += np.where(same, h[:, lo + o : hi + o] * q, 0.0)
    contrib = h * acc
    out = np.zeros((p, n_lab))
    np.add.at(out, (np.repeat(np.arange(p), k), labels.ravel()), contrib.ravel())
    return out


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


@partial(jax.jit, static_argnames=("iterations",))
def _solve_support(gram, atd, dd, idx, valid, init, smooth, sparsity, iterations: int):
    """The same estimator restricted to each pixel's support: s << K unknowns gathered from the
    block's Gram matrix, ADMM with a per-pixel factorisation.  Returns h (P, s) and the data misfit
    |d - A h|^2 (P,), for choosing between dictionaries."""
    s = idx.shape[1]
    diff = (jnp.eye(s, k=1, dtype=gram.dtype) - jnp.eye(s, dtype=gram.dtype))[:-1]

    def one(b_full, d2, ix, ok, z0):
        both = ok[:, None] & ok[None, :]
        q = jnp.where(both, gram[ix[:, None], ix[None, :]], 0.0)
        b = jnp.where(ok, b_full[ix], 0.0)
        adjacent = (ix[1:] == ix[:-1] + 1) & ok[1:] & ok[:-1]  # smooth only across neighbouring bins
        dm = diff * adjacent[:, None]
        qs = q + smooth * dm.T @ dm + jnp.diag(jnp.where(ok, 0.0, 1.0))
        rho = jnp.sum(jnp.where(ok, jnp.diag(q), 0.0)) / jnp.maximum(jnp.sum(ok), 1)
        rho = jnp.maximum(rho, 1e-6)
        minv = jnp.linalg.inv(qs + rho * jnp.eye(s, dtype=gram.dtype))
        z = _admm(minv, b, ok, z0, sparsity, rho, iterations)
        return z, d2 - 2 * z @ b + z @ q @ z

    return jax.vmap(one)(atd, dd, idx, valid, init)


_SUPPORT_SIZES = (16, 32, 64, 128, 256)


def _pad_rows(n: int) -> int:
    """Rows padded to a power of two (at least 64), so that few shapes are compiled."""
    return max(64, 1 << int(np.ceil(np.log2(max(n, 1)))))


class _Level:
    """One dictionary of a block (an attenuation level; centred for traces with a free constant,
    or the transmission itself for traces with the background subtracted) and its solvers."""

    def __init__(self, dct: Dictionary, mu: float, cfg: Config, dtype, centred: bool = True):
        m = dct.pattern(mu)
        self.mean = m.mean(axis=0)
        self.a = m - self.mean if centred else dct.transmission(mu)
        self.gram = self.a.T @ self.a
        k = self.a.shape[1]
        # L1 weights are given in units of the universal threshold: the largest correlation of pure
        # unit-variance noise with any of the K (centred) columns is about |a| sqrt(2 ln K)
        self.unit = float(np.median(np.linalg.norm(m - self.mean, axis=0)) * np.sqrt(2 * np.log(k)))
        self.cfg, self.dtype = cfg, dtype

    def full(self, d: np.ndarray, sparsity: float) -> np.ndarray:
        """Fit over the whole code grid (every column allowed)."""
        n, k = d.shape[0], self.a.shape[1]
        if n == 0:
            return np.zeros((0, k))
        lmat = np.diff(np.eye(k), axis=0)
        rho = float(np.trace(self.gram) / k)
        minv = np.linalg.inv(self.gram + self.cfg.recon.smoothness * (lmat.T @ lmat) + rho * np.eye(k))
        pad = _pad_rows(n)
        dp = np.zeros((pad, d.shape[1]))
        dp[:n] = d
        t = self.dtype
        h = _solve(
            jnp.asarray(self.a, t),
            jnp.asarray(minv, t),
            jnp.asarray(dp, t),
            jnp.asarray(sparsity * self.unit, t),
            jnp.asarray(rho, t),
            self.cfg.recon.iterations,
        )
        return np.asarray(h, dtype=np.float64)[:n]

    def on_support(
        self, d: np.ndarray, allowed: np.ndarray, sparsity: float, init: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Fit restricted to ``allowed`` columns per pixel; returns h (P, K) and |d - A h|^2 (P,)."""
        n, k = allowed.shape
        h = np.zeros((n, k))
        dd = (d**2).sum(axis=1)
        chi = dd.copy()
        size = allowed.sum(axis=1)
        if not size.any():
            return h, chi
        atd = d @ self.a
        t = self.dtype
        lower = 0
        for cap in (*_SUPPORT_SIZES, k):
            rows_ = np.flatnonzero((size > lower) & (size <= cap))
            lower = cap
            if rows_.size == 0:
                continue
            s = min(cap, k)
            order = np.argsort(~allowed[rows_], axis=1, kind="stable")[:, :s]
            valid = np.arange(s)[None, :] < size[rows_, None]
            z0 = np.zeros((rows_.size, s)) if init is None else np.take_along_axis(init[rows_], order, axis=1)
            pad = _pad_rows(rows_.size)

            def padded(x, fill=0, pad=pad):
                out = np.full((pad, *x.shape[1:]), fill, dtype=x.dtype)
                out[: len(x)] = x
                return out

            z, c = _solve_support(
                jnp.asarray(self.gram, t),
                jnp.asarray(padded(atd[rows_]), t),
                jnp.asarray(padded(dd[rows_]), t),
                jnp.asarray(padded(order)),
                jnp.asarray(padded(valid, False)),
                jnp.asarray(padded(z0 * valid), t),
                jnp.asarray(self.cfg.recon.smoothness, t),
                jnp.asarray(sparsity * self.unit, t),
                self.cfg.recon.iterations,
            )
            z = np.asarray(z, dtype=np.float64)[: rows_.size]
            sub = np.zeros((rows_.size, k))
            np.put_along_axis(sub, order, np.where(valid, z, 0.0), axis=1)
            h[rows_] = sub
            chi[rows_] = np.asarray(c, dtype=np.float64)[: rows_.size]
        return h, chi


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
    ``how`` = "any" (boolean OR of (P, K) masks) or "median" (nan-median of (P,) values)."""
    h, w = ri.max() + 1, ci.max() + 1
    shape = (h + 2 * radius, w + 2 * radius) + values.shape[1:]
    grid = np.zeros(shape, bool) if how == "any" else np.full(shape, np.nan)
    grid[ri + radius, ci + radius] = values
    stack = [
        grid[radius + dr + ri, radius + dc + ci]
        for dr in range(-radius, radius + 1)
        for dc in range(-radius, radius + 1)
    ]
    if how == "any":
        return np.logical_or.reduce(stack)
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
    dtype = jnp.float64 if cfg.recon.dtype == "float64" else jnp.float32
    if cfg.recon.dtype == "float64":
        jax.config.update("jax_enable_x64", True)

    dct = build_dictionary(setup, cfg, rows[out], cols[out], frames)
    thick = setup.geo.thickness
    mu_nominal = float(mu_thickness(cfg.recon.energy, thick)[0]) * float(np.mean(dct.path_factor))
    first = _Level(dct, mu_nominal, cfg, dtype)
    dark = _dark_pixels(traces, usable, first.a)
    bg_all = estimate_background(traces, rows, cols, dark)

    y = traces[out]
    mean = y.mean(axis=1)
    sigma = np.sqrt(np.maximum(mean, 1.0))  # Poisson: variance = mean counts
    d = -(y - mean[:, None]) / sigma[:, None]  # gold removes intensity: dips become positive
    k = dct.w.size
    band = _band(dct, cfg)

    ri, ci = rows[out] - rows[out].min(), cols[out] - cols[out].min()
    background = bg_all[out] if bg_all is not None else np.full(out.size, np.nan)
    c_lo, c_hi = _contrast_range(setup, cfg, dct.path_factor)

    # the bar-edge shape depends on the attenuation, so passes 1 and 2 use the attenuation level of a
    # first contrast estimate: (high - low) / (high - background) of the smoothed trace, shared
    # within the spot (one spot, one energy)
    level1 = np.full(out.size, _nearest_level(mu_nominal))
    if bg_all is not None:
        c_trace, reliable = _trace_contrast(y, background, sigma)
        ok = reliable & (c_trace >= c_lo) & (c_trace <= c_hi)
        c_near = _neighbourhood(np.where(ok, c_trace, np.nan), ri, ci, 2, "median")
        level1 = np.where(
            np.isfinite(c_near), _nearest_level(-np.log1p(-np.clip(c_near, 0, 1 - 1e-6))), level1
        )
    levels = {lev: _Level(dct, _MU_LEVELS[lev], cfg, dtype) for lev in np.unique(level1)}

    # pass 1: sparse, smooth fit over the whole grid, for pixels whose traces show modulation; keep
    # the support components that explain more chi-square than noise could
    active = ~dark[out]
    h = np.zeros((out.size, k))
    gain_parts = []
    labels = np.zeros((out.size, k), int)
    for lev, level in levels.items():
        idx = np.flatnonzero(level1 == lev)
        act = idx[active[idx]]
        h[act] = level.full(d[act], cfg.recon.sparsity)
        labels[idx] = _components(h[idx])
        gain_parts.append((idx, _component_energy(h[idx], labels[idx], level.gram, band)))
    gain = np.zeros((out.size, int(labels.max()) + 1))
    for idx, g in gain_parts:
        gain[idx, : g.shape[1]] = g
    keep = gain >= cfg.recon.significance
    keep[:, 0] = False
    # a component already significant in a neighbouring pixel at the same depth (same spot, same
    # grain) needs only a fraction of the chi-square gain
    near = _neighbourhood(np.take_along_axis(keep, labels, axis=1), ri, ci, 1, "any")
    seen = np.zeros_like(keep)
    np.logical_or.at(seen, (np.repeat(np.arange(out.size), k), labels.ravel()), near.ravel())
    keep |= seen & (gain >= cfg.recon.significance * _NEIGHBOUR_FRACTION)
    keep[:, 0] = False
    own = _grow(np.take_along_axis(keep, labels, axis=1), max(1, band // 4))

    # pass 2: refit on that support with a weak L1, contrast free: the depth of thin grains, and the
    # contrast c = (sum of h) / (intensity above the background) of each pixel
    weak = cfg.recon.sparsity * cfg.recon.refit_sparsity
    chi = np.zeros(out.size)
    mean_pattern = np.zeros((out.size, k))
    for lev, level in levels.items():
        idx = np.flatnonzero(level1 == lev)
        h[idx], chi[idx] = level.on_support(d[idx], own[idx], weak, init=h[idx])
        mean_pattern[idx] = level.mean
    h_counts = h * sigma[:, None]
    total_h = h_counts.sum(axis=1)
    level_f = mean + (h_counts * mean_pattern).sum(axis=1)  # the trace's constant: sum f + background
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
        # pass 3: background pinned, exact transmission; the attenuation of each pixel chosen by chi-square
        # among the levels next to its estimate.  A spot has one energy, so the estimate and the depth
        # support of faint pixels come from their neighbours.
        strong = (
            (gain[:, 1:].max(axis=1, initial=0) >= 4 * cfg.recon.significance)
            & (c_fit >= c_lo)
            & (c_fit <= c_hi)
        )
        c_near = _neighbourhood(np.where(strong, c_fit, np.nan), ri, ci, 2, "median")
        c_px = np.where(
            np.isfinite(c_near), c_near, np.where((c_fit >= c_lo) & (c_fit <= c_hi), c_fit, c_nominal)
        )
        mu_px = -np.log1p(-np.clip(c_px, 1e-6, 1 - 1e-6))
        allowed = _fill_gaps(own, 2 * band)
        lone = ~own.any(axis=1)
        allowed[lone] = _neighbourhood(own, ri, ci, 1, "any")[lone]
        allowed[~has_signal] = False
        e = (y - background[:, None]) / sigma[:, None]
        centre = np.abs(np.log(mu_px)[:, None] - np.log(_MU_LEVELS)[None, :]).argmin(axis=1)
        centre = np.clip(centre, 1, len(_MU_LEVELS) - 2)
        chis = np.full((out.size, len(_MU_LEVELS)), np.inf)
        best = np.full(out.size, np.inf)
        hw = np.zeros_like(h)
        for lev in range(len(_MU_LEVELS)):
            idx = np.flatnonzero((np.abs(centre - lev) <= 1) & has_signal)
            if idx.size == 0:
                continue
            level = _Level(dct, _MU_LEVELS[lev], cfg, dtype, centred=False)
            c_lev = -np.expm1(-_MU_LEVELS[lev])
            hl, chil = level.on_support(e[idx], allowed[idx], weak, init=h[idx] / c_lev)
            chis[idx, lev] = chil
            better = chil < best[idx]
            best[idx[better]], hw[idx[better]] = chil[better], hl[better]
        profiles_w = hw * sigma[:, None]
        chi = np.where(np.isfinite(best), best, chi)
        # attenuation refined between levels: a parabola through chi-square at the three levels around
        # the estimate, in log(mu); its curvature gives the 1-sigma (delta chi-square = 1) uncertainty
        mu_fit, mu_sig = _refine_attenuation(chis, centre)
        c_final = np.where(np.isfinite(mu_fit), -np.expm1(-mu_fit), c_px)
        c_sigma = np.where(np.isfinite(mu_fit), np.exp(-mu_fit) * mu_fit * mu_sig, np.nan)
        # pixels seeing several grains: each depth component with its own contrast, when the
        # neighbourhood tells them apart (the pinned fit above assumes one energy per pixel)
        runs = _components(own.astype(float), rel=0.5, gap=0)
        cc = _component_contrasts(h_counts, runs, total_f, ri, ci, (c_lo, c_hi))
        multi = np.isfinite(cc[:, 1:]).any(axis=1)
        if multi.any():
            # the pinned fit's shapes, each component rescaled from the pixel's contrast to its own
            per_bin = np.take_along_axis(cc[multi], runs[multi], axis=1)
            scale = np.where(
                np.isfinite(per_bin), c_final[multi, None] / np.where(np.isfinite(per_bin), per_bin, 1.0), 1.0
            )
            profiles_w[multi] = profiles_w[multi] * scale
        total_f = profiles_w.sum(axis=1)
    chi2 = chi / max(n_f - 1, 1)
    no_signal = ~has_signal | (profiles_w.sum(axis=1) <= 0)
    quality[no_signal] |= NO_SIGNAL
    profiles_w[no_signal] = 0.0
    plausible = (bg_all is not None) & (c_fit >= c_lo) & (c_fit <= c_hi)
    quality[~plausible & ~no_signal & (bg_all is not None)] |= CONTRAST
    quality[chi2 > 3.0] |= POOR_FIT
    profiles = _rebin(profiles_w, dct.w, dct.u_lo, dct.u_hi)

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
