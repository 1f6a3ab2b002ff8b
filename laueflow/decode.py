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

from dataclasses import dataclass, fields
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from . import geometry as G
from .config import Config
from .forward import Setup
from .mask import gold_fraction_np, mu_thickness

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
        return cls(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros((0, n_depth), np.float32),
                   z, z, np.zeros(0, np.uint8), z, z)

    def take(self, idx) -> Decoded:
        return Decoded(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})


@dataclass(frozen=True)
class Dictionary:
    """The code-coordinate dictionary shared by a block's pixels."""

    w: np.ndarray  # (K,) code coordinates of the columns, um
    gold: np.ndarray  # (N, K) thick-bar gold fraction at w_k + n * step
    step: float  # code shift per frame, um
    u_lo: np.ndarray  # (P, J) code coordinate of each depth bin's lower edge, per pixel
    u_hi: np.ndarray  # (P, J) ... upper edge
    path_factor: np.ndarray  # (P,) 1 / cos(phi + alpha)

    def pattern(self, mu: float) -> np.ndarray:
        """M = (1 - exp(-mu gf)) / (1 - exp(-mu)): the dip a unit of h makes, for attenuation mu."""
        return -np.expm1(-mu * self.gold) / -np.expm1(-mu)


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
    gold = gold_fraction_np(w[None, :] + step * frames[:, None], float(np.mean(optics.blur)), mask)
    return Dictionary(w=w, gold=gold, step=step, u_lo=u0[:, :-1], u_hi=u0[:, 1:],
                      path_factor=optics.path_factor)


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
        return (f"the mask never crosses the rays during the scan for any depth of the grid "
                f"[{um[0]:.1f}, {um[-1]:.1f}] um (code coordinates {lo.min():.0f}-{hi.max():.0f} um "
                f"vs bars at {first:.0f}-{last:.0f} um): check geo.mask.focus and geo.scanner")
    good = um[ok]
    return (f"the mask resolves only depths {good.min():.1f} to {good.max():.1f} um of the grid "
            f"[{um[0]:.1f}, {um[-1]:.1f}] um for these pixels: narrow geo.source.grid or check the geometry")


def _band(dct: Dictionary, cfg: Config) -> int:
    """Columns over which the code pattern stays correlated: about one wide bit plus the blur."""
    dw = dct.w[1] - dct.w[0]
    return int(min(np.ceil(2 * max(cfg.geo.mask.bitsizes) / dw), len(dct.w) - 1))


@partial(jax.jit, static_argnames=("iterations",))
def _solve(matrix, minv, data, allowed, init, sparsity, rho, iterations: int):
    """ADMM for min 1/2|d - A h|^2 + sparsity sum h + 1/2 h'Sh with h >= 0 and h = 0 where not
    ``allowed``; ``minv`` = (A'A + S + rho I)^-1.  data (P, N), allowed and init (P, K) -> h (P, K)."""

    def one(d, ok, z0):
        atd = matrix.T @ d

        def step(carry, _):
            z, u = carry
            x = minv @ (atd + rho * (z - u))
            z = jnp.where(ok, jnp.maximum(x + u - sparsity / rho, 0.0), 0.0)
            return (z, u + x - z), None

        (z, _), _ = jax.lax.scan(step, (z0, jnp.zeros_like(z0)), None, length=iterations)
        return z

    return jax.vmap(one)(data, allowed, init)


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
_MU_LEVELS = np.geomspace(0.08, 4.0, 11)


