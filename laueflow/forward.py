"""Forward model of pixel traces (model.md section 3): I = b + G f, with G[n, j] = T_E(u_n(z_j)).

One jit-compiled function per shape, vmapped over pixels; NumPy in, NumPy out.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from . import geometry as G
from . import mask as M
from .mask import Mask, gold_before, gold_fraction, mu_thickness


@dataclass(frozen=True)
class Setup:
    """Geometry and mask together: what the forward model needs besides pixels and profiles."""

    geo: G.Geometry
    mask: Mask

    @classmethod
    def from_config(cls, cfg) -> Setup:
        mask = M.from_config(cfg)
        return cls(geo=G.from_config(cfg, mask.length), mask=mask)


def _pixel_design(p, blur, mu, s, c, m_x, m_y, length, bars, gold):
    """G (N, J) of one pixel: transmission of the ray from each depth at each frame."""
    u = G.code_coordinate(p[None, None, :], s[None, :, :], c[:, None, :], m_x, m_y, length)
    return jnp.exp(-mu * gold_fraction(u, blur, bars, gold))


@jax.jit
def _design_batch(p, blur, mu, s, c, m_x, m_y, length, bars, gold):
    design = jax.vmap(_pixel_design, in_axes=(0, 0, 0) + (None,) * 7)
    return design(p, blur, mu, s, c, m_x, m_y, length, bars, gold)


@jax.jit
def _traces_batch(p, blur, mu, s, c, m_x, m_y, length, bars, gold, f, b):
    def one(p, blur, mu, f, b):
        return b + _pixel_design(p, blur, mu, s, c, m_x, m_y, length, bars, gold) @ f

    return jax.vmap(one)(p, blur, mu, f, b)


def _arguments(setup: Setup, pixels: np.ndarray, depths, frames, energy_kev, dtype):
    geo, mask = setup.geo, setup.mask
    pixels = np.asarray(pixels, dtype=np.float64).reshape(-1, 3)
    optics = G.pixel_optics(geo, pixels)
    energy = np.broadcast_to(np.asarray(energy_kev, dtype=np.float64), (pixels.shape[0],))
    mu = mu_thickness(energy, geo.thickness) * optics.path_factor
    args = (pixels, optics.blur, mu, G.source_points(geo, depths), G.mask_centres(geo, frames),
            geo.m_x, geo.m_y, np.float64(geo.code_length), mask.bars, gold_before(mask.bars))
    return tuple(jnp.asarray(a, dtype=dtype) for a in args)


def design_matrices(setup: Setup, pixels, depths, frames, energy_kev=20.0, dtype=jnp.float32) -> np.ndarray:
    """G[P, N, J] for pixel centres (P, 3) in mm, depths (J,) in mm and frame indices (N,)."""
    return np.asarray(_design_batch(*_arguments(setup, pixels, depths, frames, energy_kev, dtype)))


def traces(setup: Setup, pixels, profiles, depths, frames, energy_kev=20.0, background=0.0,
           dtype=jnp.float32, chunk: int = 256) -> np.ndarray:
    """Noise-free traces I[P, N] = b + G f for pixel centres (P, 3) and depth profiles f (P, J).

    ``energy_kev`` is one value or one per pixel; ``background`` a scalar, one per pixel (P,),
    one per frame (N,) or (P, N).  Pixels are processed ``chunk`` at a time to bound memory.
    """
    pixels = np.asarray(pixels, dtype=np.float64).reshape(-1, 3)
    profiles = np.asarray(profiles, dtype=np.float64).reshape(pixels.shape[0], -1)
    n_p, n_f = pixels.shape[0], len(np.atleast_1d(frames))
    bg = np.asarray(background, dtype=np.float64)
    if bg.ndim == 1 and bg.shape[0] == n_p and n_p != n_f:
        bg = bg[:, None]
    bg = np.broadcast_to(bg, (n_p, n_f))
    energy = np.broadcast_to(np.asarray(energy_kev, dtype=np.float64), (n_p,))
    out = np.empty((n_p, n_f), dtype=np.float64)
    for i in range(0, n_p, chunk):
        sl = slice(i, min(i + chunk, n_p))
        args = _arguments(setup, pixels[sl], depths, frames, energy[sl], dtype)
        f = jnp.asarray(profiles[sl], dtype=dtype)
        b = jnp.asarray(bg[sl], dtype=dtype)
        out[sl] = np.asarray(_traces_batch(*args, f, b))
    return out
