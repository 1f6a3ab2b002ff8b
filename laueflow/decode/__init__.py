"""Decoding pixel traces into depth profiles (the estimator of laueflow).

Model.  For a gold mask, T = 1 - c * goldfraction away from blurred bar edges, so a trace is

    I_n = b_n + sum_j f_j - c * sum_j f_j M(u_n(z_j)),     M = (1 - exp(-mu0 gf)) / c0,

a constant minus the code pattern M correlated with h = c f.  The energy (through c) only sets the
contrast, so each trace is centred (its constant absorbs background and the unknown contrast) and
h is solved from the modulation alone; the constant, minus the background measured in the block's
dark pixels, then gives the total intensity, hence c, hence the scale of f and (on request) the energy.
The estimator, per pixel, on noise-normalised data d (Poisson: sigma^2 = mean counts):

    min_{h >= 0}  1/2 |d - D h|^2 + sparsity * sum h + 1/2 smoothness * |L h|^2

(sparse thin grains, whole extended grains), with D the code-coordinate dictionary a block shares.

Modules, in the order a block meets them:

- settings:      DecodeSettings, the parameters taken once from the Config;
- dictionary:    the block's code-grid dictionary and the maps between code grid and depth bins;
- background:    dark pixels and the background plane;
- energy:        attenuation levels, contrasts, the energy range's contrasts, energy estimation;
- block:         what the passes share about one block;
- solvers:       the jit-compiled ADMM fits over the whole grid and over each pixel's support;
- support:       each pixel's support by forward selection on refits;
- neighbourhood: operations across a pixel's neighbours and along its mask's runs;
- passes:        the three passes, spot shapes, decode() and its Decoded result;
- runtime:       one BLAS thread while decoding, JAX's 64-bit switch.
"""

from __future__ import annotations

from ..errors import DecodeError
from .background import estimate_background
from .dictionary import Dictionary, build_dictionary
from .energy import estimate_energy
from .passes import CONTRAST, ENERGY_AMBIGUOUS, NO_BACKGROUND, NO_SIGNAL, POOR_FIT, Decoded, decode
from .settings import DecodeSettings

__all__ = [
    "CONTRAST",
    "ENERGY_AMBIGUOUS",
    "NO_BACKGROUND",
    "NO_SIGNAL",
    "POOR_FIT",
    "DecodeError",
    "DecodeSettings",
    "Decoded",
    "Dictionary",
    "build_dictionary",
    "decode",
    "estimate_background",
    "estimate_energy",
]
