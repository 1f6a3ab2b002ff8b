"""The whole task graph on a small simulated multipoint scan: HighThroughputExecutor on loopback, threads."""

from __future__ import annotations

import copy
import json
import os
import pickle
import re
import shutil
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import parsl
import pytest
import yaml
from click.testing import CliRunner
from conftest import use_tiles

import laueflow.decode as D
from laueflow import sites
from laueflow.cli import main
from laueflow.config import load
from laueflow.errors import ResultError
from laueflow.io import blocks, layout
from laueflow.simulate import simulate
from laueflow.workflow import Driver, RunError, RunOptions, run
from laueflow.workflow import tasks as T
from laueflow.workflow.hooks import RunHooks
from laueflow.workflow.outcomes import StitchRequest
from laueflow.workflow.resume import ResumeWarning, reusable_blocks
from laueflow.workflow.status import load_status

REGION = 16
BLOCK = 64  # 8 x 8 tiles: 4 tasks per point


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sim") / "scan"
    simulate(folder, preset="multipoint", points=3, region=REGION, seed=3)
    use_tiles(folder, BLOCK)
    return folder


def _site(name: str, out: Path, workers: int = 2):
    return sites.site_config(name, workers=workers, run_dir=str(out / ".runinfo"))


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (to find leftover Parsl workers)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(cmd)
    return found


def check_point_file(path: Path, cfg, point: int) -> None:
    """The exact point-file layout."""
    r0, r1, c0, c1 = cfg.file.frame
    depths_um = cfg.geo.source.depths * 1000.0
    with h5py.File(path, "r") as f:
        assert set(f) == {"entry"} and f.attrs["default"] == "entry"
        assert set(f["entry"]) == {"reconstruction", "intensity_vs_depth", "pixel_state", "diagnostics",
                                   "acquisition", "provenance"}
        rec = f["entry/reconstruction"]
        assert set(rec) == {"depth", "row", "col", "volume"}
        np.testing.assert_allclose(rec["depth"][()], depths_um, atol=1e-6)
        vol = rec["volume"]
        assert vol.shape == (depths_um.size, r1 - r0, c1 - c0) and vol.dtype == np.float32
        assert vol.chunks is not None and vol.compression in ("gzip", "lzf")
        assert list(vol.attrs["frame"]) == [r0, r1, c0, c1]
        v = vol[()]
        assert np.isfinite(v).all() and v.max() > 0
        np.testing.assert_allclose(f["entry/intensity_vs_depth/intensity"][()], v.sum(axis=(1, 2)),
                                   rtol=1e-4, atol=1e-3)
        pix = f["entry/diagnostics"]
        assert set(pix) == {"index", "background", "residual", "quality", "energy", "energy_sigma",
                            "quality_flags"}
        index = pix["index"][()]
        n = index.shape[0]
        assert index.shape == (n, 2) and 0 < n <= (r1 - r0) * (c1 - c0)
        assert ((index[:, 0] >= r0) & (index[:, 0] < r1) & (index[:, 1] >= c0) & (index[:, 1] < c1)).all()
        for name in ("background", "residual", "quality", "energy", "energy_sigma"):
            assert pix[name].shape == (n,)
        outside = np.ones((r1 - r0, c1 - c0), bool)
        outside[index[:, 0] - r0, index[:, 1] - c0] = False
        assert not v[:, outside].any()  # pixels not reconstructed are 0
        prov = f["entry/provenance"]
        assert prov.attrs["point"] == point
        assert prov.attrs["config_fingerprint"] == cfg.fingerprint()
        assert len(prov.attrs["input_fingerprint"]) == 16
        assert prov["inputs/name"].shape == (cfg.file.n_frames,)
        stored = yaml.safe_load(prov["configuration/data"].asstr()[()])
        assert stored["geo"]["source"]["grid"] == list(cfg.geo.source.grid)
        for key in ("laueflow_version", "command_line", "host", "start_time", "end_time"):
            assert prov.attrs[key]


class Recorder(RunHooks):
    """A hook that notes every call the driver makes."""

    def __init__(self) -> None:
        self.events, self.points, self.ticks, self.finished = [], [], 0, []

    def on_event(self, event):
        self.events.append(event)

    def on_point_done(self, result):
        self.points.append(result.point)

    def tick(self):
        self.ticks += 1

    def status_section(self):
        return {"recorder": {"points": len(self.points)}}

    def on_finish(self, result):
        self.finished.append(result)


