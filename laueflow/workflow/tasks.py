"""What one task does, as plain functions (no Parsl): stage a point, reconstruct a block, stitch a point.

The Parsl apps in :mod:`laueflow.workflow.apps` only call these, so they can be tested and run
without an executor; they return the small dataclasses of :mod:`laueflow.workflow.outcomes`.  Heavy
state (configuration, opened scan, geometry and mask) is cached per process: a worker builds it once
and reuses it for every task it runs.
"""

from __future__ import annotations

import socket
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from laueflow import decode as decoder  # by module, so that tests can replace decoder.decode
from laueflow import provenance
from laueflow.config import Config, ConfigWarning, load
from laueflow.forward import Setup
from laueflow.io import staging
from laueflow.io.blocks import read_block_meta, write_block
from laueflow.io.export import ExportError, export_point
from laueflow.io.pointfile import write_point
from laueflow.io.scan import Scan, ScanError, open_scan

from .outcomes import BlockOutcome, StageOutcome, StitchOutcome, StitchRequest
from .status import PointState

_LOCK = threading.Lock()
_CONFIGS: dict[tuple[str, int], Config] = {}
_SCANS: dict[tuple[str, str], Scan] = {}
_SETUPS: dict[str, Setup] = {}
# input fingerprints of points by (scan, point), with the stat of their files when they were hashed
_INPUTS: dict[tuple[str, int], tuple[list[tuple[int, ...]], list[dict]]] = {}
# XLA's CPU runtime can wedge when two threads of one process run computations at once: its intra-op
# thread pool is shared, and some operations block a pool thread while waiting for work queued behind
# the other computation.  So one block is decoded at a time per process (the threads site); the worker
# processes of every other site run one task at a time anyway.
_DECODE_LOCK = threading.Lock()


def cached_config(cfg_path: str | Path) -> Config:
    """The configuration at ``cfg_path``, loaded once per process (and again if the file changes)."""
    p = Path(cfg_path).resolve()
    key = (str(p), p.stat().st_mtime_ns)
    with _LOCK:
        if key not in _CONFIGS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConfigWarning)  # reported once, by the driver
                _CONFIGS[key] = load(p)
        return _CONFIGS[key]


def cached_scan(scan_path: str | Path, cfg: Config, point: int = 0) -> Scan:
    """The scan, opened once per process (file headers are checked lazily, point by point), and opened
    again when ``point`` lies beyond it (a scan that grows while it is watched)."""
    key = (str(scan_path), cfg.fingerprint())
    with _LOCK:
        if key not in _SCANS or point >= _SCANS[key].n_points:
            _SCANS[key] = open_scan(cfg, scan_path, check=False, warn_trailing=False)  # the driver warned
        return _SCANS[key]


def cached_setup(cfg: Config) -> Setup:
    """Geometry and mask of a configuration, built once per process."""
    key = cfg.fingerprint()
    with _LOCK:
        if key not in _SETUPS:
            _SETUPS[key] = Setup.from_config(cfg)
        return _SETUPS[key]


def _stat(scan: Scan, point: int) -> list[tuple[int, ...]]:
    files = dict.fromkeys(f for f, _ in scan.point_frames(point))
    try:
        stats = [f.stat() for f in files]
    except OSError as exc:
        raise ScanError(f"point {point}: cannot stat its frame files: {exc}") from None
    return [(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) for st in stats]


def point_inputs(scan_path: str | Path, scan: Scan, point: int) -> list[dict]:
    """The fingerprints of a point's frame files (:meth:`Scan.fingerprints`), hashed once per process
    while the files' inode, size and times stay the same.  Taken before the frames are read, so that
    what a block records is never newer than what it decoded (a file changed meanwhile makes the block
    look stale to a rerun, which recomputes it)."""
    key = (str(scan_path), int(point))
    before = _stat(scan, point)
    with _LOCK:
        cached = _INPUTS.get(key)
    if cached is not None and cached[0] == before:
        return cached[1]
    inputs = scan.fingerprints(point)
    if _stat(scan, point) == before:  # unchanged while hashed
        with _LOCK:
            _INPUTS[key] = (before, inputs)
    return inputs


def stage_point(scan_path: str, cfg_path: str, point: int, tiles: Sequence[Any],
                stage_file: str) -> StageOutcome:
    """Read one point's frames once into the tile-major scratch file its block tasks read from
    (:mod:`laueflow.io.staging`); a staged point of an interrupted run is reused while its frame
    files are unchanged.

    When the frames or the scratch file cannot be read or written, the outcome says why (``error``):
    the block tasks then read the frame files themselves, so that a damaged frame file fails only the
    tiles it touches.  Any other failure is returned the same way: staging only saves reading, and
    raising would fail every block task of the point with Parsl's DependencyError, which does not
    name the cause.
    """
    try:
        cfg = cached_config(cfg_path)
        scan = cached_scan(scan_path, cfg, point)
        kept = staging.reusable(stage_file, scan, point, tiles)
        if kept is not None:
            return StageOutcome(reader=staging.for_readers(kept), reused=True)
        # stage() closes the frame files after each batch, also on errors: no chunk caches stay here
        return StageOutcome(reader=staging.for_readers(staging.stage(scan, point, tiles, stage_file)))
    except (ScanError, OSError) as exc:
        return StageOutcome(error=f"staging point {point}: {exc}")
    except Exception as exc:  # whatever it was, the block tasks read the frame files instead
        return StageOutcome(error=f"staging point {point}: {type(exc).__name__}: {exc}")


