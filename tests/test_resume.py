"""What a rerun keeps: block files stamped with their inputs, damaged blocks and point files recomputed,
the tiling checked, late writes of an earlier run's workers ignored.

An interrupted run is what these tests start from: its finished block files are written by the real
block task (tasks.reconstruct_block) into the run folder, as a run that was killed before stitching
leaves them.  Runs use the threads site in this process, one worker, so that results compare bitwise.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import results
from conftest import use_tiles

from laueflow import provenance, sites
from laueflow.config import load
from laueflow.io import blocks, pointfile
from laueflow.io.layout import RunFolder
from laueflow.workflow import run
from laueflow.workflow import tasks as T
from laueflow.workflow.outcomes import StitchRequest
from laueflow.workflow.resume import ResumeWarning
from laueflow.workflow.status import read_status

BLOCK = 64  # 4 tiles per point, as the shared run


def _run(scan: Path, out: Path, points, block_pixels: int = BLOCK):
    cfg = load(scan / "config.yaml")
    return run(scan, cfg, out, points=points, block_pixels=block_pixels,
               site_config=sites.site_config("threads", workers=1, run_dir=str(out / ".runinfo")))


def _interrupted(scan: Path, out: Path, point: int, n: int | None = None) -> list[Path]:
    """The block files a run killed before stitching ``point`` leaves (its first ``n`` tiles)."""
    cfg_path = str(scan / "config.yaml")
    tiles = T.cached_scan(str(scan), load(cfg_path), point).tiles(BLOCK)[:n]
    folder = RunFolder(out)
    files = []
    for tile in tiles:
        name = folder.block_file(point, tile.r0, tile.c0)
        info = T.reconstruct_block(str(scan), cfg_path, point, tile, str(name))
        assert not info.error and name.is_file()
        files.append(name)
    return files


def _change_a_frame(scan: Path, point: int) -> Path:
    """Rewrite one of the point's frames (its region doubled): a frame file replaced after a first run."""
    cfg = load(scan / "config.yaml")
    opened = T.cached_scan(str(scan), cfg, point)
    frames = opened.point_frames(point)
    opened.close()  # the frame files this process holds open, as a new process would find them
    file, index = frames[len(frames) // 2]
    r0, r1, c0, c1 = cfg.file.frame
    with h5py.File(file, "r+") as f:
        data = f[cfg.file.h5_key]
        if data.ndim == 2:
            data[r0:r1, c0:c1] = np.minimum(data[r0:r1, c0:c1].astype(np.int64) * 2 + 50, 60000)
        else:
            region = data[index, r0:r1, c0:c1].astype(np.int64)
            data[index, r0:r1, c0:c1] = np.minimum(region * 2 + 50, 60000)
    return file


@pytest.fixture
def scan_copy(multipoint_scan: Path, tmp_path: Path) -> Path:
    """A private copy of the shared scan, whose frames a test may change."""
    return Path(shutil.copytree(multipoint_scan, tmp_path / "scan"))


def test_block_files_lists_finished_blocks_in_order(tmp_path):
    """RunFolder.block_files, what resume looks at: the point's block files sorted, without temporaries,
    staged frames or other points' blocks; nothing for a point without a block folder."""
    folder = RunFolder(tmp_path / "recon")
    assert folder.block_files(3) == []
    names = [folder.block_file(3, r0, c0) for r0, c0 in ((64, 0), (0, 64), (0, 0))]
    for name in [*names, folder.block_file(4, 0, 0)]:
        name.parent.mkdir(parents=True, exist_ok=True)
        name.write_bytes(b"")
    (folder.blocks(3) / (names[0].name + ".tmp-12")).write_bytes(b"")
    folder.staged(3).write_bytes(b"")
    assert folder.block_files(3) == sorted(names) == [names[2], names[1], names[0]]


def test_blocks_of_changed_frames_are_recomputed(scan_copy, tmp_path):
    """Defect 1: a run killed after point 1's blocks were done, one of its frames changed, a rerun: the
    old blocks (and a late write of the killed run's worker) are not reused, and the point equals a
    fresh run of the changed frames bitwise."""
    out = tmp_path / "recon"
    old = _interrupted(scan_copy, out, 1)
    stamped = {blocks.read_block_meta(f)["input_fingerprint"] for f in old}
    scan = T.cached_scan(str(scan_copy), load(scan_copy / "config.yaml"), 1)
    assert stamped == {provenance.input_fingerprint(scan.fingerprints(1))}
    _change_a_frame(scan_copy, 1)

    result = _run(scan_copy, out, [1])
    (p,) = result.points
    assert p.status == "done" and p.reused_blocks == 0 and p.failed_blocks == 0
    assert read_status(out)["points"]["1"]["blocks_reused"] == 0
    with h5py.File(out / "point_00001.h5", "r") as f:
        prov = provenance.read(f["entry/provenance"])
    now = provenance.input_fingerprint(scan.fingerprints(1))
    assert prov[provenance.INPUT_FINGERPRINT] == now != stamped.pop()

    fresh = tmp_path / "fresh"
    assert _run(scan_copy, fresh, [1]).exit_code == 0
    np.testing.assert_array_equal(results.volume(out / "point_00001.h5"),
                                  results.volume(fresh / "point_00001.h5"))
    # and the rerun keeps it from now on
    assert [q.status for q in _run(scan_copy, out, [1]).points] == ["resumed"]


def test_a_late_block_of_other_inputs_is_not_stitched(scan_copy, tmp_path):
    """Defect 11: a block file replaced after this run checked it (a worker of a killed run writing late)
    is stitched only when its stamp is this run's; otherwise the point is partial, the cause names the
    file, and a rerun recomputes that tile."""
    out = tmp_path / "recon"
    files = _interrupted(scan_copy, out, 1)
    cfg_path = str(scan_copy / "config.yaml")
    cfg = load(cfg_path)
    tiles = T.cached_scan(str(scan_copy), cfg, 1).tiles(BLOCK)
    outcomes = [T.reconstruct_block(str(scan_copy), cfg_path, 1, t, str(f))
                for t, f in zip(tiles, files, strict=True)]
    late = blocks.read_block(files[2])  # the same tile, written by a worker that read other frames
    blocks.write_block(files[2], point=1, tile=late.tile, config_fingerprint=late.config_fingerprint,
                       input_fingerprint="0" * 16, n_depths=late.profiles.shape[1])
    request = StitchRequest(point=1, cfg_path=cfg_path, scan_path=str(scan_copy), frame=tuple(cfg.file.frame),
                            depths_mm=tuple(cfg.geo.source.depths), config_yaml=cfg.to_yaml(),
                            config_fingerprint=cfg.fingerprint(), start_time=provenance.now())
    point_file = out / "point_00001.h5"
    stitched = T.stitch_point([str(f) for f in files], str(point_file), request, outcomes)
    assert stitched.status == "partial" and stitched.failed_blocks == 1
    assert str(files[2]) in stitched.reason and "other inputs" in stitched.reason
    with h5py.File(point_file, "r") as f:
        assert not f["entry/reconstruction"].attrs["complete"]

    result = _run(scan_copy, out, [1])
    (p,) = result.points
    assert p.status == "done" and p.reused_blocks == 3
    assert not files[0].exists()  # done: its block files are removed
    fresh = tmp_path / "fresh"
    assert _run(scan_copy, fresh, [1]).exit_code == 0
    np.testing.assert_array_equal(results.volume(point_file), results.volume(fresh / "point_00001.h5"))


def test_damaged_block_files_are_recomputed(multipoint_scan, tmp_path):
    """Defect 4: a truncated block file and one with bad bytes inside are recomputed, each with a warning
    naming it; the others are reused and the point equals an uninterrupted run."""
    out = tmp_path / "recon"
    files = _interrupted(multipoint_scan, out, 2)
    truncated, altered = files[0], files[1]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    raw = bytearray(altered.read_bytes())
    start = raw.index(b"profiles.npy")  # inside the profiles member: its header and data follow the name
    raw[start + 200:start + 216] = b"\xff" * 16
    altered.write_bytes(bytes(raw))
    with pytest.raises(Exception, match=str(altered.name)):
        blocks.read_block(altered)

    with pytest.warns(ResumeWarning) as caught:
        result = _run(multipoint_scan, out, [2])
    said = " ".join(str(w.message) for w in caught)
    assert str(truncated) in said and str(altered) in said
    (p,) = result.points
    assert p.status == "done" and p.reused_blocks == 2 and p.failed_blocks == 0
    fresh = tmp_path / "fresh"
    assert _run(multipoint_scan, fresh, [2]).exit_code == 0
    np.testing.assert_array_equal(results.volume(out / "point_00002.h5"),
                                  results.volume(fresh / "point_00002.h5"))


def test_another_block_size_keeps_the_point_and_another_tile_recomputes(multipoint_scan, multipoint_run,
                                                                         tmp_path):
    """Defect 9: how the region is cut into tasks does not change results, so a point file of 64-pixel
    blocks is kept by a rerun with --block-pixels 256 (one block of four tiles); the decoder's tile
    (recon.tile_pixels) is a model setting in the configuration's fingerprint: changing it recomputes."""
    out = tmp_path / "recon"
    out.mkdir()
    shutil.copy2(multipoint_run / "point_00000.h5", out / "point_00000.h5")
    assert [p.status for p in _run(multipoint_scan, out, [0], block_pixels=256).points] == ["resumed"]
    scan = tmp_path / "scan"
    shutil.copytree(multipoint_scan, scan)
    use_tiles(scan, 256)
    (p,) = _run(scan, out, [0]).points
    assert p.status == "done"
    assert [p.status for p in _run(scan, out, [0], block_pixels=1024).points] == ["resumed"]


def test_a_point_file_damaged_in_place_is_recomputed(multipoint_scan, multipoint_run, tmp_path):
    """Defect 10: 4 KB overwritten inside a finished point file (same size) fails its checksum: the rerun
    warns naming it and recomputes the point, which then reads as an uninterrupted run's."""
    out = tmp_path / "recon"
    out.mkdir()
    damaged = out / "point_00001.h5"
    shutil.copy2(multipoint_run / "point_00001.h5", damaged)
    with h5py.File(damaged, "r") as f:
        vol = f["entry/reconstruction/volume"]
        chunks = [vol.id.get_chunk_info(i) for i in range(vol.id.get_num_chunks())]
    biggest = max(chunks, key=lambda c: c.size)
    size = damaged.stat().st_size
    with open(damaged, "r+b") as fh:
        fh.seek(biggest.byte_offset)
        fh.write(b"\x5a" * min(4096, biggest.size))
    assert damaged.stat().st_size == size
    with pytest.raises(Exception, match="damaged"):
        pointfile.verify(damaged)

    with pytest.warns(ResumeWarning, match=str(damaged)):
        result = _run(multipoint_scan, out, [1])
    (p,) = result.points
    assert p.status == "done"
    pointfile.verify(damaged)
    np.testing.assert_array_equal(results.volume(damaged), results.volume(multipoint_run / "point_00001.h5"))
