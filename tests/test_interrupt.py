"""A run that stops cleanly and tells the truth: Ctrl-C and SIGTERM to the whole process group (as a
terminal and a batch system send them), a full output disk, an output folder that cannot be used.

The signal tests start `laueflow run` on the local site (a real HighThroughputExecutor: interchange and
worker pool processes) in a session of its own, as a terminal starts a foreground job, and signal the
whole process group once a block is done.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import results
import yaml

from laueflow.mask import debruijn
from laueflow.simulate import default_config_dict
from laueflow.workflow.status import read_status

BLOCK = 64  # 4 tiles per point
LAUEFLOW = [sys.executable, "-m", "laueflow.cli"]


def _command(scan: Path, out: Path, site: str = "local", points: str = "0") -> list[str]:
    return [*LAUEFLOW, "run", str(scan), "--out", str(out), "--site", site, "--workers", "2",
            "--block-pixels", str(BLOCK), "--points", points]


def _mentioning(text: str) -> list[psutil.Process]:
    """Processes whose command line mentions ``text`` (the run folder: the worker pool, its shell)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(text in part for part in p.info["cmdline"] or ()):
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


def _family(pid: int, out: Path) -> list[psutil.Process]:
    """The driver's descendants (the interchange among them) and the worker pool the local provider
    detaches from it (found by the run folder in its command line), with their descendants."""
    family = psutil.Process(pid).children(recursive=True)
    for p in _mentioning(str(out)):
        family += [p, *p.children(recursive=True)]
    return list({p.pid: p for p in family}.values())


