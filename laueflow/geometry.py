"""Beamline geometry (model.md section 2): detector pixels, mask pose per frame, code coordinates.

Lab frame: e1 along the incident beam, e2 up toward the detector, e3 completing a right-handed
frame.  Lengths are mm except code coordinates, which are um.  Set-up (rotations, centres) is
NumPy; the per-ray function :func:`code_coordinate` is written with ``jax.numpy`` so the forward
model and the decoder can jit and vmap it.  Also the detector's saturation level, the sub-sample
positions within a bin, and the reach check (which depths the mask's code crosses during a scan).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import jax.numpy as jnp
import numpy as np

from .config import Config

if TYPE_CHECKING:  # forward imports this module
    from .forward import Setup

SATURATED = 65535  # detector counts of a saturated pixel (16-bit full scale)

# sample positions across a bin, in bin widths: a depth bin (or a column of the decoder's code grid, or the
# calibration's thin film) is a continuous slab, averaged over these points
SUBSAMPLE_OFFSETS = (np.arange(4) + 0.5) / 4 - 0.5


def subsample_depths(depths_mm: np.ndarray, step_mm: float,
                     values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A profile on depth bins as one on points: the :data:`SUBSAMPLE_OFFSETS` points of each bin
    (centres ``depths_mm``, width ``step_mm``), bin by bin, and each bin's value split evenly over its
    points.  What the forward model takes for a profile that is continuous in depth."""
    z = (np.asarray(depths_mm)[:, None] + step_mm * SUBSAMPLE_OFFSETS[None, :]).ravel()
    weights = np.repeat(np.asarray(values) / SUBSAMPLE_OFFSETS.size, SUBSAMPLE_OFFSETS.size)
    return z, weights


def rodrigues(v) -> np.ndarray:
    """Rotation by |v| radians about v/|v| (identity for v = 0)."""
    v = np.asarray(v, dtype=np.float64)
    theta = np.linalg.norm(v)
    if theta < 1e-15:
        return np.eye(3)
    k = v / theta
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(theta) * kx + (1 - np.cos(theta)) * kx @ kx