class _Solver:
    """Dictionary, factorisation and ADMM for one attenuation level of one block.

    ``centred``: the dip pattern with each column's mean removed, for traces whose constant is free;
    otherwise the transmission exp(-mu gf) itself, for traces with the background subtracted."""

    def __init__(self, dct: Dictionary, mu: float, cfg: Config, dtype, centred: bool = True):
        if centred:
            m = dct.pattern(mu)
            self.mean = m.mean(axis=0)
            self.a = m - self.mean
        else:
            self.mean = None
            self.a = np.exp(-mu * dct.gold)
        self.gram = self.a.T @ self.a
        k = self.a.shape[1]
        lmat = np.diff(np.eye(k), axis=0)
        self.rho = float(np.trace(self.gram) / k)
        system = self.gram + cfg.recon.smoothness * (lmat.T @ lmat) + self.rho * np.eye(k)
        self.minv = np.linalg.inv(system)
        # L1 weights are given in units of the universal threshold: the largest correlation of pure
        # unit-variance noise with any of the K columns is about |a| sqrt(2 ln K)
        a0 = m - m.mean(axis=0) if not centred and (m := dct.pattern(mu)) is not None else self.a
        self.unit = float(np.median(np.linalg.norm(a0, axis=0)) * np.sqrt(2 * np.log(k)))
        self.cfg, self.dtype = cfg, dtype

    def __call__(self, d: np.ndarray, allowed: np.ndarray, sparsity: float,
                 init: np.ndarray | None = None) -> np.ndarray:
        n, k = allowed.shape
        pad = max(64, 1 << int(np.ceil(np.log2(max(n, 1)))))  # few distinct shapes to compile
        dp = np.zeros((pad, d.shape[1]))
        dp[:n] = d
        ap = np.zeros((pad, k), bool)
        ap[:n] = allowed
        zp = np.zeros((pad, k))
        if init is not None:
            zp[:n] = np.where(allowed, init, 0.0)
        t = self.dtype
        h = _solve(jnp.asarray(self.a, t), jnp.asarray(self.minv, t), jnp.asarray(dp, t), jnp.asarray(ap),
                   jnp.asarray(zp, t), jnp.asarray(sparsity * self.unit, t), jnp.asarray(self.rho, t),
                   self.cfg.recon.iterations)
        return np.asarray(h, dtype=np.float64)[:n]


