"""The ``laueflow`` command: run a reconstruction, simulate a scan, check a configuration, list sites.

Input problems (configuration, scan, site) are reported as one ``error: ...`` line on stderr with
exit status 2, before anything is written.  A run in which some point failed exits with status 1.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import click

from . import __version__

INPUT_ERROR = 2


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(INPUT_ERROR)


@contextmanager
def _input_errors() -> Iterator[None]:
    """Turn the errors of bad input into one message and exit status 2."""
    from .config import ConfigError
    from .io.scan import ScanError
    from .sites import SiteError
    from .workflow.dag import RunError

    try:
        yield
    except (ConfigError, ScanError, SiteError, RunError) as exc:
        _fail(str(exc))


def _load_config(path: Path) -> Any:
    """Load a configuration, printing its warnings as ``warning: ...`` on stderr."""
    from .config import load

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _input_errors():
            cfg = load(path)
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    return cfg


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="laueflow")
def main() -> None:
    """Depth-resolved reconstruction of coded-aperture Laue micro-diffraction scans."""


# ----------------------------------------------------------------------------------------------
# run


def default_out_dir(scan_dir: Path) -> Path:
    """``<scan>_recon`` beside the scan (never inside the input)."""
    scan_dir = scan_dir.resolve()
    name = scan_dir.stem if scan_dir.is_file() else scan_dir.name
    return scan_dir.parent / f"{name}_recon"


def _scan_location(scan_dir: Path, cfg: Any) -> Path:
    """The data the run reads: the configuration's ``file.path`` when it lies within SCAN_DIR (it may
    name a stack file or a frame prefix there), else SCAN_DIR itself."""
    scan_dir = scan_dir.resolve()
    if scan_dir.is_file():
        return scan_dir
    named = cfg.resolve(cfg.file.path)
    if named is not None:
        named = named.resolve()
        if named == scan_dir or scan_dir in named.parents:
            return named
    return scan_dir


def _site_options(pairs: tuple[str, ...], endpoint: str | None) -> dict[str, str]:
    """``KEY=VALUE`` site options from the command line (``--endpoint`` is the option ``endpoint``)."""
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            _fail(f"--site-option {pair!r}: expected KEY=VALUE (see `laueflow sites show SITE`)")
        options[key.strip().replace("-", "_")] = value
    if endpoint:
        options["endpoint"] = endpoint
    return options


def run_options(func: Callable) -> Callable:
    """The options `laueflow run` and `laueflow watch` share."""
    options = [
        click.option("--config", "config_file", type=click.Path(path_type=Path),
                     help="Beamline configuration (default: SCAN_DIR/config.yaml)."),
        click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
                     help="Output folder (default: <scan>_recon beside SCAN_DIR)."),
        click.option("--block-pixels", type=click.IntRange(min=1),
                     help="Pixels per task (default: recon.block_pixels)."),
        click.option("--site", default="local", show_default=True,
                     help="Site name (see `laueflow sites`) or site file."),
        click.option("--site-option", "site_option", multiple=True, metavar="KEY=VALUE",
                     help="A site option (repeatable), e.g. account=MyProject; "
                          "see `laueflow sites show SITE`."),
        click.option("--endpoint", metavar="UUID", help="Globus Compute endpoint (site globus-compute)."),
        click.option("--workers", type=click.IntRange(min=1),
                     help="Decode workers (default: the site's choice)."),
        click.option("--force", is_flag=True,
                     help="Recompute everything, even up-to-date points and blocks."),
        click.option("--per-depth-files", is_flag=True,
                     help="Also write one image file per depth (entry1/data/data, entry1/depth) per point."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@dataclass
class RunSetup:
    """What `run` and `watch` resolve from their common options before the work starts."""

    cfg: Any
    config_file: Path
    location: Path
    out_dir: Path
    site_config: Any
    console: Any


def prepare_run(scan_dir: Path, config_file: Path | None, out_dir: Path | None, site: str,
                site_option: tuple[str, ...], endpoint: str | None, workers: int | None) -> RunSetup:
    """Load the configuration and the site and print where things are (errors exit with status 2)."""
    from rich.console import Console

    from . import sites

    config_file = config_file or (scan_dir if scan_dir.is_dir() else scan_dir.parent) / "config.yaml"
    cfg = _load_config(config_file)
    location = _scan_location(scan_dir, cfg)
    out_dir = (out_dir or default_out_dir(scan_dir)).resolve()
    options = _site_options(site_option, endpoint)
    with _input_errors():
        parsl_config = sites.site_config(site, workers=workers, run_dir=str(out_dir / ".runinfo"), **options)
    click.echo(f"scan:   {location}")
    click.echo(f"config: {Path(config_file).resolve()} (fingerprint {cfg.fingerprint()})")
    click.echo(f"output: {out_dir}/point_<k>.h5 (site {site}, Parsl logs in {out_dir / '.runinfo'}, "
               f"progress in {out_dir / 'status.json'})")
    return RunSetup(cfg, Path(config_file), location, out_dir, parsl_config, Console())


def finish_run(result: Any, console: Any) -> NoReturn:
    """Print the summary (and again the points that need attention) and exit with the run's status."""
    if result is None:
        click.echo("interrupted: finished points and blocks are kept; run again to resume", err=True)
        sys.exit(130)
    if console.is_terminal:  # the bar printed the point lines; repeat the ones that need attention
        for p in result.points:
            if not p.ok:
                click.echo(p.line(), err=True)
    click.echo(result.summary())
    sys.exit(result.exit_code)


