"""Faults and operations of a run: the status file, the lock, --force, site options from the command line,
a driver killed mid-run and resumed, a worker killed mid-block."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import psutil
import pytest
import results
from click.testing import CliRunner

from laueflow import sites
from laueflow.cli import main
from laueflow.config import load
from laueflow.workflow import RunError, run
from laueflow.workflow import tasks as T
from laueflow.workflow.status import RunLock, read_status

BLOCK = 64  # 4 tiles per point
LAUEFLOW = [sys.executable, "-m", "laueflow.cli"]


# The shared run (multipoint_run, 64-pixel blocks like BLOCK) runs on threads in this process, the runs
# under test in worker processes: the same frames give the same bits (tests/test_determinism.py).


def _same_as_reference(out: Path, reference: Path) -> None:
    names = sorted(p.name for p in reference.glob("point_*.h5"))
    assert sorted(p.name for p in out.glob("point_*.h5")) == names
    for name in names:
        np.testing.assert_array_equal(results.volume(out / name), results.volume(reference / name))


def test_status_file_follows_the_run(multipoint_scan, multipoint_run, tmp_path):
    cfg = load(multipoint_scan / "config.yaml")
    out = tmp_path / "recon"
    seen: list[dict] = []

    def watch(event):
        if event.kind == "block" and not seen:
            seen.append(read_status(out))

    result = run(multipoint_scan, cfg, out, points="0:2", block_pixels=BLOCK, progress=watch,
                 site_config=sites.site_config("threads", workers=2, run_dir=str(out / ".runinfo")))
    assert result.exit_code == 0
    (during,) = seen
    assert during["format"] == "laueflow-status/1" and during["state"] == "running"
    assert during["pid"] == os.getpid() and during["scan"] == str(multipoint_scan.resolve())
    assert set(during["points"]) == {"0", "1"}
    assert {p["state"] for p in during["points"].values()} <= {"pending", "running"}
    after = read_status(out)
    assert after["state"] == "finished" and after["finished"]
    assert after["totals"]["points"] == 2 and after["totals"]["points_done"] == 2
    n_tiles = after["points"]["0"]["blocks_total"]
    assert n_tiles == len(T.cached_scan(str(multipoint_scan), cfg).tiles(BLOCK))
    assert after["totals"]["blocks"] == after["totals"]["blocks_done"] == 2 * n_tiles
    assert after["totals"]["pixels_done"] == sum(p.n_pixels for p in result.points) > 0
    for k, p in zip(("0", "1"), result.points, strict=True):
        entry = after["points"][k]
        assert entry["state"] == "done" and entry["file"] == f"point_0000{k}.h5"
        assert entry["blocks_done"] == n_tiles and entry["n_pixels"] == p.n_pixels and entry["seconds"] > 0

    # --force recomputes what a plain rerun keeps
    mtime = (out / "point_00000.h5").stat().st_mtime_ns
    kept = run(multipoint_scan, cfg, out, points="0", block_pixels=BLOCK,
               site_config=sites.site_config("threads", workers=2, run_dir=str(out / ".runinfo")))
    assert [p.status for p in kept.points] == ["resumed"]
    assert read_status(out)["points"]["0"]["state"] == "resumed"
    forced = run(multipoint_scan, cfg, out, points="0", block_pixels=BLOCK, force=True, per_depth_files=True,
                 site_config=sites.site_config("threads", workers=2, run_dir=str(out / ".runinfo")))
    assert [p.status for p in forced.points] == ["done"]
    assert (out / "point_00000.h5").stat().st_mtime_ns != mtime
    volume = results.volume(out / "point_00000.h5")
    np.testing.assert_array_equal(volume, results.volume(multipoint_run / "point_00000.h5"))
    # --per-depth-files: one image per depth for the indexing chain, beside the point file
    depth_files = sorted((out / "depths" / "point_00000").glob("*.h5"))
    assert len(depth_files) == volume.shape[0]
    with h5py.File(depth_files[1], "r") as f:
        np.testing.assert_array_equal(f["entry1/data/data"][()], volume[1])
        assert f["entry1/data/data"].dtype == np.float32
        np.testing.assert_allclose(f["entry1/depth"][()], cfg.geo.source.depths[1] * 1000.0, atol=1e-4)


def test_second_run_on_the_same_folder_is_refused(multipoint_scan, tmp_path):
    out = tmp_path / "recon"
    with RunLock(out):
        r = subprocess.run([*LAUEFLOW, "run", str(multipoint_scan), "--out", str(out), "--site", "threads"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, r.stderr
        assert "in use by laueflow pid" in r.stderr and str(os.getpid()) in r.stderr
        with pytest.raises(RunError, match="in use"):
            run(multipoint_scan, load(multipoint_scan / "config.yaml"), out,
                site_config=sites.site_config("threads"))
    assert not list(out.glob("point_*.h5")) and not (out / "status.json").exists()
    RunLock(out).acquire().release()  # free again once the holder let go


def test_site_options_on_the_command_line(multipoint_scan, tmp_path):
    out = tmp_path / "recon"
    runner = CliRunner()
    base = ["run", str(multipoint_scan), "--out", str(out), "--site"]
    r = runner.invoke(main, [*base, "local", "--site-option", "colour"])
    assert r.exit_code == 2 and "KEY=VALUE" in r.stderr
    r = runner.invoke(main, [*base, "local", "--site-option", "nodes=2"])
    assert r.exit_code == 2 and "unknown options ['nodes']" in r.stderr
    r = runner.invoke(main, [*base, "polaris"])
    assert r.exit_code == 2 and "account" in r.stderr
    r = runner.invoke(main, [*base, "local", "--site-option", "retries=many"])
    assert r.exit_code == 2 and "must be int" in r.stderr
    assert not out.exists()


def _kill_tree(pid: int, out: Path) -> None:
    """SIGKILL a process and everything it started (a crashed driver with its executor), including
    the worker pool that Parsl's LocalProvider detaches from it (found by its log folder under ``out``)."""
    parent = psutil.Process(pid)
    family = [parent, *parent.children(recursive=True)]
    for p in psutil.process_iter(["cmdline"]):
        if p not in family and any(str(out) in part for part in p.info["cmdline"] or ()):
            family += [p, *p.children(recursive=True)]
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)


