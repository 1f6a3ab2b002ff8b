"""An independent, slow, plain-NumPy ray tracer of the coded-aperture forward model.

Written from model.md sections 2-3 only, as a second opinion on laueflow's geometry and forward
model: it does not import ``laueflow.geometry`` or ``laueflow.forward``.  Rotations are built from
unit quaternions (not the Rodrigues formula), bars are laid out here from the 0/1 code, and the
thick-bar gold fraction is a brute-force average of the gold indicator over sub-samples of the
blur window.  Every ray source S(z_j) -> pixel centre is intersected with the mask plane of every
frame explicitly.

Also holds the two beamline geometries of model.md and a helper that builds their configuration.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xraydb

from laueflow import config as C

MASKS = Path("/work/shared/masks")
GOLD_DENSITY = 19.32  # g/cm3

# The two scanner set-ups of model.md: anglez ~44 deg scanned along [0.707, 0.707, 0] by 1 um, and
# anglez ~ -1.3 deg scanned along [1, 0, 0] by 0.5 um.
GEOMETRIES: dict[str, dict[str, Any]] = {
    "oblique": {"anglez": 44.0, "axis": [0.707, 0.707, 0.0], "step": 1.0},
    "flat": {"anglez": -1.3, "axis": [1.0, 0.0, 0.0], "step": 0.5},
}


def make_config(geometry: str = "oblique", mask_path: str | Path | None = None,
                grid: tuple[float, float, float] = (-0.15, 0.2, 0.001), **geo: Any) -> C.Config:
    """A validated configuration for one of :data:`GEOMETRIES` (dist 1 mm, cenx 0, usual detector).

    Extra keyword arguments are nested ``geo`` entries given as ``section__key=value``
    (e.g. ``mask__widening=1.0``, ``mask__focus__anglex=2.0``, ``scanner__rot=[0, 0, 0.01]``).
    """
    g = GEOMETRIES[geometry]
    d: dict[str, Any] = {
        "file": {"path": "/nonexistent/scan"},
        "geo": {
            "mask": {"bitsizes": [15.0, 7.5], "thickness": 3.7,
                     "focus": {"dist": 1.0, "cenx": 0.0, "cenz": 0.0, "anglex": 0.0, "angley": 0.0,
                               "anglez": g["anglez"]}},
            "scanner": {"step": g["step"], "axis": list(g["axis"])},
            "detector": {"shape": [2048, 2048], "size": [409.6, 409.6], "rot": [-1.20, -1.21, -1.22],
                         "pos": [28.8, 2.7, 513.0]},
            "source": {"grid": list(grid)},
        },
    }
    if mask_path is not None:
        d["geo"]["mask"]["path"] = str(mask_path)
    for key, value in geo.items():
        node = d["geo"]
        *parents, leaf = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a typo in a key must fail the test, not pass silently
        return C.from_dict(d)


def depth_grid(grid: tuple[float, float, float]) -> np.ndarray:
    """Depth bin centres (mm) of a [start, stop, step] grid, stop excluded."""
    start, stop, step = grid
    return start + step * np.arange(int(round((stop - start) / step)))


# ----------------------------------------------------------------------------------------------
# Rotations


def axis_angle(v: Any) -> np.ndarray:
    """Rotation by |v| radians about v/|v|, built from the unit quaternion (cos(t/2), sin(t/2) k)."""
    v = np.asarray(v, dtype=np.float64)
    theta = float(np.sqrt(v @ v))
    if theta == 0.0:
        return np.eye(3)
    a = np.cos(theta / 2)
    b, c, d = np.sin(theta / 2) * v / theta
    return np.array([
        [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
        [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d],
    ])


def about_lab_axis(i: int, degrees: float) -> np.ndarray:
    """Right-handed rotation by ``degrees`` about lab axis i (0: e1, 1: e2, 2: e3)."""
    return axis_angle(np.radians(degrees) * np.eye(3)[i])


def mask_axes(anglex: float, angley: float, anglez: float) -> np.ndarray:
    """R_m = R_y(angley) R_z(anglez) R_x(anglex); columns m_x, m_y, m_z."""
    return about_lab_axis(1, angley) @ about_lab_axis(2, anglez) @ about_lab_axis(0, anglex)


def pixel_centre(cfg: C.Config, row: float, col: float) -> np.ndarray:
    """Lab-frame centre (mm) of detector pixel (row, col)."""
    det = cfg.geo.detector
    (n0, n1), (s0, s1), pos = det.shape, det.size, det.pos
    x = (col - (n0 - 1) / 2) * s0 / n0 + pos[0]
    y = (row - (n1 - 1) / 2) * s1 / n1 + pos[1]
    local = np.array([x, y, pos[2]])
    q = axis_angle(det.rot) @ local
    return np.array([q[2], q[1], -q[0]])


# ----------------------------------------------------------------------------------------------
# The mask


def mask_code(cfg: C.Config) -> np.ndarray:
    """The 0/1 code of a configuration (laueflow's generated de Bruijn code when no path is set)."""
    path = cfg.geo.mask.path
    if path is None:
        from laueflow.mask import debruijn  # only the bit sequence; its layout is done here

        return np.asarray(debruijn(8), dtype=int)
    return np.asarray(np.load(path), dtype=int).ravel()


@dataclass(frozen=True)
class Bars:
    """Gold bars in code coordinates (um): bar k covers [starts[k], ends[k]); the code spans [0, length]."""

    starts: np.ndarray
    ends: np.ndarray
    length: float

    def gold(self, u: np.ndarray) -> np.ndarray:
        """The gold indicator (1 inside a bar) at code coordinates u; bars may overlap."""
        inside = np.searchsorted(self.starts, u, side="right") - np.searchsorted(self.ends, u, side="right")
        return (inside > 0).astype(np.float64)

    def gold_fraction(self, u: np.ndarray, blur: float, n_sub: int = 400) -> np.ndarray:
        """Brute-force mean of the indicator over [u - blur/2, u + blur/2] (midpoint sub-samples)."""
        offsets = blur * ((np.arange(n_sub) + 0.5) / n_sub - 0.5)
        return self.gold(np.asarray(u, dtype=np.float64)[..., None] + offsets).mean(axis=-1)


def bars_from_code(code: Any, bitsizes: tuple[float, float] = (15.0, 7.5), widening: float = 0.0,
                   pad: float = 150.0, stretch: float = 1.0, reverse: bool = False) -> Bars:
    """Walk the code bit by bit: each run of 1 bits is one bar, grown by ``widening`` (half per side)."""
    bits = [int(b) for b in np.ravel(code)]
    if reverse:
        bits = bits[::-1]
    starts: list[float] = []
    ends: list[float] = []
    u = pad
    previous = 0
    for bit in bits:
        width = bitsizes[bit] * stretch
        if bit == 1 and previous == 1:
            ends[-1] = u + width
        elif bit == 1:
            starts.append(u)
            ends.append(u + width)
        u += width
        previous = bit
    length = u + pad
    s = np.clip(np.asarray(starts) - widening / 2, 0.0, length)
    e = np.clip(np.asarray(ends) + widening / 2, 0.0, length)
    return Bars(starts=np.sort(s), ends=np.sort(e), length=length)


def bars_from_config(cfg: C.Config) -> Bars:
    m = cfg.geo.mask
    return bars_from_code(mask_code(cfg), m.bitsizes, m.widening, m.pad, m.stretch, m.reversed)


def mu_thickness(energy_kev: float, thickness_um: float) -> float:
    """mu * t of gold at normal incidence, from xraydb's mass attenuation coefficient."""
    return float(xraydb.mu_elam("Au", energy_kev * 1000.0)) * GOLD_DENSITY * thickness_um * 1e-4


# ----------------------------------------------------------------------------------------------
# The ray tracer


@dataclass(frozen=True)
class Ray:
    """What the tracer found for one pixel: its centre, optics and the code coordinates u[n, j]."""

    pixel: np.ndarray
    blur: float
    mu_path: float
    u: np.ndarray


def thickness_blur(cfg: C.Config, row: float, col: float) -> float:
    """Thick-bar blur l = t |p.m_x / p.m_y| (um) of a pixel."""
    f = cfg.geo.mask.focus
    axes = mask_axes(f.anglex, f.angley, f.anglez)
    p = pixel_centre(cfg, row, col)
    return cfg.geo.mask.thickness * abs((p @ axes[:, 0]) / (p @ axes[:, 1]))


def trace_pixel(cfg: C.Config, row: float, col: float, depths: np.ndarray, profile: np.ndarray,
                frames: np.ndarray, energy_kev: float = 20.0, background: float = 0.0,
                n_sub: int = 400) -> tuple[np.ndarray, Ray]:
    """Trace I_n = b + sum_j f_j T_E(u_n(z_j)) for one pixel by explicit ray-plane intersection.

    Only depths with f_j != 0 are traced.  Returns the trace (N,) and the ray details.
    """
    g = cfg.geo
    f = g.mask.focus
    p = pixel_centre(cfg, row, col)
    axes = mask_axes(f.anglex, f.angley, f.anglez)
    m_x, m_y = axes[:, 0], axes[:, 1]
    d = axis_angle(g.scanner.rot) @ np.asarray(g.scanner.axis, dtype=np.float64)
    bars = bars_from_config(cfg)
    length = bars.length

    depths = np.asarray(depths, dtype=np.float64)
    profile = np.asarray(profile, dtype=np.float64)
    used = np.flatnonzero(profile)
    z = depths[used]
    sources = np.stack([z + g.source.offset, g.source.beta * z, np.zeros_like(z)], axis=-1)  # (J, 3)

    t = g.mask.thickness
    blur = thickness_blur(cfg, row, col)
    phi = np.arctan(p[0] / p[1])
    mu_path = mu_thickness(energy_kev, t) / np.cos(phi + np.radians(f.anglez))

    frames = np.asarray(frames)
    trace = np.full(frames.shape, float(background))
    u_all = np.full((frames.size, depths.size), np.nan)
    for i, n in enumerate(frames):
        centre = np.array([f.cenx, f.dist, f.cenz]) + d * (g.mask.shift + n * g.scanner.step * 1e-3)
        direction = p - sources  # (J, 3): rays S_j -> p
        along = ((centre - sources) @ m_y) / (direction @ m_y)  # ray parameter at the mask plane
        crossing = sources + along[:, None] * direction
        u = length / 2 - 1000.0 * ((crossing - centre) @ m_x)
        u_all[i, used] = u
        transmission = np.exp(-mu_path * bars.gold_fraction(u, blur, n_sub))
        trace[i] += profile[used] @ transmission
    return trace, Ray(pixel=p, blur=blur, mu_path=mu_path, u=u_all)


def affine_fit_error(reference: np.ndarray, model: np.ndarray) -> tuple[float, float, float]:
    """Least-squares fit reference ~ a * model + b; returns (relative error, a, b).

    The relative error is ||residual|| / ||reference - mean(reference)||.
    """
    A = np.stack([model, np.ones_like(model)], axis=1)
    (a, b), *_ = np.linalg.lstsq(A, reference, rcond=None)
    resid = reference - (a * model + b)
    return float(np.linalg.norm(resid) / np.linalg.norm(reference - reference.mean())), float(a), float(b)
