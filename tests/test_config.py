"""The configuration: required physical keys, defaults that `config show` marks, the mask code (checked,
hashed into the fingerprint and the provenance), one-line errors, and where the file was read from.

Every refusal is checked as a user meets it: each command that loads the file stops with exit status 2
and one `error:` line naming the key and the file, writes nothing and leaves its inputs as they were.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conftest import MULTIPOINT_BLOCK
from raytrace import make_config

from laueflow import config as C
from laueflow import mask as M
from laueflow import provenance, sites
from laueflow.cli import main
from laueflow.simulate import default_config_dict
from laueflow.workflow import run

# The commands that load a configuration and the arguments each needs around it (SCAN: a folder
# holding config.yaml, CFG: the file itself, OUT: where it would write).
COMMANDS = {
    "config check": ["config", "check", "CFG"],
    "config show": ["config", "show", "CFG"],
    "run": ["run", "SCAN", "--config", "CFG", "--out", "OUT", "--site", "threads"],
    "watch": ["watch", "SCAN", "--config", "CFG", "--out", "OUT", "--site", "threads"],
    "simulate": ["simulate", "OUT", "--config", "CFG", "--region", "8", "--frames", "8"],
    "calibrate": ["calibrate", "SCAN", "--config", "CFG", "--film-depth", "30", "--out", "OUT"],
}


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _drop(data: dict, dotted: str) -> dict:
    data = copy.deepcopy(data)
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node[part]
    del node[leaf]
    return data


@pytest.fixture
def beamline(tmp_path: Path) -> dict:
    """A complete beamline configuration (as simulate writes it) and its mask code beside it."""
    np.save(tmp_path / "mask.npy", M.debruijn(8))
    return default_config_dict("tilted", frames=261, region=16)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(tmp_path: Path, data: dict | None, command: str, config: Path | None = None) -> str:
    """Run ``command`` on the configuration ``data`` (or the file ``config``); assert the refusal
    (exit 2, one error line naming the file, nothing written, inputs untouched) and return the line."""
    scan = tmp_path / "scan"
    scan.mkdir(exist_ok=True)
    cfg = config if config is not None else _write(scan / "config.yaml", data)
    out = tmp_path / "out"
    before = _snapshot(tmp_path)
    args = [{"CFG": str(cfg), "SCAN": str(scan), "OUT": str(out)}.get(a, a) for a in COMMANDS[command]]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, (r.output, r.exception)
    assert r.stdout == "" and "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert str(cfg) in lines[0]
    assert not out.exists()
    assert _snapshot(tmp_path) == before
    return lines[0]


# ----------------------------------------------------------------------------------------------
# Required physical keys


@pytest.mark.parametrize("key", sorted(C.REQUIRED_KEYS))
def test_each_required_key_missing_is_refused_by_config_check(tmp_path, beamline, key):
    line = _refused(tmp_path, _drop(beamline, key), "config check")
    assert f"{key}: required key is missing" in line and "no safe default" in line


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_missing_thickness_stops_every_command(tmp_path, beamline, command):
    """The issue's case: a beamline file without geo.mask.thickness was accepted with 3.7 um."""
    line = _refused(tmp_path, _drop(beamline, "geo.mask.thickness"), command)
    assert "geo.mask.thickness: required key is missing" in line


def test_null_counts_as_missing_and_all_missing_keys_are_named(tmp_path, beamline):
    data = _drop(_drop(beamline, "geo.detector.size"), "geo.scanner.axis")
    data["geo"]["mask"]["focus"]["anglez"] = None
    line = _refused(tmp_path, data, "config check")
    assert "required keys are missing" in line
    for key in ("geo.detector.size", "geo.scanner.axis", "geo.mask.focus.anglez"):
        assert key in line


def test_configurations_laueflow_writes_carry_every_required_key(tmp_path, beamline):
    """simulate's configuration and the test geometries take no physical value from a default."""
    for cfg in (C.from_dict(beamline, source=str(tmp_path / "c.yaml")), make_config("oblique"),
                make_config("flat")):
        assert not set(cfg.defaults) & set(C.REQUIRED_KEYS)
    # what laueflow writes back (config show, a run's worker configuration) loads as it was
    again = C.load(_write(tmp_path / "again.yaml", C.from_dict(beamline, source=str(tmp_path / "c.yaml"))
                          .to_dict()))
    assert again == C.from_dict(beamline, source=str(tmp_path / "again.yaml"))