def _read(scan_path: str, cfg: Config, point: int, tile: Any,
          stage: StageOutcome | None) -> tuple[Any, str, str]:
    """A tile's block: from the staged point when there is one, else from the frame files; the input
    fingerprint of the frames it holds; and, when a staged point was given but could not be used, why
    (reported with the point, since reading the frame files instead is correct but slower).

    The fingerprint is taken first, and a staged point is read only while it still matches the frame
    files (a worker outliving its run must not pair an old staged point with new frames)."""
    note = ""
    scan = cached_scan(scan_path, cfg, point)
    fingerprint = provenance.input_fingerprint(point_inputs(scan_path, scan, point))
    if stage is not None:
        note = stage.error
        if stage.reader is not None:
            try:
                info = staging.description(stage.reader["file"])
                if info is None or not staging.matches_frames(info, scan, point):
                    raise ScanError("it no longer matches the frame files")
                return staging.read_tile(stage.reader, tile, cfg.file.threshold), fingerprint, ""
            except (ScanError, OSError, ValueError) as exc:  # scratch removed, damaged, or not visible here
                note = f"staged point unreadable on {socket.gethostname()}: {exc}"
    return scan.read_block(point, tile), fingerprint, note


def reconstruct_block(scan_path: str, cfg_path: str, point: int, tile: Any,
                      block_file: str, stage: StageOutcome | None = None) -> BlockOutcome:
    """Read one block (``tile``: a rectangle of whole decoder tiles, see Scan.blocks) of one point (from
    ``stage``, the point's staged frames, when given), decode each of its tiles on its own and write
    the block file.  A tile is decoded the same in whichever block it lies, so results do not depend
    on how the region is cut into blocks.

    Data that cannot be used (an unreadable frame file, traces the decoder rejects) is reported in
    the outcome's ``error``; a block with nothing to decode is written as an empty block with the
    reason in ``skipped``.  Anything else raises, so the executor sees a real failure.
    """
    t0 = time.perf_counter()
    box = (tile.r0, tile.r1, tile.c0, tile.c1)
    cfg = cached_config(cfg_path)
    n_depths = len(cfg.geo.source.depths)
    try:
        block, input_fp, staging_note = _read(scan_path, cfg, point, tile, stage)
    except ScanError as exc:
        return BlockOutcome(point, box, error=f"tile {list(box)}: {exc}", seconds=time.perf_counter() - t0)
    selected = np.asarray(block.selected, dtype=bool)
    decoded, skipped = None, ""
    if not selected.any():
        skipped = "no pixel passes file.threshold"
    elif not np.any(block.traces[selected]):
        skipped = "all traces are zero"
    else:
        parts = []
        for part_tile in Scan.tiles_in(tile, cfg.recon.tile_pixels):
            part = block.part(part_tile)
            if not np.any(part.traces[part.selected]):
                continue  # nothing to decode in this tile
            try:
                setup = cached_setup(cfg)
                with _DECODE_LOCK:
                    parts.append(decoder.decode(part.traces, part.rows, part.cols, part.frames, setup, cfg,
                                                selected=part.selected))
            except decoder.DecodeError as exc:
                where = [part_tile.r0, part_tile.r1, part_tile.c0, part_tile.c1]
                return BlockOutcome(point, box, error=f"tile {where}: {exc}",
                                    seconds=time.perf_counter() - t0, staging_note=staging_note)
        decoded = decoder.Decoded.concat(parts, n_depths)
    seconds = time.perf_counter() - t0
    write_block(block_file, point=point, tile=box, config_fingerprint=cfg.fingerprint(),
                input_fingerprint=input_fp, n_depths=n_depths, decoded=decoded, skipped=skipped,
                saturated=(block.rows[block.saturated], block.cols[block.saturated]),
                host=socket.gethostname(), seconds=seconds)
    n = 0 if decoded is None else int(np.asarray(decoded.rows).size)
    return BlockOutcome(point, box, n_pixels=n, seconds=seconds, skipped=skipped, block_file=str(block_file),
                        staging_note=staging_note)


def _staging_problem(blocks: Sequence[BlockOutcome]) -> str:
    """A note when block tasks read the frame files because the point's staged frames were unusable."""
    notes = [b.staging_note for b in blocks if b.staging_note]
    if not notes:
        return ""
    return (f"{len(notes)} of {len(blocks)} blocks read the frame files instead of the staged point "
            f"({notes[0]})")


