"""`laueflow score`: point files of a run compared with the truth of a simulated scan."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from laueflow.cli import main
from laueflow.config import load
from laueflow.io.blocks import write_block
from laueflow.io.layout import point_files, point_name
from laueflow.io.pointfile import read_profiles, write_point
from laueflow.io.truth import load_truth
from laueflow.simulate import simulate

SHIFT = 10  # depth bins (1 um each) by which point 1's profiles are displaced


def _write_point(out: Path, cfg, point: int, rows: np.ndarray, cols: np.ndarray,
                 profiles: np.ndarray) -> Path:
    """A point file holding exactly these profiles, through the same block/stitch path a run uses."""
    n = rows.size
    decoded = SimpleNamespace(rows=rows, cols=cols, profiles=profiles, background=np.zeros(n),
                              residual=np.ones(n), quality=np.zeros(n, np.uint8), energy=np.full(n, np.nan),
                              energy_sigma=np.full(n, np.nan))
    depths = cfg.geo.source.depths
    block = out / f"block_{point}.npz"
    write_block(block, point=point, tile=cfg.file.frame, config_fingerprint=cfg.fingerprint(),
                        n_depths=depths.size, decoded=decoded)
    path = out / point_name(point)
    write_point(path, [block], frame=cfg.file.frame, depths_mm=depths,
                        provenance={"laueflow_version": "test"})
    block.unlink()
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny simulated 3-point scan and a run folder with point 0 exact, point 1 shifted, point 2 missing."""
    base = tmp_path_factory.mktemp("score")
    info = simulate(base / "scan", preset="multipoint", points=3, region=16, frames=24, seed=1)
    cfg = load(info["config"])
    truth = load_truth(info["truth"])
    out = base / "recon"
    out.mkdir()
    r0, r1, c0, c1 = cfg.file.frame
    rows, cols = (a.ravel() for a in np.mgrid[r0:r1, c0:c1])
    for k, shift in ((0, 0), (1, SHIFT)):
        t = truth.for_point(k)
        profiles = np.zeros((rows.size, truth.depth.size), np.float32)
        where = (t.pixels[:, 0] - r0) * (c1 - c0) + (t.pixels[:, 1] - c0)
        profiles[where] = np.roll(t.profiles, shift, axis=1)
        _write_point(out, cfg, k, rows, cols, profiles)
    return out, Path(info["truth"])


def _invoke(*args: object):
    return CliRunner().invoke(main, ["score", *map(str, args)])


def test_read_point_profiles_round_trip(run_dir):
    out, truth_file = run_dir
    truth = load_truth(truth_file).for_point(0)
    rows, cols, profiles = read_profiles(out / point_name(0))
    assert profiles.shape == (rows.size, truth.depth.size)
    key = {(int(r), int(c)): i for i, (r, c) in enumerate(zip(rows, cols, strict=True))}
    got = profiles[[key[(int(r), int(c))] for r, c in truth.pixels]]
    np.testing.assert_allclose(got, truth.profiles, rtol=1e-6)


def test_point_files_ignores_temporary_files(run_dir, tmp_path):
    out, _ = run_dir
    assert sorted(point_files(out)) == [0, 1]
    (tmp_path / "point_00004.h5.tmp-123").write_text("")
    (tmp_path / "point_00007.h5").write_text("")
    assert list(point_files(tmp_path)) == [7]


def test_score_every_point(run_dir):
    out, truth_file = run_dir
    r = _invoke(out, "--truth", truth_file)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("point     0:") and lines[1].startswith("point     1:")
    assert "covered 100.0%" in lines[0]
    assert "centroid error median 0.00 um" in lines[0]
    assert "correlation 1.000" in lines[0]
    assert f"centroid error median {SHIFT:.2f} um" in lines[1]
    assert "within 2 um 0.0%" in lines[1]


def test_score_one_point(run_dir):
    out, truth_file = run_dir
    r = _invoke(out, "--truth", truth_file, "--point", 1)
    assert r.exit_code == 0, r.output
    assert len(r.stdout.splitlines()) == 1 and r.stdout.startswith("point     1:")


@pytest.mark.parametrize("args, message", [(("--point", 2), "no point file 00002"), ((), None)])
def test_score_nothing_to_score(run_dir, tmp_path, args, message):
    out, truth_file = run_dir
    folder = out if message else tmp_path  # a missing point, or a folder without point files
    r = _invoke(folder, "--truth", truth_file, *args)
    assert r.exit_code == 2
    assert r.stderr.startswith("error:")
    assert (message or "no point files") in r.stderr


def test_score_rejects_a_file_that_is_not_a_truth_file(run_dir):
    out, _ = run_dir
    r = _invoke(out, "--truth", out / point_name(0))
    assert r.exit_code == 2
    assert "not a truth file" in r.stderr