def test_config_show_marks_the_defaults(tmp_path, beamline):
    data = _drop(_drop(beamline, "geo.mask.widening"), "file.h5")
    data["recon"] = {"iterations": 80}
    path = _write(tmp_path / "config.yaml", data)
    cfg = C.load(path)
    assert {"geo.mask.widening", "file.h5.key", "recon.energy", "recon.block_pixels"} <= set(cfg.defaults)
    assert not {"recon.iterations", "geo.mask.pad", "geo.mask.path"} & set(cfg.defaults)
    r = CliRunner().invoke(main, ["config", "show", str(path)])
    assert r.exit_code == 0, r.output
    assert yaml.safe_load(r.stdout) == cfg.to_dict()  # still the configuration, as YAML
    marked = {line.split(":")[0].strip() for line in r.stdout.splitlines() if line.endswith("# default")}
    assert marked == {key.split(".")[-1] for key in cfg.defaults}
    for line in r.stdout.splitlines():
        if line.strip().startswith(("iterations:", "pad:", "thickness:")):
            assert "# default" not in line


# ----------------------------------------------------------------------------------------------
# The mask code: checked, hashed


BAD_CODES = {
    "value-2": lambda p: np.save(p, np.array([0, 1, 2, 1])),
    "value-0.5": lambda p: np.save(p, np.array([0.0, 0.5, 1.0])),
    "nan": lambda p: np.save(p, np.array([0.0, np.nan, 1.0])),
    "2-D": lambda p: np.save(p, np.ones((2, 8), dtype=np.int8)),
    "empty": lambda p: np.save(p, np.array([], dtype=np.int8)),
    "text": lambda p: p.write_text("0 1 1 0 1\n"),
    "npz": lambda p: p.write_bytes(_npz_bytes(p.parent)),
    "strings": lambda p: np.save(p, np.array(["0", "1"])),
}
BAD_WORDS = {"value-2": "bit 2 is 2", "value-0.5": "bit 1 is 0.5", "nan": "bit 1 is nan", "2-D": "1-D",
             "empty": "empty", "text": "not a NumPy .npy file", "npz": "archive", "strings": "dtype"}


def _npz_bytes(folder: Path) -> bytes:
    np.savez(folder / "tmp.npz", code=M.debruijn(8))
    data = (folder / "tmp.npz").read_bytes()
    (folder / "tmp.npz").unlink()
    return data


@pytest.mark.parametrize("bad", sorted(BAD_CODES))
def test_invalid_mask_code_is_refused_by_config_check(tmp_path, beamline, bad):
    (tmp_path / "scan").mkdir()
    BAD_CODES[bad](tmp_path / "scan" / "mask.npy")
    line = _refused(tmp_path, beamline, "config check")
    assert "geo.mask.path" in line and str(tmp_path / "scan" / "mask.npy") in line and BAD_WORDS[bad] in line
    with pytest.raises(C.ConfigError, match=BAD_WORDS[bad]):
        M.load_code(tmp_path / "scan" / "mask.npy")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_invalid_mask_code_stops_every_command(tmp_path, beamline, command):
    (tmp_path / "scan").mkdir()
    np.save(tmp_path / "scan" / "mask.npy", np.array([0.0, 1.0, 0.5, 1.0]))
    assert "geo.mask.path" in _refused(tmp_path, beamline, command)


def test_valid_codes_of_any_dtype_are_one_code(tmp_path, beamline):
    """bool, int64 and float 0/1 files hold the same code: same hash, same fingerprint."""
    prints = set()
    for dtype in (np.bool_, np.int64, np.float32):
        np.save(tmp_path / "mask.npy", M.debruijn(8).astype(dtype))
        cfg = C.from_dict(beamline, source=str(tmp_path / "config.yaml"))
        assert cfg.geo.mask.sha256 == C.code_sha256(M.debruijn(8))
        prints.add(cfg.fingerprint())
    assert len(prints) == 1


def test_mask_code_is_in_the_fingerprint_not_its_path(tmp_path, beamline):
    cfg = C.from_dict(beamline, source=str(tmp_path / "config.yaml"))
    (tmp_path / "elsewhere").mkdir()
    np.save(tmp_path / "elsewhere" / "code.npy", M.debruijn(8))
    moved = C.from_dict(beamline | {"geo": {**beamline["geo"], "mask": {**beamline["geo"]["mask"],
                                    "path": str(tmp_path / "elsewhere" / "code.npy")}}},
                        source=str(tmp_path / "config.yaml"))
    assert moved.fingerprint() == cfg.fingerprint()
    np.save(tmp_path / "mask.npy", np.roll(M.debruijn(8), 1))  # a shifted code under the same name
    shifted = C.from_dict(beamline, source=str(tmp_path / "config.yaml"))
    assert shifted.fingerprint() != cfg.fingerprint()
    assert f"sha256: {shifted.geo.mask.sha256}" in shifted.to_yaml()  # what the provenance records
    # without a code file the generated code is used; nothing to hash
    generated = C.from_dict(_drop(beamline, "geo.mask.path"))
    assert generated.geo.mask.sha256 is None and "sha256" not in generated.to_yaml()


