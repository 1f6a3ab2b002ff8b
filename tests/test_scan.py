"""The scan reader on real (small) HDF5 files: both layouts, points, tile reads, selection, errors."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

from laueflow.config import from_dict, load
from laueflow.io.scan import MONITOR_KEY, Scan, ScanError, ScanWarning, Tile, open_scan, select_points

KEY = "/entry1/data/data"
DET = [64, 48]  # geo.detector.shape: 64 columns, 48 rows
ROWS, COLS = DET[1], DET[0]


def geo(shape: list[int] = DET) -> dict:
    """The ``geo`` section with every required key (the geometry does not matter to the reader)."""
    return {"mask": {"bitsizes": [15.0, 7.5], "thickness": 3.7,
                     "focus": {"cenx": 0.0, "dist": 1.0, "cenz": 0.0, "anglex": 0.0, "angley": 0.0,
                               "anglez": 0.0}},
            "scanner": {"step": 1.0, "axis": [1.0, 0.0, 0.0]},
            "detector": {"shape": list(shape), "size": [409.6, 409.6], "rot": [0.0, 0.0, 0.0],
                         "pos": [0.0, 0.0, 500.0]},
            "source": {"grid": [0.0, 0.1, 0.01]}}


def config(path: Path | str, **file: object):
    """A minimal valid configuration with the small test detector."""
    f = {"path": str(path), "frame": [0, ROWS, 0, COLS], "range": [0, 5, 1], **file}
    return from_dict({"file": f, "geo": geo()})


def frame(g: int) -> np.ndarray:
    """Frame number g of a scan: every pixel's value identifies frame, row and column."""
    r, c = np.mgrid[0:ROWS, 0:COLS]
    return ((g * 3000 + r * COLS + c) % 60000).astype(np.uint16)


def write_frame(file: Path, data: np.ndarray, i0: float | None = None, key: str = KEY) -> None:
    """A one-frame file like the detector writes: chunked, gzip-compressed."""
    with h5py.File(file, "w") as f:
        f.create_dataset(key, data=data, chunks=data.shape[:-2] + (16, 16), compression="gzip")
        if i0 is not None:
            f[MONITOR_KEY] = i0


