"""Point files and block files: atomic writing, the exact HDF5 layout, provenance."""

from __future__ import annotations

import os
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from laueflow import __version__, provenance
from laueflow.errors import ResultError
from laueflow.io import atomic, layout, pointfile
from laueflow.io import blocks as block_files

FRAME = (10, 18, 20, 28)  # 8 x 8 region
DEPTHS_MM = np.array([-0.002, -0.001, 0.0, 0.001, 0.002])
INPUTS = [{"name": "scan_0.h5", "size": 1234, "sha256": "ab" * 32},
          {"name": "scan_1.h5", "size": 1240, "sha256": "cd" * 32}]


def _decoded(rows, cols, n_depth=DEPTHS_MM.size, seed=0):
    rng = np.random.default_rng(seed)
    n = len(rows)
    return SimpleNamespace(
        rows=np.asarray(rows, np.int32), cols=np.asarray(cols, np.int32),
        profiles=rng.uniform(1, 2, (n, n_depth)).astype(np.float32),
        background=rng.uniform(40, 60, n).astype(np.float32), residual=np.ones(n, np.float32),
        quality=np.arange(n, dtype=np.uint8) % 2, energy=np.full(n, np.nan, np.float32),
        energy_sigma=np.full(n, np.nan, np.float32))


def _provenance(**extra):
    return provenance.build(config_yaml="file:\n  path: .\n", config_fingerprint="0123456789abcdef",
                            inputs=INPUTS, start_time=provenance.now(), command="laueflow run scan",
                            point=3, **extra)


@pytest.fixture
def blocks(tmp_path):
    """Two decoded tiles (top-left with 3 pixels, top-right with 2) and one empty (skipped) tile."""
    a = _decoded([10, 11, 13], [20, 21, 23], seed=1)
    b = _decoded([10, 12], [24, 27], seed=2)
    paths = [tmp_path / "blocks" / f"b{i}.npz" for i in range(3)]
    common = {"point": 3, "config_fingerprint": "fp", "input_fingerprint": "in", "n_depths": 5}
    block_files.write_block(paths[0], tile=(10, 14, 20, 24), decoded=a, saturated=([12], [22]), **common)
    block_files.write_block(paths[1], tile=(10, 14, 24, 28), decoded=b, **common)
    block_files.write_block(paths[2], tile=(14, 18, 20, 24), skipped="all traces are zero", **common)
    return paths, (a, b)


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


def test_atomic_h5_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "point_00000.h5"
    with pytest.raises(RuntimeError), atomic.atomic_h5(target) as f:
        f["x"] = np.arange(10)
        raise RuntimeError("killed while writing")
    assert not target.exists()
    assert _leftovers(tmp_path) == []


def test_atomic_h5_replaces_whole_file(tmp_path):
    target = tmp_path / "out.h5"
    with atomic.atomic_h5(target) as f:
        f["x"] = np.arange(3)
        assert not target.exists()  # only the temporary file exists while writing
        assert _leftovers(tmp_path) == [f"out.h5.tmp-{os.getpid()}"]
    with h5py.File(target) as f:
        assert f["x"][()].tolist() == [0, 1, 2]
    assert _leftovers(tmp_path) == []


def test_write_point_failure_keeps_previous_file(tmp_path, blocks):
    paths, _ = blocks
    out = tmp_path / "point_00003.h5"
    pointfile.write_point(out, paths, frame=FRAME, depths_mm=DEPTHS_MM, provenance=_provenance())
    before = out.read_bytes()
    broken = tmp_path / "blocks" / "broken.npz"
    broken.write_bytes(b"not a block")
    with pytest.raises(Exception):  # noqa: B017 - any error while stitching
        pointfile.write_point(out, [paths[0], broken], frame=FRAME, depths_mm=DEPTHS_MM,
                            provenance=_provenance())
    assert out.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_block_file_roundtrip(blocks):
    paths, (a, _) = blocks
    meta = block_files.read_block_meta(paths[0])
    assert meta == {"point": 3, "tile": (10, 14, 20, 24), "config_fingerprint": "fp",
                    "input_fingerprint": "in", "skipped": "", "host": "", "seconds": 0.0, "n_pixels": 3}
    b = block_files.read_block(paths[0])
    np.testing.assert_array_equal(b.profiles, a.profiles)
    np.testing.assert_array_equal(b.fields["quality"], a.quality)
    assert block_files.read_block_meta(paths[2])["skipped"] == "all traces are zero"
    assert block_files.read_block(paths[2]).profiles.shape == (0, 5)


