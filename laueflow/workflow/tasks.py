"""What one task does, as plain functions (no Parsl): reconstruct one block, stitch one point.

The Parsl apps in :mod:`laueflow.workflow.apps` only call these, so they can be tested and run
without an executor.  Heavy state (configuration, opened scan, geometry and mask) is cached per
process: a worker builds it once and reuses it for every task it runs.
"""

from __future__ import annotations

import socket
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_LOCK = threading.Lock()
_CONFIGS: dict[tuple[str, int], Any] = {}
_SCANS: dict[tuple[str, str], Any] = {}
_SETUPS: dict[str, Any] = {}
# XLA's CPU runtime can wedge when two threads of one process run computations at once: its intra-op
# thread pool is shared, and some operations block a pool thread while waiting for work queued behind
# the other computation.  So one block is decoded at a time per process (the threads site); the worker
# processes of every other site run one task at a time anyway.
_DECODE_LOCK = threading.Lock()


def cached_config(cfg_path: str | Path) -> Any:
    """The configuration at ``cfg_path``, loaded once per process (and again if the file changes)."""
    from laueflow.config import ConfigWarning, load

    p = Path(cfg_path).resolve()
    key = (str(p), p.stat().st_mtime_ns)
    with _LOCK:
        if key not in _CONFIGS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConfigWarning)  # reported once, by the driver
                _CONFIGS[key] = load(p)
        return _CONFIGS[key]


def cached_scan(scan_path: str | Path, cfg: Any, point: int = 0) -> Any:
    """The scan, opened once per process (file headers are checked lazily, point by point), and opened
    again when ``point`` lies beyond it (a scan that grows while it is watched)."""
    from laueflow.io.scan import open_scan

    key = (str(scan_path), cfg.fingerprint())
    with _LOCK:
        if key not in _SCANS or point >= _SCANS[key].n_points:
            _SCANS[key] = open_scan(cfg, scan_path, check=False)
        return _SCANS[key]


def cached_setup(cfg: Any) -> Any:
    """Geometry and mask of a configuration, built once per process."""
    from laueflow.forward import Setup

    key = cfg.fingerprint()
    with _LOCK:
        if key not in _SETUPS:
            _SETUPS[key] = Setup.from_config(cfg)
        return _SETUPS[key]


def block_summary(point: int, tile: Sequence[int], **info: Any) -> dict[str, Any]:
    """The small dictionary a block task returns (never arrays)."""
    out = {"point": int(point), "tile": tuple(int(v) for v in tile), "n_pixels": 0, "seconds": 0.0,
           "skipped": "", "error": "", "block_file": None, "host": socket.gethostname(), "reused": False,
           "staging_note": ""}
    out.update(info)
    return out


def stage_point(scan_path: str, cfg_path: str, point: int, tiles: Sequence[Any],
                stage_file: str) -> dict[str, Any]:
    """Read one point's frames once into the tile-major scratch file its block tasks read from
    (:mod:`laueflow.io.staging`); a staged point of an interrupted run is reused while its frame
    files are unchanged.

    Returns the staged point's description, or ``{"error": ...}`` when the frames or the scratch
    file cannot be read or written: the block tasks then read the frame files themselves, so that a
    damaged frame file fails only the tiles it touches.  Any other failure is returned the same way:
    staging only saves reading, and raising would fail every block task of the point with Parsl's
    DependencyError, which does not name the cause.
    """
    from laueflow.io import staging
    from laueflow.io.scan import ScanError

    try:
        cfg = cached_config(cfg_path)
        scan = cached_scan(scan_path, cfg, point)
        kept = staging.reusable(stage_file, scan, point, tiles)
        if kept is not None:
            return {**staging.for_readers(kept), "reused": True}
        # stage() closes the frame files after each batch, also on errors: no chunk caches stay here
        return {**staging.for_readers(staging.stage(scan, point, tiles, stage_file)), "reused": False}
    except (ScanError, OSError) as exc:
        return {"error": f"staging point {point}: {exc}", "file": None}
    except Exception as exc:  # whatever it was, the block tasks read the frame files instead
        return {"error": f"staging point {point}: {type(exc).__name__}: {exc}", "file": None}


def _read(scan_path: str, cfg: Any, point: int, tile: Any,
          stage: Mapping[str, Any] | None) -> tuple[Any, str]:
    """A tile's block: from the staged point when there is one, else from the frame files; and, when a
    staged point was given but could not be used, why (reported with the point, since reading the
    frame files instead is correct but slower)."""
    from laueflow.io import staging
    from laueflow.io.scan import ScanError

    note = ""
    if stage is not None:
        note = str(stage.get("error") or "")
        if not note:
            try:
                return staging.read_tile(dict(stage), tile, cfg.file.threshold), ""
            except (ScanError, OSError, ValueError) as exc:  # scratch removed, damaged, or not visible here
                note = f"staged point unreadable on {socket.gethostname()}: {exc}"
    return cached_scan(scan_path, cfg, point).read_block(point, tile), note


