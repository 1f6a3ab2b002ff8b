"""The decoder's passes and its public entry point: decode() turns a block's pixel traces into depth
profiles (the Decoded result with its quality flags).

Pass 1 fits the whole code grid of the pixels that show modulation, and each pixel's support is then
chosen (support.py); pass 2 refits on it with a weak L1, contrast free (centred dictionaries); pass 3
pins the background measured in the block's dark pixels and fits the exact transmission at the
attenuation levels around each pixel's contrast, which gives the scale of the profiles (and, on
request, the energy).  Last, a faint pixel whose trace allows it takes the shape of its
neighbourhood's summed profile (_spot_shapes)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

from ..config import Config
from ..errors import DecodeError
from ..flags import CONTRAST, ENERGY_AMBIGUOUS, NO_BACKGROUND, NO_SIGNAL, POOR_FIT
from ..forward import Setup
from ..geometry import SATURATED
from ..mask import contrast, mu_thickness
from .background import dark_pixels, estimate_background
from .block import Block
from .dictionary import build_dictionary, rebin, unbin
from .energy import (
    MU_LEVELS,
    component_contrasts,
    contrast_range,
    estimate_energy,
    nearest_level,
    refine_attenuation,
    trace_contrast,
)
from .neighbourhood import components, fill_gaps, neighbourhood
from .runtime import ONE_BLAS_THREAD, enable_precision
from .settings import DecodeSettings
from .solvers import Level, fit_supports
from .support import component_energy, select_support


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

    @classmethod
    def concat(cls, parts: Sequence[Decoded], n_depth: int) -> Decoded:
        """The results of several blocks as one, in the order given."""
        if not parts:
            return cls.empty(n_depth)
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))


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
    settings = DecodeSettings.from_config(cfg)
    n_depth = settings.depths.size
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
    enable_precision(settings.dtype)
    with ONE_BLAS_THREAD:
        return _decode(traces, rows, cols, frames, setup, settings, usable, out)


def _decode(traces, rows, cols, frames, setup: Setup, settings: DecodeSettings, usable, out) -> Decoded:
    """decode() of the usable selected pixels ``out``, its input checked."""
    n_f = traces.shape[1]
    dct = build_dictionary(setup, settings, rows[out], cols[out], frames)
    thick = setup.geo.thickness
    mu_nominal = float(mu_thickness(settings.energy, thick)[0]) * float(np.mean(dct.path_factor))
    nominal = Level(dct.transmission(mu_nominal), mu_nominal, settings)
    dark = dark_pixels(traces, usable, nominal.a)
    bg_all = estimate_background(traces, rows, cols, dark)
    blk = Block(settings, traces, rows, cols, out, dct)
    background = bg_all[out] if bg_all is not None else np.full(out.size, np.nan)
    c_lo, c_hi = contrast_range(setup, settings.energy_range, dct.path_factor)

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
    c_nominal = contrast(settings.energy, thick, dct.path_factor)
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
    profiles[lit] = rebin(profiles_w[lit], dct.w, dct.u_lo[lit], dct.u_hi[lit])

    energy = np.full(out.size, np.nan)
    energy_sigma = np.full(out.size, np.nan)
    if settings.estimate_energy and bg_all is not None:
        energy, energy_sigma, ambiguous = estimate_energy(
            setup, settings.energy_range, rows[out], cols[out], c_final, c_sigma,
            ~no_signal & np.isfinite(c_sigma),
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


def _first_levels(blk: Block, background, mu_nominal: float, c_range, has_background: bool) -> np.ndarray:
    """The attenuation level of each pixel for passes 1 and 2 (the bar-edge shape depends on it): from a
    first contrast estimate, (high - low) / (high - background) of the smoothed trace, shared within
    the spot (one spot, one energy); the nominal energy's where there is none."""
    level1 = np.full(blk.y.shape[0], nearest_level(mu_nominal))
    if not has_background:
        return level1
    c_trace, reliable = trace_contrast(blk.y, background, blk.sigma)
    ok = reliable & (c_trace >= c_range[0]) & (c_trace <= c_range[1])
    c_near = neighbourhood(np.where(ok, c_trace, np.nan), blk.ri, blk.ci, 2, "median")
    return np.where(np.isfinite(c_near), nearest_level(-np.log1p(-np.clip(c_near, 0, 1 - 1e-6))), level1)