def test_killed_driver_resumes_without_redoing_finished_work(multipoint_scan, multipoint_run, tmp_path):
    """Kill `laueflow run` (and its workers) mid-run; a rerun completes with the same results and reuses
    every point file and block file the first run finished."""
    out = tmp_path / "recon"
    cmd = [*LAUEFLOW, "run", str(multipoint_scan), "--out", str(out), "--site", "local", "--workers", "2",
           "--block-pixels", str(BLOCK)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            status = read_status(out)
            if status and status["totals"]["blocks_done"] >= 3:
                break
            assert first.poll() is None, first.stdout.read()
            time.sleep(0.05)
        else:
            pytest.fail("the first run finished no block in time")
    finally:
        _kill_tree(first.pid, out)
    status = read_status(out)
    assert status["state"] == "running"  # what a crash leaves behind
    total = status["totals"]["points"]
    finished = sorted(out.glob("point_*.h5"))
    blocks = {k: results.block_count(out, k) for k in range(total)}
    assert len(finished) < total and (finished or any(blocks.values()))

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout + second.stderr
    status = read_status(out)
    assert status["state"] == "finished"
    for f in finished:
        assert status["points"][str(int(f.stem.split("_")[1]))]["state"] == "resumed"
    for k, n in blocks.items():
        entry = status["points"][str(k)]
        if entry["state"] != "resumed":
            assert entry["blocks_reused"] == n and entry["state"] == "done"
    n_tiles = status["points"]["0"]["blocks_total"]
    assert sum(e["blocks_reused"] for e in status["points"].values()) + n_tiles * len(finished) >= 3
    assert not (out / ".blocks").exists()
    assert not list(out.rglob("*.tmp-*"))  # what the killed run was writing is cleaned up
    _same_as_reference(out, multipoint_run)


def _busy_workers(out: Path) -> list[psutil.Process]:
    """Decode workers of the local site writing to ``out`` that are running a task: processes under its
    process_worker_pool that have JAX loaded (a block task imports it; the pool's helpers never do)."""
    busy = []
    for p in psutil.process_iter(["cmdline"]):
        if "process_worker_pool" not in " ".join(p.info["cmdline"] or []) or str(out) not in " ".join(
                p.info["cmdline"] or []):
            continue
        for child in p.children(recursive=True):
            try:
                if any("jaxlib" in m.path for m in child.memory_maps()):
                    busy.append(child)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
    return busy


def test_killed_worker_is_retried(multipoint_scan, multipoint_run, tmp_path):
    """SIGKILL a decode worker while it runs a block: Parsl retries the task and the run completes."""
    out = tmp_path / "recon"
    killed: list[int] = []

    def assassin() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            busy = _busy_workers(out)
            if busy:
                time.sleep(0.5)  # well inside its first block (imports and compilation take seconds)
                busy[0].kill()
                killed.append(busy[0].pid)
            time.sleep(0.2)

    thread = threading.Thread(target=assassin, daemon=True)
    thread.start()
    site = sites.site_config("local", workers=2, run_dir=str(out / ".runinfo"))
    result = run(multipoint_scan, load(multipoint_scan / "config.yaml"), out, points="0:2",
                 block_pixels=BLOCK, site_config=site)
    thread.join(timeout=5)
    assert killed, "no busy worker was found to kill"
    assert result.exit_code == 0, [p.line() for p in result.points]
    assert [p.status for p in result.points] == ["done", "done"]
    logs = "".join(p.read_text(errors="replace") for p in (out / ".runinfo").rglob("parsl.log"))
    assert "try 1" in logs or "Launched block 1" in logs  # the task was retried, or its block replaced
    for name in ("point_00000.h5", "point_00001.h5"):
        np.testing.assert_array_equal(results.volume(out / name), results.volume(multipoint_run / name))


def test_ctrl_c_while_parsl_starts_stops_what_it_started(multipoint_scan, tmp_path, monkeypatch):
    """A Ctrl-C that lands while Parsl is still starting (after it registered its configuration, before
    the first task) stops and unloads that configuration, and status.json says interrupted with every
    point pending; a configuration loaded before the run is not the run's to stop."""
    import parsl

    from laueflow.workflow import dag

    started, real_load = [], parsl.load

    def load_then_interrupt(config):
        started.append(real_load(config))
        raise KeyboardInterrupt

    monkeypatch.setattr(dag.parsl, "load", load_then_interrupt)
    out = tmp_path / "recon"
    site = sites.site_config("threads", workers=1, run_dir=str(out / ".runinfo"))
    with pytest.raises(KeyboardInterrupt):
        run(multipoint_scan, load(multipoint_scan / "config.yaml"), out, points="0:2", block_pixels=BLOCK,
            site_config=site)
    assert len(started) == 1 and dag._loaded_dfk() is None  # stopped and unloaded
    status = read_status(out)
    assert status["state"] == "interrupted"
    assert {p["state"] for p in status["points"].values()} == {"pending"}
