"""Decoder benchmark: read, decode and write a simulated scan point, against a per-pixel NNLS baseline.

For each geometry (tilted: mask anglez 44 deg, 1 um steps; flat: anglez -1.3 deg, 0.5 um steps) a
synthetic scan (simulator defaults: 261 frames, 350 depth bins) is simulated once into a cache
folder, then measured in a fresh process (so peak memory and JIT compile times are its own):

- read:   ``Scan.read_block`` of every tile of point 0;
- decode: ``laueflow.decode.decode`` of every block, twice; the first pass includes JIT compilation,
  the second is the steady state, and their difference is reported as the compile time;
- write:  the block files and the stitched point file (``laueflow.io.blocks``, ``laueflow.io.pointfile``);
- baseline: a straightforward per-pixel decoder on a subset of the same pixels: the pixel's exact
  design matrix (``laueflow.forward.design_matrices`` at the configured energy), the block's
  per-frame median as background, and inverse-variance weighted non-negative least squares
  (``scipy.optimize.nnls``).

Run ``python benchmarks/bench_decode.py --help`` for the options; ``make bench`` runs the defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SINGLE_THREAD_ENV = {
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
    "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
}


@dataclass
class Stage:
    """One row of the table: a stage's work and what it cost."""

    name: str
    pixels: int
    wall: float  # s
    cpu: float  # s, user + system of every thread of the process
    rss_mib: float  # peak resident memory of the process during the stage
    note: str = ""
    rate: float | None = None  # pixels per second (wall), when not simply pixels / wall
    rate_core: float | None = None  # pixels per CPU second, when not simply pixels / cpu

    @property
    def px_per_s(self) -> float:
        return self.rate if self.rate is not None else _ratio(self.pixels, self.wall)

    @property
    def px_per_core_s(self) -> float:
        return self.rate_core if self.rate_core is not None else _ratio(self.pixels, self.cpu)


@dataclass
class Result:
    """Everything measured for one geometry."""

    geometry: str
    scan: str
    region: int
    frames: int
    depth_bins: int
    blocks: int
    block_pixels: int
    backend: str
    devices: str
    jax_version: str
    cores: int
    simulate_seconds: float | None
    stages: list[Stage] = field(default_factory=list)
    accuracy: dict[str, Any] = field(default_factory=dict)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _reset_peak_rss() -> bool:
    """Reset the process's resident-memory high-water mark to its current size (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_mib() -> float:
    """Peak resident memory (MiB): VmHWM of this process since the last reset where /proc has it, else
    ru_maxrss (which, after fork and exec, can include the parent's size)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


class _Clock:
    """Wall and CPU time of a ``with`` block; the peak RSS is reset when it starts."""

    def __enter__(self) -> _Clock:
        _reset_peak_rss()
        self.t0, self.c0 = time.perf_counter(), _cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.t0, _cpu() - self.c0
        self.rss = _rss_mib()


class _CompileTimer:
    """Seconds jax spends tracing, lowering and compiling during a ``with`` block (jax.monitoring)."""

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")

    def __init__(self) -> None:
        from jax import monitoring

        self.seconds, self._on = 0.0, False
        monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **_: Any) -> None:
        if self._on and event in self.EVENTS:
            self.seconds += duration

    def __enter__(self) -> _CompileTimer:
        self.seconds, self._on = 0.0, True
        return self

    def __exit__(self, *exc: object) -> None:
        self._on = False


# ----------------------------------------------------------------------------------------------
# the scan


def scan_folder(cache: Path, geometry: str, region: int, frames: int, preset: str, seed: int) -> Path:
    return cache / f"{geometry}-{preset}-r{region}-f{frames}-s{seed}" / "scan"


def simulator_fingerprint() -> str:
    """A hash of the code a simulated scan depends on, so that a changed simulator invalidates the cache."""
    import hashlib

    import laueflow

    package = Path(laueflow.__file__).parent
    h = hashlib.sha256(laueflow.__version__.encode())
    for name in ("simulate.py", "forward.py", "mask.py", "geometry.py", "config.py"):
        h.update((package / name).read_bytes())
    return h.hexdigest()[:16]


