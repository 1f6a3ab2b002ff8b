"""The code-coordinate dictionary a block's pixels share, and the maps between its code grid and each
pixel's depth bins.

Rays from depth z reach a pixel's mask crossing at code coordinate u_0(z); the scan shifts every depth
by the same code step per frame.  So a block shares one dictionary D[n, k] = M(w_k + n * step) on a
code grid w covering all its pixels, and each pixel's profile h(w) maps exactly onto its own depth
grid through u_0(z)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import geometry as G
from ..forward import Setup
from ..mask import gold_fraction_np
from .settings import DecodeSettings


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

    def band(self, widest_bit: float) -> int:
        """Columns over which the code pattern stays correlated: about one wide bit (``widest_bit``, um)
        plus the blur."""
        dw = self.w[1] - self.w[0]
        return int(min(np.ceil(2 * widest_bit / dw), len(self.w) - 1))


def _edges(depths: np.ndarray) -> np.ndarray:
    step = depths[1] - depths[0] if depths.size > 1 else 1e-3
    return np.concatenate([depths - step / 2, depths[-1:] + step / 2])


def build_dictionary(setup: Setup, settings: DecodeSettings, rows, cols, frames) -> Dictionary:
    """Code-coordinate grid, shared gold-fraction matrix and per-pixel depth maps for a block."""
    geo, mask = setup.geo, setup.mask
    depths = settings.depths
    frames = np.asarray(frames, dtype=np.float64)
    pix = G.pixel_centres(geo, rows, cols)
    u = np.asarray(G.code_coordinates(geo, pix, _edges(depths), np.array([0.0, 1.0])), dtype=np.float64)
    u0 = u[:, 0, :]  # (P, J+1) at frame 0
    step = float(np.mean(u[:, 1, :] - u0))  # exact per-frame code shift, averaged over the block
    optics = G.pixel_optics(geo, pix)
    dz_um = abs(depths[1] - depths[0]) * 1e3 if depths.size > 1 else 1.0
    slope = np.median(np.abs(np.diff(u0, axis=1))) / dz_um  # |du/dz|, about kappa
    dw = max(slope * dz_um / settings.oversample, 1e-3)
    lo, hi = u0.min() - 2 * dw, u0.max() + 2 * dw
    k = int(np.ceil((hi - lo) / dw)) + 1
    k = -(-k // 32) * 32  # a multiple of 32, so blocks share compiled shapes
    w = lo + dw * np.arange(k)
    sub = G.SUBSAMPLE_OFFSETS * dw  # points across each column's bin
    gold = gold_fraction_np(
        w[None, None, :] + sub[:, None, None] + step * frames[None, :, None],
        float(np.mean(optics.blur)),
        mask,
    )
    return Dictionary(
        w=w, gold=gold, step=step, u_lo=u0[:, :-1], u_hi=u0[:, 1:], path_factor=optics.path_factor
    )


def rebin(h: np.ndarray, w: np.ndarray, u_lo: np.ndarray, u_hi: np.ndarray) -> np.ndarray:
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


def unbin(profiles: np.ndarray, w: np.ndarray, u_lo: np.ndarray, u_hi: np.ndarray) -> np.ndarray:
    """Mass-conserving map of depth profiles (P, J) onto the code grid w, through each pixel's depth bins
    [u_lo, u_hi] (the inverse of rebin, each depth bin's mass spread evenly over its code interval)."""
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
