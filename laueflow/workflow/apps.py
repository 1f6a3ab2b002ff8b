"""Parsl apps of a reconstruction: thin wrappers that run :mod:`laueflow.workflow.tasks` on an executor.

Imports happen inside the apps so that workers load laueflow themselves (and keep it loaded: the
per-process caches in ``tasks`` survive from one task to the next).  Apps take and return small
things (paths, tiles, the dataclasses of :mod:`laueflow.workflow.outcomes`); arrays travel through
files, never through Parsl.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from parsl import python_app

from .outcomes import BlockOutcome, StageOutcome, StitchOutcome, StitchRequest


@python_app(executors=["stitch"])
def stage_point(scan_path: str, cfg_path: str, point: int, tiles: Sequence[Any], stage_file: str,
                inputs: Sequence[Any] = ()) -> StageOutcome:
    """Read one point's frames once into ``stage_file`` (tile-major) for its block tasks; returns what
    they need to read it, or why it could not be staged.  Runs beside stitching: it is I/O, and it
    overlaps the decoding of the points before it.  ``inputs``: the previous point's staging, so that
    one point is staged at a time (HDF5 reads one frame at a time per process anyway) and the other
    threads stay free for stitching."""
    from laueflow.workflow.tasks import stage_point as run

    return run(scan_path, cfg_path, point, tiles, stage_file)


@python_app(executors=["decode"])
def reconstruct_block(scan_path: str, cfg_path: str, point: int, tile: Any, block_file: str,
                      stage: StageOutcome | None = None) -> BlockOutcome:
    """Decode one tile of one scan point into ``block_file`` (reading it from ``stage``, the result of
    :func:`stage_point`, when given)."""
    from laueflow.workflow.tasks import reconstruct_block as run

    return run(scan_path, cfg_path, point, tile, block_file, stage)


@python_app(executors=["stitch"])
def stitch_point(block_files: Sequence[str], out_file: str, request: StitchRequest,
                 inputs: Sequence[Any] = ()) -> StitchOutcome:
    """Write one point's HDF5 file from its block files, once every block task in ``inputs`` has finished."""
    from laueflow.workflow.tasks import stitch_point as run

    return run(block_files, out_file, request, list(inputs))
