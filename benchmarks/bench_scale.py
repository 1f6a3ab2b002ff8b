"""Production-size benchmark: one scan point of 201 frames of 2048 x 2048 and a 1200 x 1200-pixel region.

The point is simulated once into the cache by :func:`laueflow.simulate.simulate_large` (whole detector
frames, gzip + byte shuffle in 256 x 256 chunks as the simulator writes them, spots over
``--spot-fraction`` of the region, every spot pixel from the forward model at its own position).  Then:

- reading, over the whole region and every tile, in a fresh process: the raw chunk bytes after
  evicting the files from the OS cache (the disk), the same bytes from the cache with their
  decompression alone (zlib + unshuffle: the codec's speed), h5py reading the region of every frame
  (the baseline), and laueflow's reader (``Scan.read_block``) tile by tile, split into the time
  inside h5py and the pixel selection after it; staging the point (``laueflow.io.staging``: one
  pass, a tile-major scratch file) and the block reads from it; and the reader as a worker that reads
  a single tile of the point without staging sees it (fresh ``Scan``: header checks, file opens, no
  chunk reuse), on a sample;
- every stage of a point's work, on a sub-region (``--sub-region``, chunk-aligned, near the centre)
  in a fresh process: reading, pixel selection, JIT compilation, decoding (the decoder alone),
  writing the block files, stitching and writing the point file; scaled to the whole region;
- ``laueflow run`` end to end on the same sub-region, on the local site, with the point given six
  times (hard links) so that the last four run on warm workers: the start-up, the seconds per point and
  the peak memory of each process; scaled to the whole region.  Twice: as it runs by default (each
  point staged once in the driver) and, as the baseline, with ``--no-staging`` (each block task reads
  its tile from the frame files).

Figures scaled from the sub-region say so in the table.  Run ``python benchmarks/bench_scale.py --help``
for the options (``--sub-region 1200`` measures the whole region); ``make bench-scale`` runs the defaults
(under fifteen minutes on two cores, including the simulation the first time).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench_decode import REPO, SINGLE_THREAD_ENV, Stage, _Clock, _fmt, _plain, _ratio, simulator_fingerprint
from bench_workflow import (
    RunMeasure,
    in_fresh_process,
    machine,
    machine_line,
    measure_stages,
    print_failures,
    repeated_scan,
    run_cli,
    stage,
    time_h5py_reads,
)

MB = 1e6
# `laueflow run` is measured with the point this many times (the first two warm up, the rest are timed),
# as it runs by default and, as the baseline, with every block task reading its own tile
RUN_COPIES = 6
RUN_VARIANTS = (("", ()), (" --no-staging", ("--no-staging",)))


@dataclass
class Row:
    """One line of the table: what a stage handled, what it cost, and how it scales to a whole point."""

    group: str
    name: str
    pixels: int  # pixels handled
    wall: float  # s
    cpu: float  # s
    rss_mib: float  # peak resident memory of the process during the stage
    comp_bytes: float = float("nan")  # compressed bytes read from the frame files
    raw_bytes: float = float("nan")  # bytes decompressed (whole chunks)
    scale: float = 1.0  # factor from the measured pixels to a whole point (1: measured on all of it)
    once: bool = False  # paid once per process, not per point
    note: str = ""

    @property
    def per_point(self) -> float:
        return self.wall if self.once else self.wall * self.scale


# ----------------------------------------------------------------------------------------------
# the scan point


def scan_dir(cache: Path, o: argparse.Namespace) -> Path:
    name = f"scale-r{o.region}-f{o.frames}-p{o.spot_fraction:g}-c{o.chunk}-s{o.seed}"
    return cache / name / "scan"


def ensure_point(folder: Path, o: argparse.Namespace, say: Any) -> tuple[float | None, dict]:
    """Simulate the point unless the cache holds it, made by the same simulator code with the same options;
    (seconds it took or None when cached, the simulator's summary)."""
    from laueflow.simulate import simulate_large

    stamp = folder.parent / "simulator.sha"
    summary_file = folder.parent / "summary.json"
    wanted = f"{simulator_fingerprint()} {o.region} {o.frames} {o.spot_fraction:g} {o.chunk} {o.seed}"
    if (folder / "truth.h5").is_file() and stamp.is_file() and stamp.read_text().strip() == wanted \
            and summary_file.is_file() and not o.resimulate:
        return None, json.loads(summary_file.read_text())
    if folder.parent.exists():
        shutil.rmtree(folder.parent)
    folder.parent.mkdir(parents=True)
    t0 = time.perf_counter()
    info = simulate_large(folder, region=o.region, frames=o.frames, spot_fraction=o.spot_fraction,
                          seed=o.seed, chunks=(o.chunk, o.chunk), progress=say)
    seconds = time.perf_counter() - t0
    summary_file.write_text(json.dumps(info, indent=1))
    stamp.write_text(wanted + "\n")
    return seconds, info


def sub_frame(frame: list[int], side: int, chunk: int) -> list[int]:
    """A side x side square inside ``frame`` near its centre, its corner on the chunk grid where it fits
    (so that it reads whole chunks, as the whole region mostly does)."""
    r0, r1, c0, c1 = frame
    side = min(side, r1 - r0, c1 - c0)

    def start(lo: int, hi: int) -> int:
        s = (lo + hi - side) // 2
        aligned = s // chunk * chunk
        for cand in (aligned, aligned + chunk):
            if lo <= cand and cand + side <= hi:
                return cand
        return s

    rs, cs = start(r0, r1), start(c0, c1)
    return [rs, rs + side, cs, cs + side]


def chunk_boxes(frame: list[int], chunk: tuple[int, int]) -> list[tuple[int, int]]:
    """Corners (row, col) of the chunks a detector region [r0, r1, c0, c1] overlaps."""
    r0, r1, c0, c1 = frame
    return [(r, c) for r in range(r0 // chunk[0] * chunk[0], r1, chunk[0])
            for c in range(c0 // chunk[1] * chunk[1], c1, chunk[1])]


def chunk_bytes(files: list[Path], key: str, boxes: list[tuple[int, int]]) -> tuple[float, float]:
    """(stored bytes, decompressed bytes) of these chunks over every frame file."""
    import h5py

    stored = raw = 0.0
    for f in files:
        with h5py.File(f, "r") as h:
            d = h[key]
            for box in boxes:
                info = d.id.get_chunk_info_by_coord(box)
                stored += info.size
            raw += len(boxes) * math.prod(d.chunks) * d.dtype.itemsize
    return stored, raw


# ----------------------------------------------------------------------------------------------
# reading, in a fresh process


def _evict(files: list[Path]) -> bool:
    """Drop these files' pages from the OS cache (only theirs); False where the OS cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def _unshuffle(data: bytes, itemsize: int) -> Any:
    """HDF5's byte shuffle undone: the first bytes of every element, then the second bytes, ..."""
    import numpy as np

    return np.frombuffer(data, np.uint8).reshape(itemsize, -1).T.copy().view(f"<u{itemsize}")


def measure_reading(folder: str, opts: dict[str, Any]) -> dict[str, Any]:
    """Reading the point's whole region, in this (fresh) process; rows as dictionaries."""
    import warnings

    import h5py
    import numpy as np

    from laueflow.config import load
    from laueflow.io.scan import open_scan

    path = Path(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = load(path / "config.yaml")
    scan = open_scan(cfg, path, check=False)
    scan.check([0])
    files = [f for f, _ in scan.point_frames(0)]
    key = cfg.file.h5_key
    frame = [int(v) for v in cfg.file.frame]
    r0, r1, c0, c1 = frame
    px = (r1 - r0) * (c1 - c0)
    with h5py.File(files[0], "r") as h:
        d = h[key]
        chunks, compression, shuffle, itemsize = d.chunks, d.compression, d.shuffle, d.dtype.itemsize
        other_filters = bool(d.fletcher32 or d.scaleoffset)
    boxes = chunk_boxes(frame, chunks)
    stored, raw = chunk_bytes(files, key, boxes)
    rows: list[Row] = []
    group = "reading, whole region"

    evicted = _evict(files)
    with _Clock() as clk:
        got = 0
        for f in files:
            with h5py.File(f, "r") as h:
                dset = h[key]
                for box in boxes:
                    got += len(dset.id.read_direct_chunk(box)[1])
    rows.append(Row(group, "chunk bytes from disk" if evicted else "chunk bytes (OS cache)", px, clk.wall,
                    clk.cpu, clk.rss, got, float("nan"),
                    note="raw chunks (read_direct_chunk), files evicted from the OS cache first" if evicted
                    else "raw chunks; the files could not be evicted from the OS cache"))

    codec = compression == "gzip" and not other_filters
    t_io = t_dec = 0.0
    checked = False
    with _Clock() as clk:
        for f in files:
            with h5py.File(f, "r") as h:
                dset = h[key]
                for box in boxes:
                    t = time.perf_counter()
                    data = dset.id.read_direct_chunk(box)[1]
                    t_io += time.perf_counter() - t
                    if codec:
                        t = time.perf_counter()
                        plain = zlib.decompress(data)
                        arr = (_unshuffle(plain, itemsize) if shuffle
                               else np.frombuffer(plain, f"<u{itemsize}"))
                        t_dec += time.perf_counter() - t
                        if not checked:  # the codec reproduces what h5py reads
                            ref = dset[box[0]:box[0] + chunks[0], box[1]:box[1] + chunks[1]]
                            assert np.array_equal(arr.reshape(chunks)[:ref.shape[0], :ref.shape[1]], ref)
                            checked = True
    rows.append(Row(group, "chunk bytes (OS cache)", px, t_io, float("nan"), clk.rss, stored, float("nan"),
                    note="the same chunks again, now cached"))
    if codec:
        rows.append(Row(group, "baseline: decompression alone", px, t_dec, float("nan"), clk.rss, stored, raw,
                        note=f"zlib{' + unshuffle' if shuffle else ''} of those chunks in memory, one core"))

    with _Clock() as clk:
        for f in files:
            with h5py.File(f, "r") as h:
                h[key][r0:r1, c0:c1]
    rows.append(Row(group, "baseline: h5py, region of each frame", px, clk.wall, clk.cpu, clk.rss, stored,
                    raw, note="one read of the region per frame file"))

    tiles = scan.tiles(opts["block_pixels"])
    n_tiles = len(tiles)
    if opts["read_tiles"]:
        tiles = tiles[: opts["read_tiles"]]
    tile_px = sum(t.n_pixels for t in tiles)
    reader = open_scan(cfg, path, check=False)
    reader.check([0])
    inside = time_h5py_reads(reader)
    with _Clock() as clk:
        for t in tiles:
            reader.read_block(0, t)
    reader.close()
    scale = px / tile_px
    part = "" if len(tiles) == n_tiles else f"; {len(tiles)} of {n_tiles} tiles, scaled"
    rows.append(Row(group, "laueflow: Scan.read_block, tiles in order", tile_px, clk.wall, clk.cpu, clk.rss,
                    stored / scale, raw / scale, scale, note=f"{n_tiles} tiles of {opts['block_pixels']} px, "
                    f"one Scan (open files and chunk caches reused){part}"))
    rows.append(Row(group, "  of which inside h5py (read, decompress)", tile_px, inside[0], float("nan"),
                    float("nan"), stored / scale, raw / scale, scale, note="dataset reads of the tiles"))
    rows.append(Row(group, "  of which pixel selection, trace layout", tile_px, clk.wall - inside[0],
                    float("nan"), float("nan"), scale=scale,
                    note="threshold, saturation, float32 (P, N), I0"))

    # what `laueflow run` does by default: the point staged once, then each block task reads its tile
    from laueflow.io import staging

    all_tiles = scan.tiles(opts["block_pixels"])
    stage_file = path.parent / "staged-point"
    stager = open_scan(cfg, path, check=False)
    with _Clock() as clk:
        info = staging.stage(stager, 0, all_tiles, stage_file)
    stager.close()
    rows.append(Row(group, "laueflow: stage the point (one pass)", px, clk.wall, clk.cpu, clk.rss, stored,
                    raw, note=f"frame regions read once, {info['bytes'] / MB:,.0f} MB tile-major scratch "
                              "file written (the run's stage_point task)"))
    with _Clock() as clk:
        for t in all_tiles:
            staging.read_tile(info, t, cfg.file.threshold)
    rows.append(Row(group, "laueflow: block reads from the staged point", px, clk.wall, clk.cpu, clk.rss,
                    note=f"{n_tiles} tiles, one contiguous read each, pixel selection, trace layout, I0"))
    staging.remove(stage_file)

    # a worker that reads one tile of the point: a fresh Scan per tile, on an even sample of the tiles
    every = max(1, n_tiles // max(opts["scattered_tiles"], 1))
    sample = scan.tiles(opts["block_pixels"])[::every][: opts["scattered_tiles"]]
    if sample:
        s_px = sum(t.n_pixels for t in sample)
        s_stored = s_raw = 0.0
        t_check = 0.0
        with _Clock() as clk:
            for t in sample:
                fresh = open_scan(cfg, path, check=False)
                t1 = time.perf_counter()
                fresh.check([0])
                t_check += time.perf_counter() - t1
                fresh.read_block(0, t)
                fresh.close()
        for t in sample:
            a, b = chunk_bytes(files[:1], key, chunk_boxes([t.r0, t.r1, t.c0, t.c1], chunks))
            s_stored, s_raw = s_stored + a * len(files), s_raw + b * len(files)
        rows.append(Row(group, "laueflow: one tile per fresh Scan", s_px, clk.wall, clk.cpu, clk.rss,
                        s_stored, s_raw, px / s_px,
                        note=f"{len(sample)} tiles; {t_check / len(sample):.2f} s of each in header checks; "
                        "no chunk reuse (a worker with one tile of the point, without staging)"))
    scan.close()
    return {"rows": [asdict(r) for r in rows], "pixels": px, "frames": len(files), "chunks": list(chunks),
            "compression": f"{compression}{' + shuffle' if shuffle else ''}", "stored_bytes": stored,
            "raw_bytes": raw, "region_bytes": px * len(files) * itemsize, "evicted": evicted}


# ----------------------------------------------------------------------------------------------
# the report


def rows_from_stages(stages: list[Stage], scale: float, comp: float, raw: float,
                     compile_s: float) -> list[Row]:
    """The pipeline's stages as rows scaled to a whole point (the decoder's first pass as its compile time,
    paid once per worker)."""
    group = "one point's work, one process"
    out = []
    for s in stages:
        if s.name.startswith(("imports", "open scan", "stitch: read")):
            continue
        if s.name.startswith("decode, first pass"):
            out.append(Row(group, "decode: JIT compilation", 0, compile_s, float("nan"), s.rss_mib, once=True,
                           note=f"in a first pass over the tiles ({s.wall:.0f} s); once per worker"))
            continue
        reads = s.name.startswith(("read", "  inside"))
        out.append(Row(group, s.name, s.pixels, s.wall, s.cpu, s.rss_mib, comp if reads else float("nan"),
                       raw if reads else float("nan"), scale, note=s.note))
    return out


def rows_from_run(r: RunMeasure, scale: float, comp: float, label: str) -> list[Row]:
    group = f"laueflow run{label}, local site, {r.workers} workers"
    mem = f"worker peaks {', '.join(_fmt(x) for x in r.worker_mib)} MiB, driver {_fmt(r.driver_mib)} MiB"
    return [
        Row(group, "first point (start-up included)", r.pixels_per_point, r.first, float("nan"),
            max(r.worker_mib, default=float("nan")), comp, scale=scale, once=True,
            note=f"start-up {r.first - r.warm:.0f} s once per run (Parsl, workers, imports, JIT)"),
        Row(group, "per point, warm workers", r.pixels_per_point, r.warm, r.warm_cpu / max(r.warm_points, 1),
            max(r.worker_mib, default=float("nan")), comp, scale=scale, note=mem),
    ]


def table(rows: list[Row], title: str) -> Any:
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for name, just in (("stage", "left"), ("px measured", "right"), ("wall s", "right"),
                       ("s / point", "right"), ("px/s", "right"), ("px/s/core", "right"),
                       ("MB/s read", "right"),
                       ("MB/s decompr.", "right"), ("peak RSS MiB", "right"), ("note", "left")):
        t.add_column(name, justify=just)  # type: ignore[arg-type]
    group = None
    for r in rows:
        if r.group != group:
            t.add_section()
            t.add_row(f"[bold]{r.group}[/]", "", "", "", "", "", "", "", "", "")
            group = r.group
        per_point = _fmt(r.per_point, 1) + ("" if r.once or abs(r.scale - 1) < 1e-9 else " *")
        if r.once:
            per_point += " (once)"
        px = r.pixels or float("nan")
        t.add_row(r.name, f"{r.pixels:,}" if r.pixels else "", _fmt(r.wall, 2), per_point,
                  _fmt(_ratio(px, r.wall)), _fmt(_ratio(px, r.cpu)),
                  _fmt(_ratio(r.comp_bytes, r.wall * MB), 1), _fmt(_ratio(r.raw_bytes, r.wall * MB), 1),
                  _fmt(r.rss_mib), r.note)
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--region", type=int, default=1200, help="side of the point's region, pixels")
    ap.add_argument("--frames", type=int, default=201, help="frames of the point (2048 x 2048 each)")
    ap.add_argument("--spot-fraction", type=float, default=0.05,
                    help="share of the region's pixels in spots (the truth's spot pixels)")
    ap.add_argument("--chunk", type=int, default=256,
                    help="side of the frames' HDF5 chunks (2048: one chunk per frame)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sub-region", type=int, default=192,
                    help="side of the region the decoding stages and the run measure (scaled to the whole)")
    ap.add_argument("--block-pixels", type=int, default=4096, help="pixels per task (recon.block_pixels)")
    ap.add_argument("--workers", type=int, default=0, help="workers of the run (0: one per core)")
    ap.add_argument("--read-tiles", type=int, default=0, help="read only the first N tiles in order (0: all)")
    ap.add_argument("--scattered-tiles", type=int, default=16, help="tiles read each by a fresh Scan")
    ap.add_argument("--threads", choices=["default", "single"], default="default",
                    help="default: the libraries' own thread pools (XLA, OpenBLAS), as a plain run; single: "
                         "one compute thread per process (the stages then use one core, the run one per "
                         "worker)")
    ap.add_argument("--no-run", action="store_true", help="skip `laueflow run`")
    ap.add_argument("--cache", type=Path, default=REPO / ".bench-cache", help="where the point is kept")
    ap.add_argument("--resimulate", action="store_true", help="simulate again even when cached")
    ap.add_argument("--json", type=Path, help="also write every number to this JSON file")
    o = ap.parse_args(argv)
    if not (16 <= o.region <= 2048 and o.frames >= 8 and 0 < o.spot_fraction < 1 and o.chunk >= 16
            and 16 <= o.sub_region and o.block_pixels >= 1 and o.workers >= 0 and o.read_tiles >= 0
            and o.scattered_tiles >= 0):
        ap.error("need 16 <= --region <= 2048, --frames >= 8, 0 < --spot-fraction < 1, --chunk >= 16, "
                 "--sub-region >= 16, --block-pixels >= 1, and non-negative counts")

    from rich.console import Console

    from laueflow.simulate import DETECTOR_KEY

    console = Console(width=None if sys.stdout.isatty() else 190)
    info = machine()
    console.print(machine_line(info), highlight=False, soft_wrap=True)
    t_start = time.perf_counter()
    folder = scan_dir(o.cache, o)
    with console.status(f"simulating the point (once, cached in {folder.parent})") as status:
        sim, summary = ensure_point(folder, o, lambda line: status.update(f"simulating: {line}"))
    frame = summary["region"]
    full_px = (frame[1] - frame[0]) * (frame[3] - frame[2])
    sim_note = f"simulated in {sim:.0f} s" if sim is not None else "cached"
    console.print(f"point: {o.frames} frames of 2048 x 2048 uint16, region {frame} ({full_px:,} px), "
                  f"{summary['spot_pixels']:,} spot pixels ({summary['spot_fraction']:.1%}) from "
                  f"{summary['spots']} spots, {summary['signal_pixels']:,} pixels with signal, chunks "
                  f"{o.chunk} x {o.chunk}, gzip level 1 + shuffle ({sim_note}, {folder})",
                  highlight=False, soft_wrap=True)

    with console.status("reading the whole region, in a fresh process"):
        reading = in_fresh_process(measure_reading, str(folder),
                                   {"block_pixels": o.block_pixels, "read_tiles": o.read_tiles,
                                    "scattered_tiles": o.scattered_tiles})
    rows = [Row(**r) for r in reading["rows"]]

    sub = sub_frame(frame, o.sub_region, o.chunk)
    sub_px = (sub[1] - sub[0]) * (sub[3] - sub[2])
    scale = full_px / sub_px
    work = folder.parent / "work"
    once = repeated_scan(folder, work / "sub1", copies=1, frame=sub)
    frames = sorted(folder.glob("*_[0-9]*.h5"))  # the point's frame files (truth.h5 aside)
    comp, dec = chunk_bytes(frames, DETECTOR_KEY, chunk_boxes(sub, (o.chunk, o.chunk)))
    with console.status(f"every stage on the sub-region {sub}, in a fresh process"):
        bare = in_fresh_process(measure_stages, str(once), {"block_pixels": o.block_pixels, "tiles": 0,
                                                            "single_thread": o.threads == "single"})
    stages = [Stage(**s) for s in bare["stages"]]
    rows += rows_from_stages(stages, scale, comp, dec, bare["compile"])

    runs: list[RunMeasure] = []
    if not o.no_run:
        repeated = repeated_scan(folder, work / "sub3", frame=sub, copies=RUN_COPIES)
        workers = o.workers or info["cores"]
        env = dict(SINGLE_THREAD_ENV) if o.threads == "single" else {}
        for label, extra in RUN_VARIANTS:
            with console.status(f"laueflow run{label} on the sub-region, the point {RUN_COPIES} times, "
                                f"{workers} workers"):
                runs.append(run_cli(repeated, work / "out", workers=workers, block_pixels=o.block_pixels,
                                    pixels_per_point=sub_px, env=env, extra=extra))
            if runs[-1].ok:
                rows += rows_from_run(runs[-1], scale, comp, label)
    shutil.rmtree(work, ignore_errors=True)

    threads = "one compute thread per process" if o.threads == "single" else "default thread pools"
    title = (f"One scan point: {o.frames} frames, {full_px:,} px; s / point is for the whole region, "
             f"* = scaled from the {sub_px:,} px measured ({sub}); JAX {bare['jax_version']} on "
             f"{bare['backend']}, {threads}")
    console.print(table(rows, title))
    print_failures(console, runs)
    decode_row = next(r for r in rows if r.name.startswith("decode ("))
    read_row = next(r for r in rows if r.name.startswith("laueflow: Scan.read_block"))
    stage_row = next(r for r in rows if r.name.startswith("laueflow: stage the point"))
    staged_row = next(r for r in rows if r.name.startswith("laueflow: block reads from the staged"))
    h5_row = next(r for r in rows if r.name.startswith("baseline: h5py"))
    dec_row = next((r for r in rows if r.name.startswith("baseline: decompression")), None)
    read_stage = stage(stages, "read (").wall
    decode_stage = stage(stages, "decode (").wall
    cadence = 72.0  # s between scan points at the beamline (model.md section 7)
    core_s = _ratio(full_px * decode_row.cpu, decode_row.pixels)
    lines = [
        f"the decoder alone: {core_s:,.0f} CPU-seconds per point "
        f"({_ratio(decode_row.pixels, decode_row.cpu):,.0f} px/s per core); {decode_row.per_point:,.0f} s "
        f"wall here, {_ratio(decode_row.cpu, decode_row.wall):.2f} cores busy on average; peak "
        f"{decode_row.rss_mib:,.0f} MiB in its process",
        f"reader vs h5py reading the same region: {_ratio(read_row.per_point, h5_row.per_point):.2f}x "
        "the time"
        + (f"; vs decompression alone {_ratio(read_row.per_point, dec_row.per_point):.2f}x" if dec_row
           else ""),
        f"staging vs h5py reading the same region: {_ratio(stage_row.per_point, h5_row.per_point):.2f}x "
        f"the time; then the block tasks' reads: {staged_row.per_point:.1f} s per point in all",
        f"a task's own read is {_ratio(read_stage, read_stage + decode_stage):.1%} of its read + decode "
        "time without staging; with staging (the default) the point is read in the driver beside the "
        "decoding of the points before it",
    ]
    for r, (label, _) in zip(runs, RUN_VARIANTS, strict=False):
        if not r.ok:
            continue
        run_core_s = r.warm_cpu / max(r.warm_points, 1) * scale
        lines.append(f"laueflow run{label}, warm: {run_core_s:,.0f} CPU-seconds per point "
                     f"({r.warm_core_rate:,.0f} px/s per core, every process counted), "
                     f"{r.warm * scale:,.0f} s wall here with {r.workers} "
                     f"workers; to keep pace with one point every {cadence:.0f} s: about "
                     f"{run_core_s / cadence:,.1f} such cores")
    lines.append(f"benchmark wall time {time.perf_counter() - t_start:.0f} s")
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)
    if o.json:
        out = {"machine": info, "options": {k: str(v) for k, v in vars(o).items()}, "point": summary,
               "simulate_seconds": sim, "sub_region": sub, "reading": reading, "stages": bare,
               "runs": [asdict(r) for r in runs],
               "rows": [asdict(r) | {"per_point": r.per_point} for r in rows],
               "summary": lines}
        o.json.write_text(json.dumps(_plain(out), indent=1))
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
