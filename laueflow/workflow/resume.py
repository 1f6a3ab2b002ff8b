"""What an earlier run left that this one may keep: a point file that is intact, complete and matches
the configuration, the tiling and the inputs, and finished block files whose stamp (point, tile,
configuration and input fingerprints) is this run's.

Whatever fails these checks is recomputed: a damaged file with a :class:`ResumeWarning` naming it,
a stale one (other inputs, configuration or tiling, or a late write of an earlier run's worker)
silently.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import provenance
from ..config import Config
from ..errors import ResultError
from ..io import blocks, pointfile
from ..io.layout import RunFolder
from ..io.scan import Scan, ScanError
from .outcomes import BlockOutcome, PointResult
from .status import PointState


class ResumeWarning(UserWarning):
    """A file an earlier run left is damaged and is recomputed."""


def resumable_point(scan: Scan, cfg: Config, point: int, out_file: Path,
                    block_dir: Path) -> PointResult | None:
    """A result for a point whose file exists, is intact and complete, and matches the configuration
    (the decoder's tiles included) and the inputs; how the region was cut into tasks does not matter."""
    if not out_file.is_file():
        return None
    prov = pointfile.read_provenance(out_file)
    if (not prov or not prov.get("complete") or prov.get("point") != point
            or prov.get(provenance.CONFIG_FINGERPRINT) != cfg.fingerprint()):
        return None
    try:
        current = provenance.input_fingerprint(scan.fingerprints(point))
    except ScanError:
        return None
    if current != prov.get(provenance.INPUT_FINGERPRINT):
        shutil.rmtree(block_dir, ignore_errors=True)  # inputs changed: their blocks are stale too
        return None
    try:
        pointfile.verify(out_file)
    except ResultError as exc:
        warnings.warn(f"{exc}; point {point} is recomputed", ResumeWarning, stacklevel=2)
        return None
    info = pointfile.point_summary(out_file)
    return PointResult(point=point, status=PointState.RESUMED, file=str(out_file), n_pixels=info["n_pixels"],
                       depth_range_um=info["depth_range_um"], reason="file up to date, kept")


def reusable_blocks(folder: RunFolder, scan: Scan, point: int, tiles: Sequence[Any],
                    config_fingerprint: str) -> dict[tuple[int, int, int, int], BlockOutcome]:
    """The finished block files of a point that this run can keep, by tile [r0, r1, c0, c1].

    Only a point with block files costs anything: its input fingerprint, and each block read whole.
    Damaged block files are removed with a warning naming them, stale ones silently; the block tasks
    write them anew.
    """
    present = folder.block_files(point)
    if not present:
        return {}
    try:
        current = provenance.input_fingerprint(scan.fingerprints(point))
    except ScanError:
        current = None  # the block tasks will say what is wrong with the frames
    wanted = {folder.block_file(point, t.r0, t.c0): (t.r0, t.r1, t.c0, t.c1) for t in tiles}
    kept: dict[tuple[int, int, int, int], BlockOutcome] = {}
    for path in present:
        try:
            b = blocks.read_block(path)
        except ResultError as exc:
            warnings.warn(f"{exc}; its tile is recomputed", ResumeWarning, stacklevel=2)
            path.unlink(missing_ok=True)
            continue
        box = wanted.get(path)
        stamp = (point, box, config_fingerprint, current)
        if current is None or stamp != (b.point, b.tile, b.config_fingerprint, b.input_fingerprint):
            path.unlink(missing_ok=True)
            continue
        kept[box] = BlockOutcome(point, box, n_pixels=b.n_pixels, seconds=b.seconds, skipped=b.skipped,
                                 block_file=str(path), host=b.host, reused=True)
    return kept