def test_block_files_store_only_pixels_with_signal(tmp_path):
    """Most decoded pixels have no signal: their zero profiles are not written, and come back as zeros."""
    rows, cols = np.divmod(np.arange(1000), 40)
    d = _decoded(rows, cols, n_depth=300)
    d.profiles[np.arange(1000) % 10 != 0] = 0  # signal in one pixel of ten
    sparse, dense = tmp_path / "sparse.npz", tmp_path / "dense.npz"
    block_files.write_block(sparse, point=0, tile=(0, 25, 0, 40), config_fingerprint="fp", n_depths=300,
                        decoded=d)
    b = block_files.read_block(sparse)
    np.testing.assert_array_equal(b.profiles, d.profiles)
    np.testing.assert_array_equal(b.rows, rows)
    assert b.profiles.dtype == np.float32 and block_files.read_block_meta(sparse)["n_pixels"] == 1000
    np.savez(dense, profiles=d.profiles)
    assert sparse.stat().st_size < 0.2 * dense.stat().st_size


def test_block_files_of_another_format_are_not_reused(tmp_path, blocks):
    paths, _ = blocks
    with np.load(paths[0]) as z:
        old = {k: z[k] for k in z.files}
    old["format"] = np.array(1)
    np.savez(tmp_path / "old.npz", **old)
    assert block_files.read_block_meta(tmp_path / "old.npz") is None  # a rerun decodes the block again


def test_point_file_layout(tmp_path, blocks):
    paths, (a, b) = blocks
    out = tmp_path / layout.point_name(3)
    assert out.name == "point_00003.h5"
    summary = pointfile.write_point(out, paths, frame=FRAME, depths_mm=DEPTHS_MM, provenance=_provenance())
    assert summary["n_pixels"] == 5 and summary["complete"]
    with h5py.File(out, "r") as f:
        assert f.attrs["NX_class"] == "NXroot" and f.attrs["default"] == "entry"
        assert f.attrs[pointfile.FORMAT_ATTR] == pointfile.POINT_FORMAT
        assert f["entry"].attrs["NX_class"] == "NXentry" and f["entry"].attrs["default"] == "reconstruction"
        rec = f["/entry/reconstruction"]
        assert set(rec) == {"depth", "row", "col", "volume"}
        assert rec.attrs["NX_class"] == "NXdata" and rec.attrs["signal"] == "volume"
        assert list(rec.attrs["axes"]) == ["depth", "row", "col"]
        np.testing.assert_allclose(rec["depth"][()], [-2.0, -1.0, 0.0, 1.0, 2.0])
        assert rec["depth"].attrs["units"] == "um"
        assert rec["row"][()].tolist() == list(range(10, 18)) and rec["row"].attrs["units"] == "pixel"
        assert rec["col"][()].tolist() == list(range(20, 28)) and rec["col"].attrs["units"] == "pixel"
        vol = rec["volume"]
        assert vol.shape == (5, 8, 8) and vol.dtype == np.float32 and vol.attrs["units"] == "counts"
        assert vol.chunks is not None and vol.compression in ("gzip", "lzf")
        assert list(vol.attrs["frame"]) == list(FRAME)
        v = vol[()]
        expected = np.zeros((5, 8, 8), np.float32)
        for d in (a, b):
            expected[:, d.rows - FRAME[0], d.cols - FRAME[2]] = d.profiles.T
        np.testing.assert_array_equal(v, expected)
        assert np.count_nonzero(v.sum(axis=0)) == 5  # not-reconstructed pixels are 0
        ivd = f["entry/intensity_vs_depth"]
        assert ivd.attrs["signal"] == "intensity" and ivd["intensity"].attrs["units"] == "counts"
        np.testing.assert_allclose(ivd["intensity"][()], expected.sum(axis=(1, 2)), rtol=1e-6)
        assert ivd["depth"] == rec["depth"]  # a hard link, not a copy
        pix = f["entry/diagnostics"]
        assert pix.attrs["NX_class"] == "NXcollection"
        assert set(pix) == {"index", "background", "residual", "quality", "energy", "energy_sigma",
                            "quality_flags"}
        index = pix["index"][()]
        assert index.shape == (5, 2)
        rows, cols = np.concatenate([a.rows, b.rows]), np.concatenate([a.cols, b.cols])
        order = np.lexsort((cols, rows))  # the pixels row by row, whatever the blocks
        assert index.tolist() == np.stack([rows[order], cols[order]], axis=1).tolist()
        background = np.concatenate([a.background, b.background])[order]
        np.testing.assert_array_equal(pix["background"][()], background)
        assert pix["quality"].dtype == np.uint8
        for name in ("background", "residual", "quality", "energy", "energy_sigma"):
            assert pix[name].shape == (5,)
        units = {"background": "counts", "residual": "1", "energy": "keV", "energy_sigma": "keV"}
        assert {k: pix[k].attrs["units"] for k in units} == units
        # the quality bits and pixel states are defined in the file, as CF flags and as a table
        assert list(pix["quality"].attrs["flag_masks"]) == [1, 2, 4, 8, 16]
        assert pix["quality"].attrs["flag_meanings"].split()[0] == "no_signal"
        table = pix["quality_flags"][()]
        assert [int(v) for v in table["value"]] == [1, 2, 4, 8, 16]
        assert table["name"][3].decode() == "poor_fit" and b"chi-square" in table["meaning"][3]
        state = f["entry/pixel_state/state"][()]
        assert state.shape == (8, 8)
        assert list(f["entry/pixel_state/state"].attrs["flag_values"]) == [0, 1, 2, 3]
        expected_state = np.full((8, 8), pointfile.PIXEL_NO_BLOCK)  # the tile (14:18, 24:28) has no block
        expected_state[0:4, 0:8] = pointfile.PIXEL_NOT_SELECTED
        expected_state[4:8, 0:4] = pointfile.PIXEL_NOT_SELECTED
        expected_state[index[:, 0] - FRAME[0], index[:, 1] - FRAME[2]] = pointfile.PIXEL_DECODED
        expected_state[12 - FRAME[0], 22 - FRAME[2]] = pointfile.PIXEL_SATURATED
        np.testing.assert_array_equal(state, expected_state)
        assert f["entry/provenance"].attrs["NX_class"] == "NXprocess"
        assert f["entry/provenance/program"].asstr()[()] == "laueflow"


