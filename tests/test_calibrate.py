"""`laueflow.calibration` and `laueflow calibrate`: the mask pose from two simulated film scans."""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from laueflow import sites
from laueflow.calibration import fit as F
from laueflow.calibration.films import read_films
from laueflow.cli import main
from laueflow.config import Config, ConfigError, ConfigWarning, from_dict, load, write_calibrated
from laueflow.decode import decode
from laueflow.errors import CalibrationError
from laueflow.evaluate import score
from laueflow.forward import Setup
from laueflow.io.pointfile import read_provenance
from laueflow.io.scan import open_scan
from laueflow.io.truth import load_truth
from laueflow.simulate import default_config_dict, simulate
from laueflow.workflow import run

ERROR = {"cenx": 0.02, "dist": -0.03, "cenz": 0.03, "angley": 0.3, "anglez": 0.3}
DEPTHS = (20.0, 80.0)
FRAMES = 121
REGION = 48
PIXELS = 150
# what a 48-pixel region fixes: the mask's position along the beam and the depth scale
DETERMINED_TOLERANCE = {"cenx": 0.001, "dist": 0.002, "anglez": 0.02}


@pytest.fixture(scope="module")
def films(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("calibrate")
    out = []
    for seed, depth in enumerate(DEPTHS):
        folder = root / f"film_{depth:g}"
        simulate(folder, preset="film", film_depth=depth, seed=seed, frames=FRAMES, region=REGION,
                 pose_error=ERROR)
        out.append(folder)
    return out


def true_focus(scan: Path) -> dict:
    with h5py.File(scan / "truth.h5", "r") as f:
        return json.loads(f["truth"].attrs["focus"])


def calibrate(films: list[Path], out: Path, *extra: str, depths=DEPTHS):
    args = ["calibrate", *map(str, films), "--config", str(films[0] / "config.yaml"), "--out", str(out),
            "--pixels", str(PIXELS)]
    for d in depths:
        args += ["--film-depth", str(d)]
    return CliRunner().invoke(main, [*args, *extra])


@pytest.fixture(scope="module")
def calibration(films: list[Path]) -> F.Calibration:
    cfg = load(films[0] / "config.yaml")
    data = read_films(cfg, films, DEPTHS, PIXELS)
    assert [f.depth_um for f in data] == list(DEPTHS) and [f.name for f in data] == list(map(str, films))
    assert all(len(np.unique(f.spots)) >= 4 for f in data)
    return F.fit_pose(cfg, data)


def test_fit_recovers_the_pose(films: list[Path], calibration: F.Calibration) -> None:
    """From a nominal pose off by 20-30 um and 0.3 deg, the fit finds cenx, dist and anglez within their
    uncertainty of the truth, names cenz (along the bars) as not determined, and puts both films at
    their depths within 1 um."""
    result = calibration
    truth = true_focus(films[0])
    got = result.values()
    for name, tol in DETERMINED_TOLERANCE.items():
        i = result.names.index(name)
        assert result.determined[i], result.undetermined
        assert abs(got[name] - truth[name]) <= max(5 * result.sigma[i], tol), (name, got[name], truth[name])
        assert abs(result.nominal[i] - truth[name]) > 5 * result.sigma[i]  # the nominal value was off
    assert not result.determined[result.names.index("cenz")]
    assert any("cenz" in line for line in result.undetermined)
    assert 0.5 < result.chi2_red < 2.0
    for film in result.films:
        assert film.within_1um_before < 0.1 and film.within_1um_after >= 0.9
        assert np.all(np.abs(film.after - film.depth_um) < 1.0)


def test_cli_calibrate_writes_the_calibrated_configuration(films: list[Path], tmp_path: Path) -> None:
    """The table, the calibrated YAML (nominal keys, values and comments kept, focus replaced, a
    calibration record that config loading keeps and does not call unknown), the nominal untouched."""
    nominal = films[0] / "config.yaml"
    before = nominal.read_bytes()
    out = tmp_path / "calibrated.yaml"
    r = calibrate(films, out)
    assert r.exit_code == 0, r.output
    assert "determined" in r.stdout and "cenx" in r.stdout and "not determined: cenz" in r.stdout
    assert "spread over spots" in r.stdout and f"wrote {out}" in r.stdout
    assert nominal.read_bytes() == before
    text = out.read_text()
    assert text.startswith("# Synthetic scan written by laueflow simulate")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        cal = load(out, check_files=False)
    nom = load(nominal)
    truth = true_focus(films[0])
    assert abs(cal.geo.mask.focus.dist - truth["dist"]) < 0.002 and abs(cal.geo.mask.focus.cenx) < 0.001
    assert cal.geo.detector == nom.geo.detector and cal.geo.scanner == nom.geo.scanner
    # in another folder, relative paths become absolute ones to the same files
    assert cal.resolve(cal.file.path) == nom.resolve(nom.file.path).resolve()
    assert cal.file.frame == nom.file.frame and cal.file.range == nom.file.range
    assert cal.calibration["scans"][1]["film_depth_um"] == 80.0
    assert "cenz" in cal.calibration["not_determined"]
    assert "calibration" in cal.to_dict()
    r = CliRunner().invoke(main, ["config", "show", str(out)])
    assert r.exit_code == 0 and "calibration:" in r.stdout


@pytest.mark.parametrize(("case", "word"), [("count", "one --film-depth per scan"),
                                            ("grid", "outside the depth grid"),
                                            ("same", "nominal configuration")])
def test_cli_bad_input_exits_2(films: list[Path], tmp_path: Path, case: str, word: str) -> None:
    """One depth for two scans, a film depth off the grid, --out naming the nominal file: exit 2,
    nothing written."""
    out = tmp_path / "calibrated.yaml"
    if case == "count":
        r = calibrate(films, out, depths=DEPTHS[:1])
    elif case == "grid":
        r = calibrate(films, out, depths=(20.0, 900.0))
    else:
        out = films[0] / "config.yaml"
        before = out.read_bytes()
        r = calibrate(films, out)
        assert out.read_bytes() == before
    assert r.exit_code == 2, r.output
    assert word in r.output
    if case != "same":
        assert not out.exists()


def test_cli_scan_without_film_exits_2(films: list[Path], tmp_path: Path) -> None:
    """A scan of background only: no bright spots, exit 2, nothing written."""
    empty = tmp_path / "empty"
    shutil.copytree(films[0], empty)
    r0, r1, c0, c1 = load(empty / "config.yaml").file.frame
    rng = np.random.default_rng(0)
    for n in range(FRAMES):  # the same files with the film's signal gone
        with h5py.File(empty / f"scan_{n}.h5", "r+") as f:
            f["/entry1/data/data"][r0:r1, c0:c1] = rng.poisson(50.0, (r1 - r0, c1 - c0)).astype(np.uint16)
    out = tmp_path / "calibrated.yaml"
    r = calibrate([empty, films[1]], out)
    assert r.exit_code == 2, r.output
    assert "no bright spots" in r.output and not out.exists()


def test_cli_failed_fit_exits_1(films: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fit that lands on a bound (bounds made tiny here) exits 1 and writes nothing; with one scan the
    command says that the depth scale is not fixed."""
    monkeypatch.setattr(F, "BOUND", {k: 1e-4 for k in F.BOUND})
    out = tmp_path / "calibrated.yaml"
    r = calibrate(films[:1], out, depths=DEPTHS[:1])
    assert r.exit_code == 1, r.output
    assert "calibration failed" in r.output and "bound" in r.output and not out.exists()
    assert "two or more scans at different film depths" in r.output


def test_cli_scan_of_another_region_exits_2(films: list[Path], tmp_path: Path) -> None:
    """A scan whose own config.yaml has another detector region: exit 2, nothing written."""
    other = tmp_path / "other"
    other.mkdir()
    data = yaml.safe_load((films[1] / "config.yaml").read_text())
    data["file"]["frame"] = [0, 16, 0, 16]
    (other / "config.yaml").write_text(yaml.safe_dump(data))
    out = tmp_path / "calibrated.yaml"
    r = calibrate([films[0], other], out)
    assert r.exit_code == 2, r.output
    assert "another detector region" in r.output and not out.exists()


def test_config_calibration_section_is_kept_not_unknown() -> None:
    """A calibration record is kept as it is, reported by to_dict, not warned about, not fingerprinted."""
    base = yaml.safe_load(
        """
file: {path: ., frame: [0, 8, 0, 8]}
geo:
  mask: {bitsizes: [15.0, 7.5], thickness: 3.7,
         focus: {cenx: 0.0, dist: 1.0, cenz: 0.0, anglex: 0.0, angley: 0.0, anglez: 0.0}}
  scanner: {step: 1.0, axis: [1.0, 0.0, 0.0]}
  detector: {shape: [2048, 2048], size: [409.6, 409.6], rot: [-1.2, -1.21, -1.22], pos: [28.8, 2.7, 513.0]}
  source: {grid: [-0.1, 0.2, 0.001]}
"""
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        cfg = from_dict({**base, "calibration": {"by": "x", "sigma": {"dist": 1e-4}}})
    assert cfg.calibration["sigma"]["dist"] == 1e-4 and cfg.unknown == ()
    assert cfg.to_dict()["calibration"]["by"] == "x"
    assert "calibration" not in from_dict(base).to_dict()
    assert cfg.fingerprint() == from_dict(base).fingerprint()


def decode_scan(cfg: Config, folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """rows, cols and depth profiles of every pixel of a small simulated scan, decoded with ``cfg``."""
    setup = Setup.from_config(cfg)
    parts = []
    with open_scan(cfg, folder) as scan:
        for tile in scan.tiles(cfg.recon.tile_pixels):
            b = scan.read_block(0, tile)
            parts.append(decode(b.traces, b.rows, b.cols, b.frames, setup, cfg, b.selected))
    return tuple(np.concatenate([getattr(p, k) for p in parts]) for k in ("rows", "cols", "profiles"))


def test_sample_with_the_fitted_pose_meets_the_accuracy_targets(
    calibration: F.Calibration, tmp_path: Path
) -> None:
    """A thin-grain sample measured with the same (unknown) true pose: decoded with the nominal pose it
    misses the accuracy targets; with the fitted pose it meets them (median centroid error <= 0.5 um,
    >= 95 % of spot pixels within 2 um, mean profile correlation >= 0.95)."""
    folder = tmp_path / "sample"
    simulate(folder, preset="thin", seed=5, frames=FRAMES, region=32, pose_error=ERROR)
    nominal = load(folder / "config.yaml")
    focus = replace(nominal.geo.mask.focus, **{k: v for k, v in calibration.values().items()})
    fitted = replace(nominal, geo=replace(nominal.geo, mask=replace(nominal.geo.mask, focus=focus)))
    truth = load_truth(folder / "truth.h5").for_point(0)
    before = score(truth, *decode_scan(nominal, folder))
    after = score(truth, *decode_scan(fitted, folder))
    assert before.centroid_median > 2.0 and before.within_2um < 0.5, before.summary()
    assert after.centroid_median <= 0.5, after.summary()
    assert after.within_2um >= 0.95 and after.correlation_mean >= 0.95, after.summary()


@pytest.fixture(scope="module")
def calibrated(films: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The configuration written by laueflow calibrate from the two films."""
    out = tmp_path_factory.mktemp("calibrated") / "calibrated.yaml"
    r = calibrate(films, out)
    assert r.exit_code == 0, r.output
    return out


def test_calibration_record_holds_the_film_depths(calibrated: Path) -> None:
    """Per film: its depth, the spots and each spot's depth at the nominal and the fitted pose, closer
    to the film after the fit."""
    films = load(calibrated, check_files=False).calibration["films"]
    assert [f["film_depth_um"] for f in films] == list(DEPTHS)
    for f in films:
        assert len(f["spots"]) == len(f["pixels"]) == len(f["before_um"]) == len(f["after_um"]) >= 4
        err_before = np.abs(np.array(f["before_um"]) - f["film_depth_um"])
        err_after = np.abs(np.array(f["after_um"]) - f["film_depth_um"])
        assert np.median(err_after) < 1 < np.median(err_before)


def test_the_written_record_is_the_fit_s_record(films: list[Path], calibration: F.Calibration,
                                                calibrated: Path) -> None:
    """laueflow calibrate writes Calibration.record of its fit (the same fit as the fixture's, so the same
    record, the date aside): absolute paths, None for the sigma of what is not determined, plain YAML
    types; one film depth per scan or CalibrationError."""
    written = load(calibrated, check_files=False).calibration
    when = datetime.strptime(written["date"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    nominal = films[0] / "config.yaml"
    record = calibration.record(nominal, films, DEPTHS, when=when)
    assert record == written
    assert yaml.safe_load(yaml.safe_dump(record)) == record
    assert record["nominal"] == str(nominal.resolve()) and record["by"].endswith(" calibrate")
    assert [s["path"] for s in record["scans"]] == [str(f.resolve()) for f in films]
    assert "cenz" in record["not_determined"] and "dist" not in record["not_determined"]
    assert all(record["sigma"][n] is None for n in record["not_determined"]) and record["sigma"]["dist"] > 0
    with pytest.raises(CalibrationError, match="one film depth per scan"):
        calibration.record(nominal, films, DEPTHS[:1])


def test_show_draws_the_calibration(calibrated: Path, tmp_path: Path) -> None:
    """laueflow show CALIBRATED.yaml writes <name>_calibration.png and a line per film; a configuration
    without a calibration record exits 2."""
    r = CliRunner().invoke(main, ["show", str(calibrated), "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    png = tmp_path / "calibrated_calibration.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote calibration  {png}" in r.stdout
    assert r.stdout.count("film at") == len(DEPTHS) and "spread" in r.stdout
    nominal = yaml.safe_load(calibrated.read_text())
    del nominal["calibration"]
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(nominal))
    r = CliRunner().invoke(main, ["show", str(plain), "--out", str(tmp_path)])
    assert r.exit_code == 2 and "no calibration record" in r.output


def test_point_file_names_its_calibration(calibrated: Path, multipoint_scan: Path, multipoint_run: Path,
                                          tmp_path: Path) -> None:
    """A point reconstructed with a calibrated configuration records the calibration (date, film scans,
    fitted values) in its provenance; one with the nominal configuration says so."""
    record = load(calibrated, check_files=False).calibration
    cfg_file = tmp_path / "calibrated.yaml"  # the shared small scan's own pose, with the films' record
    nominal = load(multipoint_scan / "config.yaml")
    write_calibrated(multipoint_scan / "config.yaml", cfg_file,
                     {"dist": nominal.geo.mask.focus.dist + 1e-4}, record)
    out = tmp_path / "recon"
    result = run(multipoint_scan, load(cfg_file), out, points=[0], block_pixels=256,
                 site_config=sites.site_config("threads", workers=1, run_dir=str(out / ".runinfo")))
    assert result.exit_code == 0, [p.line() for p in result.points]
    line = read_provenance(out / "point_00000.h5")["calibration"]
    assert record["date"] in line and str(Path(record["scans"][1]["path"])) in line
    assert f"dist={nominal.geo.mask.focus.dist + 1e-4:.6g}" in line
    assert read_provenance(multipoint_run / "point_00000.h5")["calibration"] == "none (nominal pose)"


def test_cli_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    """An existing --out is refused before any reading or fitting; with --force the run goes on (here to
    the film depth check) and write_calibrated replaces the file; the nominal file is refused even with
    --force."""
    scan = tmp_path / "scan"
    scan.mkdir()
    np.save(scan / "mask.npy", np.array([0, 1, 1, 0, 1, 0, 0, 1], dtype=np.int8))
    nominal = scan / "config.yaml"
    nominal.write_text(yaml.safe_dump(default_config_dict("tilted", frames=21, region=16), sort_keys=False))
    before = nominal.read_bytes()
    out = tmp_path / "calibrated.yaml"
    out.write_text("precious\n")
    args = ["calibrate", str(scan), "--config", str(nominal), "--film-depth"]
    r = CliRunner().invoke(main, [*args, "30", "--out", str(out)])
    assert r.exit_code == 2, r.output
    assert f"error: --out {out} exists; use --force to overwrite it" in r.stderr
    r = CliRunner().invoke(main, [*args, "900", "--out", str(out), "--force"])
    assert r.exit_code == 2 and "outside the depth grid" in r.stderr, r.output
    r = CliRunner().invoke(main, [*args, "30", "--out", str(nominal), "--force"])
    assert r.exit_code == 2 and "is the nominal configuration" in r.stderr, r.output
    assert out.read_text() == "precious\n" and nominal.read_bytes() == before
    assert "--force" in CliRunner().invoke(main, ["calibrate", "--help"]).output

    dist = load(nominal).geo.mask.focus.dist + 1e-05
    with pytest.raises(ConfigError, match="exists"):
        write_calibrated(nominal, out, {"dist": dist}, {"by": "a test"})
    write_calibrated(nominal, out, {"dist": dist}, {"by": "a test"}, force=True)
    assert load(out).geo.mask.focus.dist == dist and load(out).calibration == {"by": "a test"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibrated.yaml", "scan"]  # no temporary left
    assert nominal.read_bytes() == before