def test_htex_on_loopback_and_resume(scan, tmp_path):
    """The whole graph on the real HighThroughputExecutor (configs/local.py, 2 workers); a rerun keeps all."""
    cfg = load(scan / "config.yaml")
    out = tmp_path / "recon"
    events = []
    hook = Recorder()
    result = run(scan, cfg, out, block_pixels=BLOCK, site_config=_site("local", out), progress=events.append,
                 hooks=[hook])
    assert result.exit_code == 0, [p.line() for p in result.points]
    assert [p.point for p in result.points] == [0, 1, 2]
    assert all(p.status == "done" for p in result.points)
    written = sorted(p.name for p in out.iterdir() if p.suffix == ".h5")
    assert written == [layout.point_name(k) for k in range(3)]
    assert not (out / ".blocks").exists()  # blocks of finished points are removed
    for k in range(3):
        check_point_file(out / layout.point_name(k), cfg, k)
    assert events[0].kind == "start" and events[0].blocks_total == 12
    assert [e.blocks_done for e in events if e.kind == "block"][-1] == 12
    assert sorted(e.result.point for e in events if e.kind == "point") == [0, 1, 2]
    # hooks see the same events, each point once it ended, the ticks, and the end after the unlock
    assert hook.events == events and sorted(hook.points) == [0, 1, 2] and hook.ticks >= 1
    assert hook.finished == [result]
    # status.json read as its record: the hook's section travels in extra, and nothing else is lost
    record, note = load_status(out)
    assert note == "" and record.extra == {"recorder": {"points": 3}}
    assert record.state == "finished" and record.totals.points_done == record.totals.points_computed == 3
    assert [(k, p.state, p.file) for k, p in record.points.items()] == [
        (k, "done", layout.point_name(k)) for k in range(3)]
    assert json.dumps(record.to_json(), indent=1) == (out / "status.json").read_text()
    deadline = time.time() + 20  # the executor's worker pool and interchange must be gone
    while _processes_mentioning(str(out)) and time.time() < deadline:
        time.sleep(0.5)
    assert _processes_mentioning(str(out)) == []

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("point_*.h5")}
    again = run(scan, cfg, out, block_pixels=BLOCK, site_config=_site("local", out))
    assert again.exit_code == 0
    assert [p.status for p in again.points] == ["resumed"] * 3
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("point_*.h5")} == mtimes
    assert [p.n_pixels for p in again.points] == [p.n_pixels for p in result.points]


def test_finished_blocks_are_reused(scan, tmp_path):
    cfg = load(scan / "config.yaml")
    out = tmp_path / "recon"
    tiles = T.cached_scan(str(scan), cfg).tiles(BLOCK)
    block_dir = out / ".blocks" / "point_00002"
    for tile in tiles[:3]:  # an interrupted run finished three of the four blocks
        name = block_dir / f"block_r{tile.r0:05d}_c{tile.c0:05d}.npz"
        info = T.reconstruct_block(str(scan), str(scan / "config.yaml"), 2, tile, str(name))
        assert info.block_file == str(name) and not info.error
    result = run(scan, cfg, out, points=[2], block_pixels=BLOCK, site_config=_site("threads", out))
    (p,) = result.points
    assert p.status == "done" and p.reused_blocks == 3
    check_point_file(out / "point_00002.h5", cfg, 2)



def test_block_file_of_another_format_is_recomputed(scan, tmp_path):
    """A block file of another format is a ResultError naming it and its format when read whole, no
    stamp to stitch (read_block_meta gives None), and a rerun removes it with a warning naming it."""
    cfg = load(scan / "config.yaml")
    opened = T.cached_scan(str(scan), cfg)
    tiles = opened.tiles(BLOCK)
    folder = layout.RunFolder(tmp_path / "recon")
    name = folder.block_file(2, tiles[0].r0, tiles[0].c0)
    assert not T.reconstruct_block(str(scan), str(scan / "config.yaml"), 2, tiles[0], str(name)).error
    box = (tiles[0].r0, tiles[0].r1, tiles[0].c0, tiles[0].c1)
    assert set(reusable_blocks(folder, opened, 2, tiles, cfg.fingerprint())) == {box}  # this format: kept
    with np.load(name) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(name, **{**arrays, "format": np.array(blocks.BLOCK_FORMAT - 1)})
    older = f"{name}: block file of format {blocks.BLOCK_FORMAT - 1}"
    with pytest.raises(ResultError, match=re.escape(older)):
        blocks.read_block(name)
    assert blocks.read_block_meta(name) is None
    with pytest.warns(ResumeWarning, match=re.escape(older)):
        assert reusable_blocks(folder, opened, 2, tiles, cfg.fingerprint()) == {}
    assert not name.exists()

def test_bad_points_are_skipped_and_the_run_goes_on(scan, tmp_path):
    """Point 1 has all-zero traces (skipped, fine), point 2 a corrupt frame file (skipped, an error)."""
    data = tmp_path / "scan"
    shutil.copytree(scan, data)
    cfg = load(data / "config.yaml")
    n = cfg.file.n_frames
    r0, r1, c0, c1 = cfg.file.frame
    for i in range(n, 2 * n):
        with h5py.File(data / f"scan_{i}.h5", "r+") as f:
            f["entry1/data/data"][r0:r1, c0:c1] = 0
    (data / f"scan_{2 * n + 5}.h5").write_bytes(b"truncated")
    out = tmp_path / "recon"
    result = run(data, cfg, out, block_pixels=BLOCK, site_config=_site("threads", out))
    status = {p.point: p for p in result.points}
    assert status[0].status == "done" and status[0].ok
    assert status[1].status == "skipped" and "zero" in status[1].reason and status[1].ok
    assert status[2].status == "skipped" and not status[2].ok and f"scan_{2 * n + 5}.h5" in status[2].reason
    assert result.exit_code == 1
    assert sorted(p.name for p in out.glob("point_*.h5")) == ["point_00000.h5"]


