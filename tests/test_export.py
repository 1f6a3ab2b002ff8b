"""Per-depth export: one HDF5 image per depth bin (entry1/data/data, entry1/depth), atomic and idempotent,
and the ``laueflow export`` command on a run folder with status.json."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from laueflow import __version__, provenance
from laueflow.cli import main
from laueflow.io import blocks, export, layout, pointfile
from laueflow.simulate import default_config_dict

FRAME = (1000, 1006, 1010, 1018)  # 6 x 8 pixels
DEPTHS_MM = np.array([-3.0, -1.5, 0.0, 1.5, 3.0, 4.5]) / 1000.0  # 6 bins, um -> mm
CONFIG = yaml.safe_dump(default_config_dict("tilted", frames=16, region=8))
INPUTS = [{"name": "scan_0.h5", "size": 100, "sha256": "ab" * 32}]


def _volume(seed: int, n_depth: int = DEPTHS_MM.size) -> np.ndarray:
    """A volume with a few non-zero pixels at a few depths (like real results: mostly zeros)."""
    rng = np.random.default_rng(seed)
    r0, r1, c0, c1 = FRAME
    vol = np.zeros((n_depth, r1 - r0, c1 - c0), np.float32)
    vol[rng.integers(0, n_depth, 12), rng.integers(0, r1 - r0, 12), rng.integers(0, c1 - c0, 12)] = \
        rng.uniform(1, 100, 12)
    return vol


def write_point_file(out: Path, point: int, volume: np.ndarray, depths_mm: np.ndarray = DEPTHS_MM,
                     complete: bool = True) -> Path:
    """A real point file (io.pointfile.write_point) holding ``volume``, every pixel of FRAME decoded."""
    r0, r1, c0, c1 = FRAME
    rows, cols = (g.ravel() for g in np.mgrid[r0:r1, c0:c1])
    n = rows.size
    decoded = SimpleNamespace(
        rows=rows, cols=cols, profiles=volume.reshape(volume.shape[0], -1).T,
        background=np.full(n, 50.0), residual=np.ones(n), quality=np.zeros(n, np.uint8),
        energy=np.full(n, np.nan), energy_sigma=np.full(n, np.nan))
    block = out / ".blocks" / f"point_{point:05d}" / "block.npz"
    blocks.write_block(block, point=point, tile=FRAME, config_fingerprint="cfg", n_depths=volume.shape[0],
                        decoded=decoded)
    record = provenance.build(config_yaml=CONFIG, config_fingerprint="0123456789abcdef", inputs=INPUTS,
                              start_time=provenance.now(), command="laueflow run scan", point=point,
                              scan=str(out.parent / "scan"))
    path = out / layout.point_name(point)
    pointfile.write_point(path, [block], frame=FRAME, depths_mm=depths_mm, provenance=record,
                          complete=complete)
    return path


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if layout.TMP_MARK in p.name]


def test_one_file_per_depth_with_the_indexing_layout(tmp_path):
    vol = _volume(1)
    pf = write_point_file(tmp_path / "out", 3, vol)
    files = export.export_point(pf)
    dest = tmp_path / "out" / "depths" / "point_00003"
    assert files == sorted(files) and [f.parent for f in files] == [dest] * DEPTHS_MM.size
    assert sorted(p.name for p in dest.iterdir()) == [f.name for f in files]
    assert files[0].name == "depth_0000_-3.00um.h5" and files[-1].name == "depth_0005_4.50um.h5"
    info = pointfile.read_provenance(pf)
    for j, f in enumerate(files):
        with h5py.File(f, "r") as h:
            data = h["entry1/data/data"]
            assert data.dtype == np.float32 and data.shape == vol.shape[1:]
            np.testing.assert_array_equal(data[()], vol[j])
            assert list(data.attrs["frame"]) == list(FRAME) and int(data.attrs["depth_index"]) == j
            assert h["entry1/depth"][()] == pytest.approx(DEPTHS_MM[j] * 1000.0)
            assert h["entry1/depth"].attrs["units"] == "um"
            det = dict(h["entry1/detector"].attrs)
            assert (det["startx"], det["endx"], det["starty"], det["endy"]) == (1010, 1017, 1000, 1005)
            assert (det["Nx"], det["Ny"]) == (2048, 2048)
            p = h["entry1/provenance"].attrs
            assert p["source_file"] == str(pf.resolve()) and int(p["source_point"]) == 3
            assert p["source_config_fingerprint"] == info[provenance.CONFIG_FINGERPRINT]
            assert p["source_input_fingerprint"] == info[provenance.INPUT_FINGERPRINT]
            assert p["laueflow_version"] == __version__
    assert not _leftovers(tmp_path)


def test_rerun_keeps_up_to_date_files_and_rewrites_stale_ones(tmp_path):
    out = tmp_path / "out"
    pf = write_point_file(out, 0, _volume(1))
    first = export.export_point_detailed(pf)
    assert (first.written, first.kept, first.removed) == (DEPTHS_MM.size, 0, 0)
    stamps = {f: f.stat().st_mtime_ns for f in first.files}

    again = export.export_point_detailed(pf)
    assert (again.written, again.kept) == (0, DEPTHS_MM.size)
    assert {f: f.stat().st_mtime_ns for f in again.files} == stamps

    # one depth file damaged: only that one is written again
    first.files[2].write_bytes(b"not hdf5")
    repaired = export.export_point_detailed(pf)
    assert (repaired.written, repaired.kept) == (1, DEPTHS_MM.size - 1)
    with h5py.File(first.files[2], "r") as h:
        np.testing.assert_array_equal(h["entry1/data/data"][()], _volume(1)[2])

    # the point reconstructed again (new content, new end time): every depth file is stale
    new = _volume(2)
    write_point_file(out, 0, new)
    redone = export.export_point_detailed(pf)
    assert redone.written == DEPTHS_MM.size
    for j, f in enumerate(redone.files):
        with h5py.File(f, "r") as h:
            np.testing.assert_array_equal(h["entry1/data/data"][()], new[j])
    assert export.export_point_detailed(pf, force=True).written == DEPTHS_MM.size


def test_a_new_depth_grid_replaces_the_old_files_and_leaves_other_files_alone(tmp_path):
    out = tmp_path / "out"
    pf = write_point_file(out, 1, _volume(1))
    old = export.export_point(pf)
    dest = old[0].parent
    (dest / "notes.txt").write_text("mine")
    with h5py.File(dest / "depth_0099_1.00um.h5", "w") as h:  # looks like a depth file, not written by export
        h["x"] = 1
    grid = np.round(np.arange(0.0, 0.004, 0.001), 6)  # 4 bins, 0 to 3 um
    write_point_file(out, 1, _volume(3, n_depth=grid.size), depths_mm=grid)
    r = export.export_point_detailed(pf)
    assert r.removed == DEPTHS_MM.size - len({f.name for f in old} & {f.name for f in r.files})
    names = sorted(p.name for p in dest.iterdir())
    assert names == sorted([f.name for f in r.files] + ["notes.txt", "depth_0099_1.00um.h5"])
    assert [f.name for f in r.files] == [f"depth_{j:04d}_{z:.2f}um.h5" for j, z in enumerate([0, 1, 2, 3])]


def test_export_into_a_chosen_folder_and_an_incomplete_point(tmp_path):
    pf = write_point_file(tmp_path / "out", 2, _volume(4), complete=False)
    files = export.export_point(pf, tmp_path / "elsewhere")
    assert [f.parent for f in files] == [tmp_path / "elsewhere"] * DEPTHS_MM.size
    with h5py.File(files[0], "r") as h:
        assert not bool(h["entry1/provenance"].attrs["source_complete"])
    assert not (tmp_path / "out" / "depths").exists()


def test_a_failure_while_writing_leaves_no_partial_file(tmp_path, monkeypatch):
    pf = write_point_file(tmp_path / "out", 0, _volume(1))
    calls = {"n": 0}
    original = h5py.Group.create_group

    def failing(self, name, *args, **kwargs):
        if name == "provenance":
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError("disk full")
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_group", failing)
    with pytest.raises(OSError, match="disk full"):
        export.export_point(pf)
    dest = tmp_path / "out" / "depths" / "point_00000"
    assert sorted(p.name for p in dest.iterdir()) == ["depth_0000_-3.00um.h5", "depth_0001_-1.50um.h5"]
    assert not _leftovers(tmp_path)
    monkeypatch.undo()
    r = export.export_point_detailed(pf)
    assert (r.written, r.kept) == (DEPTHS_MM.size - 2, 2)


def test_files_that_are_not_point_files_are_refused(tmp_path):
    with pytest.raises(export.ExportError, match="does not exist"):
        export.export_point(tmp_path / "point_00000.h5")
    bad = tmp_path / "point_00001.h5"
    bad.write_text("hello")
    with pytest.raises(export.ExportError, match="not a readable laueflow point file"):
        export.export_point(bad)
    with h5py.File(tmp_path / "other.h5", "w") as h:
        h["entry1/data/data"] = np.zeros((2, 2))
    with pytest.raises(export.ExportError, match="other.h5"):
        export.export_point(tmp_path / "other.h5")


# ----------------------------------------------------------------------------------------------
# laueflow export


def _status(out: Path, points: dict[str, dict], state: str = "running") -> None:
    """status.json as the run driver writes it (format laueflow-status/1)."""
    data = {"format": "laueflow-status/1", "laueflow_version": __version__, "state": state,
            "scan": str(out.parent / "scan"), "out_dir": str(out), "command": "laueflow run scan",
            "host": "elsewhere", "pid": 1, "started": provenance.now(), "updated": provenance.now(),
            "finished": None, "totals": {"points": len(points), "points_done": 0, "points_failed": 0,
                                         "blocks": 4, "blocks_done": 2, "pixels_done": 10,
                                         "pixels_per_second": 1.0, "eta_seconds": 5.0},
            "points": points}
    (out / "status.json").write_text(json.dumps(data))


@pytest.fixture
def run_folder(tmp_path) -> Path:
    """A run in progress: point 0 done, point 1 running (no file yet), point 2 partial."""
    out = tmp_path / "out"
    write_point_file(out, 0, _volume(1))
    write_point_file(out, 2, _volume(2), complete=False)
    (out / "point_00001.h5.tmp-4242").write_bytes(b"half written")
    _status(out, {"0": {"state": "done", "file": "point_00000.h5", "blocks_total": 1, "blocks_done": 1},
                  "1": {"state": "running", "file": None, "blocks_total": 1, "blocks_done": 0},
                  "2": {"state": "partial", "file": "point_00002.h5", "blocks_total": 1, "blocks_done": 1,
                        "blocks_failed": 1}})
    return out


def _invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_exports_the_finished_points(run_folder):
    r = _invoke("export", run_folder)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].startswith("point     0: 6 depth files") and "6 written" in lines[0]
    assert lines[1].startswith("point     2: 6 depth files")
    assert "exported 2 points" in lines[-1] and "1 point not finished yet (1)" in lines[-1]
    for k in (0, 2):
        assert len(list((run_folder / "depths" / f"point_{k:05d}").glob("depth_*.h5"))) == DEPTHS_MM.size
    assert not (run_folder / "depths" / "point_00001").exists()

    again = _invoke("export", run_folder, "--points", "0")
    assert again.exit_code == 0, again.output
    assert "0 written, 6 up to date" in again.stdout


def test_cli_export_dest_and_selection(run_folder, tmp_path):
    r = _invoke("export", run_folder, "--points", "2:3", "--dest", tmp_path / "idx")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["point_00002"]
    assert len(os.listdir(tmp_path / "idx" / "point_00002")) == DEPTHS_MM.size


def test_cli_export_reports_unfinished_and_bad_selections(run_folder, tmp_path):
    r = _invoke("export", run_folder, "--points", "1")
    assert r.exit_code == 1
    assert "point     1: not exported, no result file (state running)" in r.stderr
    bad = _invoke("export", run_folder, "--points", "0,7")
    assert bad.exit_code == 2 and bad.stderr.startswith("error:") and "[7]" in bad.stderr
    worse = _invoke("export", run_folder, "--points", "zero")
    assert worse.exit_code == 2 and "error:" in worse.stderr
    (tmp_path / "empty").mkdir()
    empty = _invoke("export", tmp_path / "empty")
    assert empty.exit_code == 2 and "no scan points" in empty.stderr
    assert _invoke("export", tmp_path / "missing").exit_code == 2