def test_the_tile_is_in_the_fingerprint_the_block_size_not(tmp_path, beamline):
    """recon.tile_pixels changes results (the decoder's tile), recon.block_pixels only how the work is
    cut into tasks; both must be positive."""
    source = str(tmp_path / "config.yaml")
    cfg = C.from_dict(beamline, source=source)
    assert cfg.recon.tile_pixels == cfg.recon.block_pixels == 4096
    tiled = C.from_dict(beamline | {"recon": {"tile_pixels": 1024}}, source=source)
    blocked = C.from_dict(beamline | {"recon": {"block_pixels": 65536}}, source=source)
    assert tiled.fingerprint() != cfg.fingerprint() == blocked.fingerprint()
    for key in ("tile_pixels", "block_pixels"):
        with pytest.raises(C.ConfigError, match=f"recon.{key}"):
            C.from_dict(beamline | {"recon": {key: 0}}, source=source)


def test_a_recorded_hash_pins_the_code(tmp_path, beamline):
    """A configuration laueflow wrote (it records the hash) refuses a mask file changed since."""
    written = _write(tmp_path / "written.yaml",
                     C.from_dict(beamline, source=str(tmp_path / "config.yaml")).to_dict())
    assert C.load(written).geo.mask.sha256 == C.code_sha256(M.debruijn(8))
    np.save(tmp_path / "mask.npy", np.roll(M.debruijn(8), 3))
    line = _refused(tmp_path, None, "config check", config=written)
    assert "geo.mask.sha256" in line and "changed" in line
    assert C.load(written, check_files=False).geo.mask.sha256 == C.code_sha256(M.debruijn(8))
    no_path = _drop(C.load(written, check_files=False).to_dict(), "geo.mask.path")
    with pytest.raises(C.ConfigError, match="geo.mask.sha256"):
        C.from_dict(no_path)


def test_mask_changed_after_load_is_not_used(tmp_path, beamline):
    """A setup built after the code file changed under a loaded configuration stops, naming the file."""
    cfg = C.from_dict(beamline, source=str(tmp_path / "config.yaml"))
    np.save(tmp_path / "mask.npy", np.roll(M.debruijn(8), 1))
    with pytest.raises(C.ConfigError, match="changed since the configuration was loaded"):
        M.from_config(cfg)


def _provenance(point_file: Path) -> dict:
    with h5py.File(point_file, "r") as f:
        return provenance.read(f["entry/provenance"])


def test_changed_mask_makes_a_rerun_recompute(multipoint_scan, multipoint_run, tmp_path, monkeypatch):
    """Point files of a run are kept by a rerun with the same code (even from another file and another
    configuration file) and recomputed once the code changes; the point file records the code's hash
    and the configuration file's absolute path."""
    out = tmp_path / "recon"
    shutil.copytree(multipoint_run, out, ignore=shutil.ignore_patterns(".runinfo", ".lock"))
    data = yaml.safe_load((multipoint_scan / "config.yaml").read_text())
    data["file"]["path"] = str(multipoint_scan)
    data["geo"]["mask"]["path"] = "code.npy"
    shutil.copy(multipoint_scan / "mask.npy", tmp_path / "code.npy")
    _write(tmp_path / "beamline.yaml", data)
    monkeypatch.chdir(tmp_path)

    def rerun():
        cfg = C.load("beamline.yaml")  # relative, as typed
        return cfg, run(multipoint_scan, cfg, out, points="0", block_pixels=MULTIPOINT_BLOCK,
                        site_config=sites.site_config("threads", workers=2, run_dir=str(out / ".runinfo")))

    cfg, same = rerun()
    assert [p.status for p in same.points] == ["resumed"]
    code = np.load(tmp_path / "code.npy")
    np.save(tmp_path / "code.npy", np.roll(code, 1))
    cfg, changed = rerun()
    assert [p.status for p in changed.points] == ["done"]
    prov = _provenance(out / "point_00000.h5")
    assert prov[provenance.CONFIG_FINGERPRINT] == cfg.fingerprint()
    assert yaml.safe_load(prov["config"])["geo"]["mask"]["sha256"] == C.code_sha256(np.roll(code, 1))
    assert prov["config_file"] == str(tmp_path / "beamline.yaml")


# ----------------------------------------------------------------------------------------------
# The file itself