def _component_contrasts(h: np.ndarray, labels: np.ndarray, total_f: np.ndarray, ri: np.ndarray,
                         ci: np.ndarray, c_range: tuple[float, float], radius: int = 2) -> np.ndarray:
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
        near = grid[max(ri[p] - radius, 0): ri[p] + radius + 1, max(ci[p] - radius, 0): ci[p] + radius + 1].ravel()
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
    stack = [grid[radius + dr + ri, radius + dc + ci] for dr in range(-radius, radius + 1)
             for dc in range(-radius, radius + 1)]
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
    first = _Solver(dct, mu_nominal, cfg, dtype)
    dark = _dark_pixels(traces, usable, first.a)
    bg_all = estimate_background(traces, rows, cols, dark)

    y = traces[out]
    mean = y.mean(axis=1)
    sigma = np.sqrt(np.maximum(mean, 1.0))  # Poisson: variance = mean counts
    d = -(y - mean[:, None]) / sigma[:, None]  # gold removes intensity: dips become positive
    k = dct.w.size
    band = _band(dct, cfg)

    # pass 1: sparse, smooth fit over the whole grid with the nominal attenuation; keep the support
    # components that explain more chi-square than noise could
    h = first(d, np.ones((out.size, k), bool), cfg.recon.sparsity)
    labels = _components(h)
    gain = _component_energy(h, labels, first.gram, band)
    keep = gain >= cfg.recon.significance
    keep[:, 0] = False
    ri, ci = rows[out] - rows[out].min(), cols[out] - cols[out].min()
    # a component already significant in a neighbouring pixel at the same depth (same spot, same
    # grain) needs only a third of the chi-square gain
    near = _neighbourhood(np.take_along_axis(keep, labels, axis=1), ri, ci, 1, "any")
    seen = np.zeros_like(keep)
    np.logical_or.at(seen, (np.repeat(np.arange(out.size), k), labels.ravel()), near.ravel())
    keep |= seen & (gain >= cfg.recon.significance / 3)
    keep[:, 0] = False
    own = _grow(np.take_along_axis(keep, labels, axis=1), max(1, band // 4))

    # pass 2: refit on that support with a weak L1, contrast free: the depth of thin grains, and the
    # contrast c = (sum of h) / (intensity above the background) of each pixel
    weak = cfg.recon.sparsity * cfg.recon.refit_sparsity
    h = first(d, own, weak, init=h)
    background = bg_all[out] if bg_all is not None else np.full(out.size, np.nan)
    h_counts = h * sigma[:, None]
    total_h = h_counts.sum(axis=1)
    level_f = mean + h_counts @ first.mean  # the trace's constant: sum f + background
    total_f = level_f - np.nan_to_num(background, nan=0.0)
    c_fit = np.where(total_f > 0, total_h / np.maximum(total_f, 1e-12), np.nan)
    c_lo, c_hi = _contrast_range(setup, cfg, dct.path_factor)
    mu_nom_px = float(mu_thickness(cfg.recon.energy, thick)[0]) * dct.path_factor
    c_nominal = -np.expm1(-mu_nom_px)
    excess_tol = 4 * np.sqrt(np.maximum(np.nan_to_num(background, nan=1.0), 1.0) / n_f) + 0.01 * np.nan_to_num(
        background, nan=0.0)
    has_signal = (total_f > excess_tol) | own.any(axis=1) if bg_all is not None else own.any(axis=1)

    quality = np.zeros(out.size, np.uint8)
    if bg_all is None:
        # no dark pixels to measure the background: keep the contrast-free fit, scale at the nominal energy
        quality |= NO_BACKGROUND
        profiles_w = h_counts / c_nominal[:, None]
        fit_a = first.a
        resid = d - h @ fit_a.T
        background = level_f - profiles_w.sum(axis=1)
        c_final = np.full(out.size, np.nan)
    else:
        # pass 3: background pinned, exact transmission at each pixel's attenuation.  A spot has one
        # energy, so the contrast and the depth support are shared with the neighbouring pixels.
        strong = (gain[:, 1:].max(axis=1, initial=0) >= 4 * cfg.recon.significance) & (c_fit >= c_lo) & (c_fit <= c_hi)
        c_near = _neighbourhood(np.where(strong, c_fit, np.nan), ri, ci, 2, "median")
        c_px = np.where(np.isfinite(c_near), c_near, np.where((c_fit >= c_lo) & (c_fit <= c_hi), c_fit, c_nominal))
        mu_px = -np.log1p(-np.clip(c_px, 1e-6, 1 - 1e-6))
        # a pixel's own support, gaps narrower than two code bits bridged; pixels too faint to have
        # support of their own borrow that of their neighbours (the same spot, the same grain)
        allowed = _fill_gaps(own, 2 * band)
        lone = ~own.any(axis=1)
        allowed[lone] = _neighbourhood(own, ri, ci, 1, "any")[lone]
        e = (y - background[:, None]) / sigma[:, None]
        level = np.abs(np.log(mu_px)[:, None] - np.log(_MU_LEVELS)[None, :]).argmin(axis=1)
        hw = np.zeros_like(h)
        resid = np.zeros_like(d)
        for lev in np.unique(level):
            idx = np.flatnonzero((level == lev) & has_signal)
            if idx.size == 0:
                continue
            solver = _Solver(dct, _MU_LEVELS[lev], cfg, dtype, centred=False)
            start = h[idx] / np.maximum(c_px[idx, None], 1e-3)
            hw[idx] = solver(e[idx], allowed[idx], weak, init=start)
            resid[idx] = e[idx] - hw[idx] @ solver.a.T
        profiles_w = hw * sigma[:, None]
        c_final = c_px
        # pixels seeing several grains: each depth component with its own contrast, when the
        # neighbourhood tells them apart (the pinned fit above assumes one energy per pixel)
        runs = _components(own.astype(float), rel=0.5, gap=0)
        cc = _component_contrasts(h_counts, runs, total_f, ri, ci, (c_lo, c_hi))
        multi = np.isfinite(cc[:, 1:]).any(axis=1)
        if multi.any():
            per_bin = np.take_along_axis(cc[multi], runs[multi], axis=1)
            profiles_w[multi] = np.where(np.isfinite(per_bin), h_counts[multi] / np.where(
                np.isfinite(per_bin), per_bin, 1.0), 0.0)
        total_f = profiles_w.sum(axis=1)
    chi2 = (resid**2).sum(axis=1) / max(n_f - 1, 1)
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
        energy, energy_sigma, ambiguous = estimate_energy(setup, cfg, rows[out], cols[out], c_final, total_h,
                                                          total_f, sigma, n_f, plausible)
        quality[ambiguous & ~no_signal] |= ENERGY_AMBIGUOUS
    return Decoded(
        rows=rows[out].astype(np.int32), cols=cols[out].astype(np.int32),
        profiles=profiles.astype(np.float32), background=background.astype(np.float32),
        residual=chi2.astype(np.float32), quality=quality, energy=energy.astype(np.float32),
        energy_sigma=energy_sigma.astype(np.float32))


_ENERGY_GRID = np.linspace(4.0, 80.0, 761)


def _contrast_range(setup: Setup, cfg: Config, path_factor: np.ndarray) -> tuple[float, float]:
    """Lowest and highest contrast any energy of ``recon.energy_range`` gives (with 10 % slack)."""
    e = _ENERGY_GRID[(_ENERGY_GRID >= cfg.recon.energy_range[0]) & (_ENERGY_GRID <= cfg.recon.energy_range[1])]
    c = -np.expm1(-np.multiply.outer(path_factor, mu_thickness(e, setup.geo.thickness)))
    return float(c.min() * 0.9), float(min(c.max() * 1.1, 1.0))


def estimate_energy(setup: Setup, cfg: Config, rows, cols, c_fit, total_h, total_f, sigma, n_frames,
                    plausible) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Energy from the fitted contrast, only where it is unambiguous.

    The contrast c = 1 - exp(-mu(E) t / cos) is not monotonic in E across the Au L edges, so a
    contrast with its uncertainty maps to a set of energies; a single connected set gives the
    energy (its middle) and uncertainty (half its width); several sets are reported as ambiguous."""
    lo_e, hi_e = cfg.recon.energy_range
    e = _ENERGY_GRID[(_ENERGY_GRID >= lo_e) & (_ENERGY_GRID <= hi_e)]
    pix = G.pixel_centres(setup.geo, rows, cols)
    pf = G.pixel_optics(setup.geo, pix).path_factor
    c_of_e = 1.0 - np.exp(-np.multiply.outer(pf, mu_thickness(e, setup.geo.thickness)))  # (P, E)
    # uncertainty of c = H / F: relative errors of the modulation total and of the level add
    rel_h = sigma * np.sqrt(n_frames) / np.maximum(total_h, 1e-9) / np.sqrt(n_frames) * 3.0
    rel_f = sigma / np.sqrt(n_frames) / np.maximum(total_f, 1e-9)
    c_sig = np.abs(c_fit) * np.sqrt(rel_h**2 + rel_f**2) + 0.02
    energy = np.full(len(rows), np.nan)
    esig = np.full(len(rows), np.nan)
    ambiguous = np.zeros(len(rows), bool)
    for i in np.flatnonzero(plausible):
        ok = np.abs(c_of_e[i] - c_fit[i]) <= 2 * c_sig[i]
        if not ok.any():
            continue
        runs = np.flatnonzero(np.diff(np.concatenate([[0], ok.astype(int), [0]])) != 0).reshape(-1, 2)
        if len(runs) > 1:
            ambiguous[i] = True
            continue
        a, b = e[runs[0, 0]], e[runs[0, 1] - 1]
        if b - a > 0.5 * (hi_e - lo_e):
            ambiguous[i] = True
            continue
        energy[i], esig[i] = (a + b) / 2, max((b - a) / 2, e[1] - e[0])
    return energy, esig, ambiguous
