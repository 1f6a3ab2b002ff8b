"""`laueflow watch`: when frame files are complete, which points are ready, lag bookkeeping, and a scan
folder that grows while `laueflow watch` runs (a writer process drops frames into it, slowly).

Run as a script (``python tests/test_watch.py write ...``) this module is that writer.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

FRAMES = 4  # frames per point in the fast feed tests
KEY = "/entry1/data/data"
SHAPE = (2048, 2048)


# ----------------------------------------------------------------------------------------------
# The writer: the beamline, as seen from the scan folder


def drop_frames(staging: Path, watched: Path, log: Path, gate: Path, n_points: int, n_frames: int,
                cadence: float, stall: float) -> None:
    """Copy the frame files of each point from ``staging`` into ``watched`` under their final names,
    half a file at a time; the first and last frames of a point stay half-written for ``stall`` seconds.
    Points after the first wait for ``gate`` to exist.  After the last point, a frame is left cut short
    (the beamline stopped while writing it).  ``log`` records when each point's last frame was complete."""
    times: dict[str, float] = {}
    for k in range(n_points):
        while k == 1 and not gate.exists():
            time.sleep(0.05)
        for j in range(n_frames):
            name = f"scan_{k * n_frames + j}.h5"
            data = (staging / name).read_bytes()
            with open(watched / name, "wb") as fh:
                fh.write(data[: len(data) // 2])
                fh.flush()
                time.sleep(stall if j in (0, n_frames - 1) else 0.002)
                fh.write(data[len(data) // 2:])
        times[str(k)] = time.time()
        tmp = log.with_suffix(".tmp")
        tmp.write_text(json.dumps(times))
        os.replace(tmp, log)
        time.sleep(cadence)
    data = (staging / "scan_0.h5").read_bytes()
    (watched / f"scan_{n_points * n_frames}.h5").write_bytes(data[: len(data) // 3])


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "write":
    a = sys.argv[2:]
    drop_frames(Path(a[0]), Path(a[1]), Path(a[2]), Path(a[3]), int(a[4]), int(a[5]), float(a[6]),
                float(a[7]))
    sys.exit(0)


from click.testing import CliRunner  # noqa: E402
from conftest import use_tiles  # noqa: E402

from laueflow.cli import main  # noqa: E402
from laueflow.config import load  # noqa: E402
from laueflow.mask import debruijn  # noqa: E402
from laueflow.simulate import default_config_dict, simulate  # noqa: E402
from laueflow.watch import (  # noqa: E402
    LagBook,
    PointFeed,
    WatchError,
    frame_problem,
    sigterm_as_interrupt,
    watch_status,
)


class Clock:
    """Epoch seconds that move only when told (the feed compares them with file times)."""

    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t

    def tick(self, seconds: float = 1.0) -> float:
        self.t += seconds
        return self.t


def _config(folder: Path, **file_keys) -> object:
    data = default_config_dict("tilted", frames=FRAMES, region=16)
    data["file"].update(file_keys)
    np.save(folder / "mask.npy", debruijn(8))
    (folder / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return load(folder / "config.yaml")


def _frame_bytes(tmp: Path, value: int = 7, key: str = KEY, shape: tuple[int, ...] = SHAPE,
                 dtype: str = "uint16") -> bytes:
    """A frame file's bytes, written elsewhere (only one chunk stored)."""
    path = tmp / f"frame_{value}_{abs(hash((key, shape, dtype)))}.bin"
    with h5py.File(path, "w") as f:
        chunks = tuple(min(256, n) for n in shape)
        d = f.create_dataset(key, shape=shape, dtype=dtype, chunks=chunks, compression="gzip")
        d[(slice(0, 16),) * len(shape)] = value
    data = path.read_bytes()
    path.unlink()
    return data


def _write(folder: Path, numbers, data: bytes) -> None:
    for n in numbers:
        (folder / f"scan_{n}.h5").write_bytes(data)


def _polls(feed: PointFeed, clock: Clock, n: int) -> list[int]:
    ready: list[int] = []
    for _ in range(n):
        clock.tick(feed.poll_interval)
        ready += feed.poll()
    return ready


@pytest.fixture
def scan_dir(tmp_path) -> Path:
    folder = tmp_path / "frames"
    folder.mkdir()
    return folder


# ----------------------------------------------------------------------------------------------
# Readiness


def test_half_written_frame_is_never_ready(scan_dir, tmp_path):
    """A frame whose size stays put but that is cut short is refused until its last byte is there."""
    cfg = _config(scan_dir)
    clock = Clock()
    feed = PointFeed(cfg, scan_dir, poll_interval=1.0, clock=clock)
    data = _frame_bytes(tmp_path)
    _write(scan_dir, range(FRAMES - 1), data)
    (scan_dir / f"scan_{FRAMES - 1}.h5").write_bytes(data[: len(data) // 2])
    assert feed.poll() == []  # first sight: nothing can be stable yet
    _write(scan_dir, [FRAMES], data)  # within the poll interval: not even listed
    assert feed.poll() == [] and FRAMES not in feed._frames
    assert _polls(feed, clock, 4) == []
    [(name, why)] = feed.incomplete()
    assert name.name == f"scan_{FRAMES - 1}.h5" and "not a readable HDF5 file" in why
    assert feed.unfinished_points() == [0, 1] and not feed.done

    before = clock()
    (scan_dir / f"scan_{FRAMES - 1}.h5").write_bytes(data)
    assert _polls(feed, clock, 1) == []  # it changed: wait for the next listing
    settled = clock()
    assert _polls(feed, clock, 1) == [0]
    assert before <= feed.arrival(0) <= settled  # the write happened between these two listings
    assert feed.ready_at(0) == clock() and feed.points_ready == [0]
    assert _polls(feed, clock, 2) == []  # handed out once


def test_incomplete_frame_holds_back_only_its_point(scan_dir, tmp_path):
    cfg = _config(scan_dir)
    clock = Clock()
    feed = PointFeed(cfg, scan_dir, poll_interval=0.5, until_idle=3.0, clock=clock)
    data = _frame_bytes(tmp_path)
    _write(scan_dir, range(3 * FRAMES), data)
    (scan_dir / f"scan_{FRAMES + 1}.h5").write_bytes(data[:100])  # point 1: a frame that never completes
    assert _polls(feed, clock, 2) == [0, 2]
    assert feed.unfinished_points() == [1] and not feed.done
    _polls(feed, clock, 6)
    assert feed.done and feed.stop_reason == "no new frames for 3 s"
    assert [p.name for p, _ in feed.incomplete()] == [f"scan_{FRAMES + 1}.h5"]
    assert feed.poll() == []


def test_gap_in_numbering_holds_points_until_it_closes(scan_dir, tmp_path):
    cfg = _config(scan_dir)
    clock = Clock()
    feed = PointFeed(cfg, scan_dir, poll_interval=1.0, clock=clock)
    data = _frame_bytes(tmp_path)
    _write(scan_dir, [n for n in range(2 * FRAMES) if n != FRAMES], data)
    assert _polls(feed, clock, 3) == []  # point 0 is complete, but the folder cannot be opened yet
    assert feed.summary()["numbering_gap"] == [FRAMES]
    _write(scan_dir, [FRAMES], data)
    assert _polls(feed, clock, 2) == [0, 1]


def test_points_limit_numbering_and_frames_outside_points(scan_dir, tmp_path):
    """Numbering starts at the first file; range [1, 5, 2] uses frames 1 and 3 of every 4."""
    cfg = _config(scan_dir, range=[1, 5, 2])
    clock = Clock()
    feed = PointFeed(cfg, scan_dir, poll_interval=1.0, max_points=2, clock=clock)
    data = _frame_bytes(tmp_path)
    _write(scan_dir, range(100, 100 + 3 * 4), data)
    (scan_dir / "scan_100.h5").write_bytes(data[:50])  # frame 0 of every 4 is not used: no matter
    assert _polls(feed, clock, 2) == [0, 1]
    assert feed.done and feed.stop_reason == "points 0-1 are ready" and feed.unfinished_points() == []
    feed2 = PointFeed(cfg, scan_dir, poll_interval=1.0, clock=clock)
    _polls(feed2, clock, 1)
    _write(scan_dir, [99], data)
    with pytest.raises(WatchError, match="numbering of the scan changed"):
        _polls(feed2, clock, 1)


def test_frame_problems(tmp_path):
    good = tmp_path / "good.h5"
    good.write_bytes(_frame_bytes(tmp_path))
    assert frame_problem(good, KEY, SHAPE) is None
    cases = {"other key": (_frame_bytes(tmp_path, key="/entry1/other"), "no dataset"),
             "shape": (_frame_bytes(tmp_path, shape=(2048, 1024)), "shape [2048, 1024]"),
             "stack": (_frame_bytes(tmp_path, shape=(2, 2048, 2048)), "shape [2, 2048, 2048]"),
             "dtype": (_frame_bytes(tmp_path, dtype="float32"), "dtype float32"),
             "text": (b"not hdf5 at all", "not a readable HDF5 file")}
    for name, (data, expected) in cases.items():
        path = tmp_path / f"{name}.h5"
        path.write_bytes(data)
        assert expected in (frame_problem(path, KEY, SHAPE) or ""), name
    with h5py.File(tmp_path / "group.h5", "w") as f:
        f.create_group(KEY)
    assert "not a dataset" in frame_problem(tmp_path / "group.h5", KEY, SHAPE)


def test_unwatchable_scans(scan_dir, tmp_path):
    with pytest.raises(WatchError, match="file.stacked: true"):
        PointFeed(_config(scan_dir, stacked=False), scan_dir)
    cfg = _config(scan_dir)
    data = _frame_bytes(tmp_path)
    _write(scan_dir, [0], data)
    with pytest.raises(WatchError, match="is a file"):
        PointFeed(cfg, scan_dir / "scan_0.h5")
    (scan_dir / "other_0.h5").write_bytes(data)
    with pytest.raises(WatchError, match="several prefixes"):
        PointFeed(cfg, scan_dir, poll_interval=1.0).poll()
    named = PointFeed(cfg, scan_dir / "other", poll_interval=1.0)  # a path naming the prefix
    named.poll()
    assert named.prefix == "other" and list(named._frames) == [0]
    (scan_dir / "other_00.h5").write_bytes(data)
    with pytest.raises(WatchError, match="same frame number"):
        PointFeed(cfg, scan_dir / "other", poll_interval=1.0).poll()


# ----------------------------------------------------------------------------------------------
# Lag bookkeeping


def test_lag_book_warns_when_the_lag_grows():
    book = LagBook(window=4, margin=10.0)
    t = 1000.0
    for k, lag in enumerate([30, 31, 29, 32, 30, 31]):  # steady: keeping up
        book.record(k, t + 72 * k, t + 72 * k + 1, t + 72 * k + lag)
        assert book.falling_behind() is None
    assert book.lags() == [30, 31, 29, 32, 30, 31]
    warnings = []
    for k, lag in enumerate([35, 42, 48, 50, 53, 58, 66], start=6):  # 6-12 s more per point
        book.record(k, t + 72 * k, t + 72 * k + 1, t + 72 * k + lag)
        warnings.append(book.falling_behind())
    assert [w is not None for w in warnings] == [False, True, False, False, True, False, True]
    assert "from 30 s to 42 s over the last 4 points" in warnings[1]  # 12 s over 4 points
    assert "to 53 s" in warnings[4] and "to 66 s" in warnings[6]  # again after another 10 s each
    assert book.summary()["falling_behind"] and book.summary()["max_seconds"] == 66
    for k, lag in enumerate([40, 30, 25, 25], start=13):  # caught up: armed again
        book.record(k, t + 72 * k, t + 72 * k + 1, t + 72 * k + lag)
        assert book.falling_behind() is None
    assert not book.summary()["falling_behind"]


def test_watch_status_has_the_lag_of_every_point(scan_dir, tmp_path):
    cfg = _config(scan_dir)
    clock = Clock()
    feed = PointFeed(cfg, scan_dir, poll_interval=1.0, clock=clock)
    _write(scan_dir, range(3 * FRAMES), _frame_bytes(tmp_path))
    assert _polls(feed, clock, 2) == [0, 1, 2]
    assert feed.describe().startswith(f"{scan_dir / 'scan_<n>.h5'}, {FRAMES} frames per point")
    book = LagBook()
    book.keep(0)
    book.record(1, feed.arrival(1), feed.ready_at(1), clock() + 4.25)
    status = watch_status(feed, book)["watch"]
    json.dumps(status)
    assert status["state"] == "watching" and status["frames_complete"] == 3 * FRAMES
    assert status["points"]["0"]["status"] == "resumed" and status["points"]["0"]["lag_seconds"] is None
    one = status["points"]["1"]
    assert one["status"] == "done"
    assert one["lag_seconds"] == pytest.approx(clock() + 4.25 - feed.arrival(1), abs=1e-3)
    assert dt.datetime.fromisoformat(one["output_at"]).timestamp() == pytest.approx(clock() + 4.25, abs=1e-3)
    assert status["points"]["2"]["status"] == "pending" and status["points"]["2"]["output_at"] is None
    assert status["lag"]["last_seconds"] == one["lag_seconds"]


def test_sigterm_is_an_interrupt():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) == before


# ----------------------------------------------------------------------------------------------
# The command


def test_cli_refuses_a_stack_scan(scan_dir):
    _config(scan_dir, stacked=False)
    out = scan_dir.parent / "recon"
    r = CliRunner().invoke(main, ["watch", str(scan_dir), "--out", str(out), "--site", "threads"])
    assert r.exit_code == 2 and "error:" in r.stderr and "file.stacked: true" in r.stderr
    assert not out.exists()


def test_cli_stops_when_nothing_arrives(scan_dir):
    _config(scan_dir)
    out = scan_dir.parent / "recon"
    t0 = time.monotonic()
    r = CliRunner().invoke(main, ["watch", str(scan_dir), "--out", str(out), "--site", "threads",
                                  "--until-idle", "0.5", "--poll-interval", "0.1"])
    assert r.exit_code == 0, r.output
    assert "watch stopped: no new frames for 0.5 s" in r.stdout and "nothing was reconstructed" in r.stdout
    assert time.monotonic() - t0 < 10 and not list(out.glob("point_*.h5"))


REGION = 8
BLOCK = 64  # one task per point
N_POINTS = 3
POINT_LINE = re.compile(r"^point +(\d+): (\w+)", re.M)
LAG_LINE = re.compile(r"^point +(\d+): lag ([0-9.]+) s", re.M)


def _start(cmd: list, log: Path) -> subprocess.Popen:
    """Start a process with its output in ``log``.out and ``log``.err."""
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        return subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=err)


def _wait_for(what, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode}: {log.with_suffix('.err').read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s")
        time.sleep(0.1)


def test_watch_a_growing_scan_with_a_restart(tmp_path):
    """Frames land slowly, point by point; the watcher is interrupted after the first point and
    restarted; every point is reconstructed once, from complete files, as `laueflow run` would."""
    staging, watched, out = tmp_path / "staging", tmp_path / "watched", tmp_path / "recon"
    simulate(staging, preset="multipoint", points=N_POINTS, region=REGION, seed=5)
    use_tiles(staging, BLOCK)
    n_frames = load(staging / "config.yaml").file.n_frames
    watched.mkdir()
    for name in ("config.yaml", "mask.npy"):
        shutil.copy(staging / name, watched / name)
    written, gate = tmp_path / "written.json", tmp_path / "go"
    watch = [sys.executable, "-m", "laueflow.cli", "watch", watched, "--out", out, "--site", "threads",
             "--workers", "1", "--block-pixels", BLOCK, "--poll-interval", "0.3"]
    procs = [_start([sys.executable, __file__, "write", staging, watched, written, gate, N_POINTS, n_frames,
                     0.5, 1.2], tmp_path / "writer")]
    writer = procs[0]
    try:
        first = _start(watch, tmp_path / "first")
        procs.append(first)
        first_out = tmp_path / "first.out"
        _wait_for(lambda: LAG_LINE.search(first_out.read_text()), 120, first, tmp_path / "first")
        first.send_signal(signal.SIGINT)
        assert first.wait(60) == 130
        interrupted = json.loads((out / "status.json").read_text())
        assert interrupted["state"] == "interrupted"
        assert interrupted["watch"]["points"]["0"]["lag_seconds"] > 0
        kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("point_*.h5")}
        assert list(kept) == ["point_00000.h5"]

        second = _start([*watch, "--until-idle", 4], tmp_path / "second")
        procs.append(second)
        gate.touch()
        assert second.wait(150) == 0, (tmp_path / "second.err").read_text()
        assert writer.wait(30) == 0, (tmp_path / "writer.err").read_text()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    logs = [(tmp_path / f"{name}.out").read_text() for name in ("first", "second")]
    err2 = (tmp_path / "second.err").read_text()
    # every point reconstructed once; the finished one was kept, not recomputed
    done = [int(k) for log in logs for k, state in POINT_LINE.findall(log) if state == "done"]
    assert sorted(done) == list(range(N_POINTS)), logs
    assert ("0", "resumed") in POINT_LINE.findall(logs[1])
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("point_00000.h5")} == kept
    # lag figures: printed per point, in status.json, and never before the frames were complete
    lags = {int(k): float(v) for log in logs for k, v in LAG_LINE.findall(log)}
    assert sorted(lags) == list(range(N_POINTS)) and all(0 < v < 120 for v in lags.values())
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "finished"
    assert {k: p["state"] for k, p in status["points"].items()} == {"0": "resumed", "1": "done", "2": "done"}
    complete_at = json.loads(written.read_text())
    for k in ("1", "2"):
        entry = status["watch"]["points"][k]
        ready = dt.datetime.fromisoformat(entry["ready_at"]).timestamp()
        last_frame = dt.datetime.fromisoformat(entry["last_frame_at"]).timestamp()
        assert ready >= complete_at[k], (k, ready, complete_at[k])  # never from a half-written file
        assert abs(last_frame - complete_at[k]) < 1.0
        assert entry["lag_seconds"] == pytest.approx(lags[int(k)], abs=0.15)
    assert status["watch"]["points"]["0"]["status"] == "resumed"
    assert math.isfinite(status["watch"]["lag"]["median_seconds"])
    # the beamline stopped in the middle of a frame: the watch ended on idle and says what was left
    assert "watch stopped: no new frames for 4 s" in logs[1]
    assert f"scan_{N_POINTS * n_frames}.h5" in err2 and "points not taken: 3" in err2
    assert logs[1].rstrip().splitlines()[-1].startswith("3 points")

    # the same volumes as `laueflow run` on the finished folder
    ref = tmp_path / "ref"
    r = CliRunner().invoke(main, ["run", str(watched), "--out", str(ref), "--site", "threads",
                                  "--workers", "1", "--block-pixels", str(BLOCK)])
    assert r.exit_code == 0, r.output
    for k in range(N_POINTS):
        name = f"point_{k:05d}.h5"
        with h5py.File(out / name) as a, h5py.File(ref / name) as b:
            va, vb = a["entry/reconstruction/volume"][()], b["entry/reconstruction/volume"][()]
            assert va.max() > 0
            np.testing.assert_array_equal(va, vb)  # the same frames: the same bits
            np.testing.assert_array_equal(a["entry/diagnostics/index"][()], b["entry/diagnostics/index"][()])
