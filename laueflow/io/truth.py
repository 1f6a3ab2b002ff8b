"""``truth.h5``: what a simulated scan really holds, written by ``laueflow simulate`` and read to score.

Layout::

    /truth/pixels        (n, 2) detector row, col of every spot pixel of every point
    /truth/depth         (J,) um, the depth grid
    /truth/profiles      (n, J) counts, true intensity of each depth bin (detector counts per frame)
    /truth/grain, second_grain, energy (keV), point      (n,) per spot pixel
    /truth/grains/{point, top_um, thickness_um, decay_um} per grain
    /truth attrs         the simulation's settings (preset, seed, pose, ...) and laueflow_version

h5py only (no JAX), so that scoring and figures read it without loading the simulator.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from .. import __version__
from ..evaluate import Truth
from .atomic import atomic_h5


def write_truth(path: Path, truth: dict[str, list[np.ndarray]], grain_rows: list[tuple],
                 depth_um: np.ndarray, attrs: dict) -> None:
    """truth.h5: every point's spot pixels with their profiles, grains and energies (read back by
    :func:`load_truth`); ``attrs`` describe the simulation (preset, seed, pose)."""
    with atomic_h5(path) as f:
        t = f.create_group("truth")
        t["pixels"] = np.concatenate(truth["pixels"]).astype(np.int32)
        t["depth"] = depth_um
        t["depth"].attrs["units"] = "um"
        t.create_dataset("profiles", data=np.concatenate(truth["profiles"]).astype(np.float32),
                         compression="gzip")
        t["profiles"].attrs["units"] = "counts"
        t["profiles"].attrs["long_name"] = "true intensity of each depth bin, detector counts per frame"
        t["grain"] = np.concatenate(truth["grain"]).astype(np.int32)
        t["second_grain"] = np.concatenate(truth["grain2"]).astype(np.int32)
        t["energy"] = np.concatenate(truth["energy"]).astype(np.float32)
        t["energy"].attrs["units"] = "keV"
        t["point"] = np.concatenate(truth["point"]).astype(np.int32)
        gr = np.asarray(grain_rows, dtype=np.float64).reshape(-1, 4)
        g = t.create_group("grains")
        g["point"], g["top_um"] = gr[:, 0].astype(int), gr[:, 1]
        g["thickness_um"], g["decay_um"] = gr[:, 2], gr[:, 3]
        t.attrs.update({**attrs, "laueflow_version": __version__})


def load_truth(path: str | Path) -> Truth:
    """Read a truth file written by :func:`write_truth` (``laueflow simulate``)."""
    with h5py.File(path, "r") as f:
        t = f["truth"]
        g = t["grains"]
        return Truth(t["pixels"][()], t["depth"][()], t["profiles"][()], t["grain"][()],
                     t["second_grain"][()], t["energy"][()], t["point"][()], g["top_um"][()],
                     g["thickness_um"][()], g["decay_um"][()])
