"""The command line: config check / show, error reporting (exit status 2, nothing written), sites."""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from laueflow import provenance, sites
from laueflow.cli import main
from laueflow.cli.run import RunSetup, default_out_dir, make_options
from laueflow.mask import debruijn
from laueflow.simulate import default_config_dict
from laueflow.workflow.dag import RunOptions


def _write(folder: Path, data: dict, name: str = "config.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def good(tmp_path) -> dict:
    np.save(tmp_path / "mask.npy", debruijn(8))
    return default_config_dict("tilted", frames=261, region=16)


def _invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_config_check_good(tmp_path, good):
    path = _write(tmp_path, good)
    r = _invoke("config", "check", path)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("OK")
    assert "warning" not in r.output


def test_config_check_lists_unknown_keys(tmp_path, good):
    data = copy.deepcopy(good)
    data["file"]["colour"] = "red"
    data["geo"]["mask"]["focus"]["tilt"] = 1.0
    data["algo"] = {"pos": {"order": 5}}
    r = _invoke("config", "check", _write(tmp_path, data))
    assert r.exit_code == 0, r.output
    assert "OK" in r.stdout
    warning = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert warning, r.stderr
    assert "file.colour" in r.stderr and "geo.mask.focus.tilt" in r.stderr and "algo.pos.order" in r.stderr


def test_config_show_fills_defaults(tmp_path, good):
    data = copy.deepcopy(good)
    del data["geo"]["mask"]["widening"]
    r = _invoke("config", "show", _write(tmp_path, data))
    assert r.exit_code == 0, r.output
    shown = yaml.safe_load(r.stdout)
    assert shown["geo"]["mask"]["widening"] == 0.0
    assert shown["recon"]["block_pixels"] == 4096
    assert shown["geo"]["mask"]["focus"]["anglez"] == 44.0
    assert shown["file"]["h5"]["key"] == "/entry1/data/data"


def _set(data: dict, dotted: str, value) -> None:
    node = data
    *parents, last = dotted.split(".")
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value


BAD = [
    ("geo.scanner.step", -1.0, "geo.scanner.step"),
    ("file.range", [10, 10, 1], "file.range"),
    ("file.frame", [0, 4096, 0, 100], "file.frame"),
    ("geo.mask.path", "no_such_mask.npy", "geo.mask.path"),
    ("geo.mask.thickness", "thick", "geo.mask.thickness"),
    ("geo.source.grid", KeyError, "geo.source.grid"),
]


@pytest.mark.parametrize("command", ["check", "show"])
@pytest.mark.parametrize(("key", "value", "named"), BAD, ids=[b[0] + "-" + str(b[1])[:12] for b in BAD])
def test_config_bad_values(tmp_path, good, command, key, value, named):
    data = copy.deepcopy(good)
    _set(data, key, value)
    path = _write(tmp_path, data)
    r = _invoke("config", command, path)
    assert r.exit_code == 2, r.output
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert named in lines[0] and str(path) in lines[0]


def test_config_missing_file(tmp_path):
    r = _invoke("config", "check", tmp_path / "nope.yaml")
    assert r.exit_code == 2 and "nope.yaml" in r.stderr


def test_sites_listing():
    r = _invoke("sites")
    assert r.exit_code == 0, r.output
    names = {line.split()[0] for line in r.stdout.splitlines() if line and not line.startswith("(")}
    assert {"local", "threads"} <= names
    local = next(line for line in r.stdout.splitlines() if line.startswith("local"))
    assert "HighThroughputExecutor" in local


def test_site_files_define_both_labels(monkeypatch):
    """Every site, given what it requires (an account, a job's node list), has both labels."""
    monkeypatch.setenv("LAUEFLOW_POLARIS_ACCOUNT", "TEST")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "nid[001-002]")
    for name, _ in sites.list_sites():
        if name == "globus-compute":  # needs an endpoint and a Globus login: see tests/test_globus_compute.py
            continue
        cfg = sites.site_config(name, workers=1)
        assert {"decode", "stitch"} <= {ex.label for ex in cfg.executors}


