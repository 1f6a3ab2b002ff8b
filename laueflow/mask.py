"""The gold coded aperture: its code, its bars in code coordinates, thick-bar gold fraction, attenuation.

Code coordinate u (um) runs from 0 to L along the mask: ``pad`` of open margin, the bits (a 0 bit
``bitsizes[0]`` wide, a 1 bit ``bitsizes[1]``, both times ``stretch``), and ``pad`` again.  A run of
1 bits is one gold bar; each bar grows by ``widening`` (half on each side).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from .config import Config, ConfigError, code_sha256, read_code

GOLD_DENSITY = 19.32  # g/cm3


def debruijn(n: int = 8, k: int = 2) -> np.ndarray:
    """The binary (k = 2) de Bruijn sequence B(k, n): every n-bit word appears once, cyclically."""
    a = [0] * (k * n)
    seq: list[int] = []

    def db(t: int, p: int) -> None:
        if t > n:
            if n % p == 0:
                seq.extend(a[1 : p + 1])
        else:
            a[t] = a[t - p]
            db(t + 1, p)
            for j in range(a[t - p] + 1, k):
                a[t] = j
                db(t + 1, t)

    db(1, 1)
    return np.asarray(seq, dtype=np.int8)


def load_code(path: str | Path) -> np.ndarray:
    """Read a 0/1 code from a .npy file: a non-empty 1-D binary sequence, else :class:`ConfigError`
    (see :func:`laueflow.config.read_code`)."""
    return read_code(path)


@dataclass(frozen=True)
class Mask:
    """A coded mask laid out in code coordinates (um)."""

    code: np.ndarray
    bars: np.ndarray  # (n_bars, 2) start and end of each gold bar, um
    length: float  # L, um
    thickness: float  # gold thickness, um

    @property
    def breakpoints(self) -> tuple[np.ndarray, np.ndarray]:
        """Knots (x, C(x)) of the cumulative gold length C(u) = |gold within [0, u]|, piecewise linear."""
        x = np.concatenate([[0.0], self.bars.ravel(), [self.length]])
        gold = np.zeros_like(x)
        seg = np.diff(x)
        inside = np.zeros(seg.size, bool)
        inside[1:-1:2] = True  # segments between a bar's start and end
        gold[1:] = np.cumsum(np.where(inside, seg, 0.0))
        return x, gold

    def open_fraction(self) -> float:
        return 1.0 - float(np.sum(self.bars[:, 1] - self.bars[:, 0])) / self.length


def layout(code: np.ndarray, bitsizes=(15.0, 7.5), widening=0.0, pad=150.0, stretch=1.0,
           reversed_: bool = False, thickness: float = 3.7) -> Mask:
    """Lay a 0/1 code out into gold bars in code coordinates."""
    code = np.asarray(code, dtype=np.int8)
    if reversed_:
        code = code[::-1]
    widths = np.where(code == 1, bitsizes[1], bitsizes[0]) * stretch
    starts = pad + np.concatenate([[0.0], np.cumsum(widths)[:-1]])
    ends = starts + widths
    length = float(np.sum(widths) + 2 * pad)
    bars: list[list[float]] = []
    for s, e, bit in zip(starts, ends, code, strict=True):
        if bit != 1:
            continue
        if bars and abs(bars[-1][1] - s) < 1e-9:
            bars[-1][1] = e  # a run of 1 bits is one bar
        else:
            bars.append([s, e])
    arr = np.asarray(bars, dtype=np.float64).reshape(-1, 2)
    arr[:, 0] -= widening / 2
    arr[:, 1] += widening / 2
    arr = np.clip(arr, 0.0, length)
    merged: list[list[float]] = []
    for s, e in arr:  # widened bars that touch become one
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return Mask(code=code, bars=np.asarray(merged).reshape(-1, 2), length=length, thickness=thickness)


def from_config(cfg: Config) -> Mask:
    """The mask a configuration describes (a generated de Bruijn B(2, 8) code when no path is set)."""
    m = cfg.geo.mask
    code = load_code(cfg.resolve(m.path)) if m.path is not None else debruijn(8)
    if m.sha256 is not None and code_sha256(code) != m.sha256:  # the file changed since it was loaded
        raise ConfigError(f"{cfg.source_file or 'configuration'}: geo.mask.path: the code in "
                          f"{cfg.resolve(m.path)} changed since the configuration was loaded "
                          f"(sha256 {code_sha256(code)}, not {m.sha256}); rerun with the mask unchanged")
    return layout(code, m.bitsizes, m.widening, m.pad, m.stretch, m.reversed, m.thickness)


def _window_gold(xp, u, blur, bars, cumulative):
    """Mean gold indicator over [u - h, u + h], h = blur / 2, with the array module ``xp`` (NumPy or JAX).

    The overlap of the window with a bar [s, e] is ``max(0, min(h, e - u) + min(h, u - s))``: it only
    ever subtracts u from a nearby bar edge, so it stays exact in float32 where ``u + h`` would round
    back to u (u ~ 3000 um has an ulp of 2.4e-4 um).  Only the first and the last bar the window
    touches can be cut; the bars between them lie wholly inside, and their gold comes from the
    cumulative gold length ``cumulative`` (n + 1 values), so any blur costs the same two searches.
    """
    starts, ends = bars[:, 0], bars[:, 1]
    n = starts.shape[0]
    if n == 0:  # an all-open code
        return xp.zeros_like(u)
    h = blur / 2
    lo = xp.searchsorted(ends, u - h, side="right")  # first bar ending after the window starts
    hi = xp.searchsorted(starts, u + h, side="left") - 1  # last bar starting before it ends
    lo_c, hi_c = xp.clip(lo, 0, n - 1), xp.clip(hi, 0, n - 1)

    def overlap(i):
        return xp.maximum(xp.minimum(h, ends[i] - u) + xp.minimum(h, u - starts[i]), 0)

    first = xp.where(lo <= hi, overlap(lo_c), 0)
    last = xp.where(hi > lo, overlap(hi_c), 0)
    between = xp.where(hi - lo >= 2, cumulative[hi_c] - cumulative[xp.minimum(lo_c + 1, n)], 0)
    total = first + last + between
    positive = h > 0
    inside = (lo <= hi).astype(total.dtype)  # blur 0: the indicator (bar interiors; edges are open)
    return xp.where(positive, total / xp.where(positive, 2 * h, 1), inside)


def gold_before(bars) -> np.ndarray:
    """Gold length before each bar and in all (n + 1 values), for :func:`gold_fraction`."""
    bars = np.asarray(bars, dtype=np.float64)
    return np.concatenate([[0.0], np.cumsum(bars[:, 1] - bars[:, 0])])


def gold_fraction(u, blur, bars, gold_before_bars=None):
    """Mean gold indicator over [u - blur/2, u + blur/2] (JAX; broadcasts u against blur).

    ``bars`` (n, 2) holds the starts and ends of the sorted, disjoint gold bars (:attr:`Mask.bars`);
    ``gold_before_bars`` is :func:`gold_before` of them, best computed in float64 before the cast
    (when omitted it is summed here, in the working precision).  Exact for any blur, from zero (the
    indicator) to many bars wide, and accurate in float32 to the rounding of u itself: the window
    is never formed as u +- blur/2.  Cost: two binary searches over the bars, whatever the blur.
    """
    u = jnp.asarray(u)
    blur = jnp.asarray(blur, dtype=u.dtype)
    u, blur = jnp.broadcast_arrays(u, blur)
    bars = jnp.asarray(bars, dtype=u.dtype).reshape(-1, 2)
    if gold_before_bars is None:
        gold_before_bars = jnp.concatenate([jnp.zeros(1, u.dtype), jnp.cumsum(bars[:, 1] - bars[:, 0])])
    return _window_gold(jnp, u, blur, bars, jnp.asarray(gold_before_bars, dtype=u.dtype))


def gold_fraction_np(u: np.ndarray, blur: float | np.ndarray, mask: Mask) -> np.ndarray:
    """NumPy (float64) twin of :func:`gold_fraction` for set-up code that runs outside JAX."""
    u, blur = np.broadcast_arrays(np.asarray(u, dtype=np.float64), np.asarray(blur, dtype=np.float64))
    return _window_gold(np, u, blur, mask.bars, gold_before(mask.bars))


@lru_cache(maxsize=256)
def _mu_rho(energy_ev: float) -> float:
    import xraydb  # opens its SQLite database on import: only where attenuation is computed

    return float(xraydb.mu_elam("Au", energy_ev))


def mu_rho_gold(energy_kev) -> np.ndarray:
    """Mass attenuation coefficient of gold (cm2/g) at the given energies (keV), from xraydb."""
    e = np.atleast_1d(np.asarray(energy_kev, dtype=np.float64))
    return np.array([_mu_rho(round(float(v) * 1000.0, 3)) for v in e.ravel()]).reshape(e.shape)


def mu_thickness(energy_kev, thickness_um: float) -> np.ndarray:
    """mu * t of a gold layer of the given thickness at normal incidence (dimensionless)."""
    return mu_rho_gold(energy_kev) * GOLD_DENSITY * thickness_um * 1e-4


def contrast(energy_kev, thickness_um: float, path_factor=1.0) -> np.ndarray:
    """Fraction c = 1 - exp(-mu_path) of the intensity a full gold bar removes."""
    return 1.0 - np.exp(-mu_thickness(energy_kev, thickness_um) * path_factor)