def ensure_scan(folder: Path, geometry: str, region: int, frames: int, preset: str, seed: int,
                again: bool) -> float | None:
    """Simulate the scan unless the cache holds it, made by the same simulator code (truth.h5 is written
    last); the seconds it took, None when cached."""
    stamp = folder.parent / "simulator.sha"
    current = simulator_fingerprint()
    cached = stamp.is_file() and stamp.read_text().strip() == current
    if (folder / "truth.h5").is_file() and cached and not again:
        return None
    import shutil

    from laueflow.simulate import simulate

    if folder.exists():
        shutil.rmtree(folder)
    stamp.unlink(missing_ok=True)
    t0 = time.perf_counter()
    simulate(folder, preset=preset, seed=seed, frames=frames, region=region, geometry=geometry)
    seconds = time.perf_counter() - t0
    stamp.write_text(current + "\n")
    return seconds


# ----------------------------------------------------------------------------------------------
# the baseline


def baseline_decode(setup: Any, cfg: Any, rows: Any, cols: Any, traces: Any, background: Any,
                    frames: Any) -> Any:
    """Per-pixel NNLS: f >= 0 minimising |W (y - b - G f)|^2 with W = diag(1 / sqrt(max(y, 1))).

    ``traces`` (P, N) counts, ``background`` (N,) counts per frame; returns profiles (P, J).
    """
    import numpy as np

    # scipy is not a dependency of laueflow itself; it comes with jax and xraydb.  Imported here
    # so that the benchmark's other stages never need it.
    from scipy.optimize import nnls

    from laueflow import geometry as G
    from laueflow.forward import design_matrices

    depths = cfg.geo.source.depths
    out = np.zeros((len(rows), depths.size))
    for i, (r, c) in enumerate(zip(rows, cols, strict=True)):
        pixel = G.pixel_centres(setup.geo, np.array([r]), np.array([c]))
        g = design_matrices(setup, pixel, depths, frames, energy_kev=cfg.recon.energy)[0].astype(np.float64)
        y = np.asarray(traces[i], dtype=np.float64)
        w = 1.0 / np.sqrt(np.maximum(y, 1.0))
        out[i], _ = nnls(g * w[:, None], (y - background) * w, maxiter=50 * depths.size)
    return out


# ----------------------------------------------------------------------------------------------
# one geometry, in its own process


