"""The decoder's parameters: what the solvers and passes read of the configuration, taken once per
block from ``Config`` (the configuration itself never enters the fitting loops)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import Config


@dataclass(frozen=True, eq=False)
class DecodeSettings:
    """The estimator's settings (``recon`` and the depth grid); see ReconConfig for their meaning."""

    depths: np.ndarray  # (J,) depth bin centres, mm
    widest_bit: float  # the mask's widest bit, um: sets the band of correlated code-grid columns
    oversample: int  # code-grid columns per depth bin
    sparsity: float  # L1 weight of pass 1, in units of the universal noise threshold
    refit_sparsity: float  # L1 weight of the refits, relative to ``sparsity``
    smoothness: float  # first-difference weight
    significance: float  # chi-square a support piece must explain
    iterations: int  # ADMM iterations at most
    energy: float  # keV assumed for the gold attenuation
    energy_range: tuple[float, float]  # keV searched when estimating the energy
    estimate_energy: bool
    dtype: str  # working precision of the solvers: "float32" or "float64"

    @classmethod
    def from_config(cls, cfg: Config) -> DecodeSettings:
        r = cfg.recon
        return cls(
            depths=cfg.geo.source.depths, widest_bit=max(cfg.geo.mask.bitsizes), oversample=r.oversample,
            sparsity=r.sparsity, refit_sparsity=r.refit_sparsity, smoothness=r.smoothness,
            significance=r.significance, iterations=r.iterations, energy=r.energy,
            energy_range=r.energy_range, estimate_energy=r.estimate_energy, dtype=r.dtype,
        )

    @property
    def weak(self) -> float:
        """L1 weight of the refits on a chosen support."""
        return self.sparsity * self.refit_sparsity

    @property
    def float_type(self) -> type[np.floating]:
        """NumPy type of the working precision."""
        return np.float64 if self.dtype == "float64" else np.float32
