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
def _solve(matrix, minv, data, allowed, sparsity, rho, iterations: int):
    """ADMM for min 1/2|d - A h|^2 + sparsity sum h + 1/2 h'Sh with h >= 0 and h = 0 where not
    ``allowed``; ``minv`` = (A'A + S + rho I)^-1.  data (P, N), allowed (P, K) -> h (P, K)."""

    def one(d, ok):
        atd = matrix.T @ d

        def step(carry, _):
            z, u = carry
            x = minv @ (atd + rho * (z - u))
            z = jnp.where(ok, jnp.maximum(x + u - sparsity / rho, 0.0), 0.0)
            return (z, u + x - z), None

        zero = jnp.zeros(matrix.shape[1], dtype=d.dtype)
        (z, _), _ = jax.lax.scan(step, (zero, zero), None, length=iterations)
        return z

    return jax.vmap(one)(data, allowed)


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
    (row, col) fitted to their mean counts.  None when fewer than 8 dark pixels exist."""
    if dark.sum() < 8:
        return None
    m = traces[dark].mean(axis=1)
    a = np.stack([np.ones(dark.sum()), rows[dark], cols[dark]], axis=1).astype(np.float64)
    if np.ptp(rows[dark]) == 0 or np.ptp(cols[dark]) == 0:
        coef = np.array([np.median(m), 0.0, 0.0])
    else:
        coef, *_ = np.linalg.lstsq(a, m, rcond=None)
    full = np.stack([np.ones(len(rows)), rows, cols], axis=1) @ coef
    return np.maximum(full, 0.0)


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
    """Centred dictionary, factorisation and ADMM for one attenuation level of one block."""

    def __init__(self, dct: Dictionary, mu: float, cfg: Config, dtype):
        m = dct.pattern(mu)
        self.mean = m.mean(axis=0)
        self.a = m - self.mean  # centring removes the constant (background and contrast)
        self.gram = self.a.T @ self.a
        k = self.a.shape[1]
        lmat = np.diff(np.eye(k), axis=0)
        self.rho = float(np.trace(self.gram) / k)
        # L1 weights are given in units of the universal threshold: the largest correlation of pure
        # unit-variance noise with any of the K columns is about |a| sqrt(2 ln K)
        self.unit = float(np.median(np.linalg.norm(self.a, axis=0)) * np.sqrt(2 * np.log(k)))
        system = self.gram + cfg.recon.smoothness * (lmat.T @ lmat) + self.rho * np.eye(k)
        self.minv = np.linalg.inv(system)
        self.cfg, self.dtype = cfg, dtype

    def __call__(self, d: np.ndarray, allowed: np.ndarray, sparsity: float) -> np.ndarray:
        n = d.shape[0]
        pad = max(64, 1 << int(np.ceil(np.log2(max(n, 1)))))  # few distinct shapes to compile
        dp = np.zeros((pad, d.shape[1]))
        dp[:n] = d
        ap = np.zeros((pad, allowed.shape[1]), bool)
        ap[:n] = allowed
        t = self.dtype
        h = _solve(jnp.asarray(self.a, t), jnp.asarray(self.minv, t), jnp.asarray(dp, t), jnp.asarray(ap),
                   jnp.asarray(sparsity * self.unit, t), jnp.asarray(self.rho, t), self.cfg.recon.iterations)
        return np.asarray(h, dtype=np.float64)[:n]


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
    allowed = _grow(np.take_along_axis(keep, labels, axis=1), max(1, band // 4))

    # contrast of each pixel: modulation total over intensity above the measured background
    background = bg_all[out] if bg_all is not None else np.full(out.size, np.nan)
    h_counts = h * sigma[:, None]
    total_f = mean + h_counts @ first.mean - np.nan_to_num(background, nan=0.0)
    total_h = h_counts.sum(axis=1)
    c_fit = np.where(total_f > 0, total_h / np.maximum(total_f, 1e-12), np.nan)
    c_lo, c_hi = _contrast_range(setup, cfg, dct.path_factor)
    plausible = (bg_all is not None) & (c_fit >= c_lo) & (c_fit <= c_hi)
    mu_fit = np.where(plausible, -np.log1p(-np.clip(c_fit, 1e-6, 1 - 1e-6)), mu_nominal)

    # pass 2: refit on the kept support, each pixel with the dictionary of its attenuation level
    level = np.abs(np.log(mu_fit)[:, None] - np.log(_MU_LEVELS)[None, :]).argmin(axis=1)
    h = np.zeros_like(h)
    mean_pattern = np.zeros((out.size, k))
    resid = np.zeros_like(d)
    for lev in np.unique(level):
        idx = np.flatnonzero(level == lev)
        solver = first if abs(_MU_LEVELS[lev] - mu_nominal) < 1e-12 else _Solver(dct, _MU_LEVELS[lev], cfg, dtype)
        h[idx] = solver(d[idx], allowed[idx], cfg.recon.sparsity * cfg.recon.refit_sparsity)
        mean_pattern[idx] = solver.mean
        resid[idx] = d[idx] - h[idx] @ solver.a.T
    chi2 = (resid**2).sum(axis=1) / max(n_f - 1, 1)

    h_counts = h * sigma[:, None]  # undo the noise normalisation: h = c f in counts
    total_h = h_counts.sum(axis=1)
    level_f = mean + (h_counts * mean_pattern).sum(axis=1)  # the trace's constant: sum f + background
    quality = np.zeros(out.size, np.uint8)
    no_signal = dark[out] | (total_h <= 0)
    quality[no_signal] |= NO_SIGNAL
    if bg_all is None:
        quality |= NO_BACKGROUND
    total_f = level_f - np.nan_to_num(background, nan=0.0)
    c_fit = np.where(total_f > 0, total_h / np.maximum(total_f, 1e-12), np.inf)
    plausible = (bg_all is not None) & (c_fit >= c_lo) & (c_fit <= c_hi)
    quality[~plausible & ~no_signal & (bg_all is not None)] |= CONTRAST
    c_nominal = -np.expm1(-float(mu_thickness(cfg.recon.energy, thick)[0]) * dct.path_factor)
    c_use = np.where(plausible, c_fit, c_nominal)
    h_counts[no_signal] = 0.0
    profiles = _rebin(h_counts / c_use[:, None], dct.w, dct.u_lo, dct.u_hi)
    quality[chi2 > 3.0] |= POOR_FIT

    energy = np.full(out.size, np.nan)
    energy_sigma = np.full(out.size, np.nan)
    if cfg.recon.estimate_energy:
        energy, energy_sigma, ambiguous = estimate_energy(setup, cfg, rows[out], cols[out], c_fit, total_h,
                                                          total_f, sigma, n_f, plausible)
        quality[ambiguous & ~no_signal] |= ENERGY_AMBIGUOUS
    if bg_all is None:
        background = level_f - profiles.sum(axis=1)
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