def test_unreachable_depth_grid_stops_before_writing(scan, tmp_path):
    raw = yaml.safe_load((scan / "config.yaml").read_text())
    bad = copy.deepcopy(raw)
    bad["geo"]["source"]["grid"] = [2.0, 2.5, 0.001]  # 2 mm behind the surface: the mask never sees it
    bad["geo"]["mask"]["path"] = str(scan / "mask.npy")
    path = tmp_path / "far.yaml"
    path.write_text(yaml.safe_dump(bad))
    out = tmp_path / "recon"
    with pytest.raises(RunError, match="depth"):
        run(scan, load(path), out, site_config=_site("threads", out))
    assert not out.exists()


def test_output_inside_scan_is_refused(scan):
    with pytest.raises(RunError, match="inside"):
        run(scan, load(scan / "config.yaml"), scan / "recon")
    assert not (scan / "recon").exists()


def test_cli_run_threads_and_config_change(scan, tmp_path):
    out = tmp_path / "recon"
    r = CliRunner().invoke(main, ["run", str(scan), "--out", str(out), "--points", "1", "--site", "threads",
                                  "--workers", "2", "--block-pixels", str(BLOCK)])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert any(line.startswith("output:") and str(out) in line for line in lines)
    point_lines = [line for line in lines if line.startswith("point")]
    assert len(point_lines) == 1 and "pixels" in point_lines[0] and " um" in point_lines[0]
    assert lines[-1].startswith("1 point (1 done)")
    assert sorted(p.name for p in out.glob("point_*.h5")) == ["point_00001.h5"]
    cfg = load(scan / "config.yaml")
    check_point_file(out / "point_00001.h5", cfg, 1)
    # a changed configuration invalidates the file: it is recomputed, not kept
    changed = replace(cfg, recon=replace(cfg.recon, sparsity=cfg.recon.sparsity * 2))
    again = run(scan, changed, out, points="1", block_pixels=BLOCK, site_config=_site("threads", out))
    assert [p.status for p in again.points] == ["done"]
    with h5py.File(out / "point_00001.h5") as f:
        assert f["entry/provenance"].attrs["config_fingerprint"] == changed.fingerprint()


@pytest.mark.parametrize("error", ["decode", "crash"])
def test_failing_blocks_are_reported(scan, tmp_path, monkeypatch, error):
    """A DecodeError skips the point with its reason; any other exception fails it; both exit non-zero."""
    def broken(*args, **kwargs):
        if error == "decode":
            raise D.DecodeError("traces too short for this code")
        raise RuntimeError("boom")

    monkeypatch.setattr(D, "decode", broken)
    out = tmp_path / "recon"
    result = run(scan, load(scan / "config.yaml"), out, points="0", block_pixels=BLOCK,
                 site_config=_site("threads", out))
    (p,) = result.points
    assert result.exit_code == 1 and not p.ok
    if error == "decode":
        assert p.status == "skipped" and "traces too short" in p.reason
    else:
        assert p.status == "failed" and "boom" in p.reason
    assert not list(out.glob("point_*.h5"))


def test_refuses_when_parsl_is_already_loaded(scan, tmp_path):
    with parsl.load(_site("threads", tmp_path)):
        with pytest.raises(RunError, match="already loaded"):
            run(scan, load(scan / "config.yaml"), tmp_path / "recon")
    assert not (tmp_path / "recon").exists()


def test_stitch_request_is_plain(scan, tmp_path):
    """What the driver sends a stitching task is a frozen dataclass of plain fields: it pickles (Parsl
    carries it to other processes) and holds no configuration or scan object."""
    cfg = load(scan / "config.yaml")
    options = RunOptions(block_pixels=BLOCK, command_line="laueflow run")
    driver = Driver(scan, cfg, tmp_path / "recon", options)
    driver.prepare()
    driver.start()
    request = driver.stitch_request(point=2)
    assert isinstance(request, StitchRequest) and pickle.loads(pickle.dumps(request)) == request
    with pytest.raises(AttributeError):
        request.point = 1  # frozen
    assert request.point == 2 and request.command_line == "laueflow run"
    assert list(request.frame) == list(cfg.file.frame)
    assert len(request.depths_mm) == len(cfg.geo.source.depths)
    plain = (str, int, float, bool, type(None))
    for name, value in vars(request).items():
        items = value if isinstance(value, tuple) else (value,)
        assert all(isinstance(v, plain) for v in items), name