def _in_group(pgid: int) -> list[int]:
    left = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                left.append(p.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return left


@pytest.fixture(scope="module")
def local_reference(multipoint_scan, tmp_path_factory) -> Path:
    """An uninterrupted run of point 0 on the local site, as the runs under test make it."""
    out = tmp_path_factory.mktemp("interrupt_reference") / "recon"
    r = subprocess.run(_command(multipoint_scan, out), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


@pytest.mark.parametrize(("signum", "status"), [
    (signal.SIGINT, 130),
    pytest.param(signal.SIGTERM, 143, marks=pytest.mark.slow),  # the same stop, by another signal
], ids=["ctrl-c", "sigterm"])
def test_stop_signal_to_the_process_group(multipoint_scan, local_reference, tmp_path, signum, status):
    """One signal to the run's process group ends it within seconds, with the shell's exit status, no
    traceback, no process left, and a status.json that says what is on disk; a rerun completes it and
    equals an uninterrupted run bitwise."""
    out = tmp_path / "recon"
    cmd = _command(multipoint_scan, out)
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            s = read_status(out)
            if s and s["totals"]["blocks_done"] >= 1:
                break
            assert run.poll() is None, run.communicate()
            time.sleep(0.05)
        else:
            pytest.fail("no block was done in time")
        family = _family(run.pid, out)
        assert family, "the run has no interchange or worker processes"
        os.killpg(run.pid, signum)
        t0 = time.monotonic()
        stdout, stderr = run.communicate(timeout=120)
        seconds = time.monotonic() - t0
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == status, stdout + stderr
    assert seconds < 20, f"took {seconds:.1f} s to stop"
    assert "Traceback" not in stderr and "Traceback" not in stdout, stderr
    assert "interrupted: finished points and blocks are kept" in stderr
    gone, alive = psutil.wait_procs(family, timeout=20)
    assert not alive, [p.info if hasattr(p, "info") else p.pid for p in alive]
    assert _in_group(run.pid) == [] and _mentioning(str(out)) == []

    after = read_status(out)
    assert after["state"] == "interrupted"
    for k, entry in after["points"].items():
        assert entry["state"] in ("done", "partial", "pending"), (k, entry)
        point_file = out / f"point_{int(k):05d}.h5"
        assert point_file.is_file() == (entry["state"] == "done")
        if entry["state"] != "done":  # partial: some blocks finished, counted; pending: none
            on_disk = results.block_count(out, int(k))
            assert entry["blocks_done"] == on_disk and (on_disk > 0) == (entry["state"] == "partial"), \
                (k, entry, on_disk)
    assert after["totals"]["blocks_done"] >= 1

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    final = read_status(out)
    assert final["state"] == "finished"
    assert {e["state"] for e in final["points"].values()} <= {"done", "resumed"}
    reused = final["totals"]["points_kept"] + sum(e["blocks_reused"] for e in final["points"].values())
    assert reused >= 1  # what the interrupted run finished was not done again
    name = "point_00000.h5"
    np.testing.assert_array_equal(results.volume(out / name), results.volume(local_reference / name))


def test_killed_driver_leaves_no_worker_behind(multipoint_scan, tmp_path):
    """SIGKILL of the driver alone (no clean-up at all): its interchange ends itself within a second or
    two, and the local site's worker pool, no longer hearing from it, within its heartbeat threshold
    (15 s; Parsl's default is 120 s)."""
    out = tmp_path / "recon"
    run = subprocess.Popen(_command(multipoint_scan, out), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not _busy(out):
            assert run.poll() is None, "the run ended before its workers were busy"
            assert time.monotonic() < deadline, "no worker became busy in time"
            time.sleep(0.05)
        family = _family(run.pid, out)
        run.kill()
        run.wait()
        t0 = time.monotonic()
        gone, alive = psutil.wait_procs(family, timeout=60)
        seconds = time.monotonic() - t0
    finally:
        for p in _family(run.pid, out) if run.poll() is None else _mentioning(str(out)):
            p.kill()
    assert not alive, [p.pid for p in alive]
    assert seconds < 45, f"the worker pool outlived its driver by {seconds:.0f} s"


def _busy(out: Path) -> bool:
    """Whether the run's worker pool has a worker with JAX loaded (running a block task)."""
    for pool in _mentioning("process_worker_pool"):
        try:
            if str(out) not in " ".join(pool.cmdline()):
                continue
            for child in pool.children(recursive=True):
                if any("jaxlib" in m.path for m in child.memory_maps()):
                    return True
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return False


def test_a_full_output_disk_is_one_error(multipoint_scan, multipoint_run, tmp_path):
    """The run folder on a small file system (a tmpfs mounted in a user namespace of its own, so that no
    privilege is needed): the run stops with one error line, status failed, no scratch left; after
    space is freed a rerun completes.  The disk fills for real (ENOSPC from the kernel), not by an
    injected error."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = tmp_path / "probe"
    probe.mkdir()
    tried = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k none {probe}"],
                           capture_output=True, text=True)
    if tried.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {tried.stderr.strip()}")
    disk = tmp_path / "disk"
    disk.mkdir()
    keep = tmp_path / "kept"
    keep.mkdir()
    out = disk / "recon"
    run = " ".join(_command(multipoint_scan, out, site="threads", points="0:2"))
    script = f"""
set -u
mount -t tmpfs -o size=4m none {disk}
head -c $((4096 * 1024 - 160 * 1024)) /dev/zero > {disk}/filler
{run} > {keep}/first.out 2> {keep}/first.err
echo $? > {keep}/first.rc
cp {out}/status.json {keep}/first_status.json
find {out} -type f > {keep}/first_files
rm {disk}/filler
{run} > {keep}/second.out 2> {keep}/second.err
echo $? > {keep}/second.rc
cp {out}/status.json {keep}/second_status.json
cp {out}/point_*.h5 {keep}/
"""
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    first_err = (keep / "first.err").read_text()
    assert (keep / "first.rc").read_text().strip() == "2", first_err
    errors = [line for line in first_err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no space left" in errors[0] and str(out) in errors[0], first_err
    assert "Traceback" not in first_err and "Logging error" not in first_err, first_err
    assert len(first_err.splitlines()) <= 3, first_err
    status = json.loads((keep / "first_status.json").read_text())
    assert status["state"] == "failed"
    assert all(e["state"] != "running" for e in status["points"].values())
    files = (keep / "first_files").read_text().splitlines()
    assert not [f for f in files if f.endswith("frames.stage") or ".tmp-" in f], files

    assert (keep / "second.rc").read_text().strip() == "0", (keep / "second.err").read_text()
    assert json.loads((keep / "second_status.json").read_text())["state"] == "finished"
    for name in ("point_00000.h5", "point_00001.h5"):
        np.testing.assert_array_equal(results.volume(keep / name), results.volume(multipoint_run / name))


def test_watch_holds_the_folder_from_the_start(tmp_path):
    """`laueflow watch` locks its output folder before any point is ready (issue 14, defect 12): a second
    watch on the same folder is refused at once; SIGTERM then ends the waiting watch with status 143."""
    scan = tmp_path / "scan"
    scan.mkdir()
    np.save(scan / "mask.npy", debruijn(8))
    (scan / "config.yaml").write_text(yaml.safe_dump(default_config_dict("tilted", frames=261, region=16),
                                                     sort_keys=False))
    out = tmp_path / "recon"
    cmd = [*LAUEFLOW, "watch", str(scan), "--out", str(out), "--site", "threads", "--poll-interval", "0.1"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        lock = out / ".lock"
        while not (lock.is_file() and f"pid {first.pid} " in lock.read_text()):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the watch did not lock its output folder"
            time.sleep(0.05)
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"is in use by laueflow pid {first.pid}" in second.stderr
        os.killpg(first.pid, signal.SIGTERM)
        stdout, stderr = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert first.returncode == 143, stdout + stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert lock.read_text() == ""  # released