def rot_x(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def rot_y(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def rot_z(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def mask_rotation(anglex: float, angley: float, anglez: float) -> np.ndarray:
    """R_m = R_y R_z R_x; columns m_x (along the code), m_y (mask normal), m_z (along the bars)."""
    return rot_y(angley) @ rot_z(anglez) @ rot_x(anglex)


@dataclass(frozen=True)
class Geometry:
    """Everything about the set-up that maps (pixel, depth, frame) to a code coordinate."""

    det_rot: np.ndarray  # 3x3
    det_pos: np.ndarray  # mm
    det_shape: tuple[int, int]
    det_size: tuple[float, float]
    mask_rot: np.ndarray  # 3x3, columns m_x, m_y, m_z
    mask_centre: np.ndarray  # (cenx, dist, cenz), mm
    scan_dir: np.ndarray  # d = R(scanner.rot) scanner.axis
    step_mm: float  # mask step per frame, mm
    shift_mm: float
    code_length: float  # L, um
    thickness: float  # um
    anglez: float  # rad
    beta: float
    offset: float  # mm

    @property
    def m_x(self) -> np.ndarray:
        return self.mask_rot[:, 0]

    @property
    def m_y(self) -> np.ndarray:
        return self.mask_rot[:, 1]

    @property
    def code_shift_per_frame(self) -> float:
        """Code-coordinate change per frame for a ray in the mask plane: step * (d . m_x), um."""
        return self.step_mm * 1e3 * float(self.scan_dir @ self.m_x)


def from_config(cfg: Config, code_length: float) -> Geometry:
    """The geometry of a configuration, for a mask whose code spans ``code_length`` um."""
    g = cfg.geo
    f = g.mask.focus
    return Geometry(
        det_rot=rodrigues(g.detector.rot),
        det_pos=np.asarray(g.detector.pos, float),
        det_shape=tuple(g.detector.shape),
        det_size=tuple(g.detector.size),
        mask_rot=mask_rotation(f.anglex, f.angley, f.anglez),
        mask_centre=np.array([f.cenx, f.dist, f.cenz], float),
        scan_dir=rodrigues(g.scanner.rot) @ np.asarray(g.scanner.axis, float),
        step_mm=g.scanner.step * 1e-3,
        shift_mm=g.mask.shift,
        code_length=code_length,
        thickness=g.mask.thickness,
        anglez=np.radians(f.anglez),
        beta=g.source.beta,
        offset=g.source.offset,
    )


def pixel_centres(geo: Geometry, rows, cols) -> np.ndarray:
    """Lab-frame centres (mm) of detector pixels (row, col); broadcasts, returns (..., 3)."""
    rows = np.asarray(rows, dtype=np.float64)
    cols = np.asarray(cols, dtype=np.float64)
    n0, n1 = geo.det_shape
    s0, s1 = geo.det_size
    x = (cols - (n0 - 1) / 2) * s0 / n0 + geo.det_pos[0]
    y = (rows - (n1 - 1) / 2) * s1 / n1 + geo.det_pos[1]
    z = np.broadcast_to(geo.det_pos[2], np.broadcast(x, y).shape)
    xyz = np.stack(np.broadcast_arrays(x, y, z), axis=-1)
    q = np.einsum("...j,ij->...i", xyz, geo.det_rot)  # no BLAS: see laueflow.decode.background
    return np.stack([q[..., 2], q[..., 1], -q[..., 0]], axis=-1)


def mask_centres(geo: Geometry, frames) -> np.ndarray:
    """Mask centre C_n (mm) at each frame index n (frames counted from the scan point's first)."""
    n = np.asarray(frames, dtype=np.float64)
    return geo.mask_centre + np.multiply.outer(geo.shift_mm + n * geo.step_mm, geo.scan_dir)


def source_points(geo: Geometry, depths) -> np.ndarray:
    """Points S(z) on the incident beam (mm) for depths z (mm)."""
    z = np.asarray(depths, dtype=np.float64)
    return np.stack([z + geo.offset, geo.beta * z, np.zeros_like(z)], axis=-1)


def code_coordinate(p, s, c, m_x, m_y, code_length):
    """Code coordinate u (um) where the ray s -> p crosses the mask plane through c with normal m_y.

    Pure ``jax.numpy`` on broadcastable (..., 3) arrays: p pixel centres, s source points, c mask
    centres.  u = L/2 - 1000 m_x . (X - c), with X the crossing point.
    """
    ray = p - s
    t = jnp.sum((c - s) * m_y, axis=-1) / jnp.sum(ray * m_y, axis=-1)
    x = s + t[..., None] * ray
    return code_length / 2 - 1000.0 * jnp.sum((x - c) * m_x, axis=-1)


def code_coordinates(geo: Geometry, pixels, depths, frames):
    """u[P, N, J] (um) for pixel centres (P, 3), frame indices (N,) and depths (J,) in mm."""
    p = jnp.asarray(pixels)[:, None, None, :]
    c = jnp.asarray(mask_centres(geo, frames))[None, :, None, :]
    s = jnp.asarray(source_points(geo, depths))[None, None, :, :]
    return code_coordinate(p, s, c, jnp.asarray(geo.m_x), jnp.asarray(geo.m_y), geo.code_length)


@dataclass(frozen=True)
class PixelOptics:
    """Per-pixel quantities of the forward model (arrays over pixels)."""

    blur: np.ndarray  # thick-bar blur length l = t |p.m_x / p.m_y|, um
    path_factor: np.ndarray  # 1 / cos(phi + alpha)
    kappa: np.ndarray  # cos(phi) / cos(phi + alpha), approximate du0/dz
    phi: np.ndarray  # atan(p1 / p2), rad


def pixel_optics(geo: Geometry, pixels) -> PixelOptics:
    """Thick-bar blur, attenuation path factor and kappa for pixel centres (..., 3)."""
    p = np.asarray(pixels, dtype=np.float64)
    blur = geo.thickness * np.abs(np.einsum("...j,j->...", p, geo.m_x) / np.einsum("...j,j->...", p, geo.m_y))
    phi = np.arctan(p[..., 0] / p[..., 1])
    cos_pa = np.cos(phi + geo.anglez)
    return PixelOptics(blur=blur, path_factor=1.0 / cos_pa, kappa=np.cos(phi) / cos_pa, phi=phi)


def check_reach(setup: Setup, cfg: Config, rows, cols, frames=None) -> str | None:
    """None when the mask code crosses every depth of the grid for these pixels during the scan;
    otherwise a message saying which depths the mask can resolve."""
    geo = setup.geo
    depths = cfg.geo.source.depths
    n = cfg.file.n_frames if frames is None else len(frames)
    step = cfg.file.range[2]
    pix = pixel_centres(geo, np.asarray(rows), np.asarray(cols))
    u = np.asarray(code_coordinates(geo, pix, depths, np.array([0.0, (n - 1) * step])))
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