def reconstruct_block(scan_path: str, cfg_path: str, point: int, tile: Any,
                      block_file: str, stage: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read one tile of one point (from ``stage``, the point's staged frames, when given), decode its
    selected pixels and write the block file.

    Data that cannot be used (an unreadable frame file, traces the decoder rejects) is reported in
    the returned ``error``; a tile with nothing to decode is written as an empty block with the
    reason in ``skipped``.  Anything else raises, so the executor sees a real failure.
    """
    from laueflow.decode import DecodeError, decode
    from laueflow.io.results import write_block
    from laueflow.io.scan import ScanError

    t0 = time.perf_counter()
    box = (tile.r0, tile.r1, tile.c0, tile.c1)
    cfg = cached_config(cfg_path)
    n_depths = len(cfg.geo.source.depths)
    try:
        block, staging_note = _read(scan_path, cfg, point, tile, stage)
    except ScanError as exc:
        return block_summary(point, box, error=f"tile {list(box)}: {exc}", seconds=time.perf_counter() - t0)
    selected = np.asarray(block.selected, dtype=bool)
    decoded, skipped = None, ""
    if not selected.any():
        skipped = "no pixel passes file.threshold"
    elif not np.any(block.traces[selected]):
        skipped = "all traces are zero"
    else:
        try:
            setup = cached_setup(cfg)
            with _DECODE_LOCK:
                decoded = decode(block.traces, block.rows, block.cols, block.frames, setup, cfg,
                                 selected=selected)
        except DecodeError as exc:
            return block_summary(point, box, error=f"tile {list(box)}: {exc}",
                                 seconds=time.perf_counter() - t0, staging_note=staging_note)
    seconds = time.perf_counter() - t0
    write_block(block_file, point=point, tile=box, config_fingerprint=cfg.fingerprint(), n_depths=n_depths,
                decoded=decoded, skipped=skipped, host=socket.gethostname(), seconds=seconds)
    n = 0 if decoded is None else int(np.asarray(decoded.rows).size)
    return block_summary(point, box, n_pixels=n, seconds=seconds, skipped=skipped, block_file=str(block_file),
                         staging_note=staging_note)


def _staging_problem(blocks: Sequence[Mapping[str, Any]]) -> str:
    """A note when block tasks read the frame files because the point's staged frames were unusable."""
    notes = [b["staging_note"] for b in blocks if b.get("staging_note")]
    if not notes:
        return ""
    return (f"{len(notes)} of {len(blocks)} blocks read the frame files instead of the staged point "
            f"({notes[0]})")


def stitch_point(block_files: Sequence[str], out_file: str, meta: Mapping[str, Any],
                 blocks: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Write a point file from the blocks that were decoded; report the point as skipped when none were.

    ``blocks`` are the block tasks' summaries (in the order of ``block_files``); ``meta`` carries
    what the driver knows: scan and config paths, point, region, depths and provenance fields.
    """
    from laueflow import provenance
    from laueflow.io.results import write_point

    t0 = time.perf_counter()
    point = int(meta["point"])
    errors = [b["error"] for b in blocks if b.get("error")]
    written = [f for f, b in zip(block_files, blocks, strict=True) if not b.get("error")]
    base = {"point": point, "file": None, "n_pixels": sum(int(b.get("n_pixels", 0)) for b in blocks),
            "block_seconds": float(sum(float(b.get("seconds", 0.0)) for b in blocks)),
            "n_blocks": len(blocks), "failed_blocks": len(errors), "errors": errors[:3],
            "depth_range_um": None,
            "reused_blocks": sum(bool(b.get("reused")) for b in blocks)}
    if not written:
        return {**base, "status": "skipped", "reason": f"all {len(blocks)} blocks failed: {errors[0]}"}
    if base["n_pixels"] == 0:
        reasons = sorted({b.get("skipped") or "nothing decoded" for b in blocks})
        if not errors:
            return {**base, "status": "skipped", "reason": "; ".join(reasons)}
    cfg = cached_config(meta["cfg_path"])
    scan = cached_scan(meta["scan_path"], cfg, point)
    inputs = scan.fingerprints(point)
    hosts = sorted({str(b.get("host", "")) for b in blocks if b.get("host")})
    record = provenance.build(
        config_yaml=meta["config_yaml"], config_fingerprint=meta["config_fingerprint"], inputs=inputs,
        start_time=meta["start_time"], command=meta.get("command_line"), host=meta.get("host"),
        point=point, scan=str(meta["scan_path"]), config_file=str(meta.get("config_file") or ""),
        config_source=meta.get("config_source") or None, worker_hosts=", ".join(hosts),
        failed_blocks=len(errors))
    summary = write_point(out_file, written, frame=meta["frame"], depths_mm=meta["depths_mm"],
                          provenance=record, complete=not errors)
    export_problem = ""
    if meta.get("per_depth_files"):
        from laueflow.io.export import ExportError, export_point

        try:
            summary["depth_files"] = len(export_point(out_file))
        except (ExportError, OSError) as exc:  # the point file itself is complete and stays
            export_problem = f"per-depth export failed: {exc}"
    status = "partial" if errors else "done"
    reason = f"{len(errors)} of {len(blocks)} blocks failed: {errors[0]}" if errors else ""
    reason = "; ".join(r for r in (reason, export_problem, _staging_problem(blocks)) if r)
    return {**base, **summary, "status": status, "reason": reason, "stitch_seconds": time.perf_counter() - t0,
            "input_fingerprint": record[provenance.INPUT_FINGERPRINT]}
