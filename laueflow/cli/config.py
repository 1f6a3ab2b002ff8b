"""`laueflow config check|show|from-geo`: validate or print a beamline configuration, or take its detector
from a geoN geometry file."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import click
from ruamel.yaml.comments import CommentedMap

from ..config import Config, commented, derived_yaml, write_derived, write_yaml, yaml_text, yaml_writer
from ..io.geon import GeoNDetector, GeoNFile, detector_keys, read_geon
from .common import fail, input_errors, load_config

_COMMENT_COLUMN = 36  # where `# default` marks start in `config show`


@click.group("config")
def config_group() -> None:
    """Check or show a beamline configuration file, or take its detector from a geoN file."""


@config_group.command("check")
@click.argument("file", type=click.Path(path_type=Path))
def config_check(file: Path) -> None:
    """Validate FILE and the mask code it names; list unknown or unused keys as warnings."""
    cfg = load_config(file)
    r0, r1, c0, c1 = cfg.file.frame
    mask = cfg.geo.mask
    code = (f"mask code {cfg.resolve(mask.path)} (sha256 {mask.sha256[:16]})" if mask.sha256
            else "generated de Bruijn B(2, 8) mask code")
    click.echo(f"OK: {file}: {cfg.file.n_frames} frames per point, region {r1 - r0} x {c1 - c0} pixels, "
               f"{len(cfg.geo.source.depths)} depth bins, {code}")


@config_group.command("show")
@click.argument("file", type=click.Path(path_type=Path))
def config_show(file: Path) -> None:
    """Print FILE as laueflow resolves it, every default filled in and marked `# default`."""
    cfg = load_config(file)
    click.echo(annotated_yaml(cfg), nl=False)


def annotated_yaml(cfg: Config) -> str:
    """The configuration as YAML (the beamline schema of :meth:`Config.to_dict`), each value that came
    from laueflow's defaults rather than the file marked with a ``# default`` comment."""
    data = commented(cfg.to_dict())
    for key in cfg.defaults:
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, CommentedMap) else None
        if isinstance(node, CommentedMap) and leaf in node:
            node.yaml_add_eol_comment("default", leaf, column=_COMMENT_COLUMN)
    mask = data["geo"]["mask"]
    if "sha256" in mask:
        mask.yaml_add_eol_comment("of the code in geo.mask.path", "sha256", column=_COMMENT_COLUMN)
    return yaml_text(yaml_writer(), data)


def refuse_out(out: Path, base: Path | None, force: bool, base_role: str, result: str) -> None:
    """Stop before any work when --out is a folder, is the configuration ``base`` the result derives from
    (its ``base_role``), or exists and --force is not given."""
    if out.is_dir():
        fail(f"--out {out} is a folder; give a file name")
    if base is not None and out.exists() and out.resolve() == base.resolve():
        fail(f"--out {out} is the {base_role}; write the {result} to another file")
    if out.exists() and not force:
        fail(f"--out {out} exists; use --force to overwrite it")


# ----------------------------------------------------------------------------------------------
# `config from-geo`: geo.detector from a 34-ID-E geoN geometry file


@config_group.command("from-geo")
@click.argument("geo_file", metavar="GEO.xml", type=click.Path(path_type=Path))
@click.option("--base", type=click.Path(path_type=Path), metavar="BEAMLINE.yaml",
              help="Write this configuration with its geo.detector keys replaced (comments kept).")
@click.option("--detector", "which", metavar="ID_OR_N",
              help="The detector's ID (e.g. 'PE1621 723-3335') or its number N; needed when the file has "
                   "several.")
@click.option("--out", type=click.Path(path_type=Path), metavar="FILE",
              help="Write here instead of printing; an existing file only with --force.")