def test_invalid_yaml_is_one_line_with_the_position(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("file:\n  path: .\n  range: [0, 10, 1\ngeo:\n  mask: {}\n")
    line = _refused(tmp_path, None, "config check", config=path)
    assert "not valid YAML" in line and "line 4, column" in line


def test_source_file_is_absolute(tmp_path, beamline, monkeypatch):
    _write(tmp_path / "config.yaml", beamline)
    monkeypatch.chdir(tmp_path)
    cfg = C.load("config.yaml")
    assert cfg.source_file == str(tmp_path / "config.yaml") and os.path.isabs(cfg.source_file)
    monkeypatch.chdir("/")  # paths in it still resolve against its folder
    assert cfg.resolve(cfg.geo.mask.path) == tmp_path / "mask.npy"


# ----------------------------------------------------------------------------------------------
# Configurations laueflow writes: read back by laueflow's loader as the numbers written

# PyYAML, laueflow's loader, reads 1e-05 as a string and 1.0e-05 as a number
SMALL_AND_LARGE = {"geo.source.beta": 1e-05, "geo.mask.shift": -2e-06, "geo.mask.focus.cenz": 3e-21,
                   "recon.smoothness": 1e16}


def _set(data: dict, dotted: str, value: object) -> dict:
    data = copy.deepcopy(data)
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return data


def test_config_show_output_loads_back_as_the_same_numbers(tmp_path, beamline):
    data = beamline
    for key, value in SMALL_AND_LARGE.items():
        data = _set(data, key, value)
    path = _write(tmp_path / "config.yaml", data)
    r = CliRunner().invoke(main, ["config", "show", str(path)])
    assert r.exit_code == 0, r.output
    shown = tmp_path / "shown.yaml"
    shown.write_text(r.stdout)
    again = C.load(shown)
    assert again.to_dict() == C.load(path).to_dict()
    assert (again.geo.source.beta, again.geo.mask.shift, again.geo.mask.focus.cenz,
            again.recon.smoothness) == tuple(SMALL_AND_LARGE.values())
    assert yaml.safe_load(C.yaml_text(C.yaml_writer(), {"a": [1e-05, float("inf"), -float("inf")]})) == {
        "a": [1e-05, float("inf"), -float("inf")]}


def test_a_derived_configuration_keeps_comments_and_reads_back_its_numbers(tmp_path, beamline):
    """write_derived: dotted keys set, the base's comments kept, header and notes added, relative paths
    absolute from another folder and kept beside the base, and the numbers written load as they were."""
    base = tmp_path / "beamline.yaml"
    base.write_text("# 34-ID-E, run 2024-1\n" + yaml.safe_dump(beamline, sort_keys=False)
                    .replace("thickness: 3.7\n", "thickness: 3.7  # measured by SEM\n"))
    before = base.read_bytes()
    out = tmp_path / "other" / "derived.yaml"
    out.parent.mkdir()
    record = {"by": "a test", "sigma": [1e-07, 0.5]}
    updates = {"geo.mask.focus.cenx": np.float64(1e-05), "geo.source.beta": 2e-06,
               "recon.iterations": np.int64(80), "calibration": record}
    cfg = C.write_derived(base, out, updates, header=["derived by a test"], notes={"recon": "laueflow's own"})
    text = out.read_text()
    assert text.startswith("# derived by a test\n# 34-ID-E, run 2024-1\n")
    assert "thickness: 3.7  # measured by SEM\n" in text and "recon:  # laueflow's own\n" in text
    again = C.load(out)
    assert again == cfg and again.source_file == str(out)
    assert (again.geo.mask.focus.cenx, again.geo.source.beta, again.recon.iterations) == (1e-05, 2e-06, 80)
    assert again.calibration == record
    folder = tmp_path.resolve()
    assert again.file.path == str(folder) and again.geo.mask.path == str(folder / "mask.npy")
    nominal = C.load(base)
    assert again.geo.detector == nominal.geo.detector and again.file.frame == nominal.file.frame
    assert again.geo.mask.sha256 == nominal.geo.mask.sha256
    assert base.read_bytes() == before

    beside = tmp_path / "beside.yaml"
    C.write_derived(base, beside, {"geo.source.beta": 2e-06})
    kept = yaml.safe_load(beside.read_text())
    assert kept["file"]["path"] == "." and kept["geo"]["mask"]["path"] == "mask.npy"
    assert C.load(beside).geo.mask.sha256 == nominal.geo.mask.sha256

    # refused: an existing file without force, the base itself, a result that would not pass check
    with pytest.raises(C.ConfigError, match="exists"):
        C.write_derived(base, out, {"geo.source.beta": 1e-3})
    with pytest.raises(C.ConfigError, match="derived from"):
        C.write_derived(base, base, {"geo.source.beta": 1e-3}, force=True)
    with pytest.raises(C.ConfigError, match=r"with geo.mask.focus.dist is not a valid configuration: "
                                            r".*geo.mask.focus.dist: must be > 0"):
        C.write_derived(base, out, {"geo.mask.focus.dist": -1.0}, force=True)
    assert out.read_text() == text and base.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["derived.yaml"]  # no temporary left
    C.write_derived(base, out, {"geo.source.beta": 1e-3}, force=True)
    assert C.load(out).geo.source.beta == 1e-3