def test_point_files_open_in_nexus_viewers(tmp_path, blocks):
    """silx and nexusformat find the volume as the default plot, with depth, row and column axes."""
    import nexusformat.nexus as nexus  # dev extra: here, so the other tests do not wait for them to load
    import silx.io.nxdata as silx_nxdata
    paths, _ = blocks
    out = tmp_path / "point_00003.h5"
    pointfile.write_point(out, paths, frame=FRAME, depths_mm=DEPTHS_MM, provenance=_provenance())
    with h5py.File(out, "r") as f:
        default = silx_nxdata.get_default(f)
        assert default is not None and default.is_valid
        assert default.signal.name == "/entry/reconstruction/volume"
        assert [ax.name.rpartition("/")[2] for ax in default.axes] == ["depth", "row", "col"]
        assert silx_nxdata.is_valid_nxdata(f["entry/intensity_vs_depth"])
        assert silx_nxdata.is_valid_nxdata(f["entry/pixel_state"])
    root = nexus.nxload(str(out), "r")
    try:
        plot = root.plottable_data
        assert plot.nxpath == "/entry/reconstruction"
        assert plot.nxsignal.shape == (5, 8, 8)
        assert [ax.nxname for ax in plot.nxaxes] == ["depth", "row", "col"]
        assert str(plot.nxaxes[0].attrs["units"]) == "um"
    finally:
        root.nxfile.close()


def test_the_frame_header_is_kept(tmp_path, blocks):
    """The header of the point's first frame (datasets and attributes, not the image) is copied."""
    paths, _ = blocks
    frame_file = tmp_path / "scan_0.h5"
    with h5py.File(frame_file, "w") as f:
        f.attrs["file_name"] = "scan_0.h5"
        f["entry1/data/data"] = np.zeros((4, 4), np.uint16)
        f["entry1/detector/startx"] = 0
        f["entry1/sample/incident_energy"] = 20.0
        f["entry1/sample/incident_energy"].attrs["units"] = "keV"
        f["entry1/scanNum"] = 272544
    out = tmp_path / "point_00003.h5"
    pointfile.write_point(out, paths, frame=FRAME, depths_mm=DEPTHS_MM, provenance=_provenance(),
                          header=(frame_file, "/entry1/data/data"))
    with pointfile.PointReader(out) as r:
        acq = r.acquisition()
        assert acq.attrs["file_name"] == "scan_0.h5" and acq.attrs["source_file"] == str(frame_file)
        assert "data" not in acq["entry1/data"]  # the image is not copied
        assert acq["entry1/detector/startx"][()] == 0 and acq["entry1/scanNum"][()] == 272544
        assert acq["entry1/sample/incident_energy"].attrs["units"] == "keV"


