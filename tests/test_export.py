"""Per-depth export: one HDF5 image per depth bin (entry1/data/data, entry1/depth), atomic and idempotent,
and the ``laueflow export`` command on a run folder with status.json."""

from __future__ import annotations

import json
import os
import shutil
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
    header = out.parent / "scan" / "scan_0.h5"
    if not header.exists():
        _frame_file(header)
    pointfile.write_point(path, [block], frame=FRAME, depths_mm=depths_mm, provenance=record,
                          complete=complete, header=(header, "/entry1/data/data"))
    return path


def _frame_file(path: Path, startx: int = 0, binx: int = 1) -> None:
    """A detector frame file with the header the beamline writes (datasets, as 34-ID-E's files hold)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs["file_name"] = path.name
        f["entry1/data/data"] = np.zeros((4, 4), np.uint16)
        for key, value in {"Nx": 2048, "Ny": 2048, "startx": startx, "endx": 2047, "starty": 0, "endy": 2047,
                           "binx": binx, "biny": 1}.items():
            f[f"entry1/detector/{key}"] = np.float64(value)  # as LaueGo's files store them
        f["entry1/detector/ID"] = "PE1621 723-3335"
        f["entry1/detector/exposure"] = 0.25
        f["entry1/monitor/I0"] = 70871.0
        f["entry1/sample/sampleX"] = -5.5
        f["entry1/sample/sampleX"].attrs["units"] = "micron"
        f["entry1/sample/incident_energy"] = 20.0
        f["entry1/microDiffraction/HutchTemperature"] = 23.2
        f["entry1/scanNum"] = 272544
        f["entry1/wire/wireX"] = 1.0


class ChainReader:
    """A per-depth file read as LaueGo's C reader (microHDF5.c) and lauelab's per-depth reader do: image
    entry1/data/data, depth entry1/depth[0] (um), and the region from the *datasets*
    entry1/detector/{startx, endx, starty, endy, binx, biny} (absent: the detector corner, binning 1)."""

    def __init__(self, path: Path) -> None:
        with h5py.File(path, "r") as f:
            self.image = f["entry1/data/data"][()]
            self.depth = float(f["entry1/depth"][0])

            def number(key: str, default: float) -> int:
                obj = f.get(f"entry1/detector/{key}")
                return int(obj[()]) if isinstance(obj, h5py.Dataset) else int(default)

            self.startx, self.starty = number("startx", 0), number("starty", 0)
            self.endx = number("endx", self.startx + self.image.shape[1] - 1)
            self.endy = number("endy", self.starty + self.image.shape[0] - 1)
            self.binx, self.biny = number("binx", 1), number("biny", 1)

    def detector_value(self, x: int, y: int) -> float:
        """The image's value at unbinned detector pixel (x = column, y = row)."""
        return float(self.image[(y - self.starty) // self.biny, (x - self.startx) // self.binx])


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if layout.TMP_MARK in p.name]


def test_one_file_per_depth_with_the_indexing_layout(tmp_path):
    vol = _volume(1)
    pf = write_point_file(tmp_path / "out", 3, vol)
    files = export.export_point(pf)
    dest = tmp_path / "out" / "depths" / "point_00003"
    assert [f.parent for f in files] == [dest] * DEPTHS_MM.size
    assert sorted(p.name for p in dest.iterdir()) == sorted(f.name for f in files)
    assert [f.name for f in files] == [f"out_272544_{j}.h5" for j in range(DEPTHS_MM.size)]
    info = pointfile.read_provenance(pf)
    for j, f in enumerate(files):
        with h5py.File(f, "r") as h:
            data = h["entry1/data/data"]
            assert data.dtype == np.float32 and data.shape == vol.shape[1:]
            np.testing.assert_array_equal(data[()], vol[j])
            assert h["entry1/depth"].shape == (1,)
            assert h["entry1/depth"][0] == pytest.approx(DEPTHS_MM[j] * 1000)
            assert h["entry1/depth"].attrs["units"] == "um"
            det = h["entry1/detector"]
            assert not {"startx", "endx", "starty", "endy"} & set(det.attrs)  # datasets, not attributes
            assert [det[k][()] for k in ("startx", "endx", "starty", "endy")] == [1010, 1017, 1000, 1005]
            assert (det["Nx"][()], det["Ny"][()]) == (2048, 2048)
            assert det["ID"].asstr()[()] == "PE1621 723-3335"
            # the frame's header comes along, every group it has
            assert h["entry1/monitor/I0"][()] == 70871.0 and h["entry1/scanNum"][()] == 272544
            assert h["entry1/sample/sampleX"].attrs["units"] == "micron"
            assert h["entry1/microDiffraction/HutchTemperature"][()] == pytest.approx(23.2)
            assert h.attrs["file_name"] == f.name  # names itself, as the detector's files do
            p = h["entry1/laueflow"].attrs
            assert p["source_file"] == str(pf.resolve()) and int(p["source_point"]) == 3
            assert int(p["depth_index"]) == j and list(p["frame"]) == list(FRAME)
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

    # one depth file damaged: laueflow cannot tell it from someone else's file, so it refuses to
    # overwrite it; once it is removed, only that one is written again
    first.files[2].write_bytes(b"not hdf5")
    with pytest.raises(export.ExportError, match=r"\(out_272544_2\.h5\)"):
        export.export_point_detailed(pf)
    first.files[2].unlink()
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


def test_a_new_depth_grid_replaces_the_old_files(tmp_path):
    out = tmp_path / "out"
    pf = write_point_file(out, 1, _volume(1))
    old = export.export_point(pf)
    dest = old[0].parent
    grid = np.round(np.arange(0.0, 0.004, 0.001), 6)  # 4 bins, 0 to 3 um
    write_point_file(out, 1, _volume(3, n_depth=grid.size), depths_mm=grid)
    r = export.export_point_detailed(pf)
    assert r.removed == DEPTHS_MM.size - grid.size
    assert sorted(p.name for p in dest.iterdir()) == sorted(f.name for f in r.files)
    assert [f.name for f in r.files] == [f"out_272544_{j}.h5" for j in range(grid.size)]


def test_depth_files_lists_what_the_export_wrote_in_depth_order(tmp_path):
    """depth_files: the point's depth files as export_point returns them, by depth index (out_<n>_10.h5
    after out_<n>_9.h5, not after out_<n>_1.h5); temporaries and files of another point file are left
    out; no folder, no files."""
    out, grid = tmp_path / "out", np.arange(12) * 1e-3
    pf = write_point_file(out, 4, _volume(1, n_depth=grid.size), depths_mm=grid)
    assert export.depth_files(pf, 4) == []
    files = export.export_point(pf)
    assert [f.name for f in files][9:11] == ["out_272544_9.h5", "out_272544_10.h5"]
    dest = files[0].parent
    (dest / f"out_272544_12.h5{layout.TMP_MARK}77").write_bytes(b"partial")
    other = write_point_file(tmp_path / "elsewhere", 4, _volume(2, n_depth=grid.size), depths_mm=grid)
    export.export_point(other, tmp_path / "other")
    (tmp_path / "other" / "out_272544_3.h5").rename(dest / "stray.h5")
    assert export.depth_files(pf, 4) == files
    assert export.depth_files(out / ".." / "out" / pf.name, 4) == files  # the same point file


def test_a_folder_holding_other_files_is_refused_and_nothing_is_overwritten(tmp_path):
    out = tmp_path / "out"
    pf = write_point_file(out, 1, _volume(1))
    dest = export.export_point(pf)[0].parent
    foreign = dest / "out_272544_2.h5"  # same name as a depth file, written by someone else
    with h5py.File(foreign, "w") as h:
        h["x"] = 1
    before = foreign.read_bytes()
    with pytest.raises(export.ExportError, match=r"point_00001: holds files that are not this point's "
                       r"per-depth files \(out_272544_2\.h5\)"):
        export.export_point_detailed(pf, force=True)
    assert foreign.read_bytes() == before
    foreign.unlink()
    other = write_point_file(out, 2, _volume(2))  # another point's files in the same folder
    with pytest.raises(export.ExportError, match="holds files that are not this point's"):
        export.export_point(other, dest)
    assert export.export_point_detailed(pf).written == 1  # the folder as it was: only the gap refilled


def test_the_prefix_is_chosen_and_checked(tmp_path):
    pf = write_point_file(tmp_path / "out", 0, _volume(1))
    r = export.export_point_detailed(pf, tmp_path / "d", prefix="Si_film")
    assert [f.name for f in r.files][:2] == ["Si_film_0.h5", "Si_film_1.h5"]
    with pytest.raises(export.ExportError, match="file prefix '../x'"):
        export.export_point_detailed(pf, tmp_path / "e", prefix="../x")


def test_an_independent_reader_finds_the_region_at_its_detector_position(tmp_path):
    """Read as the beamline's C reader does (datasets, not attributes): every pixel of the region lies at
    its detector position, also for a frame that is itself a binned region of the detector."""
    scan = tmp_path / "scan"
    _frame_file(scan / "scan_0.h5", startx=100, binx=2)
    vol = _volume(5)
    pf = write_point_file(tmp_path / "out", 0, vol)
    r0, r1, c0, c1 = FRAME
    for j, f in enumerate(export.export_point(pf)):
        chain = ChainReader(f)
        assert chain.depth == pytest.approx(DEPTHS_MM[j] * 1000)
        assert (chain.startx, chain.endx) == (100 + 2 * c0, 100 + 2 * c1 - 1)
        assert (chain.starty, chain.endy) == (r0, r1 - 1)
        assert (chain.binx, chain.biny) == (2, 1)
        for r, c in [(r0, c0), (r1 - 1, c1 - 1), (r0 + 2, c0 + 5)]:
            # frame pixel (r, c) covers unbinned detector columns 100 + 2c and 100 + 2c + 1
            assert chain.detector_value(100 + 2 * c + 1, r) == vol[j, r - r0, c - c0]


def test_depth_files_are_valid_nexus(tmp_path):
    import silx.io.nxdata as silx_nxdata  # dev extra, loaded only here
    pf = write_point_file(tmp_path / "out", 0, _volume(1))
    with h5py.File(export.export_point(pf)[0], "r") as h:
        default = silx_nxdata.get_default(h)
        assert default is not None and default.is_valid and default.signal.name == "/entry1/data/data"


def test_export_into_a_chosen_folder_and_an_incomplete_point(tmp_path):
    pf = write_point_file(tmp_path / "out", 2, _volume(4), complete=False)
    files = export.export_point(pf, tmp_path / "elsewhere")
    assert [f.parent for f in files] == [tmp_path / "elsewhere"] * DEPTHS_MM.size
    with h5py.File(files[0], "r") as h:
        assert not bool(h["entry1/laueflow"].attrs["source_complete"])
    assert not (tmp_path / "out" / "depths").exists()


def test_a_failure_while_writing_leaves_no_partial_file(tmp_path, monkeypatch):
    pf = write_point_file(tmp_path / "out", 0, _volume(1))
    calls = {"n": 0}
    original = h5py.Group.create_group

    def failing(self, name, *args, **kwargs):
        if name == "laueflow":
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError("disk full")
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_group", failing)
    with pytest.raises(OSError, match="disk full"):
        export.export_point(pf)
    dest = tmp_path / "out" / "depths" / "point_00000"
    assert sorted(p.name for p in dest.iterdir()) == ["out_272544_0.h5", "out_272544_1.h5"]
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
        assert len(list((run_folder / "depths" / f"point_{k:05d}").glob("out_*.h5"))) == DEPTHS_MM.size
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


# ----------------------------------------------------------------------------------------------
# --format lauelab


def test_lauelab_point_files_follow_the_format(multipoint_scan, multipoint_run, tmp_path):
    """Read back with the keys of lauelab's point-format description, written out here: format and
    version, NeXus defaults, the stack and its depth link, the process groups, the detector ROI and the
    reference images (the first raw frame and the raw sum checked against the frame files)."""
    dest = tmp_path / "lauelab"
    r = _invoke("export", multipoint_run, "--format", "lauelab", "--dest", dest, "--points", "1")
    assert r.exit_code == 0, r.output
    path = dest / "point_00001.h5"
    with pointfile.PointReader(multipoint_run / "point_00001.h5") as src:
        volume, depth, (r0, r1, c0, c1) = src.volume[()], src.depth(), src.frame()
    with h5py.File(path, "r") as f:
        assert (f.attrs["format"], int(f.attrs["version"])) == ("lauelab-reconstruction-point", 2)
        assert f.attrs["default"] == "entry1" and f["entry1"].attrs["default"] == "data"
        data = f["entry1/data"]
        assert data.attrs["signal"] == "data" and list(data.attrs["axes"]) == ["depth", ".", "."]
        np.testing.assert_array_equal(data["data"][()], volume)
        assert data["depth"] == f["entry1/depth"] and f["entry1/depth"].attrs["units"] == "um"
        np.testing.assert_allclose(f["entry1/depth"][()], depth)
        rec = f["entry1/reconstruction"]
        assert rec.attrs["NX_class"] == "NXprocess" and rec["program"].asstr()[()] == "laueflow"
        for group in ("point", "settings", "execution", "geometry", "acquisition", "detector",
                      "normalization"):
            assert rec[group].attrs["NX_class"] == "NXparameters", group
        assert rec["point/complete"][()] == 1 and rec["point/manifest_index"][()] == -1
        assert rec["detector/roi_start"][()].tolist() == [c0, r0]  # (x, y): the region's detector origin
        assert rec["detector/roi_group"][()].tolist() == [1, 1]
        assert rec["detector/size"][()].tolist() == [2048, 2048]
        assert rec["acquisition/scan_number"][()] == 1 and rec["acquisition/energy_kev"][()] == 20.0
        np.testing.assert_allclose(rec["stored_depth_intensity/data"][()], volume.sum(axis=(1, 2)), rtol=1e-6)
        np.testing.assert_allclose(rec["sum_reconstructed/data"][()], volume.sum(axis=0), rtol=1e-6)
        frames = sorted(multipoint_scan.glob("scan_*.h5"), key=lambda p: int(p.stem.split("_")[1]))
        n = rec["acquisition/raw_slices"][()][1]
        mine = frames[n:2 * n]  # point 1's frame files
        with h5py.File(mine[0], "r") as first:
            np.testing.assert_array_equal(rec["first_raw/data"][()], first["entry1/data/data"][r0:r1, c0:c1])
        total = np.zeros((r1 - r0, c1 - c0), np.int64)
        for p in mine:
            with h5py.File(p, "r") as fr:
                total += fr["entry1/data/data"][r0:r1, c0:c1]
        np.testing.assert_array_equal(rec["sum_raw/data"][()], total)
        assert f["entry1/monitor/I0"][()] > 0  # the frame's header, as lauelab keeps it
        # and its detector fields describe the stored region, as every reader of entry1/detector expects
        assert [int(f[f"entry1/detector/{k}"][()]) for k in ("startx", "endx", "starty", "endy")] == \
            [c0, c1 - 1, r0, r1 - 1]
        # the format's conventions on each dataset, which lauelab's readers check
        assert rec["settings/normalization"].asstr()[()] == "monitor/I0"
        assert rec["settings/normalization"].attrs["missing"] == ""
        assert rec["acquisition/sample_position"].attrs["missing"] == "nan"
        assert rec["acquisition/sample_position"].attrs["units"] == "um"
        assert rec["point/manifest_index"].attrs["missing"] == -1
        assert (rec["detector/roi_start"].attrs["order"], rec["detector/roi_start"].attrs["binning"]) == \
            ("x,y", "unbinned")
        assert data["data"].attrs["values"] == "stored" and rec["first_raw/data"].attrs["values"] == "raw"
        assert rec["computed_depth_intensity/data"].attrs["values"] == "computed"
        assert rec["date"].asstr()[()].endswith("Z")
        assert rec["point/manifest_index"].dtype == np.dtype("<i8")
        assert rec["detector/size"].dtype == np.dtype("<i4")
    again = _invoke("export", multipoint_run, "--format", "lauelab", "--dest", dest, "--points", "1")
    assert again.exit_code == 0 and "up to date" in again.stdout
    (dest / "point_00002.h5").write_text("someone else's file")
    refused = _invoke("export", multipoint_run, "--format", "lauelab", "--dest", dest, "--points", "2")
    assert refused.exit_code == 1 and "was not written by laueflow" in refused.output
    assert (dest / "point_00002.h5").read_text() == "someone else's file"


def test_depth_files_of_the_earlier_export_format_are_replaced(tmp_path):
    """Files of laueflow's first export format (depth_<j>_<z>um.h5, provenance in entry1/provenance) of the
    same point are this export's own: replaced, not refused."""
    pf = write_point_file(tmp_path / "out", 0, _volume(1))
    dest = export.default_dest(pf, 0)
    dest.mkdir(parents=True)
    with h5py.File(dest / "depth_0000_-3.00um.h5", "w") as h:
        h.create_group("entry1/provenance").attrs.update({"source_file": str(pf.resolve()),
                                                          "source_fingerprint": "x"})
    r = export.export_point_detailed(pf)
    assert (r.written, r.removed) == (DEPTHS_MM.size, 1)
    assert sorted(p.name for p in dest.iterdir()) == sorted(f.name for f in r.files)


def test_a_moved_run_folder_keeps_its_depth_files(tmp_path):
    """The export owns a point's depth files by point file name and point number, not by absolute path:
    a run folder copied elsewhere exports again without refusing its own files."""
    pf = write_point_file(tmp_path / "out", 0, _volume(1))
    export.export_point(pf)
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "out", moved, copy_function=shutil.copy2)
    r = export.export_point_detailed(moved / pf.name)
    assert r.kept == DEPTHS_MM.size and r.written == 0
    assert export.depth_files(moved / pf.name, 0) == r.files