def _pass_support(blk: Block, level1: np.ndarray, active: np.ndarray):
    """Pass 1: the sparse, smooth fit over the whole code grid of the pixels whose traces show modulation
    (``active``), then the support each pixel's trace supports (select_support).

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
        labels[act] = components(h[act])
        parts.append((act, component_energy(h[act], labels[act], level.gram, band)))
    gain = np.zeros((n, int(labels.max()) + 1))
    for act, g in parts:
        gain[act, : g.shape[1]] = g
    gain[:, 0] = 0.0
    return h, gain, select_support(blk, level1, h, labels, gain)


def _pass_refit(blk: Block, level1: np.ndarray, own: np.ndarray, h: np.ndarray):
    """Pass 2: refit on the kept support with a weak L1, contrast free (centred dictionaries), warm-started
    from pass 1: the depth of thin grains.  Returns h (P, K) and the misfit |d - A h|^2 (P,)."""
    levs = np.unique(level1)
    return fit_supports(
        [blk.level(lev) for lev in levs], np.searchsorted(levs, level1), np.arange(len(level1)), blk.d, own,
        h, blk.weak,
    )


def _pass_pinned(blk: Block, h, h_counts, chi, own, gain, has_signal, background, c_fit, c_nominal, total_f,
                 c_range):
    """Pass 3: the background pinned, exact transmission; the attenuation of each pixel chosen by
    chi-square among the three levels around its estimate and refined between them.  A spot has one
    energy, so the estimate and the depth support of faint pixels come from their neighbours, and so
    may their profile's shape (_spot_shapes).

    Returns the profiles on the code grid in counts (P, K), the misfit (P,), the contrast and its
    1-sigma uncertainty (P,)."""
    settings, ri, ci, band = blk.settings, blk.ri, blk.ci, blk.band
    c_lo, c_hi = c_range
    n, k = h.shape
    plausible = (c_fit >= c_lo) & (c_fit <= c_hi)
    strong = (gain[:, 1:].max(axis=1, initial=0) >= 4 * settings.significance) & plausible
    c_near = neighbourhood(np.where(strong, c_fit, np.nan), ri, ci, 2, "median")
    c_px = np.where(np.isfinite(c_near), c_near, np.where(plausible, c_fit, c_nominal))
    mu_px = -np.log1p(-np.clip(c_px, 1e-6, 1 - 1e-6))
    allowed = fill_gaps(own, 2 * band)
    lone = ~own.any(axis=1)
    allowed[lone] = neighbourhood(own, ri, ci, 1, "any")[lone]
    allowed[~has_signal] = False
    e = (blk.y - background[:, None]) / blk.sigma[:, None]
    centre = np.abs(np.log(mu_px)[:, None] - np.log(MU_LEVELS)[None, :]).argmin(axis=1)
    centre = np.clip(centre, 1, len(MU_LEVELS) - 2)

    # every pixel with signal at its three levels, all in one batch of fits
    sig = np.flatnonzero(has_signal)
    row_lev = (centre[sig, None] + np.arange(-1, 2)[None, :]).ravel()
    levs = np.unique(row_lev)
    fits, misfit = fit_supports(
        [blk.level(lev, centred=False) for lev in levs], np.searchsorted(levs, row_lev), np.repeat(sig, 3), e,
        allowed, h, blk.weak,
    )
    chis = np.full((n, len(MU_LEVELS)), np.inf)
    chis[np.repeat(sig, 3), row_lev] = misfit
    pick = misfit.reshape(-1, 3).argmin(axis=1)  # the first of equals, as the levels go up
    hw = np.zeros_like(h)
    hw[sig] = fits.reshape(-1, 3, k)[np.arange(sig.size), pick]
    profiles_w = hw * blk.sigma[:, None]
    chi = chi.copy()
    chi[sig] = misfit.reshape(-1, 3)[np.arange(sig.size), pick]
    # attenuation refined between levels: a parabola through chi-square at the three levels around
    # the estimate, in log(mu); its curvature gives the 1-sigma (delta chi-square = 1) uncertainty
    mu_fit, mu_sig = refine_attenuation(chis, centre)
    c_final = np.where(np.isfinite(mu_fit), -np.expm1(-mu_fit), c_px)
    c_sigma = np.where(np.isfinite(mu_fit), np.exp(-mu_fit) * mu_fit * mu_sig, np.nan)
    # pixels seeing several grains: each depth component with its own contrast, when the
    # neighbourhood tells them apart (the pinned fit above assumes one energy per pixel)
    pieces = components(own.astype(float), rel=0.5, gap=0)
    cc = component_contrasts(h_counts, pieces, total_f, ri, ci, c_range)
    multi = np.isfinite(cc[:, 1:]).any(axis=1)
    if multi.any():
        # the pinned fit's shapes, each component rescaled from the pixel's contrast to its own
        per_bin = np.take_along_axis(cc[multi], pieces[multi], axis=1)
        scale = np.where(
            np.isfinite(per_bin), c_final[multi, None] / np.where(np.isfinite(per_bin), per_bin, 1.0), 1.0
        )
        profiles_w[multi] = profiles_w[multi] * scale
    lev_px = np.zeros(n, int)
    lev_px[sig] = row_lev.reshape(-1, 3)[np.arange(sig.size), pick]
    _spot_shapes(blk, profiles_w, chi, e, lev_px, has_signal & ~multi)
    return profiles_w, chi, c_final, c_sigma


def _spot_shapes(blk: Block, profiles_w, chi, e, lev_px, candidates) -> None:
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
    depth[lit] = rebin(profiles_w[lit], dct.w, dct.u_lo[lit], dct.u_hi[lit])
    summed = neighbourhood(depth, blk.ri, blk.ci, 1, "sum")
    shape = unbin(summed[px], dct.w, dct.u_lo[px], dct.u_hi[px]) / blk.sigma[px, None]
    model = np.zeros((px.size, e.shape[1]))
    for lev in np.unique(lev_px[px]):
        m = lev_px[px] == lev
        model[m] = np.einsum("rk,nk->rn", shape[m], blk.level(lev, centred=False).a)
    norm = np.einsum("rn,rn->r", model, model)
    scale = np.where(norm > 0, np.einsum("rn,rn->r", model, e[px]) / np.maximum(norm, 1e-30), 0.0)
    scale = np.maximum(scale, 0.0)
    misfit = np.einsum("rn,rn->r", e[px] - scale[:, None] * model, e[px] - scale[:, None] * model)
    sig = blk.settings.significance
    explained = np.einsum("rn,rn->r", e[px], e[px]) - misfit
    take = (scale > 0) & (explained >= sig) & (misfit <= chi[px] + sig)
    rows = px[take]
    profiles_w[rows] = scale[take, None] * shape[take] * blk.sigma[rows, None]
    chi[rows] = misfit[take]