def test_unknown_site(tmp_path):
    with pytest.raises(sites.SiteError, match="unknown site"):
        sites.find_site("nowhere")
    bad = tmp_path / "bad_site.py"
    bad.write_text("from parsl.config import Config\n\ndef config(workers=None, run_dir='runinfo', **o):\n"
                   "    return Config(executors=[])\n")
    with pytest.raises(sites.SiteError, match="decode"):
        sites.site_config(bad)


def test_run_bad_config_writes_nothing(tmp_path, good):
    scan = tmp_path / "scan"
    scan.mkdir()
    data = copy.deepcopy(good)
    data["geo"]["scanner"]["step"] = 0
    _write(scan, data)
    r = _invoke("run", scan, "--site", "threads")
    assert r.exit_code == 2 and "geo.scanner.step" in r.stderr
    assert not default_out_dir(scan).exists()


def test_run_missing_frames_writes_nothing(tmp_path, good):
    scan = tmp_path / "scan"
    scan.mkdir()
    np.save(scan / "mask.npy", debruijn(8))
    _write(scan, good)
    out = tmp_path / "out"
    r = _invoke("run", scan, "--out", out, "--site", "threads")
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error: ") and str(scan) in r.stderr
    assert not out.exists()


def test_run_unknown_site_writes_nothing(tmp_path, good):
    scan = tmp_path / "scan"
    scan.mkdir()
    np.save(scan / "mask.npy", debruijn(8))
    _write(scan, good)
    r = _invoke("run", scan, "--site", "mars")
    assert r.exit_code == 2 and "unknown site" in r.stderr
    assert not default_out_dir(scan).exists()


def test_default_out_dir_is_beside_the_scan(tmp_path):
    scan = tmp_path / "run42"
    scan.mkdir()
    out = default_out_dir(scan)
    assert out == tmp_path / "run42_recon"
    assert scan not in out.parents


def test_simulate_command(tmp_path):
    out = tmp_path / "sim"
    r = _invoke("simulate", out, "--points", "1", "--region", "16", "--single-file", "--seed", "1")
    assert r.exit_code == 0, r.output
    assert str(out) in r.stdout and "config.yaml" in r.stdout and "truth.h5" in r.stdout
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "truth.h5", "mask.npy", "scan.h5"}
    assert _invoke("config", "check", out / "config.yaml").exit_code == 0
    bad = _invoke("simulate", tmp_path / "x", "--preset", "nonsense")
    assert bad.exit_code == 2 and not (tmp_path / "x").exists()



BAD_SIMULATE = [(["--region", "4"], "region must be between 8"), (["--frames", "7"], "frames must be >= 8"),
                (["--pose-error", "cenx=abc"], "is not a number"),
                (["--film-depth", "20"], "a film depth is for the film preset"),
                (["--preset", "film", "--film-depth", "900"], "outside the depth grid")]


@pytest.mark.parametrize(("args", "named"), BAD_SIMULATE, ids=[b[1].split()[0] for b in BAD_SIMULATE])
def test_simulate_bad_arguments(tmp_path, args, named):
    """Arguments the simulator refuses (SimulateError, a LaueflowError): one error line, exit status 2,
    nothing written."""
    out = tmp_path / "sim"
    r = _invoke("simulate", out, "--region", "16", *args)
    assert r.exit_code == 2, r.output
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], r.stderr
    assert not out.exists()


def test_simulate_bad_frames_of_a_configuration(tmp_path, good):
    """A configuration whose frames are too few to simulate: one error line naming it, exit status 2."""
    data = copy.deepcopy(good)
    data["file"]["range"] = [0, 4, 1]
    path = _write(tmp_path, data)
    out = tmp_path / "sim"
    r = _invoke("simulate", out, "--config", path)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: frames must be >= 8") and str(path) in lines[0]
    assert not out.exists()

# Output folders the operating system refuses (issue 14, defect 6): one error line, exit 2, nothing written.

