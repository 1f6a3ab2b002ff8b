"""What the run tests read back from a run folder, through laueflow's own readers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from laueflow.io.layout import RunFolder
from laueflow.runs import open_point


def volume(path: Path) -> np.ndarray:
    """A point file's whole volume (depth, row, col)."""
    with open_point(path) as point:
        return point.volume()


def block_count(out: Path, point: int) -> int:
    """How many block files of ``point`` are in the run folder ``out``."""
    return len(RunFolder(out).block_files(point))
