"""geoN geometry files (laueflow.io.geon) and `laueflow config from-geo`.

tests/data/geoN_example.xml is written by hand in LaueGo's layout: detector N=0 in mm and radian as
LaueGo writes it, detector N=3 with size and P in micron.  The expected values below are converted by
hand, not by the code under test.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from scipy.spatial.transform import Rotation

from laueflow import geometry
from laueflow import mask as M
from laueflow.cli import main
from laueflow.config import from_dict
from laueflow.errors import GeometryFileError, LaueflowError
from laueflow.io.geon import detector_keys, read_geon
from laueflow.simulate import default_config_dict

EXAMPLE = Path(__file__).parent / "data" / "geoN_example.xml"
TOP = "PE1621 723-3335"
SIDE = "PE0822 883-4841"

# detector N=0 as written (mm, radian)
TOP_KEYS = {"shape": [2048, 2048], "size": [409.6, 409.6], "rot": [-1.20133461, -1.2129874, -1.21875012],
            "pos": [28.764, 2.841, 513.052]}
# detector N=3: size 204800 micron = 204.8 mm; P (-143702, 25914, 404218) micron = (-143.702, 25.914,
# 404.218) mm
SIDE_KEYS = {"shape": [1024, 1024], "size": [204.8, 204.8], "rot": [-1.75021388, -0.72761042, -1.76630517],
             "pos": [-143.702, 25.914, 404.218]}


def _variant(tmp_path: Path, *replacements: tuple[str, str], name: str = "geoN_variant.xml") -> Path:
    """The example file with text replaced (each replacement must apply)."""
    text = EXAMPLE.read_text()
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(path: Path) -> str:
    with pytest.raises(GeometryFileError) as info:
        read_geon(path)
    assert isinstance(info.value, LaueflowError)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    return message


def _cli(*args: str | Path):
    return CliRunner().invoke(main, ["config", "from-geo", *[str(a) for a in args]])


def _refused(result) -> str:
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stdout == "" and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# ----------------------------------------------------------------------------------------------
# Reading


def test_reads_the_example_detectors_sample_and_units():
    geo = read_geon(EXAMPLE)
    assert [d.number for d in geo.detectors] == [0, 3]
    top, side = geo.detectors
    assert top.id == TOP and side.id == SIDE
    assert top.npixels == (2048, 2048) and top.size == (409.6, 409.6)
    assert top.rot == (-1.20133461, -1.2129874, -1.21875012)
    assert top.pos == (28.764, 2.841, 513.052)
    assert top.time_measured == "Tue, Mar 12, 2024, 13:58:10 (-5)"
    assert top.note == "Optimized using CalibrationListOrange0"
    # micron in the file, mm here
    assert side.npixels == (1024, 1024) and side.size == (204.8, 204.8)
    assert side.pos == (-143.702, 25.914, 404.218)
    assert side.rot == (-1.75021388, -0.72761042, -1.76630517)
    assert [(c.element, c.unit, c.factor) for c in side.conversions] == [
        ("size", "micron", 1e-3), ("R", "radian", 1.0), ("P", "micron", 1e-3)]
    # the sample origin: 8150 -4712.5 -4490 micron = 8.15 -4.7125 -4.49 mm
    assert geo.sample.origin == (8.15, -4.7125, -4.49)
    assert geo.sample.origin_given == (8150.0, -4712.5, -4490.0)
    assert geo.sample.origin_conversion.unit == "micron"
    assert geo.sample.rot == (-0.0061, 0.0058, -2.1e-05)
    assert geo.has_wire and geo.date_written == "Tue, Mar 12, 2024"
    assert detector_keys(top) == TOP_KEYS and detector_keys(side) == SIDE_KEYS


def test_micron_and_mm_give_the_same_detector(tmp_path):
    in_micron = _variant(tmp_path,
                         ('<size unit="mm">409.6 409.6</size>', '<size unit="micron">409600 409600</size>'),
                         ('<P unit="mm">28.764 2.841 513.052</P>', '<P unit="um">28764 2841 513052</P>'))
    top = read_geon(in_micron).select(0)
    assert detector_keys(top) == TOP_KEYS
    assert [c.describe() for c in top.conversions] == [
        "size: micron x 0.001 -> mm", "R: radian, as given", "P: um x 0.001 -> mm"]
    # no float dust in what is written out: 700 * 0.001 is 0.7000000000000001 in floating point
    small = _variant(tmp_path, ('<size unit="mm">409.6 409.6</size>', '<size unit="micron">700 28.8</size>'))
    assert read_geon(small).select(0).size == (0.7, 0.0288)


def test_angles_in_degrees_and_units_left_out(tmp_path):
    path = _variant(tmp_path, ('<R unit="radian">-1.20133461 -1.2129874 -1.21875012</R>',
                               '<R unit="degree">90 -45 0</R>'),
                    ('<P unit="mm">28.764 2.841 513.052</P>', "<P>28.764 2.841 513.052</P>"),
                    ('<Origin unit="micron">8150 -4712.5 -4490</Origin>',
                     "<Origin>8150 -4712.5 -4490</Origin>"))
    geo = read_geon(path)
    top = geo.select(TOP)
    assert top.rot == pytest.approx((math.pi / 2, -math.pi / 4, 0.0), rel=1e-14, abs=0)
    assert top.pos == (28.764, 2.841, 513.052)  # no unit: mm, what LaueGo writes and assumes
    assert top.conversions[2].describe() == "P: no unit given, mm assumed"
    assert geo.sample.origin == (8.15, -4.7125, -4.49)  # no unit: micron, LaueGo's unit of the origin


def test_unknown_unit_is_named(tmp_path):
    message = _error(_variant(tmp_path, ('<P unit="micron">-143702', '<P unit="furlong">-143702')))
    assert "Detector N=3/P: unknown unit 'furlong'" in message and "micron" in message


@pytest.mark.parametrize("replacement, expected", [
    (("</geoN>", ""), "not valid XML: line"),
    (("<Npixels>2048 2048</Npixels>", "<Npixels>2048 2048</Npixel>"), "not valid XML: line 19"),
    (('<P unit="mm">28.764 2.841 513.052</P>', ""), "Detector N=0: <P> is missing"),
    (("<ID>PE0822 883-4841</ID>", ""), "Detector N=3: <ID> is missing or empty"),
    (("<Npixels>1024 1024</Npixels>", "<Npixels>1024</Npixels>"), "Detector N=3/Npixels: expected 2 numbers"),
    (("<Npixels>1024 1024</Npixels>", "<Npixels>1024 10.5</Npixels>"), "positive whole numbers of pixels"),
    (('<size unit="mm">409.6 409.6</size>', '<size unit="mm">409.6 nan</size>'), "expected finite numbers"),
    (('<Detector N="3">', '<Detector N="0">'), "two detectors share the number N 0"),
    (('<Detector N="3">', "<Detector>"), "<Detector> number 2 in <Detectors>: needs an integer N attribute"),
    (('Ndetectors="2"', 'Ndetectors="3"'), "Ndetectors=3 but only 2 <Detector> elements"),
    (("<geoN xmlns", "<diffractometer xmlns"), "the root element is <diffractometer>, not <geoN>"),
])
def test_broken_files_are_one_error_naming_file_and_element(tmp_path, replacement, expected):
    if replacement[0] == "<geoN xmlns":
        path = _variant(tmp_path, replacement, ("</geoN>", "</diffractometer>"))
    else:
        path = _variant(tmp_path, replacement)
    assert expected in _error(path)


def test_a_missing_file_and_a_missing_detectors_section(tmp_path):
    assert "does not exist" in _error(tmp_path / "geoN_none.xml")
    empty = tmp_path / "geoN_empty.xml"
    empty.write_text('<?xml version="1.0" ?>\n<geoN><Sample/></geoN>\n')
    assert "geoN: <Detectors> is missing" in _error(empty)


def test_old_comment_style_is_read(tmp_path):
    """LaueGo wrote comments as '<-- ... -->' until late 2012: not XML, but meant as comments."""
    path = _variant(tmp_path, ("<!-- unique detector ID -->", "<-- unique detector ID -->"),
                    ("<!-- Ndetectors, number of detectors in use -->", "<-- Ndetectors -->"))
    assert detector_keys(read_geon(path).select(TOP)) == TOP_KEYS


def test_choosing_a_detector(tmp_path):
    geo = read_geon(EXAMPLE)
    assert geo.select(SIDE).number == 3 and geo.select("3").id == SIDE and geo.select(0).id == TOP
    with pytest.raises(GeometryFileError, match=r"holds 2 detectors: N=0 \(ID 'PE1621 723-3335'\), N=3 "
                                                r"\(ID 'PE0822 883-4841'\); choose one"):
        geo.select(None)
    with pytest.raises(GeometryFileError, match=r"no detector with ID or number '1'; it has N=0 \(ID "
                                                r"'PE1621 723-3335'\), N=3 \(ID 'PE0822 883-4841'\)"):
        geo.select("1")
    # Ndetectors="1": only the first detector is in use (as LaueGo reads it), and it is the default
    one = read_geon(_variant(tmp_path, ('Ndetectors="2"', 'Ndetectors="1"')))
    assert [d.id for d in one.detectors] == [TOP] and one.select(None).id == TOP


def test_pixels_land_where_the_geon_convention_puts_them(tmp_path):
    """Column c, row r in laueflow is LaueGo's pixel (px, py) = (c, r) on a non-square detector: the lab
    point of laueflow's pixel_centres equals R (xd + P) of the geoN description, with the beamline axes
    X, Y, Z (outboard, up, downstream) as laueflow's (-e3, e2, e1)."""
    nx, ny, sx, sy = 2048, 1024, 409.6, 153.6
    rot, pos = (-1.20133461, -1.2129874, -1.21875012), (28.764, 2.841, 513.052)
    path = _variant(tmp_path, ("<Npixels>2048 2048</Npixels>", f"<Npixels>{nx} {ny}</Npixels>"),
                    ('<size unit="mm">409.6 409.6</size>', f'<size unit="mm">{sx} {sy}</size>'))
    keys = detector_keys(read_geon(path).select(TOP))
    assert keys["shape"] == [nx, ny] and keys["size"] == [sx, sy]
    data = default_config_dict("tilted", frames=11, region=16)
    data["file"]["frame"] = [0, 16, 0, 16]
    data["geo"]["detector"] = keys
    cfg = from_dict(data, check_files=False)
    geo = geometry.from_config(cfg, code_length=1000.0)
    px = np.array([0, 2047, 100, 1500])
    py = np.array([0, 1023, 900, 17])
    lab = geometry.pixel_centres(geo, rows=py, cols=px)
    xd = (px - 0.5 * (nx - 1)) * sx / nx + pos[0]
    yd = (py - 0.5 * (ny - 1)) * sy / ny + pos[1]
    xyz = Rotation.from_rotvec(rot).apply(np.stack([xd, yd, np.full(px.shape, pos[2])], axis=-1))
    np.testing.assert_allclose(lab, np.stack([xyz[:, 2], xyz[:, 1], -xyz[:, 0]], axis=-1), rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# laueflow config from-geo


def test_fragment_without_base():
    r = _cli(EXAMPLE, "--detector", "3")
    assert r.exit_code == 0, (r.output, r.exception)
    assert yaml.safe_load(r.stdout) == {"geo": {"detector": SIDE_KEYS}}
    comments = [line for line in r.stdout.splitlines() if "#" in line]
    assert any(f"geo.detector from {EXAMPLE}, detector N=3 (ID '{SIDE}')" in c for c in comments)
    assert any("size" in c and "micron x 0.001 -> mm" in c for c in comments)
    assert any("Sample/Origin (8150 -4712.5 -4490 micron)" in c and "not taken" in c for c in comments)


def test_fragment_numbers_stay_numbers(tmp_path):
    """A component like 1e-05 is written 1.0e-05: PyYAML (laueflow's loader) reads 1e-05 as a string."""
    path = _variant(tmp_path, ("-1.20133461 -1.2129874 -1.21875012", "1e-05 0 -2"))
    r = _cli(path, "--detector", TOP)
    assert r.exit_code == 0, r.output
    assert yaml.safe_load(r.stdout)["geo"]["detector"]["rot"] == [1e-05, 0.0, -2.0]


def test_several_detectors_and_none_chosen_or_a_missing_one():
    line = _refused(_cli(EXAMPLE))
    assert f"holds 2 detectors: N=0 (ID '{TOP}'), N=3 (ID '{SIDE}')" in line
    line = _refused(_cli(EXAMPLE, "--detector", "PE9999"))
    assert "no detector with ID or number 'PE9999'" in line and TOP in line and SIDE in line


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A complete beamline configuration with comments, its mask code beside it (relative paths)."""
    folder = tmp_path / "beamline"
    folder.mkdir()
    np.save(folder / "mask.npy", M.debruijn(8))
    text = yaml.safe_dump(default_config_dict("tilted", frames=261, region=16), sort_keys=False)
    text = "# 34-ID-E, run 2024-1\n" + text.replace("  detector:\n", "  detector:  # the 2023 calibration\n")
    text = text.replace("thickness: 3.7\n", "thickness: 3.7  # measured by SEM\n")
    path = folder / "beamline.yaml"
    path.write_text(text)
    return path


def test_with_base_writes_a_configuration_that_passes_check(tmp_path, base):
    out = tmp_path / "elsewhere" / "from_geo.yaml"
    out.parent.mkdir()
    before = base.read_bytes()
    r = _cli(EXAMPLE, "--base", base, "--detector", TOP, "--out", out)
    assert r.exit_code == 0, (r.output, r.exception)
    assert f"wrote {out}" in r.stdout and "Sample/Origin" in r.stdout
    assert base.read_bytes() == before
    text = out.read_text()
    # the base's comments are kept, the source of the detector is named
    for comment in ("# 34-ID-E, run 2024-1", "# measured by SEM", "# the 2023 calibration"):
        assert comment in text
    assert f"# geo.detector from {EXAMPLE}, detector N=0 (ID '{TOP}')" in text
    data, nominal = yaml.safe_load(text), yaml.safe_load(before)
    assert data["geo"]["detector"] == TOP_KEYS
    # relative paths of the base now point to its folder from the other one; all else as it was
    assert data["file"]["path"] == str(base.parent)
    assert data["geo"]["mask"]["path"] == str(base.parent / "mask.npy")
    for d in (data, nominal):
        del d["geo"]["detector"], d["file"]["path"], d["geo"]["mask"]["path"]
    assert data == nominal
    check = CliRunner().invoke(main, ["config", "check", str(out)])
    assert check.exit_code == 0 and check.stdout.startswith(f"OK: {out}"), check.output


def test_with_base_beside_it_keeps_relative_paths(base):
    out = base.parent / "beamline_geo.yaml"
    r = _cli(EXAMPLE, "--base", base, "--detector", "0", "--out", out)
    assert r.exit_code == 0, r.output
    data = yaml.safe_load(out.read_text())
    assert data["file"]["path"] == "." and data["geo"]["mask"]["path"] == "mask.npy"
    assert CliRunner().invoke(main, ["config", "check", str(out)]).exit_code == 0


def test_with_base_printed_has_absolute_paths_and_numbers_that_load(tmp_path, base):
    """Without --out the configuration is printed, its paths absolute (it may be saved anywhere); a small
    component such as 1e-05 loads back as that number."""
    path = _variant(tmp_path, ("-1.20133461 -1.2129874 -1.21875012", "1e-05 0 -2"))
    r = _cli(path, "--base", base, "--detector", TOP)
    assert r.exit_code == 0, (r.output, r.exception)
    assert sorted(p.name for p in base.parent.iterdir()) == ["beamline.yaml", "mask.npy"]  # nothing written
    saved = tmp_path / "saved.yaml"
    saved.write_text(r.stdout)
    data = yaml.safe_load(r.stdout)
    assert data["file"]["path"] == str(base.parent)
    assert data["geo"]["mask"]["path"] == str(base.parent / "mask.npy")
    check = CliRunner().invoke(main, ["config", "check", str(saved)])
    assert check.exit_code == 0, check.output
    assert data["geo"]["detector"]["rot"] == [1e-05, 0.0, -2.0]


def test_refuses_to_overwrite_unless_forced(tmp_path, base):
    out = tmp_path / "out.yaml"
    out.write_text("precious\n")
    line = _refused(_cli(EXAMPLE, "--base", base, "--detector", TOP, "--out", out))
    assert f"{out} exists; use --force" in line and out.read_text() == "precious\n"
    _refused(_cli(EXAMPLE, "--detector", TOP, "--out", out))
    assert out.read_text() == "precious\n"
    line = _refused(_cli(EXAMPLE, "--base", base, "--detector", TOP, "--out", base, "--force"))
    assert "is the base configuration" in line
    r = _cli(EXAMPLE, "--base", base, "--detector", TOP, "--out", out, "--force")
    assert r.exit_code == 0, r.output
    assert yaml.safe_load(out.read_text())["geo"]["detector"] == TOP_KEYS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["beamline", "out.yaml"]  # no temporary left


def test_a_result_that_would_not_pass_check_is_not_written(tmp_path, base):
    """The 1024-pixel side detector cannot hold the base's region at row 1016-1032."""
    out = tmp_path / "out.yaml"
    line = _refused(_cli(EXAMPLE, "--base", base, "--detector", SIDE, "--out", out))
    assert "is not a valid configuration" in line and "file.frame" in line and "1024 x 1024 detector" in line
    assert not out.exists() and list(tmp_path.iterdir()) == [base.parent]


def test_malformed_geon_file_on_the_command_line(tmp_path, base):
    path = _variant(tmp_path, ("</Detectors>", ""))
    line = _refused(_cli(path, "--base", base, "--out", tmp_path / "out.yaml"))
    assert line.startswith(f"error: {path}: not valid XML: line ")
    assert not (tmp_path / "out.yaml").exists()


def test_base_without_detector_or_with_a_calibration(tmp_path, base):
    """A base without geo.detector gets one; a calibrated base is written with a warning that its mask pose
    was fitted with another detector."""
    data = yaml.safe_load(base.read_text())
    del data["geo"]["detector"]
    data["calibration"] = {"by": "laueflow calibrate", "fitted": ["cenx", "dist"]}
    bare = base.parent / "bare.yaml"
    bare.write_text(yaml.safe_dump(data, sort_keys=False))
    out = base.parent / "filled.yaml"
    r = _cli(EXAMPLE, "--base", bare, "--detector", TOP, "--out", out)
    assert r.exit_code == 0, r.output
    assert "calibration record" in r.stderr and "recalibrate" in r.stderr
    written = yaml.safe_load(out.read_text())
    assert written["geo"]["detector"] == TOP_KEYS and written["calibration"] == data["calibration"]
    assert CliRunner().invoke(main, ["config", "check", str(out)]).exit_code == 0