def _stale(block_files: Sequence[str], blocks: Sequence[BlockOutcome], stamp: dict[str, Any]) -> list[str]:
    """Per block, why its file cannot be stitched into this point ("" when it can): unreadable, or
    stamped with another point, tile, configuration or input (frames changed during the run, or an
    earlier run's worker wrote it late)."""
    out = []
    for name, b in zip(block_files, blocks, strict=True):
        if b.error:
            out.append("")
            continue
        meta = read_block_meta(name)
        if meta is None:
            out.append(f"tile {list(b.tile)}: {name} is unreadable")
        elif {k: meta[k] for k in stamp} != {**stamp, "tile": tuple(b.tile)}:
            out.append(f"tile {list(b.tile)}: {name} belongs to other inputs or another configuration "
                       "(frames changed during the run, or a late write of an earlier run); a rerun "
                       "recomputes it")
        else:
            out.append("")
    return out


def stitch_point(block_files: Sequence[str], out_file: str, request: StitchRequest,
                 blocks: Sequence[BlockOutcome]) -> StitchOutcome:
    """Write a point file from the blocks that were decoded; report the point as skipped when none were.

    ``blocks`` are the block tasks' outcomes (in the order of ``block_files``); ``request`` carries
    what the driver knows: scan and config paths, point, region, depths, tiling and provenance fields.
    Only block files stamped with this point, their tile, the workers' configuration and the point's
    frames as they are now are stitched; any other counts as a failed block (the point is partial and
    a rerun recomputes it).
    """
    t0 = time.perf_counter()
    req = request
    point = int(req.point)
    cfg = cached_config(req.cfg_path)
    scan = cached_scan(req.scan_path, cfg, point)
    inputs = point_inputs(req.scan_path, scan, point)
    stamp = {"point": point, "tile": None, "config_fingerprint": cfg.fingerprint(),
             "input_fingerprint": provenance.input_fingerprint(inputs)}
    stale = _stale(block_files, blocks, stamp)
    blocks = [replace(b, error=why, n_pixels=0) if why else b for b, why in zip(blocks, stale, strict=True)]
    errors = [b.error for b in blocks if b.error]
    written = [f for f, b in zip(block_files, blocks, strict=True) if not b.error]
    base = {"point": point, "n_pixels": sum(b.n_pixels for b in blocks),
            "block_seconds": float(sum(b.seconds for b in blocks)), "n_blocks": len(blocks),
            "failed_blocks": len(errors), "errors": tuple(errors[:3]),
            "reused_blocks": sum(b.reused for b in blocks)}
    if not written:
        return StitchOutcome(**base, status=PointState.SKIPPED,
                             reason=f"all {len(blocks)} blocks failed: {errors[0]}")
    if base["n_pixels"] == 0:
        reasons = sorted({b.skipped or "nothing decoded" for b in blocks})
        if not errors:
            return StitchOutcome(**base, status=PointState.SKIPPED, reason="; ".join(reasons))
    hosts = sorted({b.host for b in blocks if b.host})
    record = provenance.build(
        config_yaml=req.config_yaml, config_fingerprint=req.config_fingerprint, inputs=inputs,
        start_time=req.start_time, command=req.command_line, host=req.host,
        point=point, scan=str(req.scan_path), config_file=str(req.config_file or ""),
        config_source=req.config_source or None, worker_hosts=", ".join(hosts),
        failed_blocks=len(errors),
        calibration=provenance.calibration(cfg.calibration, cfg.geo.mask.focus, cfg.geo.mask))
    summary = write_point(out_file, written, frame=req.frame, depths_mm=req.depths_mm,
                          provenance=record, complete=not errors,
                          stamp={k: v for k, v in stamp.items() if k != "tile"},
                          tile_pixels=cfg.recon.tile_pixels,
                          header=(scan.point_frames(point)[0][0], cfg.file.h5_key))
    depth_files, export_problem = 0, ""
    if req.per_depth_files:
        try:
            depth_files = len(export_point(out_file))
        except (ExportError, OSError) as exc:  # the point file itself is complete and stays
            export_problem = f"per-depth export failed: {exc}"
    reason = f"{len(errors)} of {len(blocks)} blocks failed: {errors[0]}" if errors else ""
    reason = "; ".join(r for r in (reason, export_problem, _staging_problem(blocks)) if r)
    rng = summary["depth_range_um"]
    return StitchOutcome(**{**base, "n_pixels": int(summary["n_pixels"])},
                         status=PointState.PARTIAL if errors else PointState.DONE, reason=reason,
                         file=summary["file"],
                         depth_range_um=tuple(rng) if rng else None,
                         stitch_seconds=time.perf_counter() - t0,
                         input_fingerprint=record[provenance.INPUT_FINGERPRINT], depth_files=depth_files)