def _run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "laueflow.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def test_run_output_folder_below_a_file(multipoint_scan, tmp_path):
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a folder\n")
    r = _run_cli("run", multipoint_scan, "--out", blocker / "recon", "--site", "threads")
    assert r.returncode == 2, r.stderr
    line = _one_error_line(r.stderr)
    assert str(blocker) in line and "is a file, not a folder" in line
    assert blocker.read_text() == "not a folder\n" and sorted(tmp_path.iterdir()) == [blocker]


def test_run_read_only_output_folder(multipoint_scan, tmp_path):
    """A folder the user may not write to (mode 555; as root, which ignores modes, a read-only tmpfs
    mounted in a user namespace of its own)."""
    out = tmp_path / "recon"
    out.mkdir()
    cmd = [sys.executable, "-m", "laueflow.cli", "run", str(multipoint_scan), "--out", str(out),
           "--site", "threads"]
    if os.geteuid() != 0:
        out.chmod(0o555)
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        finally:
            out.chmod(0o755)
    else:
        if shutil.which("unshare") is None:
            pytest.skip("running as root, and unshare is not installed to mount a read-only folder")
        script = f"mount -t tmpfs -o ro,size=64k none {out} && exec {shlex.join(cmd)}"
        r = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                           timeout=300)
        if r.returncode != 2 and "mount" in r.stderr:
            pytest.skip(f"cannot mount a read-only tmpfs in a user namespace: {r.stderr.strip()}")
    assert r.returncode == 2, r.stderr
    line = _one_error_line(r.stderr)
    assert f"output folder {out} cannot be written" in line and "Traceback" not in r.stderr
    assert list(out.iterdir()) == []


def test_rerun_that_keeps_every_point_says_so(multipoint_scan, multipoint_run, tmp_path):
    """The last line and status.json count kept points and pixels apart from decoded ones (issue 14,
    item 3): a rerun that keeps every point decodes nothing and says so."""
    out = tmp_path / "recon"
    shutil.copytree(multipoint_run, out)
    r = _invoke("run", multipoint_scan, "--out", out, "--site", "threads", "--block-pixels", 64)
    assert r.exit_code == 0, r.output
    totals = json.loads((out / "status.json").read_text())["totals"]
    kept = totals["pixels_kept"]
    assert kept > 0 and totals["pixels_decoded"] == totals["pixels_reused"] == totals["pixels_failed"] == 0
    assert totals["points_kept"] == 3 and totals["points_computed"] == 0
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith(f"3 points (3 kept); pixels: 0 decoded, {kept} in kept files;"), last
    assert "reconstructed" not in last


def test_run_and_watch_options_from_one_helper(tmp_path):
    """`run` and `watch` build their RunOptions in one place: the shared options, the site, this command
    line for the provenance, and the watch's poll interval on top."""
    site = sites.site_config("threads", workers=1, run_dir=str(tmp_path / ".runinfo"))
    setup = RunSetup(cfg=None, location=tmp_path, out_dir=tmp_path / "recon", site_config=site, console=None)
    shared = {"block_pixels": 64, "site_config": site, "command_line": provenance.command_line()}
    assert make_options(setup, "0:2", 64, True, True, False) == RunOptions(
        points="0:2", force=True, per_depth_files=True, staging=False, **shared)
    assert make_options(setup, [3], 64, False, False, True, poll_interval=0.25) == RunOptions(
        points=[3], poll_interval=0.25, **shared)


def test_laueflow_warnings_are_one_line(capsys):
    """The command line shows laueflow's warnings (here a scan's trailing frames) as one line; others
    keep Python's format."""
    from laueflow.cli.common import show_warning
    from laueflow.io.scan import ScanWarning

    show_warning(ScanWarning("the last 2 of 12 frames are ignored"), ScanWarning, "scan.py", 1)
    show_warning(DeprecationWarning("something else"), DeprecationWarning, "x.py", 3)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "warning: the last 2 of 12 frames are ignored"
    assert err[1] == "x.py:3: DeprecationWarning: something else"
