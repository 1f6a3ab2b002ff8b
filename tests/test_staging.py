"""Staged points: a point's frames read once into a tile-major scratch file give the same blocks as
reading each tile from the frame files, are reused only while the inputs are unchanged, and the
task graph stages, falls back and cleans up as it should."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_scan import config, write_frames, write_stack

from laueflow import sites
from laueflow.config import load
from laueflow.io import blocks, layout, staging
from laueflow.io.layout import STAGE_NAME, RunFolder
from laueflow.io.scan import ScanError, Tile, open_scan
from laueflow.workflow import run
from laueflow.workflow import tasks as T
from laueflow.workflow.outcomes import StageOutcome


def assert_same_block(a, b) -> None:
    assert a.point == b.point and a.tile == b.tile
    for name in ("traces", "rows", "cols", "selected", "saturated", "frames"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.traces.dtype == b.traces.dtype == np.float32


@pytest.mark.parametrize("layout", ["frames", "stack"])
def test_staged_tiles_equal_direct_reads(tmp_path: Path, layout: str) -> None:
    """Edge tiles, several batches, a monitor, a frame step: every block exactly as read_block gives it."""
    i0 = np.linspace(900.0, 1100.0, 30)
    if layout == "frames":
        write_frames(tmp_path / "run", 30, i0=i0)
        cfg = config(tmp_path / "run", range=[2, 14, 2], threshold=28500.0)
    else:
        write_stack(tmp_path / "stack.h5", 30, i0=i0)
        cfg = config(tmp_path / "stack.h5", stacked=False, range=[2, 14, 2], threshold=28500.0)
    scan = open_scan(cfg)
    assert scan.n_points == 2 and scan.has_monitor
    tiles = scan.tiles(100)  # 10 x 10 tiles over 48 x 64: smaller ones at the bottom and right edges
    path = tmp_path / "out" / "point" / STAGE_NAME
    info = staging.stage(scan, 1, tiles, path, batch_bytes=2 * 48 * 64 * 2)  # two frames per batch
    assert path.stat().st_size == info["bytes"] == 2 * scan.n_frames * 48 * 64
    assert json.loads(staging.description_path(path).read_text()) == info
    for tile in tiles:
        block = staging.read_tile(info, tile, cfg.file.threshold)
        assert_same_block(block, scan.read_block(1, tile))
    assert 0 < sum(staging.read_tile(info, t, cfg.file.threshold).selected.sum() for t in tiles) < 48 * 64


def test_the_description_lies_beside_the_data_file(tmp_path: Path) -> None:
    """The run folder names a staged point's description (frames.stage.json); staging writes it there."""
    folder = RunFolder(tmp_path / "out")
    assert folder.staged_description(2) == tmp_path / "out" / ".blocks" / "point_00002" / "frames.stage.json"
    assert staging.description_path(folder.staged(2)) == folder.staged_description(2)
    assert staging.description_path(tmp_path / "x.stage") == tmp_path / "x.stage.json"


def test_a_subset_of_tiles(tmp_path: Path) -> None:
    write_frames(tmp_path / "run", 5)
    scan = open_scan(config(tmp_path / "run"))
    tiles = scan.tiles(64)
    some = [tiles[3], tiles[7], tiles[-1]]  # the tiles still to decode after an interruption
    info = staging.stage(scan, 0, some, tmp_path / "s")
    assert info["bytes"] == 2 * 5 * sum(t.n_pixels for t in some)
    for tile in some:
        assert_same_block(staging.read_tile(info, tile, 0.0), scan.read_block(0, tile))
    with pytest.raises(ScanError, match="does not hold tile"):
        staging.read_tile(info, tiles[0], 0.0)