def measure(geometry: str, folder: str, opts: dict[str, Any], simulate_seconds: float | None) -> dict:
    """Measure every stage for the scan in ``folder``; returns a :class:`Result` as a dictionary."""
    if opts["single_thread"]:
        os.environ.update(SINGLE_THREAD_ENV)
    import warnings

    import jax
    import numpy as np

    from laueflow import provenance
    from laueflow.config import load
    from laueflow.decode import decode
    from laueflow.evaluate import centroids, correlations
    from laueflow.forward import Setup
    from laueflow.io.blocks import write_block
    from laueflow.io.layout import point_name
    from laueflow.io.pointfile import write_point
    from laueflow.io.scan import open_scan
    from laueflow.io.truth import load_truth

    scan_dir = Path(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = load(scan_dir / "config.yaml")
    setup = Setup.from_config(cfg)
    depths = cfg.geo.source.depths
    r0, r1, _, _ = cfg.file.frame
    res = Result(geometry=geometry, scan=str(scan_dir), region=r1 - r0, frames=cfg.file.n_frames,
                 depth_bins=int(depths.size), blocks=0, block_pixels=opts["block_pixels"],
                 backend=jax.default_backend(), devices=", ".join(str(d) for d in jax.devices()),
                 jax_version=jax.__version__, cores=len(os.sched_getaffinity(0)),
                 simulate_seconds=simulate_seconds)

    with _Clock() as clk:
        scan = open_scan(cfg, scan_dir)
    res.stages.append(Stage("open scan (check headers)", 0, clk.wall, clk.cpu, clk.rss,
                            f"{scan.n_total} frame files"))

    tiles = scan.tiles(opts["block_pixels"])
    if opts["blocks"]:
        tiles = tiles[: opts["blocks"]]
    res.blocks = len(tiles)
    with _Clock() as clk:
        blocks = [scan.read_block(0, t) for t in tiles]
    n_read = sum(t.n_pixels for t in tiles)
    res.stages.append(Stage("read", n_read, clk.wall, clk.cpu, clk.rss, "Scan.read_block, warm OS cache"))

    def decode_all() -> list[Any]:
        return [decode(b.traces, b.rows, b.cols, b.frames, setup, cfg, selected=b.selected) for b in blocks]

    compiling = _CompileTimer()
    with _Clock() as cold, compiling:
        decode_all()
    cold_compile = compiling.seconds
    with _Clock() as warm, compiling:
        decoded = decode_all()
    n_dec = sum(int(d.rows.size) for d in decoded)
    res.stages.append(Stage("decode, first pass", n_dec, cold.wall, cold.cpu, cold.rss, "includes JIT"))
    res.stages.append(Stage("  of which JIT compile", 0, cold_compile, float("nan"), float("nan"),
                            "trace + lower + XLA compile, as jax reports them"))
    again = f", still {compiling.seconds:.1f} s compiling" if compiling.seconds > 0.05 else ""
    res.stages.append(Stage("decode", n_dec, warm.wall, warm.cpu, warm.rss, "steady state" + again))

    with tempfile.TemporaryDirectory(dir=scan_dir.parent, prefix="write-") as tmp, _Clock() as clk:
        files = []
        for i, (b, d) in enumerate(zip(blocks, decoded, strict=True)):
            t = b.tile
            files.append(Path(tmp) / f"block_{i:05d}.npz")
            write_block(files[-1], point=0, tile=(t.r0, t.r1, t.c0, t.c1),
                                config_fingerprint=cfg.fingerprint(), n_depths=depths.size, decoded=d)
        record = provenance.build(config_yaml=cfg.to_yaml(), config_fingerprint=cfg.fingerprint(), inputs=[],
                                  start_time=provenance.now(), point=0)
        write_point(Path(tmp) / point_name(0), files, frame=cfg.file.frame, depths_mm=depths,
                            provenance=record)
    res.stages.append(Stage("write", n_dec, clk.wall, clk.cpu, clk.rss, "block files + point file"))
    if n_dec == 0 or opts["baseline_pixels"] < 1:
        return asdict(res)

    # baseline: the same number of spot and of background pixels, drawn from the decoded pixels; the
    # rate is extrapolated to the scan's mix of the two
    truth = load_truth(scan_dir / "truth.h5").for_point(0)
    spot_index = {(int(r), int(c)): i for i, (r, c) in enumerate(truth.pixels)}
    rng = np.random.default_rng(opts["seed"])
    where = [(bi, j) for bi, d in enumerate(decoded) for j in range(d.rows.size)]
    pixel = [(int(decoded[bi].rows[j]), int(decoded[bi].cols[j])) for bi, j in where]
    is_spot = np.array([rc in spot_index for rc in pixel])
    half = max(1, opts["baseline_pixels"] // 2)
    chosen = {kind: rng.permutation(np.flatnonzero(is_spot == kind))[:half] for kind in (True, False)}
    frames = blocks[0].frames
    # the background of each block, once (its cost per pixel is negligible), and one call to compile the
    # design matrix, both outside the timing
    medians = [np.median(b.traces[b.selected], axis=0) if b.selected.any() else np.zeros(b.traces.shape[1])
               for b in blocks]
    b0 = blocks[0]
    baseline_decode(setup, cfg, b0.rows[:1], b0.cols[:1], b0.traces[:1], medians[0], frames)
    per_pixel: dict[bool, tuple[float, float]] = {}
    base_profiles: dict[bool, Any] = {}
    base_wall = base_cpu = base_rss = 0.0
    for kind, picks in chosen.items():
        if picks.size == 0:
            continue
        with _Clock() as clk:
            profiles = []
            for k in picks:
                bi, j = where[k]
                b, d = blocks[bi], decoded[bi]
                row = np.flatnonzero((b.rows == d.rows[j]) & (b.cols == d.cols[j]))[0]
                profiles.append(baseline_decode(setup, cfg, d.rows[j:j + 1], d.cols[j:j + 1],
                                                b.traces[row:row + 1], medians[bi], frames)[0])
        per_pixel[kind] = (clk.wall / picks.size, clk.cpu / picks.size)
        base_profiles[kind] = np.array(profiles)
        base_wall, base_cpu, base_rss = base_wall + clk.wall, base_cpu + clk.cpu, max(base_rss, clk.rss)
    frac = float(is_spot.mean()) if is_spot.size else 0.0
    mix = {True: frac, False: 1.0 - frac}
    t_wall = sum(mix[k] * per_pixel[k][0] for k in per_pixel) / max(sum(mix[k] for k in per_pixel), 1e-12)
    t_cpu = sum(mix[k] * per_pixel[k][1] for k in per_pixel) / max(sum(mix[k] for k in per_pixel), 1e-12)
    n_base = int(sum(p.size for p in chosen.values()))
    res.stages.append(Stage("baseline: per-pixel NNLS", n_base, base_wall, base_cpu, base_rss,
                            f"{chosen[True].size} spot + {chosen[False].size} other px, "
                            f"rate for {frac:.0%} spot px",
                            rate=_ratio(1.0, t_wall), rate_core=_ratio(1.0, t_cpu)))

    # accuracy on the baseline's spot pixels, both decoders
    if chosen[True].size:
        picks = chosen[True]
        true = truth.profiles[[spot_index[pixel[k]] for k in picks]]
        ours = np.array([decoded[where[k][0]].profiles[where[k][1]] for k in picks])
        depth_um = truth.depth
        for name, prof in (("laueflow", ours), ("baseline", base_profiles[True])):
            err = np.abs(centroids(prof, depth_um) - centroids(true, depth_um))
            res.accuracy[name] = {
                "centroid_median_um": float(np.nanmedian(err)) if np.isfinite(err).any() else float("nan"),
                "within_2um": float(np.mean(np.nan_to_num(err, nan=np.inf) <= 2.0)),
                "correlation_mean": float(np.mean(correlations(prof, true))),
            }
        res.accuracy["spot_pixels"] = int(picks.size)
    return asdict(res)


def _plain(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None (strict JSON)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def _from_dict(d: dict) -> Result:
    stages = [Stage(**s) for s in d.pop("stages")]
    return Result(**d, stages=stages)


# ----------------------------------------------------------------------------------------------
# the report


def _fmt(x: float, digits: int = 0) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    if digits == 0 and abs(x) >= 1e5:
        return f"{x:.3g}"
    return f"{x:,.{digits}f}"


def report(results: list[Result], console: Any) -> None:
    from rich.table import Table

    first = results[0]
    console.print(f"JAX {first.jax_version}, backend [bold]{first.backend}[/], devices: {first.devices}; "
                  f"{first.cores} CPU cores available to the process", highlight=False)
    for r in results:
        sim = (f"simulated in {r.simulate_seconds:.0f} s" if r.simulate_seconds is not None else "cached")
        blocks = f"{r.blocks} block{'s' if r.blocks != 1 else ''}"
        title = (f"{r.geometry} geometry: {r.region} x {r.region} pixels, {r.frames} frames, "
                 f"{r.depth_bins} depth bins, {blocks} of up to {r.block_pixels} pixels (scan {sim})")
        t = Table(title=title, title_justify="left", show_lines=False)
        for col, just in (("stage", "left"), ("pixels", "right"), ("wall s", "right"), ("CPU s", "right"),
                          ("px/s", "right"), ("px/s/core", "right"), ("peak RSS MiB", "right"),
                          ("note", "left")):
            t.add_column(col, justify=just)  # type: ignore[arg-type]
        for s in r.stages:
            rates = s.pixels > 0 or s.rate is not None
            t.add_row(s.name, str(s.pixels) if s.pixels else "", _fmt(s.wall, 2), _fmt(s.cpu, 2),
                      _fmt(s.px_per_s) if rates else "", _fmt(s.px_per_core_s) if rates else "",
                      _fmt(s.rss_mib), s.note)
        console.print(t)
        steady = next(s for s in r.stages if s.name == "decode")
        base = next((s for s in r.stages if s.name.startswith("baseline")), None)
        if base is not None:
            per_s = _ratio(steady.px_per_s, base.px_per_s)
            per_core = _ratio(steady.px_per_core_s, base.px_per_core_s)
            console.print(f"decode vs baseline: {per_s:.1f}x per second, {per_core:.1f}x per core",
                          highlight=False, soft_wrap=True)
        acc = r.accuracy
        if acc:
            parts = [f"{name}: centroid error median {a['centroid_median_um']:.2f} um, within 2 um "
                     f"{a['within_2um']:.0%}, correlation {a['correlation_mean']:.3f}"
                     for name, a in acc.items() if isinstance(a, dict)]
            console.print(f"on the baseline's {acc['spot_pixels']} spot pixels: " + "; ".join(parts),
                          highlight=False, soft_wrap=True)
        console.print()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--geometry", choices=["tilted", "flat", "both"], default="both")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--region", type=int, default=64, help="side of the simulated detector region, pixels")
    size.add_argument("--pixels", type=int, help="pixels in the region (rounded up to a square)")
    ap.add_argument("--frames", type=int, default=261, help="frames per scan point")
    ap.add_argument("--block-pixels", type=int, default=1024, help="pixels per block (tile)")
    ap.add_argument("--blocks", type=int, default=0, help="time only the first N blocks (0: all)")
    ap.add_argument("--baseline-pixels", type=int, default=64,
                    help="pixels decoded by the baseline (half spot pixels, half others)")
    ap.add_argument("--preset", default="thin", choices=["thin", "extended", "overlap"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--single-thread", action="store_true",
                    help="restrict XLA and BLAS to one thread (default: their own choice, as in a run)")
    ap.add_argument("--cache", type=Path, default=REPO / ".bench-cache",
                    help="where simulated scans are kept")
    ap.add_argument("--resimulate", action="store_true", help="simulate again even when cached")
    ap.add_argument("--json", type=Path, help="also write the measurements to this JSON file")
    args = ap.parse_args(argv)
    region = math.isqrt(args.pixels - 1) + 1 if args.pixels else args.region
    if region < 16 or args.frames < 8 or args.block_pixels < 1 or args.blocks < 0:
        ap.error("need --region >= 16 (--pixels >= 256), --frames >= 8, --block-pixels >= 1, --blocks >= 0")

    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 150)
    opts = {"block_pixels": args.block_pixels, "blocks": args.blocks, "baseline_pixels": args.baseline_pixels,
            "seed": args.seed, "single_thread": args.single_thread}
    geometries = ["tilted", "flat"] if args.geometry == "both" else [args.geometry]
    out: list[Result] = []
    for geometry in geometries:
        folder = scan_folder(args.cache, geometry, region, args.frames, args.preset, args.seed)
        with console.status(f"{geometry}: simulating (once, cached in {folder.parent})"):
            sim = ensure_scan(folder, geometry, region, args.frames, args.preset, args.seed, args.resimulate)
        with console.status(f"{geometry}: measuring"), mp.get_context("spawn").Pool(1) as pool:
            out.append(_from_dict(pool.apply(measure, (geometry, str(folder), opts, sim))))
    report(out, console)
    if args.json:
        args.json.write_text(json.dumps(_plain([asdict(r) for r in out]), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
