"""What the passes share about one block: its dictionary, the decoded pixels' traces (noise-normalised
and centred), their places in the tile, and the dictionaries of the attenuation levels, each made once."""

from __future__ import annotations

import numpy as np

from .dictionary import Dictionary
from .energy import MU_LEVELS
from .settings import DecodeSettings
from .solvers import Level


class Block:
    """One block being decoded: the traces of its decoded pixels ``out`` (y counts, d = their centred,
    noise-normalised dips), their places in the tile (ri, ci), and its attenuation levels' dictionaries."""

    def __init__(self, settings: DecodeSettings, traces, rows, cols, out, dct: Dictionary) -> None:
        self.settings, self.dct = settings, dct
        self.y = traces[out]
        self.mean = self.y.mean(axis=1)
        self.sigma = np.sqrt(np.maximum(self.mean, 1.0))  # Poisson: variance = mean counts
        self.d = -(self.y - self.mean[:, None]) / self.sigma[:, None]  # gold removes intensity: dips positive
        self.ri, self.ci = rows[out] - rows[out].min(), cols[out] - cols[out].min()
        self.band = dct.band(settings.widest_bit)
        self.sparsity = settings.sparsity
        self.weak = settings.weak
        self._transmissions: dict[int, np.ndarray] = {}
        self._levels: dict[tuple[int, bool], Level] = {}

    def level(self, lev: int, centred: bool = True) -> Level:
        """The dictionary of attenuation level ``lev`` (see MU_LEVELS)."""
        key = (int(lev), centred)
        if key not in self._levels:
            if key[0] not in self._transmissions:
                self._transmissions[key[0]] = self.dct.transmission(MU_LEVELS[key[0]])
            t = self._transmissions[key[0]]
            self._levels[key] = Level(t, float(MU_LEVELS[key[0]]), self.settings, centred)
        return self._levels[key]