@main.command()
@click.argument("scan_dir", type=click.Path(exists=True, path_type=Path))
@click.option("--points", help="Scan points: 5, 0,2,4, 3:7 (end exclusive) or all (default).")
@run_options
def run(scan_dir: Path, points: str | None, config_file: Path | None, out_dir: Path | None,
        block_pixels: int | None, site: str, site_option: tuple[str, ...], endpoint: str | None,
        workers: int | None, force: bool, per_depth_files: bool) -> None:
    """Reconstruct the scan in SCAN_DIR into one HDF5 file per scan point.

    A rerun keeps the points and blocks that are up to date and computes the rest; progress is in
    OUT/status.json while it runs.
    """
    from . import provenance
    from .progress import reporter
    from .workflow import dag

    setup = prepare_run(scan_dir, config_file, out_dir, site, site_option, endpoint, workers)
    report, close = reporter(setup.console)
    with _input_errors():
        try:
            result = dag.run(setup.location, setup.cfg, setup.out_dir, points=points,
                             block_pixels=block_pixels, site_config=setup.site_config, progress=report,
                             command_line=provenance.command_line(), force=force,
                             per_depth_files=per_depth_files)
        except KeyboardInterrupt:
            result = None
        finally:
            close()
    finish_run(result, setup.console)


# ----------------------------------------------------------------------------------------------
# simulate


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", type=click.Choice(["thin", "extended", "overlap", "multipoint"]), default="thin",
              show_default=True, help="What the sample holds.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--frames", type=click.IntRange(min=2), help="Frames per scan point (default 261).")
@click.option("--points", type=click.IntRange(min=1), default=1, show_default=True, help="Scan points.")
@click.option("--noise/--no-noise", default=True, show_default=True, help="Poisson noise.")
@click.option("--single-file", is_flag=True, help="One stack file instead of one file per frame.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Take geometry, mask, region and frames from this configuration.")
@click.option("--region", type=click.IntRange(min=1), default=64, show_default=True,
              help="Side of the simulated detector region, pixels.")
@click.option("--geometry", type=click.Choice(["tilted", "flat"]), default="tilted", show_default=True,
              help="tilted: mask anglez 44 deg; flat: anglez -1.3 deg.")
def simulate(out_dir: Path, preset: str, seed: int, frames: int | None, points: int, noise: bool,
             single_file: bool, config_file: Path | None, region: int, geometry: str) -> None:
    """Write a synthetic scan (frames, config.yaml, truth.h5) into OUT_DIR."""
    from .simulate import simulate as sim

    if config_file is not None:
        _load_config(config_file)  # report its problems the usual way before simulating
    try:
        with _input_errors():
            info = sim(out_dir, preset=preset, seed=seed, frames=frames, points=points, noise=noise,
                       single_file=single_file, config=config_file, region=region, geometry=geometry)
    except ValueError as exc:
        _fail(str(exc))
    what = "one stack file" if info.get("layout") == "stack" else f"{info.get('frames')} frame files"
    click.echo(f"wrote {what}: {info.get('points')} points x {info.get('frames_per_point')} frames, "
               f"region {info.get('region')}, {info.get('grains')} grains, "
               f"{info.get('spot_pixels')} spot pixels")
    click.echo(f"scan:   {info.get('out_dir')}")
    click.echo(f"config: {info.get('config')}")
    click.echo(f"truth:  {info.get('truth')}")
    click.echo(f"next:   laueflow run {info.get('out_dir')}")


# ----------------------------------------------------------------------------------------------
# config, sites


@main.group("config")
def config_group() -> None:
    """Check or show a beamline configuration file."""


@config_group.command("check")
@click.argument("file", type=click.Path(path_type=Path))
def config_check(file: Path) -> None:
    """Validate FILE; list unknown or unused keys as warnings."""
    cfg = _load_config(file)
    r0, r1, c0, c1 = cfg.file.frame
    click.echo(f"OK: {file}: {cfg.file.n_frames} frames per point, region {r1 - r0} x {c1 - c0} pixels, "
               f"{len(cfg.geo.source.depths)} depth bins")