def test_older_point_files_are_refused_by_name(tmp_path, blocks):
    paths, _ = blocks
    old = tmp_path / "point_00003.h5"
    pointfile.write_point(old, paths, frame=FRAME, depths_mm=DEPTHS_MM, provenance=_provenance())
    with h5py.File(old, "a") as f:
        del f.attrs[pointfile.FORMAT_ATTR]  # as laueflow wrote them before format 2
    with pytest.raises(ResultError, match=r"point_00003\.h5: a point file of an older laueflow format"):
        pointfile.PointReader(old)
    with pytest.raises(ResultError, match="older laueflow format"):
        pointfile.verify(old)  # a rerun recomputes it
    assert pointfile.read_provenance(old) is None
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = 1
    with pytest.raises(ResultError, match="not a laueflow point file"):
        pointfile.PointReader(other)


def test_provenance_contents(tmp_path, blocks):
    paths, _ = blocks
    out = tmp_path / "p.h5"
    pointfile.write_point(out, paths, frame=FRAME, depths_mm=DEPTHS_MM,
                        provenance=_provenance(scan="/data/scan"))
    with h5py.File(out, "r") as f:
        g = f["/entry/provenance"]
        assert g.attrs["laueflow_version"] == __version__
        assert g.attrs["command_line"] == "laueflow run scan"
        assert g.attrs["host"]
        assert g.attrs["start_time"] <= g.attrs["end_time"]
        assert g.attrs["config_fingerprint"] == "0123456789abcdef"
        assert g.attrs["input_fingerprint"] == provenance.input_fingerprint(INPUTS)
        assert g.attrs["scan"] == "/data/scan"
        assert g["configuration/data"].asstr()[()] == "file:\n  path: .\n"
        assert g["configuration"].attrs["NX_class"] == "NXnote"
        assert list(g["inputs/name"].asstr()[()]) == ["scan_0.h5", "scan_1.h5"]
        assert list(g["inputs/size"][()]) == [1234, 1240]
        assert list(g["inputs/sha256"].asstr()[()]) == ["ab" * 32, "cd" * 32]
    back = pointfile.read_provenance(out)
    assert back["complete"] is True and back["point"] == 3 and back["inputs"] == INPUTS
    summary = pointfile.point_summary(out)
    assert summary["n_pixels"] == 5 and summary["depth_range_um"] is not None


def test_input_fingerprint_sees_changes():
    changed = [dict(INPUTS[0]), dict(INPUTS[1], size=9999)]
    assert provenance.input_fingerprint(INPUTS) == provenance.input_fingerprint([dict(f) for f in INPUTS])
    assert provenance.input_fingerprint(INPUTS) != provenance.input_fingerprint(changed)


def test_incomplete_point_is_marked(tmp_path, blocks):
    paths, _ = blocks
    out = tmp_path / "p.h5"
    pointfile.write_point(out, paths[:1], frame=FRAME, depths_mm=DEPTHS_MM, provenance=_provenance(),
                        complete=False)
    assert pointfile.read_provenance(out)["complete"] is False
    assert pointfile.read_provenance(tmp_path / "missing.h5") is None


def test_signal_range():
    depth = np.arange(10.0)
    assert pointfile.signal_range(depth, np.zeros(10)) is None
    intensity = np.ones(10)
    intensity[3:6] = [5, 10, 5]
    assert pointfile.signal_range(depth, intensity) == (3.0, 5.0)


def test_point_file_checksum_finds_damage_in_place(tmp_path, blocks):
    """4 KB overwritten anywhere in a point file (same size): either the checksum check fails naming the
    file, or the file still reads exactly as written (the bytes held no data)."""
    paths, _ = blocks
    out = tmp_path / "point_00003.h5"
    pointfile.write_point(out, paths, frame=FRAME, depths_mm=DEPTHS_MM, provenance=_provenance())
    pointfile.verify(out)
    original = out.read_bytes()

    def everything(path):
        with h5py.File(path, "r") as f:
            found = {}
            f.visititems(lambda n, o: found.update({n: o[()]}) if isinstance(o, h5py.Dataset) else None)
            return found

    expected = everything(out)
    caught = 0
    for offset in range(0, len(original) - 4096, 1024):
        damaged = tmp_path / "damaged.h5"
        damaged.write_bytes(original[:offset] + b"\xa5" * 4096 + original[offset + 4096:])
        try:
            pointfile.verify(damaged)
        except ResultError as exc:
            assert str(damaged) in str(exc)
            caught += 1
            continue
        got = everything(damaged)
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            np.testing.assert_array_equal(got[name], value)
    assert caught > 0
