"""What the driver and the tasks of a run hand each other: small, picklable dataclasses (Parsl carries
them), the requests the driver sends and the outcomes the tasks send back.

Arrays never travel this way; they go through the block and point files.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .status import OK_STATES, PointState


@dataclass(frozen=True)
class StitchRequest:
    """What a stitching task needs besides its block files and their outcomes, built once per point by
    the driver: where the scan and the workers' configuration are, the region and depth grid of the
    volume, and what the point file's provenance records.  Plain fields only, so that it pickles.

    ``scan_path``, ``cfg_path``: the scan and the configuration file the workers load;
    ``frame``: the detector region [r0, r1, c0, c1]; ``depths_mm``: the depth grid;
    ``config_yaml``, ``config_fingerprint``: the run's configuration as recorded;
    ``start_time``, ``command_line``, ``host``: the run's start, command and driver host (None: this
    process's); ``config_file``, ``config_source``: the configuration's file and its text as written;
    ``per_depth_files``: also write the per-depth files.
    """

    point: int
    scan_path: str
    cfg_path: str
    frame: Sequence[int]
    depths_mm: Sequence[float]
    config_yaml: str
    config_fingerprint: str
    start_time: str
    command_line: str | None = None
    host: str | None = None
    config_file: str = ""
    config_source: str | None = None
    per_depth_files: bool = False


@dataclass(frozen=True)
class StageOutcome:
    """One staged point: what its block tasks need to read it (``reader``, see
    :func:`laueflow.io.staging.for_readers`), whether an earlier run's staging was kept, or why it could
    not be staged (``error``; ``reader`` is then None and the block tasks read the frame files)."""

    reader: dict[str, Any] | None = None
    reused: bool = False
    error: str = ""


@dataclass(frozen=True)
class BlockOutcome:
    """One block task: its tile [r0, r1, c0, c1], the pixels it decoded into ``block_file``, and what
    went wrong (``error``: the tile's data could not be used; ``skipped``: nothing to decode there;
    ``staging_note``: the staged point was unusable, the frame files were read instead)."""

    point: int
    tile: tuple[int, int, int, int]
    n_pixels: int = 0
    seconds: float = 0.0
    skipped: str = ""
    error: str = ""
    block_file: str | None = None
    host: str = field(default_factory=socket.gethostname)
    reused: bool = False  # a finished block file of an earlier run, not decoded again
    staging_note: str = ""


@dataclass(frozen=True)
class StitchOutcome:
    """One stitched point: its status (done, partial or skipped), its file and what it holds."""

    point: int
    status: PointState
    reason: str = ""
    file: str | None = None
    n_pixels: int = 0
    depth_range_um: tuple[float, float] | None = None
    block_seconds: float = 0.0
    n_blocks: int = 0
    failed_blocks: int = 0
    reused_blocks: int = 0
    errors: tuple[str, ...] = ()  # the first three block errors
    stitch_seconds: float = 0.0
    input_fingerprint: str = ""
    depth_files: int = 0  # per-depth files written beside it


@dataclass
class PointResult:
    """How one scan point ended: done, resumed (existing file still valid), skipped, partial, failed."""

    point: int
    status: PointState
    file: str | None = None
    n_pixels: int = 0
    depth_range_um: tuple[float, float] | None = None
    seconds: float = 0.0
    block_seconds: float = 0.0
    failed_blocks: int = 0
    reused_blocks: int = 0
    reason: str = ""

    @property
    def ok(self) -> bool:
        """False when something went wrong (a skipped point is fine when no block failed)."""
        return self.status in OK_STATES or (self.status == PointState.SKIPPED and self.failed_blocks == 0)

    def line(self) -> str:
        """One line for humans."""
        head = f"point {self.point:5d}: {self.status:<8s}"
        if self.status in (PointState.SKIPPED, PointState.FAILED):
            return f"{head} {self.reason}"
        rng = (f"signal {self.depth_range_um[0]:.1f} to {self.depth_range_um[1]:.1f} um"
               if self.depth_range_um else "no signal")
        text = f"{head} {self.n_pixels} pixels, {rng}"
        if self.status != PointState.RESUMED:
            text += f", {self.seconds:.1f} s (decoding {self.block_seconds:.1f} s)"
        if self.reason:
            text += f"; {self.reason}"
        return text