@click.option("--force", is_flag=True, help="Overwrite an existing --out file.")
def config_from_geo(geo_file: Path, base: Path | None, which: str | None, out: Path | None,
                    force: bool) -> None:
    """geo.detector from a geoN geometry file (LaueGo's geoN_<date>.xml).

    Without --base, prints the geo.detector section (or writes it to --out), units and conversions in
    comments.  With --base, writes the whole configuration BEAMLINE.yaml with geo.detector replaced, its
    comments and other keys kept, a comment naming the geoN file and detector, and relative paths made
    absolute when the result lies in another folder; it must pass `laueflow config check`.

    shape = Npixels [Nx, Ny] (columns along x, rows along y), size = size [sizeX, sizeY] in mm,
    rot = R in radians (Rodrigues), pos = P in mm; other units in the file are converted.  Not taken: the
    sample origin (a raw reading of the sample positioner; laueflow's depths count from the beamline
    origin along the beam, and geo.source.offset stays as it is), the sample and wire rotations, the wire,
    and detector translators m1..m3 (their distances are not in the file).
    """
    if out is not None:
        refuse_out(out, base, force, "base configuration", "new one")
    with input_errors():
        geo = read_geon(geo_file)
        det = geo.select(which)
        notes = [f"not taken from the geoN file: {n}" for n in _not_taken(geo, det)]
        header = _provenance(geo, det) + notes
        if base is None:
            text = _detector_fragment(det, header)
            if out is not None:
                write_yaml(out, text)
        else:  # written to --out by _with_detector
            text = _with_detector(base, out, force, geo, det, header)
    if out is None:
        click.echo(text, nl=False)
        return
    what = "geo.detector" if base is None else f"{base} with geo.detector"
    click.echo(f"wrote {out}: {what} from {geo.path}, detector {det.label()}")
    for line in notes:
        click.echo(line)


def _provenance(geo: GeoNFile, det: GeoNDetector) -> list[str]:
    measured = f", measured {det.time_measured}" if det.time_measured else ""
    return [f"geo.detector from {geo.path.resolve()}, detector {det.label()}{measured}",
            "by laueflow config from-geo; units: " + "; ".join(c.describe() for c in det.conversions)]


def _not_taken(geo: GeoNFile, det: GeoNDetector) -> list[str]:
    """What the geoN file holds that laueflow does not use, one line each."""
    notes = []
    if geo.sample is not None:
        s = geo.sample
        unit = s.origin_conversion.unit or s.origin_conversion.assumed
        given = " ".join(f"{v:g}" for v in s.origin_given)
        notes.append(f"Sample/Origin ({given} {unit}) is a reading of the sample positioner; laueflow's "
                     f"depths count from the beamline origin along the beam (geo.source.offset is left as "
                     f"it is)")
    unused = (["Sample/R"] if geo.sample is not None and geo.sample.rot is not None else []) + \
        (["Wire"] if geo.has_wire else [])
    if unused:
        notes.append(f"{' and '.join(unused)}: laueflow has no use for them (the coded aperture's pose is "
                     f"geo.mask.focus)")
    if det.translators:
        notes.append(f"{len(det.translators)} detector translator direction(s) m1..m3: not applied, their "
                     f"distances are not in the geoN file; P is taken as the detector position")
    others = [d.label() for d in geo.detectors if d is not det]
    if others:
        notes.append(f"the other detectors in the file: {', '.join(others)}")
    return notes


def _detector_fragment(det: GeoNDetector, header: list[str]) -> str:
    """The geo.detector section alone, each key's source and unit in a comment."""
    data = commented({"geo": {"detector": detector_keys(det)}})
    node = data["geo"]["detector"]
    units = {c.element: c for c in det.conversions}
    for key, comment in (
        ("shape", "px: Npixels [Nx, Ny]; columns along x, rows along y"),
        ("size", f"mm: size [sizeX, sizeY], {units['size'].how()}"),
        ("rot", f"rad, Rodrigues vector: R, {units['R'].how()}"),
        ("pos", f"mm: P, {units['P'].how()}"),
    ):
        node.yaml_add_eol_comment(comment, key, column=_COMMENT_COLUMN + 16)
    return yaml_text(yaml_writer(), data, header)


def _with_detector(base: Path, out: Path | None, force: bool, geo: GeoNFile, det: GeoNDetector,
                   header: list[str]) -> str:
    """BEAMLINE.yaml with geo.detector from ``det``, checked as `config check` would check it: written to
    ``out``, or returned as text where there is none.  Its warnings go to stderr."""
    updates = {f"geo.detector.{k}": v for k, v in detector_keys(det).items()}
    derived: dict[str, Any] = {
        "header": header,
        "notes": {"geo.detector": f"from {geo.path.name}, detector {det.label()}"},
        "what": f"{base} with detector {det.label()} of {geo.path}",
    }
    text = ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if out is None:
            text, cfg = derived_yaml(base, updates, **derived)
        else:
            cfg = write_derived(base, out, updates, force=force, **derived)
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    if cfg.calibration:
        click.echo(f"warning: {base} carries a calibration record: its mask pose was fitted with the base's "
                   f"detector, not with this one; recalibrate (laueflow calibrate) if the detector moved",
                   err=True)
    return text