@config_group.command("show")
@click.argument("file", type=click.Path(path_type=Path))
def config_show(file: Path) -> None:
    """Print FILE as laueflow resolves it, with every default filled in."""
    cfg = _load_config(file)
    click.echo(cfg.to_yaml(), nl=False)


@main.group("sites", invoke_without_command=True)
@click.pass_context
def sites_command(ctx: click.Context) -> None:
    """List the named sites (use one with `laueflow run --site NAME`)."""
    from . import sites

    if ctx.invoked_subcommand is not None:
        return
    found = sites.list_sites()
    if not found:
        click.echo(f"no sites in {sites.sites_dir()}")
        return
    width = max(len(name) for name, _ in found)
    for name, doc in found:
        click.echo(f"{name:<{width}}  {doc}")
    click.echo(f"(in {sites.sites_dir()}; any file defining config(workers, run_dir, **options) works with "
               f"--site path/to/site.py)")


@sites_command.command("show")
@click.argument("name")
def sites_show(name: str) -> None:
    """Print the options of site NAME, their defaults and the environment variables that set them."""
    import os

    from . import sites

    with _input_errors():
        module = sites.load_site(name)
    click.echo(f"{name}: {(module.__doc__ or '').strip().splitlines()[0] if module.__doc__ else ''}")
    options = getattr(module, "OPTIONS", None)
    if not options:
        click.echo("(no documented options)")
        return
    env_var = getattr(module, "env_var", None)
    for option, (default, _kind, help_text) in options.items():
        default_text = "(required)" if default is None else repr(default)
        line = f"  {option} = {default_text}"
        if env_var is not None:
            var = env_var(option)
            line += f"  [{var}" + (f"={os.environ[var]!r}" if var in os.environ else "") + "]"
        click.echo(line)
        click.echo(f"      {help_text}")


# ----------------------------------------------------------------------------------------------
# score


def point_files(run_dir: Path) -> dict[int, Path]:
    """The point files ``point_<k:05d>.h5`` in RUN_DIR by point number (temporary files are ignored)."""
    import re

    found = {}
    for path in run_dir.glob("point_*.h5"):
        m = re.fullmatch(r"point_(\d+)\.h5", path.name)
        if m:
            found[int(m.group(1))] = path
    return dict(sorted(found.items()))


def read_point_profiles(path: Path) -> tuple[Any, Any, Any]:
    """rows, cols (P,) and depth profiles (P, J) of the reconstructed pixels of a point file."""
    import h5py
    import numpy as np

    with h5py.File(path, "r") as f:
        rec = f["entry/reconstruction"]
        vol = rec["volume"]
        r0, _, c0, _ = (int(v) for v in vol.attrs["frame"])
        index = np.asarray(rec["pixels/index"][()], dtype=np.int64).reshape(-1, 2)
        rows, cols = index[:, 0], index[:, 1]
        volume = vol[()]
    profiles = volume[:, rows - r0, cols - c0].T if rows.size else np.zeros((0, volume.shape[0]))
    return rows, cols, profiles


@main.command("score")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--truth", "truth_file", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="truth.h5 written by `laueflow simulate` beside the scan.")
@click.option("--point", "point", type=click.IntRange(min=0), help="Score only this scan point.")
def score_command(run_dir: Path, truth_file: Path, point: int | None) -> None:
    """Compare the point files in RUN_DIR with the truth of a simulated scan, one line per point.

    Exit status 0 when every point file was scored, 1 when some could not be read, 2 when there is
    nothing to score or the truth file is unusable."""
    from .evaluate import load_truth, score

    files = point_files(run_dir)
    if point is not None:
        if point not in files:
            _fail(f"{run_dir}: no point file {point:05d} (found {_plural(len(files), 'point file')})")
        files = {point: files[point]}
    if not files:
        _fail(f"{run_dir}: no point files point_<k>.h5 to score")
    try:
        truth = load_truth(truth_file)
    except (OSError, KeyError) as exc:
        _fail(f"{truth_file}: not a truth file written by `laueflow simulate`: {exc}")
    known = {int(k) for k in set(truth.point.tolist())}
    unreadable = 0
    for k, path in files.items():
        try:
            rows, cols, profiles = read_point_profiles(path)
        except (OSError, KeyError) as exc:
            click.echo(f"point {k:5d}: unreadable point file {path}: {exc}", err=True)
            unreadable += 1
            continue
        note = "" if k in known else " (no spot pixels in the truth for this point)"
        click.echo(f"point {k:5d}: {score(truth.for_point(k), rows, cols, profiles).summary()}{note}")
    sys.exit(1 if unreadable else 0)


if __name__ == "__main__":
    main()
