"""The results API (laueflow.open_run): a run read while `laueflow run` writes it, point access checked
against the HDF5 file and the scan, truth and traces, and the states of runs whose driver is gone."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

import laueflow
from laueflow import provenance
from laueflow.config import load
from laueflow.flags import PIXEL_DECODED, PIXEL_SATURATED
from laueflow.runs import FILE_STATES, POINT_STATES, ResultError, open_point, open_run
from laueflow.workflow.status import load_status, record_section

POINTS = 3
ORDER = {s: i for i, s in enumerate(("pending", "running", "done"))}


def _snapshot(out: Path) -> dict:
    """Everything a reader looks at, read the way a notebook would while the run goes on."""
    run = open_run(out)
    seen = {"state": run.state, "points": {}, "ready": run.ready, "describe": run.describe()}
    for k, p in run.points.items():
        assert p.state in POINT_STATES, p
        if p.state in FILE_STATES:
            assert p.ready, f"point {k} is {p.state} but has no file"
        seen["points"][k] = p.state
    for k in run.ready:
        with run.point(k) as pt:
            assert pt.point == k
            vol = pt.volume()
            assert vol.shape == pt.shape and np.isfinite(vol).all()
            np.testing.assert_allclose(pt.intensity_vs_depth, vol.sum(axis=(1, 2)), rtol=1e-4, atol=1e-3)
            assert len(pt.pixels) == pt.n_pixels > 0
            assert pt.provenance["complete"] is True
    return seen


@pytest.fixture(scope="module")
def watched(multipoint_scan, tmp_path_factory) -> SimpleNamespace:
    """`laueflow run` in a subprocess on a 3-point scan, read repeatedly until it ends."""
    scan, out = multipoint_scan, tmp_path_factory.mktemp("runs") / "recon"
    cmd = [sys.executable, "-m", "laueflow.cli", "run", str(scan), "--out", str(out), "--site", "threads",
           "--block-pixels", "64", "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    snapshots = []
    try:
        deadline = time.monotonic() + 540
        while proc.poll() is None and time.monotonic() < deadline:
            if (out / "status.json").is_file():
                snapshots.append(_snapshot(out))
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate()[0]
    assert proc.returncode == 0, output
    return SimpleNamespace(scan=scan, out=out, snapshots=snapshots, final=_snapshot(out),
                           cfg=load(scan / "config.yaml"))


def test_a_run_being_written_reads_without_error_and_states_only_move_forward(watched):
    running = [s for s in watched.snapshots if s["state"] == "running"]
    assert running, "no snapshot while the run was going"
    assert any(len(s["ready"]) < POINTS for s in running)
    assert all(s["state"] in ("running", "finished") for s in watched.snapshots)
    last: dict[int, str] = {}
    for s in watched.snapshots:
        assert sorted(s["points"]) == list(range(POINTS))
        for k, state in s["points"].items():
            assert ORDER[state] >= ORDER.get(last.get(k, "pending"), 0), (k, last.get(k), state)
            last[k] = state
        assert "point" in s["describe"]


def test_the_finished_run(watched):
    run = open_run(watched.out)
    assert run.state == "finished" and run.recorded_state == "finished"
    assert run.ready == list(range(POINTS)) and run.counts() == {"done": POINTS}
    assert run.totals["points_done"] == POINTS
    assert run.progress().startswith(f"finished: {POINTS} of {POINTS} points finished")
    table = run.table().splitlines()
    assert len(table) == POINTS + 1 and all(" done " in line for line in table[1:])
    assert [p.point for p in run] == list(range(POINTS))
    assert laueflow.open_run(str(watched.out)).ready == run.ready  # the lazily exposed entry point


def test_point_access_reads_what_the_file_holds(watched):
    cfg = watched.cfg
    pt = open_run(watched.out).point(1)
    r0, r1, c0, c1 = cfg.file.frame
    assert pt.frame == (r0, r1, c0, c1)
    np.testing.assert_allclose(pt.depth, cfg.geo.source.depths * 1000.0, atol=1e-6)
    with h5py.File(pt.path, "r") as f:
        vol = f["entry/reconstruction/volume"][()]
        index = f["entry/diagnostics/index"][()]
        residual = f["entry/diagnostics/residual"][()]
        sample = f["entry/acquisition/entry1/sample"]
        position = {k: (float(sample[k][()]), sample[k].attrs["units"])
                    for k in ("sampleX", "sampleY", "sampleZ")}
    assert pt.shape == vol.shape
    assert pt.sample_position() == position and position["sampleX"][0] == 1.0  # the simulated 1 um step
    j = int(np.argmax(vol.sum(axis=(1, 2))))
    np.testing.assert_array_equal(pt.depth_slice(pt.depth[j]), vol[j])
    np.testing.assert_array_equal(pt.depth_slice(pt.depth[j] + 0.4), vol[j])  # nearest bin
    np.testing.assert_array_equal(pt.depth_slice(index=j), vol[j])
    sub = pt.volume(depth=(pt.depth[j - 2], pt.depth[j + 2]), rows=(r0 + 2, r0 + 9), cols=(c0 + 3, c1))
    np.testing.assert_array_equal(sub, vol[j - 2:j + 3, 2:9, 3:])
    np.testing.assert_array_equal(pt.profile(r0 + 5, c0 + 7), vol[:, 5, 7])
    np.testing.assert_allclose(pt.integrated_image(), vol.sum(axis=0), rtol=1e-5)
    peak = vol.max(axis=0)
    expected = np.where(peak > 0, pt.depth[vol.argmax(axis=0)], np.nan)
    np.testing.assert_array_equal(pt.depth_map(), expected)
    px = pt.pixels
    np.testing.assert_array_equal(np.stack([px.rows, px.cols], 1), index)
    np.testing.assert_array_equal(px.residual, residual)
    i = len(px) // 2
    assert pt.pixel(int(px.rows[i]), int(px.cols[i]))["residual"] == pytest.approx(float(residual[i]))
    decoded = {(int(r), int(c)) for r, c in index}
    undecoded = [(r, c) for r in range(r0, r1) for c in range(c0, c1) if (r, c) not in decoded]
    assert undecoded, "the simulator marks saturated pixels, which are not decoded"
    assert pt.pixel(*undecoded[0]) is None
    state = pt.pixel_state()
    assert state.shape == (r1 - r0, c1 - c0)
    assert {(r0 + i, c0 + j) for i, j in zip(*np.nonzero(state == PIXEL_DECODED), strict=True)} == decoded
    assert (state == PIXEL_SATURATED).sum() >= 1  # the simulator's hot pixels
    assert {f.name for f in pt.pixel_states()} >= {"saturated", "not_selected"}
    assert pt.signal_range() is not None
    with pytest.raises(ResultError, match="outside the region"):
        pt.profile(r1, c0)
    with pytest.raises(ResultError, match="outside the grid"):
        pt.depth_slice(pt.depth[-1] + 10)
    with pytest.raises(ResultError, match="no depth bin"):
        pt.volume(depth=(1e6, 2e6))
    text = pt.describe()
    assert re.search(r"^point +1 ", text, re.M) and f"{r1 - r0} x {c1 - c0} pixels" in text
    assert "with signal" in text and re.search(r"^not decoded +saturated \d+", text, re.M)


def test_truth_and_predicted_traces(watched):
    pt = open_run(watched.out).point(0)
    assert pt.truth_path == watched.scan / "truth.h5"
    truth = pt.truth()
    assert truth is not None and len(truth.pixels) > 0 and set(truth.point.tolist()) == {0}
    scores = pt.score(truth)
    assert scores.covered > 0.9 and scores.within_2um > 0.8
    image = pt.integrated_image()
    r, c = np.unravel_index(np.argmax(image), image.shape)
    row, col = int(r + pt.frame[0]), int(c + pt.frame[2])
    assert pt.truth_profile(row, col, truth).max() > 0

    # the measured trace is the pixel's counts over the point's frames, normalised by the I0 monitor
    n = watched.cfg.file.n_frames
    raw, i0 = np.empty(n), np.empty(n)
    for j in range(n):
        with h5py.File(watched.scan / f"scan_{j}.h5", "r") as f:  # point 0: frames 0 .. n-1
            raw[j], i0[j] = f["entry1/data/data"][row, col], f["entry1/monitor/I0"][()]
    np.testing.assert_allclose(pt.measured_trace(row, col), raw * i0.mean() / i0, rtol=1e-5)

    cmp = pt.compare_traces(row, col)
    assert cmp.energy_source == "best fit"
    assert cmp.predicted.shape == cmp.measured.shape == (n,)
    assert np.corrcoef(cmp.measured, cmp.predicted)[0, 1] > 0.95
    assert cmp.chi2 < 10
    lo, hi = watched.cfg.recon.energy_range
    assert lo <= cmp.energy_kev <= hi
    given = pt.compare_traces(row, col, energy_kev=cmp.energy_kev)
    assert given.energy_source == "given"
    np.testing.assert_allclose(given.predicted, cmp.predicted, rtol=1e-4)  # float32 forward model
    worse = pt.compare_traces(row, col, energy_kev=hi if cmp.energy_kev < (lo + hi) / 2 else lo)
    assert worse.chi2 > cmp.chi2


def test_a_point_is_a_snapshot_and_temporary_files_are_never_read(watched, tmp_path):
    out = tmp_path / "copy"
    out.mkdir()
    for k in (0, 2):
        shutil.copy2(watched.out / f"point_{k:05d}.h5", out)
    status = json.loads((watched.out / "status.json").read_text())
    status["state"] = "running"
    status["pid"], status["host"] = os.getpid(), socket.gethostname()  # a live driver: this process
    status["points"]["1"].update(state="running", file=None, blocks_done=1)
    (out / "status.json").write_text(json.dumps(status))
    (out / "point_00001.h5.tmp-4242").write_bytes(b"\x89HDF half written")
    run = open_run(out)
    assert run.state == "running" and run.driver_alive is True
    assert run.ready == [0, 2] and run.points[1].state == "running" and run.points[1].file is None
    with pytest.raises(ResultError, match="no result yet"):
        run.point(1)
    with pytest.raises(ResultError, match="no scan point 7"):
        run.point(7)

    old = run.point(0)
    before = old.volume()
    other = open_point(out / "point_00002.h5").volume()
    assert not np.array_equal(before, other)
    shutil.copy2(out / "point_00002.h5", out / "point_00000.h5.tmp-1")
    os.replace(out / "point_00000.h5.tmp-1", out / "point_00000.h5")  # a rerun replacing the file
    np.testing.assert_array_equal(old.volume(), before)
    with run.point(0) as new:
        np.testing.assert_array_equal(new.volume(), other)
    old.close()


def test_runs_whose_driver_is_gone_or_that_have_no_status(watched, tmp_path):
    out = tmp_path / "copy"
    out.mkdir()
    shutil.copy2(watched.out / "point_00000.h5", out)
    status = json.loads((watched.out / "status.json").read_text())
    status["state"] = "running"
    for k in ("1", "2"):
        status["points"][k].update(state="pending", file=None)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    status["pid"], status["host"] = int(dead.stdout), socket.gethostname()
    (out / "status.json").write_text(json.dumps(status))
    run = open_run(out)
    assert run.recorded_state == "running" and run.driver_alive is False and run.state == "stale"
    assert "is gone" in run.progress()

    status["host"] = "another-host"  # elsewhere: told by the age of the last update
    status["updated"] = "2020-01-01T00:00:00+00:00"
    (out / "status.json").write_text(json.dumps(status))
    assert open_run(out).state == "stale"
    status["updated"] = provenance.now()
    (out / "status.json").write_text(json.dumps(status))
    assert open_run(out).state == "running" and open_run(out).driver_alive is True

    status["points"]["0"]["state"] = "done"
    (out / "point_00000.h5").rename(out / "moved.h5")  # e.g. sent away and removed by a transfer
    (out / "status.json").write_text(json.dumps(status))
    with pytest.raises(ResultError, match="is done but its file is not here"):
        open_run(out).point(0)
    (out / "moved.h5").rename(out / "point_00000.h5")

    (out / "status.json").write_text("{ not json")
    broken = open_run(out)
    assert broken.state == "unknown" and "unreadable" in broken.status_problem
    assert broken.ready == [0] and broken.points[0].state == "done"
    (out / "status.json").unlink()
    plain = open_run(out)
    assert plain.state == "unknown" and plain.ready == [0] and "no status.json" in plain.progress()


def test_a_status_file_of_another_laueflow_is_read_as_far_as_its_fields_go(tmp_path):
    """A later format: the fields this laueflow names are read (a value of another type as missing),
    points by number, the rest kept in ``extra``; a finished run's section is added without losing any."""
    data = {"format": "laueflow-status/2", "state": "finished", "scan": "/data/scan", "pid": True,
            "finished": "2024-01-01T00:00:00+00:00", "totals": {"points": 3, "points_done": 1, "shards": 2},
            "points": {"0": {"state": "done", "blocks_total": 4, "blocks_done": 4, "n_pixels": 9,
                             "seconds": 2, "shard": "a"},
                       "1": {"state": "queued", "blocks_done": "many"}, "2": "?", "all": {}},
            "watch": {"lag": 1.5}}
    (tmp_path / "status.json").write_text(json.dumps(data))
    record, note = load_status(tmp_path)
    assert "laueflow-status/2" in note and record.state == "finished" and record.pid is None
    assert record.totals.points == 3 and record.totals.blocks is None and record.totals.extra == {"shards": 2}
    assert list(record.points) == [0, 1, 2] and record.extra == {"watch": {"lag": 1.5}}
    done = record.points[0]
    assert (done.state, done.blocks_done, done.seconds, done.reason) == ("done", 4, 2.0, "")
    assert done.extra == {"shard": "a"}
    assert record.points[1].state == "queued" and record.points[1].blocks_done is None
    assert record.points[2].state == "pending"
    with pytest.raises(TypeError):
        record.extra["transfers"] = {}  # type: ignore[index]

    run = open_run(tmp_path)
    assert run.state == "finished" and run.counts() == {"done": 1, "queued": 1, "pending": 1}
    assert run.totals["points"] == 3 and run.totals["blocks"] is None and run.totals["shards"] == 2
    assert run.progress() == "finished: 1 of 3 points finished; ended 2024-01-01T00:00:00+00:00"
    assert run.points[1].line().split()[:3] == ["1", "queued", "-"]

    assert record_section(tmp_path, "transfers", {"files": 1})
    assert json.loads((tmp_path / "status.json").read_text()) == {**data, "transfers": {"files": 1}}


def test_bad_paths_are_reported(tmp_path):
    with pytest.raises(ResultError, match="does not exist"):
        open_run(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ResultError, match="not a run folder"):
        open_run(tmp_path / "file.txt")
    with pytest.raises(ResultError, match="not a readable HDF5 file"):
        open_point(tmp_path / "file.txt")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["entry1/data/data"] = np.zeros((2, 2))
    with pytest.raises(ResultError, match="not a laueflow point file"):
        open_point(tmp_path / "other.h5")


def test_import_laueflow_stays_light():
    code = ("import sys, laueflow; assert 'h5py' not in sys.modules and 'numpy' not in sys.modules; "
            "assert callable(laueflow.open_run); assert 'h5py' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
