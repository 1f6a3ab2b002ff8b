"""Workflow benchmark: `laueflow run` on the local site with 1 and 2 workers, against the bare stages.

On one simulated scan point (simulated once into the cache, as ``bench_decode.py`` does):

- bare: in a fresh process and without Parsl, what the tasks of one point do, stage by stage (open the
  scan, read every tile, decode it, write the block files, stitch the point file): the baseline;
- ``laueflow run SCAN --site local --workers W`` for each W (default 1 and 2), as a subprocess, on a
  copy of the scan that holds the point three times (hard links to the same frame files): the whole
  command's wall time, when each point was done (the first includes starting Parsl and its workers and
  compiling the decoder; the last two are the steady state on warm workers), the block tasks' own
  seconds, the CPU time and the peak memory of every process (driver, Parsl's processes, each worker);
- peak memory per worker against block size: one run per ``--memory-blocks`` size.

It prints scaling efficiency (the steady rate with W workers over W times the rate with one), the
workflow's overhead over the bare stages and over the decoder alone, and the fixed start-up cost.
By default every process is limited to one compute thread (XLA, OpenBLAS, OpenMP), so that W workers
use W cores and the scaling is that of the workflow; ``--threads default`` measures what a plain run
does.

Run ``python benchmarks/bench_workflow.py --help`` for the options; ``make bench-workflow`` runs the
defaults (about ten minutes on two cores the first time).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from bench_decode import (
    REPO,
    SINGLE_THREAD_ENV,
    Stage,
    _Clock,
    _CompileTimer,
    _fmt,
    _plain,
    _ratio,
    ensure_scan,
    scan_folder,
)

CLK_TCK = os.sysconf("SC_CLK_TCK")
POINT_LINE = re.compile(r"^point\s+(\d+):\s+(\S+)")
TASK_SECONDS = re.compile(r"\(decoding ([0-9.]+) s\)")
COPIES = 3  # the point three times: the first warms the workers up, the last two show the steady state


# ----------------------------------------------------------------------------------------------
# the machine


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPU model, cores available, memory, load, versions, code state."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) / 2**20
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "laueflow", "configs"],
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
        changed = sorted(line[3:] for line in dirty if line.strip())
    except (OSError, subprocess.SubprocessError):
        commit, changed = "", []
    return {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpu": model or platform.processor(),
            "cores": len(os.sched_getaffinity(0)), "memory_gib": round(mem, 1),
            "load": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
            "commit": commit, "changed": changed}


def machine_line(m: dict[str, Any]) -> str:
    code = f"laueflow at {m['commit']}" + (f" with local changes to {', '.join(m['changed'])}"
                                            if m["changed"] else "")
    return (f"{m['date']}: {m['cpu']}, {m['cores']} cores available, {m['memory_gib']} GiB, load average "
            f"{' '.join(str(x) for x in m['load'])} at the start; Python {m['python']}; {code}")


# ----------------------------------------------------------------------------------------------
# a scan holding its point more than once


def repeated_scan(src: Path, dst: Path, copies: int = COPIES, frame: list[int] | None = None) -> Path:
    """A scan folder ``dst`` whose frame files ``<prefix>_<n>.h5`` are hard links to ``src``'s single point,
    ``copies`` times over (point k = the same frames), with ``src``'s configuration (``file.frame``
    replaced by ``frame`` when given).  Point 1 and later then run on warm workers in one run."""
    cfg = yaml.safe_load((src / "config.yaml").read_text())
    begin, end, step = cfg["file"]["range"]
    if begin != 0 or step != 1:
        raise ValueError(f"{src}: expected file.range [0, N, 1], got {cfg['file']['range']}")
    frames = sorted(src.glob("*_[0-9]*.h5"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if len(frames) != end:
        raise ValueError(f"{src}: expected {end} frame files (one point), found {len(frames)}")
    prefix = frames[0].stem.rsplit("_", 1)[0]
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for k in range(copies):
        for n, f in enumerate(frames):
            os.link(f, dst / f"{prefix}_{k * end + n}.h5")
    for extra in ("mask.npy",):
        if (src / extra).exists():
            os.link(src / extra, dst / extra)
    if frame is not None:
        cfg["file"]["frame"] = [int(v) for v in frame]
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dst


# ----------------------------------------------------------------------------------------------
# watching the processes of a run


@dataclass
class Proc:
    """One process of a run, as last sampled."""

    pid: int
    ppid: int
    cmd: str
    peak_mib: float = 0.0  # VmHWM: the process's own resident-memory high-water mark
    cpu: float = 0.0  # user + system seconds
    worker: bool = False  # a Parsl worker that loaded JAX


class ProcessSampler(threading.Thread):
    """Samples every process that carries ``LAUEFLOW_BENCH_TAG=tag`` in its environment (a run's driver,
    Parsl's interchange and worker pool, the workers, whatever re-parenting happened), every
    ``interval`` seconds: peak resident memory, CPU seconds, and whether it has loaded JAX."""

    def __init__(self, tag: str, interval: float = 0.2):
        super().__init__(daemon=True)
        self.marker = f"LAUEFLOW_BENCH_TAG={tag}".encode()
        self.interval = interval
        self.procs: dict[int, Proc] = {}
        self.history: list[tuple[float, float]] = []  # (perf_counter, CPU seconds of all processes so far)
        self._foreign: set[int] = set()
        self._ours: set[int] = set()  # included whatever their environment says
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()

    def include(self, pid: int) -> None:
        """Watch ``pid`` too (a process started here carries the marker only once it has exec'd)."""
        self._ours.add(pid)
        self._foreign.discard(pid)

    def cpu_at(self, t: float) -> float:
        """CPU seconds of all the processes up to ``t`` (perf_counter), interpolated between samples."""
        import numpy as np

        if not self.history:
            return float("nan")
        ts, cs = zip(*self.history, strict=True)
        return float(np.interp(t, ts, cs))

    def sample(self) -> None:
        self._sample()
        self.history.append((time.perf_counter(), sum(p.cpu for p in self.procs.values())))

    def _sample(self) -> None:
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            if pid in self._foreign:
                continue
            try:
                if pid not in self.procs:
                    if pid not in self._ours and self.marker not in Path(f"/proc/{pid}/environ").read_bytes():
                        self._foreign.add(pid)
                        continue
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                    self.procs[pid] = Proc(pid=pid, ppid=0, cmd=cmd.decode(errors="replace").strip())
                p = self.procs[pid]
                status = Path(f"/proc/{pid}/status").read_text()
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:  # gone, or not ours to read
                if pid not in self.procs:
                    self._foreign.add(pid)
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    p.peak_mib = max(p.peak_mib, int(line.split()[1]) / 1024.0)
                elif line.startswith("PPid:"):
                    p.ppid = int(line.split()[1])
            fields = stat.rsplit(")", 1)[1].split()
            p.cpu = max(p.cpu, (int(fields[11]) + int(fields[12])) / CLK_TCK)
            if not p.worker and "spawn_main" in p.cmd and p.peak_mib > 100:
                try:
                    p.worker = "jaxlib" in Path(f"/proc/{pid}/maps").read_text()
                except OSError:
                    pass


@dataclass
class RunMeasure:
    """What one `laueflow run` command cost."""

    command: str
    workers: int | None
    block_pixels: int | None
    pixels_per_point: int
    returncode: int
    wall: float  # s, the whole command
    point_done: dict[int, float] = field(default_factory=dict)  # s from the start to each point's line
    point_status: dict[int, str] = field(default_factory=dict)
    point_tasks: dict[int, float] = field(default_factory=dict)  # s, the point's block tasks added up
    cpu: float = 0.0  # s, sampled, every process
    warm_cpu: float = float("nan")  # s, CPU of every process over the warm points (see ``warm``)
    driver_mib: float = 0.0
    worker_mib: list[float] = field(default_factory=list)
    other_mib: float = 0.0  # the largest of Parsl's other processes (interchange, pool manager, helpers)
    output: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and bool(self.point_done) and all(
            s == "done" for s in self.point_status.values())

    @property
    def first(self) -> float:
        """Seconds until the first point was done (start-up included)."""
        return min(self.point_done.values()) if self.point_done else float("nan")

    @property
    def warm_points(self) -> int:
        """Points finished on warm workers: all after the second (the first point's blocks compile, and
        the second's start while the first's last blocks still run)."""
        return max(len(self.point_done) - 2, 0)

    @property
    def warm_core_rate(self) -> float:
        """Pixels per CPU second on warm workers (every process counted): robust to other load."""
        return _ratio(self.pixels_per_point * self.warm_points, self.warm_cpu)

    @property
    def warm(self) -> float:
        """Seconds per point on warm workers: the time between the second and the last point's completion,
        per point (in the steady state points complete at the rate the workers get through them)."""
        times = sorted(self.point_done.values())
        return (times[-1] - times[1]) / self.warm_points if self.warm_points else float("nan")

    @property
    def warm_tasks(self) -> float:
        """Seconds of block tasks per warm point (worker time inside the tasks: read, decode, write)."""
        warm = sorted(self.point_done, key=self.point_done.get)[2:]
        vals = [self.point_tasks[k] for k in warm if k in self.point_tasks]
        return sum(vals) / len(vals) if vals else float("nan")


def run_cli(scan_dir: Path, out_dir: Path, *, site: str = "local", workers: int | None = None,
            block_pixels: int | None = None, env: dict[str, str] | None = None,
            pixels_per_point: int = 0, extra: Sequence[str] = ()) -> RunMeasure:
    """Run ``laueflow run`` as a subprocess (the console script of this environment) and measure it;
    ``extra``: further options of the command."""
    tag = uuid.uuid4().hex
    cmd = [str(Path(sys.executable).parent / "laueflow"), "run", str(scan_dir), "--out", str(out_dir),
           "--site", site, "--force"]
    if workers:
        cmd += ["--workers", str(workers)]
    if block_pixels:
        cmd += ["--block-pixels", str(block_pixels)]
    cmd += list(extra)
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", "LAUEFLOW_BENCH_TAG": tag}
    sampler = ProcessSampler(tag)
    sampler.start()
    lines: list[str] = []
    done: dict[int, float] = {}
    status: dict[int, str] = {}
    tasks: dict[int, float] = {}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=str(REPO))
    sampler.include(proc.pid)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            m = POINT_LINE.match(line.strip())
            if m:
                k = int(m.group(1))
                done[k], status[k] = time.perf_counter() - t0, m.group(2)
                seconds = TASK_SECONDS.search(line)
                if seconds:
                    tasks[k] = float(seconds.group(1))
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wall = time.perf_counter() - t0
    time.sleep(0.5)  # let Parsl's detached processes exit before the last sample
    sampler.stop()
    procs = list(sampler.procs.values())
    times = sorted(done.values())
    warm_cpu = (sampler.cpu_at(t0 + times[-1]) - sampler.cpu_at(t0 + times[1]) if len(times) > 2
                else float("nan"))
    driver = next((p for p in procs if p.pid == proc.pid), None)
    workers_ = [p for p in procs if p.worker]
    others = [p for p in procs if p is not driver and not p.worker]
    return RunMeasure(command=" ".join(cmd[1:]), workers=workers, block_pixels=block_pixels,
                      pixels_per_point=pixels_per_point, returncode=rc, wall=wall, point_done=done,
                      point_status=status, point_tasks=tasks, cpu=sum(p.cpu for p in procs),
                      warm_cpu=warm_cpu,
                      driver_mib=driver.peak_mib if driver else float("nan"),
                      worker_mib=sorted((p.peak_mib for p in workers_), reverse=True),
                      other_mib=max((p.peak_mib for p in others), default=0.0),
                      output="\n".join(lines[-40:]))


# ----------------------------------------------------------------------------------------------
# the bare stages, in a fresh process


class _TimedDataset:
    """A dataset whose reads add their wall time to ``clock[0]``: the time spent inside h5py (reading,
    decompressing, copying out) as opposed to what the reader does with the pixels afterwards."""

    def __init__(self, dset: Any, clock: list[float]):
        self._dset, self._clock = dset, clock

    def __getitem__(self, key: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self._dset[key]
        finally:
            self._clock[0] += time.perf_counter() - t0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dset, name)


def time_h5py_reads(scan: Any) -> list[float]:
    """Make ``scan`` (a :class:`laueflow.io.scan.Scan`) count the seconds its reads spend inside h5py;
    returns the one-element list that accumulates them."""
    clock = [0.0]
    opened = scan._dataset_for
    scan._dataset_for = lambda file: _TimedDataset(opened(file), clock)
    return clock


def measure_stages(scan_dir: str, opts: dict[str, Any]) -> dict[str, Any]:
    """Every stage of one point's work in this (fresh) process, as :class:`Stage` dictionaries.

    ``opts``: block_pixels, tiles (time only the first N tiles, 0 = all), single_thread.  Returns
    {"stages": [...], "pixels": decoded pixels, "tiles": n, "compile": s, "backend": ...}.
    """
    if opts.get("single_thread"):
        os.environ.update(SINGLE_THREAD_ENV)
    import warnings

    with _Clock() as clk:
        import jax

        from laueflow import provenance
        from laueflow.config import load
        from laueflow.decode import decode
        from laueflow.forward import Setup
        from laueflow.io.blocks import read_block, write_block
        from laueflow.io.layout import point_name
        from laueflow.io.pointfile import write_point
        from laueflow.io.scan import open_scan
    stages = [Stage("imports", 0, clk.wall, clk.cpu, clk.rss, "jax and laueflow, in a fresh process")]
    scan_path = Path(scan_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = load(scan_path / "config.yaml")
    with _Clock() as clk:
        scan = open_scan(cfg, scan_path, check=False)
        scan.check([0])
        setup = Setup.from_config(cfg)
    stages.append(Stage("open scan, geometry and mask", 0, clk.wall, clk.cpu, clk.rss,
                        "headers of the point's files"))
    tiles = scan.tiles(opts["block_pixels"])
    if opts.get("tiles"):
        tiles = tiles[: opts["tiles"]]
    n_read = sum(t.n_pixels for t in tiles)
    inside = time_h5py_reads(scan)
    with _Clock() as clk:
        blocks = [scan.read_block(0, t) for t in tiles]
    stages.append(Stage("read (Scan.read_block)", n_read, clk.wall, clk.cpu, clk.rss, "warm OS cache"))
    stages.append(Stage("  inside h5py: read + decompress", n_read, inside[0], float("nan"), float("nan"),
                        "dataset reads of the tiles"))
    stages.append(Stage("  the rest: pixel selection, traces", n_read, clk.wall - inside[0], float("nan"),
                        float("nan"), "threshold, saturation, float32 (P, N), I0"))

    def dec(b: Any) -> Any:
        return decode(b.traces, b.rows, b.cols, b.frames, setup, cfg, selected=b.selected)

    # two passes over the same tiles: the first compiles what the tiles need (once per process, tile
    # shape and support size), the second is the steady state a warm worker sees
    compiling = _CompileTimer()
    with _Clock() as clk, compiling:
        n_first = sum(int(dec(b).rows.size) for b in blocks)
    first_compile = compiling.seconds
    stages.append(Stage("decode, first pass", n_first, clk.wall, clk.cpu, clk.rss,
                        f"{first_compile:.1f} s of it JIT compilation, once per process"))
    with _Clock() as clk, compiling:
        decoded = [dec(b) for b in blocks]
    n_dec = sum(int(d.rows.size) for d in decoded)
    again = f", still {compiling.seconds:.1f} s compiling" if compiling.seconds > 0.05 else ""
    stages.append(Stage("decode (the decoder alone)", n_dec, clk.wall, clk.cpu, clk.rss,
                        f"laueflow.decode.decode, every tile again{again}"))
    n_depths = cfg.geo.source.depths.size
    with tempfile.TemporaryDirectory(dir=scan_path.parent, prefix="stages-") as tmp:
        files = [Path(tmp) / f"block_{i:05d}.npz" for i in range(len(tiles))]
        with _Clock() as clk:
            for f, b, d in zip(files, blocks, decoded, strict=True):
                t = b.tile
                write_block(f, point=0, tile=(t.r0, t.r1, t.c0, t.c1),
                                    config_fingerprint=cfg.fingerprint(), n_depths=n_depths, decoded=d)
        size = sum(f.stat().st_size for f in files)
        stages.append(Stage("write block files", n_dec, clk.wall, clk.cpu, clk.rss,
                            f"{size / 2**20:.0f} MiB of .npz"))
        with _Clock() as clk:
            for f in files:
                read_block(f)
        stages.append(Stage("stitch: read block files", n_dec, clk.wall, clk.cpu, clk.rss, "warm OS cache"))
        record = provenance.build(config_yaml=cfg.to_yaml(), config_fingerprint=cfg.fingerprint(),
                                  inputs=scan.fingerprints(0), start_time=provenance.now(), point=0)
        out = Path(tmp) / point_name(0)
        with _Clock() as clk:
            write_point(out, files, frame=cfg.file.frame, depths_mm=cfg.geo.source.depths,
                                provenance=record)
        stages.append(Stage("stitch + write point file", n_dec, clk.wall, clk.cpu, clk.rss,
                            f"write_point, {out.stat().st_size / 2**20:.0f} MiB (reads the blocks again)"))
    scan.close()
    return {"stages": [asdict(s) for s in stages], "pixels": n_dec, "read_pixels": n_read,
            "tiles": len(tiles), "compile": first_compile, "backend": jax.default_backend(),
            "jax_version": jax.__version__}


def in_fresh_process(func: Any, *args: Any) -> Any:
    """``func(*args)`` in a freshly spawned interpreter (its own imports, JIT caches and peak memory)."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(func, args)


def stage(stages: list[Stage], prefix: str) -> Stage:
    return next(s for s in stages if s.name.startswith(prefix))


def steady_stage_seconds(stages: list[Stage]) -> float:
    """Seconds of one point's work for a warm process: read, decode, write blocks, stitch + write (the
    block files are read inside write_point, so their separate reading is not added)."""
    names = ("read (", "decode (", "write block files", "stitch + write")
    return sum(stage(stages, n).wall for n in names)


# ----------------------------------------------------------------------------------------------
# the report


def _table(title: str, columns: list[tuple[str, str]]) -> Any:
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for name, just in columns:
        t.add_column(name, justify=just)  # type: ignore[arg-type]
    return t


def stage_table(title: str, stages: list[Stage]) -> Any:
    t = _table(title, [("stage", "left"), ("pixels", "right"), ("wall s", "right"), ("CPU s", "right"),
                       ("px/s", "right"), ("px/s/core", "right"), ("peak RSS MiB", "right"),
                       ("note", "left")])
    for s in stages:
        rates = s.pixels > 0
        t.add_row(s.name, f"{s.pixels:,}" if s.pixels else "", _fmt(s.wall, 2), _fmt(s.cpu, 2),
                  _fmt(s.px_per_s) if rates else "", _fmt(s.px_per_core_s) if rates else "", _fmt(s.rss_mib),
                  s.note)
    return t


def run_table(title: str, runs: list[RunMeasure], cores: int) -> Any:
    t = _table(title, [("workers", "right"), ("block px", "right"), ("points", "right"),
                       ("command s", "right"), ("1st point s", "right"), ("warm s/point", "right"),
                       ("warm px/s", "right"), ("warm px/s/core", "right"), ("task s/point", "right"),
                       ("CPU s", "right"), ("cores busy", "right"),
                       ("driver MiB", "right"), ("worker MiB", "right"), ("Parsl other MiB", "right"),
                       ("status", "left")])
    for r in runs:
        t.add_row(str(r.workers or "site"), str(r.block_pixels or "config"), str(len(r.point_done)),
                  _fmt(r.wall, 1), _fmt(r.first, 1), _fmt(r.warm, 1),
                  _fmt(_ratio(r.pixels_per_point, r.warm)), _fmt(r.warm_core_rate), _fmt(r.warm_tasks, 1),
                  _fmt(r.cpu, 1),
                  _fmt(_ratio(r.cpu, r.wall), 2) + f" of {cores}",
                  _fmt(r.driver_mib), " ".join(_fmt(x) for x in r.worker_mib) or "-", _fmt(r.other_mib),
                  "ok" if r.ok else f"FAILED (exit {r.returncode})")
    return t


def print_failures(console: Any, runs: list[RunMeasure]) -> None:
    for r in runs:
        if not r.ok:
            console.print(f"[red]laueflow {r.command} failed (exit {r.returncode}); its last lines:[/]")
            console.print(r.output, highlight=False, markup=False)


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--region", type=int, default=128, help="side of the simulated region, pixels")
    ap.add_argument("--frames", type=int, default=201, help="frames per scan point")
    ap.add_argument("--preset", default="thin", choices=["thin", "extended", "overlap"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block-pixels", type=int, default=4096, help="pixels per task in the scaling runs")
    ap.add_argument("--workers", default="1,2", help="worker counts to run, comma-separated")
    ap.add_argument("--memory-blocks", default="1024,4096,16384",
                    help="block sizes of the memory runs, comma-separated ('' for none)")
    ap.add_argument("--memory-workers", type=int, default=2, help="workers in the memory runs")
    ap.add_argument("--threads", choices=["single", "default"], default="single",
                    help="single: one compute thread per process (W workers use W cores); default: "
                         "XLA's and BLAS's own choice, as a plain run")
    ap.add_argument("--site", default="local", help="the site of the runs")
    ap.add_argument("--cache", type=Path, default=REPO / ".bench-cache",
                    help="where simulated scans are kept")
    ap.add_argument("--resimulate", action="store_true", help="simulate again even when cached")
    ap.add_argument("--json", type=Path, help="also write every number to this JSON file")
    args = ap.parse_args(argv)
    try:
        worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
        memory_blocks = [int(b) for b in args.memory_blocks.split(",") if b.strip()]
    except ValueError:
        ap.error("--workers and --memory-blocks take comma-separated integers")
    if (args.region < 16 or args.frames < 8 or args.block_pixels < 1 or not worker_counts
            or min(worker_counts) < 1 or any(b < 1 for b in memory_blocks) or args.memory_workers < 1):
        ap.error("need --region >= 16, --frames >= 8, --block-pixels >= 1, workers and block sizes >= 1")

    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 160)
    info = machine()
    console.print(machine_line(info), highlight=False, soft_wrap=True)
    folder = scan_folder(args.cache, "tilted", args.region, args.frames, args.preset, args.seed)
    with console.status(f"simulating (once, cached in {folder.parent})"):
        sim = ensure_scan(folder, "tilted", args.region, args.frames, args.preset, args.seed, args.resimulate)
    single = args.threads == "single"
    env = dict(SINGLE_THREAD_ENV) if single else {}
    pixels = args.region * args.region
    with console.status("bare stages, in a fresh process"):
        bare = in_fresh_process(measure_stages, str(folder),
                                {"block_pixels": args.block_pixels, "tiles": 0, "single_thread": single})
    stages = [Stage(**s) for s in bare["stages"]]
    work = folder.parent / "workflow"
    repeated = repeated_scan(folder, work / "scan3")
    once = repeated_scan(folder, work / "scan1", copies=1)
    runs: list[RunMeasure] = []
    for w in worker_counts:
        with console.status(f"laueflow run, {w} worker(s), the point {COPIES} times"):
            runs.append(run_cli(repeated, work / f"out-w{w}", site=args.site, workers=w,
                                block_pixels=args.block_pixels, env=env, pixels_per_point=pixels))
    memory: list[RunMeasure] = []
    for b in memory_blocks:
        with console.status(f"laueflow run, blocks of {b} pixels"):
            memory.append(run_cli(once, work / f"out-b{b}", site=args.site, workers=args.memory_workers,
                                  block_pixels=b, env=env, pixels_per_point=pixels))
    shutil.rmtree(work, ignore_errors=True)

    sim_note = f"simulated in {sim:.0f} s" if sim is not None else "cached"
    threads = "one compute thread per process" if single else "default thread pools"
    console.print(stage_table(
        f"Bare stages of one point, one process ({bare['backend']}, {threads}): {args.region} x "
        f"{args.region} pixels, {args.frames} frames, {bare['tiles']} tiles of {args.block_pixels} px "
        f"(scan {sim_note})", stages))
    console.print(run_table(f"laueflow run --site {args.site}, the point {COPIES} times (the last two on "
                            "warm workers), "
                            f"{threads}", runs, info["cores"]))
    print_failures(console, runs + memory)
    bare_s = steady_stage_seconds(stages)
    decode_s = stage(stages, "decode (").wall
    start = stage(stages, "imports").wall + bare["compile"]
    one = next((r for r in runs if r.workers == 1 and r.ok), None)
    lines = [f"bare stages (read, decode, write blocks, stitch + write): {bare_s:.1f} s per point, "
             f"{_ratio(pixels, bare_s):,.0f} px/s; the decoder alone {decode_s:.1f} s, "
             f"{_ratio(pixels, decode_s):,.0f} px/s; start-up of a process {start:.1f} s (imports, JIT)"]
    for r in runs:
        if not r.ok:
            continue
        line = (f"{r.workers} worker(s): warm {r.warm:.1f} s per point, of which the workers spent "
                f"{_ratio(r.warm_tasks, r.warm * r.workers):.0%} inside block tasks")
        if one is not None and r is not one:
            eff = _ratio(one.warm, r.warm * r.workers / one.workers)
            per_core = _ratio(r.warm_core_rate, one.warm_core_rate)
            line += (f", scaling efficiency {eff:.0%} (steady rate over {r.workers}x the 1-worker rate; "
                     f"per CPU second {per_core:.0%} of the 1-worker rate)")
        if r.workers == 1:
            line += (f", workflow overhead {_ratio(r.warm, bare_s) - 1:+.0%} over the bare stages, "
                     f"{_ratio(r.warm, decode_s) - 1:+.0%} over the decoder alone")
        line += f"; first point {r.first:.1f} s (start-up {r.first - r.warm:.1f} s), command {r.wall:.1f} s"
        lines.append(line)
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)
    if memory:
        t = _table(f"Peak memory per worker against block size ({args.memory_workers} workers, one point "
                   f"of {args.region} x {args.region} px)",
                   [("block px", "right"), ("tiles", "right"), ("worker peak MiB", "right"),
                    ("driver MiB", "right"), ("command s", "right"), ("status", "left")])
        for r in memory:
            side = max(1, round(math.sqrt(r.block_pixels or 1)))
            n_tiles = math.ceil(args.region / side) ** 2
            t.add_row(f"{r.block_pixels:,}", str(n_tiles), _fmt(max(r.worker_mib, default=float("nan"))),
                      _fmt(r.driver_mib), _fmt(r.wall, 1), "ok" if r.ok else f"FAILED (exit {r.returncode})")
        console.print(t)
    if args.json:
        out = {"machine": info, "options": {k: str(v) for k, v in vars(args).items()}, "bare": bare,
               "runs": [asdict(r) for r in runs], "memory": [asdict(r) for r in memory],
               "summary": lines}
        args.json.write_text(json.dumps(_plain(out), indent=1))
    return 0 if all(r.ok for r in runs + memory) else 1


if __name__ == "__main__":
    sys.exit(main())