def write_frames(folder: Path, n: int, prefix: str = "scan", digits: int = 0, start: int = 0,
                 i0: np.ndarray | None = None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for g in range(n):
        file = folder / f"{prefix}_{start + g:0{digits}d}.h5"
        write_frame(file, frame(g), None if i0 is None else float(i0[g]))
        files.append(file)
    return files


def write_stack(file: Path, n: int, i0: np.ndarray | None = None, data: np.ndarray | None = None) -> Path:
    file.parent.mkdir(parents=True, exist_ok=True)
    data = np.stack([frame(g) for g in range(n)]) if data is None else data
    with h5py.File(file, "w") as f:
        f.create_dataset(KEY, data=data, chunks=(1, min(16, data.shape[1]), min(16, data.shape[2])),
                         compression="gzip")
        if i0 is not None:
            f[MONITOR_KEY] = i0
    return file


def expected(positions: list[int], tile: Tile) -> np.ndarray:
    """(P, N) traces of a tile for frames at these positions, row-major pixels."""
    return np.stack([frame(g)[tile.r0:tile.r1, tile.c0:tile.c1].reshape(-1) for g in positions], axis=1)


# ----------------------------------------------------------------------------------------------
# Layouts and points


def test_frame_files_several_points(tmp_path: Path) -> None:
    write_frames(tmp_path / "run", 12)
    scan = open_scan(config(tmp_path / "run"))
    assert scan.layout == "frames" and scan.n_frames == 5 and scan.n_points == 2  # 12 files: 2 full points
    assert [f.name for f in scan.files[:3]] == ["scan_0.h5", "scan_1.h5", "scan_2.h5"]  # numeric order
    assert scan.point_frames(1) == [(scan.files[p], 0) for p in range(5, 10)]
    tile = Tile(3, 10, 20, 31)
    block = scan.read_block(1, tile)
    assert block.traces.shape == (7 * 11, 5) and block.traces.dtype == np.float32
    np.testing.assert_array_equal(block.traces, expected(list(range(5, 10)), tile))
    assert block.rows.dtype == np.int32 and block.cols.dtype == np.int32
    assert (block.rows[0], block.cols[0], block.rows[1], block.cols[-1]) == (3, 20, 3, 30)
    np.testing.assert_array_equal(block.frames, [0, 1, 2, 3, 4])
    assert "2 points x 5 frames" in scan.describe() and "scan_<n>.h5" in scan.describe()


def test_zero_padded_numbers_and_prefix_path(tmp_path: Path) -> None:
    write_frames(tmp_path / "run", 5, prefix="Ni_scan", digits=5, start=7)
    scan = open_scan(config(tmp_path / "run"))
    assert scan.files[0].name == "Ni_scan_00007.h5" and scan.numbers == list(range(7, 12))
    np.testing.assert_array_equal(scan.read_block(0, Tile(0, 2, 0, 2)).traces, expected(list(range(5)),
                                                                                      Tile(0, 2, 0, 2)))
    # a path that does not exist but names the prefix of files beside it
    via_prefix = open_scan(config(tmp_path / "run" / "Ni_scan"))
    assert via_prefix.files == scan.files and via_prefix.prefix == "Ni_scan"


def test_range_with_offset_and_step(tmp_path: Path) -> None:
    write_frames(tmp_path / "run", 20)
    scan = open_scan(config(tmp_path / "run", range=[2, 8, 2]))  # span 6, frames at +0, +2, +4
    assert scan.n_frames == 3 and scan.n_points == 3  # last point uses 14, 16, 18
    assert [f.name for f, _ in scan.point_frames(2)] == ["scan_14.h5", "scan_16.h5", "scan_18.h5"]
    tile = Tile(40, 48, 60, 64)
    block = scan.read_block(1, tile)
    np.testing.assert_array_equal(block.traces, expected([8, 10, 12], tile))
    np.testing.assert_array_equal(block.frames, [0, 2, 4])


def test_stack_file_and_stack_in_folder(tmp_path: Path) -> None:
    stack = write_stack(tmp_path / "data" / "stack.h5", 17)
    write_frame(tmp_path / "data" / "dark.h5", frame(0))  # a 2-D file beside it is ignored
    for where in (stack, tmp_path / "data"):
        scan = open_scan(config(where, stacked=False, range=[1, 6, 2]))
        assert scan.layout == "stack" and scan.path == stack and scan.files == [stack]
        assert scan.n_frames == 3 and scan.n_points == 3  # points at 1, 6, 11 (+0, 2, 4)
        assert scan.point_frames(2) == [(stack, 11), (stack, 13), (stack, 15)]
        tile = Tile(5, 9, 0, 64)
        np.testing.assert_array_equal(scan.read_block(2, tile).traces, expected([11, 13, 15], tile))
    # a file path is a stack whatever file.stacked says
    assert open_scan(config(stack, stacked=True)).layout == "stack"


def test_trailing_frames_are_named_in_one_warning(tmp_path: Path) -> None:
    """Frames after the last complete point are never read: one warning says how many."""
    write_frames(tmp_path / "run", 12)  # 2 points of 5 frames, 2 frames left over
    with pytest.warns(ScanWarning) as caught:
        scan = open_scan(config(tmp_path / "run"))
    assert len(caught) == 1 and scan.trailing_frames == 2
    assert "the last 2 of 12 frames are ignored" in str(caught[0].message)
    assert str(tmp_path / "run") in str(caught[0].message)
    stack = write_stack(tmp_path / "stack.h5", 17)  # points at 1, 6, 11; point 3 would need 16, 18, 20
    with pytest.warns(ScanWarning, match="the last 1 of 17 frames are ignored"):
        open_scan(config(stack, range=[1, 6, 2]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_scan(config(tmp_path / "run"), warn_trailing=False).n_points == 2  # a growing folder
        write_frames(tmp_path / "exact", 10)
        assert open_scan(config(tmp_path / "exact")).trailing_frames == 0
        assert open_scan(config(tmp_path / "stack.h5", range=[1, 6, 5])).trailing_frames == 0  # 1 + 3 x 5


def test_frame_file_with_leading_axis(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    for g in range(5):
        write_frame(folder / f"img_{g}.h5", frame(g)[None])
    scan = open_scan(config(folder))
    tile = Tile(1, 4, 2, 6)
    np.testing.assert_array_equal(scan.read_block(0, tile).traces, expected(list(range(5)), tile))


def test_config_relative_path(tmp_path: Path) -> None:
    write_frames(tmp_path / "beam" / "run", 5)
    cfg_file = tmp_path / "beam" / "scan.yml"
    cfg_file.write_text(f"""
file: {{path: run, frame: [0, {ROWS}, 0, {COLS}], range: [0, 5, 1]}}
geo: {json.dumps(geo())}
""")
    scan = open_scan(load(cfg_file))
    assert scan.path == tmp_path / "beam" / "run" and scan.n_points == 1


# ----------------------------------------------------------------------------------------------
# Reading only the region


def test_reads_only_the_tile_region(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_frames(tmp_path / "run", 5)
    stack = write_stack(tmp_path / "stack.h5", 5)
    requests: list[tuple[str, object]] = []
    original = h5py.Dataset.__getitem__

    def spy(self: h5py.Dataset, args: object, *rest: object, **kw: object) -> object:
        out = original(self, args, *rest, **kw)
        if self.name == KEY:
            requests.append((self.name, args))
            assert np.asarray(out).size <= 5 * 4 * 6  # never more than the tile of all frames
        return out

    tile = Tile(10, 14, 30, 36)
    for where, stacked in ((tmp_path / "run", True), (stack, False)):
        scan = open_scan(config(where, stacked=stacked))
        monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
        requests.clear()
        block = scan.read_block(0, tile)
        monkeypatch.setattr(h5py.Dataset, "__getitem__", original)
        assert block.traces.shape == (24, 5)
        assert requests, "no pixel read recorded"
        for _, args in requests:
            assert isinstance(args, tuple) and args[-2:] == (slice(10, 14), slice(30, 36))
        assert len(requests) == (5 if stacked else 1)  # one hyperslab per frame file, one for the stack


def detector_scan(folder: Path, n_frames: int, frame: list[int], chunks: tuple[int, int],
                  seed: int) -> tuple[Scan, np.ndarray]:
    """``n_frames`` gzip-compressed frames of a full 2048 x 2048 detector in ``folder`` (frame g holds
    ``big + g``), opened with region ``frame`` (geometry irrelevant); returns the scan and ``big``."""
    folder.mkdir()
    big = np.random.default_rng(seed).integers(0, 1000, (2048, 2048), dtype=np.uint16)
    for g in range(n_frames):
        with h5py.File(folder / f"{folder.name}_{g}.h5", "w") as f:
            f.create_dataset(KEY, data=big + g, chunks=chunks, compression="gzip", compression_opts=1)
    cfg = from_dict({
        "file": {"path": str(folder), "range": [0, n_frames, 1], "frame": frame},
        "geo": geo(shape=[2048, 2048]),
    })
    return open_scan(cfg), big


def test_region_of_large_compressed_frames(tmp_path: Path) -> None:
    """Frames of a 2048 x 2048 detector: a small tile reads quickly and returns just that region."""
    scan, big = detector_scan(tmp_path / "big", 3, [1000, 1010, 500, 520], chunks=(256, 256), seed=0)
    (tile,) = scan.tiles(4096)
    assert tile == Tile(1000, 1010, 500, 520)
    block = scan.read_block(0, tile)
    np.testing.assert_array_equal(block.traces[:, 2], big[1000:1010, 500:520].reshape(-1) + 2)


def test_whole_frame_chunks_are_decompressed_once_per_frame(tmp_path: Path) -> None:
    """A frame stored as one 8 MiB chunk: every open frame file gets a chunk cache that holds it, so
    reading a point tile by tile decompresses each frame once (with the default 4 MiB cache, once per
    tile)."""
    import laueflow.io.scan as S

    scan, big = detector_scan(tmp_path / "whole", 2, [0, 64, 0, 64], chunks=(2048, 2048), seed=1)
    tiles = scan.tiles(1024)
    assert len(tiles) == 4
    for tile in tiles:
        block = scan.read_block(0, tile)
        region = big[tile.r0:tile.r1, tile.c0:tile.c1].reshape(-1)
        np.testing.assert_array_equal(block.traces[:, 1], region + 1)
    assert S.MAX_CHUNK_CACHE_BYTES >= scan._chunk_cache >= 2048 * 2048 * 2
    for file, (f, _dset) in scan._handles.items():
        assert f.id.get_access_plist().get_cache()[2] == scan._chunk_cache, file


# ----------------------------------------------------------------------------------------------
# Selection and normalisation


def test_threshold_and_saturation(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    for g in range(5):
        data = np.full((ROWS, COLS), 50, np.uint16)
        data[0, 0] = 10  # below threshold
        data[0, 1] = 65535 if g == 3 else 200  # saturated in one frame
        data[0, 2] = 30 if g % 2 else 10  # mean 18: below
        data[0, 3] = 30 if g % 2 == 0 else 10  # mean 22: above
        write_frame(folder / f"s_{g}.h5", data)
    scan = open_scan(config(folder, threshold=20))
    block = scan.read_block(0, Tile(0, 1, 0, 5))
    np.testing.assert_array_equal(block.saturated, [False, True, False, False, False])
    np.testing.assert_array_equal(block.selected, [False, False, False, True, True])
    assert block.traces[1, 3] == 65535
    everything = open_scan(config(folder, threshold=0)).read_block(0, Tile(0, 1, 0, 5))
    np.testing.assert_array_equal(everything.selected, [True, False, True, True, True])


def test_monitor_normalisation(tmp_path: Path) -> None:
    i0 = np.array([1.0, 2.0, 4.0, 1.0, 2.0, 3.0, 3.0, 3.0, 3.0, 3.0])
    write_frames(tmp_path / "run", 10, i0=i0)
    stack = write_stack(tmp_path / "stack.h5", 10, i0=i0)
    tile = Tile(2, 5, 7, 9)
    for where, stacked in ((tmp_path / "run", True), (stack, False)):
        scan = open_scan(config(where, stacked=stacked))
        assert scan.has_monitor and "I0 monitor" in scan.describe()
        raw = expected(list(range(5)), tile)
        scale = i0[:5].mean() / i0[:5]  # 2.0 / I0
        np.testing.assert_allclose(scan.read_block(0, tile).traces, raw * scale[None, :], rtol=1e-6)
        # point 1 has constant I0: unchanged
        np.testing.assert_allclose(scan.read_block(1, tile).traces, expected(list(range(5, 10)), tile))
        off = open_scan(config(where, stacked=stacked, monitor=False))
        assert not off.has_monitor
        np.testing.assert_array_equal(off.read_block(0, tile).traces, raw)


# ----------------------------------------------------------------------------------------------
# Tiles, fingerprints, points, pickling


@pytest.mark.parametrize("block_pixels", [1, 7, 100, 256, 4096])
def test_tiles_cover_region_once(tmp_path: Path, block_pixels: int) -> None:
    write_frames(tmp_path / "run", 5)
    scan = open_scan(config(tmp_path / "run", frame=[3, 45, 5, 60]))
    count = np.zeros((ROWS, COLS), int)
    side = round(block_pixels ** 0.5)
    for t in scan.tiles(block_pixels):
        assert t.r1 - t.r0 <= side and t.c1 - t.c0 <= side and t.n_pixels > 0
        count[t.r0:t.r1, t.c0:t.c1] += 1
    inside = np.zeros_like(count)
    inside[3:45, 5:60] = 1
    np.testing.assert_array_equal(count, inside)


@pytest.mark.parametrize(("tile_pixels", "block_pixels", "per_side"),
                         [(100, 1, 1), (100, 100, 1), (100, 300, 2), (100, 400, 2), (64, 4096, 8)])
def test_blocks_are_squares_of_whole_tiles(tmp_path: Path, tile_pixels: int, block_pixels: int,
                                          per_side: int) -> None:
    """A block holds n x n whole tiles (n = round(block side / tile side), at least 1), the blocks cover
    the region once, and each tile lies in exactly one block, as the decoder's tiles do for any block."""
    write_frames(tmp_path / "run", 5)
    scan = open_scan(config(tmp_path / "run", frame=[3, 45, 5, 60]))
    tiles = scan.tiles(tile_pixels)
    side = round(tile_pixels ** 0.5)
    blocks = scan.blocks(tile_pixels, block_pixels)
    assert blocks[0] == Tile(3, min(3 + per_side * side, 45), 5, min(5 + per_side * side, 60))
    held = [t for b in blocks for t in scan.tiles_in(b, tile_pixels)]
    assert sorted(held, key=lambda t: (t.r0, t.c0)) == tiles  # every tile once, none split
    for b in blocks:
        inner = scan.tiles_in(b, tile_pixels)
        assert sum(t.n_pixels for t in inner) == b.n_pixels


def test_fingerprints(tmp_path: Path) -> None:
    files = write_frames(tmp_path / "run", 10)
    scan = open_scan(config(tmp_path / "run"))
    fp = scan.fingerprints(1)
    assert [d["name"] for d in fp] == [f"scan_{g}.h5" for g in range(5, 10)]
    assert all(d["size"] == files[5 + i].stat().st_size and len(d["sha256"]) == 64 for i, d in enumerate(fp))
    assert scan.fingerprints(1) == fp and len(scan.fingerprints()) == 10
    write_frame(files[7], frame(7) + 1)
    after = scan.fingerprints(1)
    assert after[2]["sha256"] != fp[2]["sha256"]
    assert [a for i, a in enumerate(after) if i != 2] == [f for i, f in enumerate(fp) if i != 2]
    stack = write_stack(tmp_path / "stack.h5", 5)
    assert [d["name"] for d in open_scan(config(stack, stacked=False)).fingerprints(0)] == ["stack.h5"]


def test_fingerprint_covers_the_end_of_large_files(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (3 << 20))
    write_frames(tmp_path / "run", 5)
    scan = open_scan(config(tmp_path / "run"))
    scan.files[0] = big
    before = scan.fingerprints(0)[0]["sha256"]
    with open(big, "r+b") as fh:
        fh.seek((3 << 20) - 10)
        fh.write(b"x")
    assert scan.fingerprints(0)[0]["sha256"] != before


def test_select_points() -> None:
    assert select_points(None, 4) == [0, 1, 2, 3]
    assert select_points("all", 3) == [0, 1, 2]
    assert select_points("3:7", 10) == [3, 4, 5, 6]
    assert select_points(":2", 10) == [0, 1]
    assert select_points("::3", 7) == [0, 3, 6]
    assert select_points("5", 10) == [5]
    assert select_points("-1", 10) == [9]
    assert select_points("0, 2,4", 10) == [0, 2, 4]
    for spec, words in (("10", "point 10 is out of range"), ("3:12", "12 is out of range"),
                        ("0,2,9", "point 9"), ("a", "'a' is not an integer"), ("5:5", "selects no point"),
                        ("", "empty"), ("::0", "step")):
        with pytest.raises(ScanError, match=words):
            select_points(spec, 8)



def test_select_points_among_known_points() -> None:
    """The same rules for a run's points (laueflow export --points): numbers name points, slices take
    the points that exist, lists may hold slices."""
    run = [0, 2, 4, 5]
    assert select_points(None, run) == run and select_points("all", run) == run
    assert select_points("2:5", run) == [2, 4]
    assert select_points(":", run) == run and select_points("-1", run) == [5]
    assert select_points("5,0:3", run) == [5, 0, 2]
    assert select_points("0:3,7", 10) == [0, 1, 2, 7]
    with pytest.raises(ScanError, match=r"point 3 is out of range, this run has points 0, 2, 4, 5"):
        select_points("0,3", run, "this run")
    with pytest.raises(ScanError, match="selects no point of this run"):
        select_points("3:4", run, "this run")


def test_pickle_round_trip(tmp_path: Path) -> None:
    write_frames(tmp_path / "run", 5)
    scan = open_scan(config(tmp_path / "run"))
    tile = Tile(0, 4, 0, 4)
    first = scan.read_block(0, tile)  # opens (and caches) the files
    again = pickle.loads(pickle.dumps(scan))
    np.testing.assert_array_equal(again.read_block(0, tile).traces, first.traces)
    scan.close()
    np.testing.assert_array_equal(scan.read_block(0, tile).traces, first.traces)


def test_check_later(tmp_path: Path) -> None:
    files = write_frames(tmp_path / "run", 10)
    files[7].write_bytes(b"not hdf5")
    with pytest.raises(ScanError, match="scan_7.h5"):
        open_scan(config(tmp_path / "run"))
    scan = open_scan(config(tmp_path / "run"), check=False)
    scan.read_block(0, Tile(0, 2, 0, 2))  # point 0 is fine
    with pytest.raises(ScanError, match="scan_7.h5: not a readable HDF5 file"):
        scan.read_block(1, Tile(0, 2, 0, 2))


# ----------------------------------------------------------------------------------------------
# Bad input: every message names the file or folder and the problem


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ScanError, match=r"nowhere: scan data does not exist"):
        open_scan(config(tmp_path / "nowhere"))


def test_no_matching_files(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("x")
    write_frame(tmp_path / "run" / "scan_0.tif", frame(0))
    with pytest.raises(ScanError, match=r"run: no frame files named <prefix>_<n>\.h5"):
        open_scan(config(tmp_path / "run"))
    with pytest.raises(ScanError, match=r"run: no \*\.h5 file"):
        open_scan(config(tmp_path / "run", stacked=False))


def test_gap_in_numbering(tmp_path: Path) -> None:
    files = write_frames(tmp_path / "run", 12)
    files[4].unlink()
    files[9].unlink()
    with pytest.raises(ScanError, match=r"run: gap in the frame numbering of scan_<n>\.h5: missing 4, 9"):
        open_scan(config(tmp_path / "run"))


def test_duplicate_numbers(tmp_path: Path) -> None:
    write_frames(tmp_path / "run", 5)
    write_frame(tmp_path / "run" / "scan_03.h5", frame(3))
    with pytest.raises(ScanError, match=r"scan_0?3\.h5 and scan_0?3\.h5 have the same frame number 3"):
        open_scan(config(tmp_path / "run"))


def test_several_prefixes(tmp_path: Path) -> None:
    write_frames(tmp_path / "run", 5, prefix="scan")
    write_frames(tmp_path / "run", 5, prefix="dark")
    with pytest.raises(ScanError, match=r"run: frame files with several prefixes: dark, scan"):
        open_scan(config(tmp_path / "run"))
    assert open_scan(config(tmp_path / "run" / "dark")).prefix == "dark"
    write_frames(tmp_path / "scan", 5, prefix="scan")
    write_frames(tmp_path / "scan", 5, prefix="dark")
    assert open_scan(config(tmp_path / "scan")).prefix == "scan"  # the folder's name picks the prefix


def test_too_few_frames(tmp_path: Path) -> None:
    write_frames(tmp_path / "run", 4)
    with pytest.raises(ScanError, match=r"scan_<n>\.h5: too few frames for one scan point: 4 frames.*"
                                        r"needs 5"):
        open_scan(config(tmp_path / "run"))
    stack = write_stack(tmp_path / "stack.h5", 6)
    with pytest.raises(ScanError, match=r"stack\.h5: too few frames.*6 frames.*needs 7"):
        open_scan(config(stack, range=[2, 7, 1]))


def test_point_out_of_range(tmp_path: Path) -> None:
    write_frames(tmp_path / "run", 12)
    scan = open_scan(config(tmp_path / "run"))
    with pytest.raises(ScanError, match=r"run/scan_<n>\.h5: point 2 is out of range: the scan holds "
                                        r"2 complete"):
        scan.read_block(2, Tile(0, 1, 0, 1))
    with pytest.raises(ScanError, match=r"point -1 is out of range"):
        scan.point_frames(-1)
    with pytest.raises(ScanError, match=r"tile .* outside the 48 x 64 frames"):
        scan.read_block(0, Tile(0, 49, 0, 1))


def test_wrong_frame_shape(tmp_path: Path) -> None:
    files = write_frames(tmp_path / "run", 5)
    write_frame(files[3], np.zeros((COLS, ROWS), np.uint16))  # transposed
    with pytest.raises(ScanError, match=r"scan_3\.h5: frame shape \[64, 48\] .* expected \[rows, cols\] = "
                                        r"\[48, 64\] \(geo.detector.shape \[64, 48\]\)"):
        open_scan(config(tmp_path / "run"))
    stack = write_stack(tmp_path / "stack.h5", 5, data=np.zeros((5, 10, 10), np.uint16))
    with pytest.raises(ScanError, match=r"stack\.h5: frame shape \[10, 10\]"):
        open_scan(config(stack))
    write_frame(files[3], np.zeros((2, ROWS, COLS), np.uint16))
    with pytest.raises(ScanError, match=r"scan_3\.h5: dataset /entry1/data/data holds 2 frames"):
        open_scan(config(tmp_path / "run"))
    write_frame(files[3], frame(3))
    with pytest.raises(ScanError, match=r"scan_0\.h5: dataset /entry1/data/data has shape \[48, 64\], "
                                        r"expected a stack"):
        open_scan(config(files[0]))


def test_wrong_dtype(tmp_path: Path) -> None:
    files = write_frames(tmp_path / "run", 5)
    write_frame(files[2], frame(2).astype(np.float32))
    with pytest.raises(ScanError, match=r"scan_2\.h5: dataset /entry1/data/data has dtype float32, "
                                        r"expected uint16"):
        open_scan(config(tmp_path / "run"))
    stack = write_stack(tmp_path / "stack.h5", 5, data=np.zeros((5, ROWS, COLS), np.int32))
    with pytest.raises(ScanError, match=r"stack\.h5: .* dtype int32"):
        open_scan(config(stack))


def test_truncated_and_garbage_files(tmp_path: Path) -> None:
    files = write_frames(tmp_path / "run", 5)
    size = files[1].stat().st_size
    with open(files[1], "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(ScanError, match=r"scan_1\.h5: not a readable HDF5 file \(truncated or corrupt\?\)"):
        open_scan(config(tmp_path / "run"))
    files[1].write_bytes(np.random.default_rng(1).bytes(5000))
    with pytest.raises(ScanError, match=r"scan_1\.h5: not a readable HDF5 file"):
        open_scan(config(tmp_path / "run"))
    files[1].write_bytes(b"")
    with pytest.raises(ScanError, match=r"scan_1\.h5: not a readable HDF5 file"):
        open_scan(config(tmp_path / "run"))
    stack = write_stack(tmp_path / "stack.h5", 5)
    with open(stack, "r+b") as fh:
        fh.truncate(stack.stat().st_size - 100)
    with pytest.raises(ScanError, match=r"stack\.h5: not a readable HDF5 file"):
        open_scan(config(stack))


def test_corrupt_pixel_data(tmp_path: Path) -> None:
    """A file whose header is fine but whose compressed pixels are garbage fails at read time."""
    files = write_frames(tmp_path / "run", 5)
    with h5py.File(files[2], "r") as f:
        info = f[KEY].id.get_chunk_info(0)
    with open(files[2], "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(b"\xff" * info.size)
    scan = open_scan(config(tmp_path / "run"))
    with pytest.raises(ScanError, match=r"scan_2\.h5: cannot read frame pixels"):
        scan.read_block(0, Tile(0, 4, 0, 4))


def test_missing_dataset_key(tmp_path: Path) -> None:
    files = write_frames(tmp_path / "run", 5)
    write_frame(files[4], frame(4), key="/entry1/data/other")
    with pytest.raises(ScanError, match=r"scan_4\.h5: no dataset /entry1/data/data in the file"):
        open_scan(config(tmp_path / "run"))
    with pytest.raises(ScanError, match=r"scan_0\.h5: no dataset /entry/image in the file"):
        open_scan(config(tmp_path / "run", h5={"key": "/entry/image"}))
    with pytest.raises(ScanError, match=r"scan_0\.h5: /entry1/data is a group, not a dataset"):
        open_scan(config(tmp_path / "run", h5={"key": "/entry1/data"}))
    write_stack(tmp_path / "data" / "stack.h5", 5)
    with pytest.raises(ScanError, match=r"data: no file holds a 3-D dataset /entry/image: "
                                        r"stack\.h5 \(no dataset\)"):
        open_scan(config(tmp_path / "data", stacked=False, h5={"key": "/entry/image"}))
    write_stack(tmp_path / "data" / "second.h5", 5)
    with pytest.raises(ScanError, match=r"data: several stack files .*: second\.h5, stack\.h5"):
        open_scan(config(tmp_path / "data", stacked=False))


def test_bad_monitor(tmp_path: Path) -> None:
    i0 = np.ones(5)
    files = write_frames(tmp_path / "run", 5, i0=i0)
    write_frame(files[3], frame(3), i0=0.0)
    with pytest.raises(ScanError, match=r"scan_3\.h5: monitor /entry1/monitor/I0 is 0; it must be > 0"):
        open_scan(config(tmp_path / "run"))
    assert not open_scan(config(tmp_path / "run", monitor=False)).has_monitor
    write_frame(files[3], frame(3))  # no monitor in this one file
    with pytest.raises(ScanError, match=r"scan_3\.h5: has no monitor /entry1/monitor/I0 while "
                                        r"scan_0\.h5 has one"):
        open_scan(config(tmp_path / "run"))
    stack = write_stack(tmp_path / "stack.h5", 5, i0=np.ones(4))
    with pytest.raises(ScanError, match=r"stack\.h5: monitor /entry1/monitor/I0 holds 4 values, expected 5"):
        open_scan(config(stack))