def test_reuse_only_while_inputs_are_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = write_frames(tmp_path / "run", 10)
    scan = open_scan(config(tmp_path / "run"))
    tiles = scan.tiles(256)
    path = tmp_path / "s"
    assert staging.reusable(path, scan, 1, tiles) is None  # nothing staged yet
    staging.stage(scan, 1, tiles, path)
    assert staging.reusable(path, scan, 1, tiles)["file"] == str(path)
    assert staging.reusable(path, scan, 1, tiles[:2]) is not None  # fewer tiles: held
    assert staging.reusable(path, scan, 0, tiles) is None  # another point
    bigger = Tile(0, 48, 0, 64)
    assert staging.reusable(path, scan, 1, [bigger]) is None  # a tile it does not hold
    with monkeypatch.context() as m:  # the host restarted: unsynced scratch data may be lost
        m.setattr(staging, "_boot", lambda: "host another-boot")
        assert staging.reusable(path, scan, 1, tiles) is None
    st = files[7].stat()
    os.utime(files[7], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a frame of point 1 rewritten
    assert staging.reusable(path, scan, 1, tiles) is None
    staging.stage(scan, 1, tiles, path)
    with open(path, "r+b") as fh:  # a data file cut short (a full disk): not reused, and reads fail
        fh.truncate(100)
    assert staging.reusable(path, scan, 1, tiles) is None
    info = json.loads(staging.description_path(path).read_text())
    with pytest.raises(ScanError, match="truncated"):
        staging.read_tile(info, tiles[-1], 0.0)
    staging.remove(path)
    assert not path.exists() and not staging.description_path(path).exists()
    staging.remove(path)  # removing twice is fine


def test_no_reuse_after_a_configuration_change(tmp_path: Path) -> None:
    """Other frames of the same stack file, another dataset in it, or the monitor switched off: the
    files are unchanged but what was staged from them is not what the configuration now reads."""
    stack = write_stack(tmp_path / "stack.h5", 30, i0=np.linspace(900.0, 1100.0, 30))
    with h5py.File(stack, "a") as f:
        f["/entry1/data/other"] = f["/entry1/data/data"][()][::-1]

    def scan_with(**file: object):
        return open_scan(config(stack, **{"stacked": False, "range": [0, 10, 1], **file}))

    scan = scan_with()
    tiles = scan.tiles(256)
    path = tmp_path / "s"
    staging.stage(scan, 0, tiles, path)
    assert staging.reusable(path, scan_with(), 0, tiles) is not None  # the same configuration again
    for changed in (scan_with(range=[5, 15, 1]), scan_with(h5={"key": "/entry1/data/other"}),
                    scan_with(monitor=False)):
        assert changed.n_frames == scan.n_frames
        assert staging.reusable(path, changed, 0, tiles) is None
        assert not np.array_equal(changed.read_block(0, tiles[0]).traces, scan.read_block(0, tiles[0]).traces)


def test_a_frame_file_changed_while_staging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = write_frames(tmp_path / "run", 5)
    scan = open_scan(config(tmp_path / "run"))
    read_region = scan.read_region

    def rewritten_meanwhile(*args, **kwargs):
        out = read_region(*args, **kwargs)
        st = files[4].stat()
        os.utime(files[4], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        return out

    monkeypatch.setattr(scan, "read_region", rewritten_meanwhile)
    staging.stage(scan, 0, scan.tiles(256), tmp_path / "s")
    assert staging.reusable(tmp_path / "s", scan, 0, scan.tiles(256)) is None


def test_interrupted_staging_leaves_nothing(tmp_path: Path) -> None:
    """Restaging removes the staged point it replaces before reading (its disk space is needed, and
    its description must not be left to describe a new data file), and a failed pass leaves nothing."""
    write_frames(tmp_path / "run", 5)
    scan = open_scan(config(tmp_path / "run"))
    path = tmp_path / "s"
    staging.stage(scan, 0, scan.tiles(256), path)
    assert path.is_file() and staging.description_path(path).is_file()
    (tmp_path / "run" / "scan_3.h5").write_bytes(b"garbage")
    with pytest.raises(ScanError, match="scan_3.h5"):
        staging.stage(scan, 0, scan.tiles(256), path)
    assert list(tmp_path.glob("s*")) == []  # neither the data file, its description nor a temporary


def test_blocks_from_a_staged_point_equal_direct_blocks(multipoint_scan: Path, tmp_path: Path) -> None:
    cfg_path = str(multipoint_scan / "config.yaml")
    cfg = load(multipoint_scan / "config.yaml")
    tiles = T.cached_scan(str(multipoint_scan), cfg).tiles(64)
    stage = T.stage_point(str(multipoint_scan), cfg_path, 1, tiles, str(tmp_path / STAGE_NAME))
    assert not stage.error and not stage.reused and (tmp_path / STAGE_NAME).stat().st_size > 0
    assert set(stage.reader) == set(staging.READER_KEYS)  # what travels with each block task
    assert T.stage_point(str(multipoint_scan), cfg_path, 1, tiles, str(tmp_path / STAGE_NAME)).reused
    for tile in tiles:
        box = f"r{tile.r0}_c{tile.c0}"
        scan = str(multipoint_scan)
        a = T.reconstruct_block(scan, cfg_path, 1, tile, str(tmp_path / f"staged_{box}.npz"), stage)
        b = T.reconstruct_block(scan, cfg_path, 1, tile, str(tmp_path / f"direct_{box}.npz"))
        assert a.n_pixels == b.n_pixels > 0 and not a.error
        ra, rb = blocks.read_block(a.block_file), blocks.read_block(b.block_file)
        np.testing.assert_array_equal(ra.profiles, rb.profiles)
    # a scratch file that vanished (cleaned up under a running task): the frame files are read instead
    staging.remove(tmp_path / STAGE_NAME)
    c = T.reconstruct_block(str(multipoint_scan), cfg_path, 1, tiles[0], str(tmp_path / "fallback.npz"),
                            stage)
    assert c.n_pixels > 0 and not c.error


def test_staging_errors_are_returned_not_raised(multipoint_scan: Path, tmp_path: Path) -> None:
    data = tmp_path / "scan"
    shutil.copytree(multipoint_scan, data)
    cfg = load(data / "config.yaml")
    (data / f"scan_{cfg.file.n_frames + 4}.h5").write_bytes(b"truncated")
    tiles = open_scan(cfg, data, check=False).tiles(64)
    stage = T.stage_point(str(data), str(data / "config.yaml"), 1, tiles, str(tmp_path / STAGE_NAME))
    assert f"scan_{cfg.file.n_frames + 4}.h5" in stage.error and stage.reader is None
    cfg_path = str(data / "config.yaml")
    out = T.reconstruct_block(str(data), cfg_path, 1, tiles[0], str(tmp_path / "b.npz"), stage)
    assert f"scan_{cfg.file.n_frames + 4}.h5" in out.error  # read directly: the real cause is reported


def test_an_unexpected_staging_failure_falls_back(multipoint_scan: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever staging raises, the block tasks read the frame files (raising would fail every block of
    the point with Parsl's DependencyError instead)."""
    def broken(*args, **kwargs):
        raise RuntimeError("no staging today")

    monkeypatch.setattr(staging, "stage", broken)
    cfg_path = str(multipoint_scan / "config.yaml")
    tiles = T.cached_scan(str(multipoint_scan), load(multipoint_scan / "config.yaml")).tiles(64)
    stage = T.stage_point(str(multipoint_scan), cfg_path, 1, tiles, str(tmp_path / STAGE_NAME))
    assert stage == StageOutcome(error="staging point 1: RuntimeError: no staging today")
    out = T.reconstruct_block(str(multipoint_scan), cfg_path, 1, tiles[0], str(tmp_path / "b.npz"), stage)
    assert out.n_pixels > 0 and not out.error
    assert out.staging_note == stage.error  # slower reading is reported, not silent

    # the same in a run: every point done, each saying that its blocks read the frame files
    result = run(multipoint_scan, load(multipoint_scan / "config.yaml"), tmp_path / "out", points=[1],
                 block_pixels=64,
                 site_config=sites.site_config("threads", workers=1, run_dir=str(tmp_path / ".runinfo")))
    (p,) = result.points
    assert p.status == "done" and result.exit_code == 0
    assert "4 of 4 blocks read the frame files instead of the staged point" in p.reason
    assert "no staging today" in p.line()


def test_scratch_of_other_points_is_removed_at_start(multipoint_scan: Path, tmp_path: Path) -> None:
    """A staged point left by an interrupted run is kept for the points this run does, removed for the
    others (it would only hold disk space)."""
    cfg = load(multipoint_scan / "config.yaml")
    scan = open_scan(cfg, multipoint_scan)
    out = tmp_path / "out"
    for k in (0, 2):
        staging.stage(scan, k, scan.tiles(64), out / ".blocks" / f"point_{k:05d}" / STAGE_NAME)
    kept = RunFolder(out).staged_description(0).read_text()
    seen: list[bool] = []

    def progress(event) -> None:
        if event.kind == "start":
            seen.append((out / ".blocks" / "point_00002" / STAGE_NAME).exists())

    result = run(multipoint_scan, cfg, out, points=[0], block_pixels=64, progress=progress,
                 site_config=sites.site_config("threads", workers=1, run_dir=str(tmp_path / ".runinfo")))
    assert result.exit_code == 0 and seen == [False]
    assert not list((out / ".blocks" / "point_00002").glob(f"{STAGE_NAME}*"))
    assert json.loads(kept)["point"] == 0 and not (out / ".blocks" / "point_00000").exists()


def test_run_with_and_without_staging(multipoint_scan: Path, tmp_path: Path) -> None:
    """Same volumes; the scratch files of points in flight stay within the budget (two of the three
    points here: the least), and none is left behind."""
    cfg = load(multipoint_scan / "config.yaml")
    seen_stages: list[int] = []
    events: list[tuple[str, int]] = []

    def watch(event) -> None:
        seen_stages.append(len(list((tmp_path / "a" / ".blocks").glob(f"point_*/{STAGE_NAME}"))))
        if event.kind in ("block", "point"):
            events.append((event.kind, event.point if event.kind == "block" else event.result.point))

    a = run(multipoint_scan, cfg, tmp_path / "a", block_pixels=64, progress=watch, stage_budget_bytes=1,
            site_config=sites.site_config("threads", workers=2, run_dir=str(tmp_path / "a" / ".runinfo")))
    b = run(multipoint_scan, cfg, tmp_path / "b", block_pixels=64, staging=False,
            site_config=sites.site_config("threads", workers=2, run_dir=str(tmp_path / "b" / ".runinfo")))
    assert a.exit_code == b.exit_code == 0
    # the budget admits two points at a time (the least): the third is submitted only once one ended,
    # so no block of point 2 finishes before a point did, and at most two staged points exist at once
    first_of_2 = events.index(("block", 2))
    assert any(kind == "point" for kind, _ in events[:first_of_2]), events
    assert max(seen_stages) <= 2
    assert not (tmp_path / "a" / ".blocks").exists()
    for k in range(3):
        with h5py.File(tmp_path / "a" / layout.point_name(k)) as fa, \
                h5py.File(tmp_path / "b" / layout.point_name(k)) as fb:
            va, vb = fa["entry/reconstruction/volume"][()], fb["entry/reconstruction/volume"][()]
        np.testing.assert_array_equal(va, vb)  # the same traces: the same bits
        assert va.any()
