"""What an earlier run left that this one may keep: a point file that is complete and matches the
configuration and the inputs, and finished block files of the same configuration, point and tile."""

from __future__ import annotations

import shutil
from pathlib import Path

from .. import provenance
from ..config import Config
from ..io import blocks, pointfile
from ..io.scan import Scan, ScanError
from .outcomes import BlockOutcome, PointResult
from .status import PointState


def resumable_point(scan: Scan, cfg: Config, point: int, out_file: Path,
                    block_dir: Path) -> PointResult | None:
    """A result for a point whose file exists, is complete and matches the configuration and the inputs."""
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
    info = pointfile.point_summary(out_file)
    return PointResult(point=point, status=PointState.RESUMED, file=str(out_file), n_pixels=info["n_pixels"],
                       depth_range_um=info["depth_range_um"], reason="file up to date, kept")


def reusable_block(block_file: Path, point: int, box: tuple[int, int, int, int],
                    fingerprint: str) -> BlockOutcome | None:
    """The outcome of a finished block file that can be reused, else None."""
    if not block_file.is_file():
        return None
    meta = blocks.read_block_meta(block_file)
    if not meta or meta["config_fingerprint"] != fingerprint or meta["point"] != point or meta["tile"] != box:
        return None
    return BlockOutcome(point, box, n_pixels=meta["n_pixels"], seconds=meta["seconds"],
                        skipped=meta["skipped"], block_file=str(block_file), host=meta["host"], reused=True)
