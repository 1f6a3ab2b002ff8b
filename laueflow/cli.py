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
from .errors import LaueflowError
from .io.layout import RunFolder, point_dir_name, point_files
from .progress import plural as _plural

INPUT_ERROR = 2


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(INPUT_ERROR)


def _echo_err(line: str) -> None:
    click.echo(line, err=True)


@contextmanager
def _input_errors() -> Iterator[None]:
    """Turn the errors of bad input into one message and exit status 2."""
    try:
        yield
    except LaueflowError as exc:
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
        click.option("--staging/--no-staging", default=True, show_default=True,
                     help="Read each point's frames once, beside the decoding, into a scratch file in "
                          "OUT/.blocks (about 2 bytes x frames x region pixels per point in flight: "
                          "within 4 GiB, two points at least), or let every block task read its tile "
                          "from the frame files."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@dataclass
class RunSetup:
    """What `run` and `watch` resolve from their common options before the work starts."""

    cfg: Any
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
    folder = RunFolder(out_dir)
    with _input_errors():
        parsl_config = sites.site_config(site, workers=workers, run_dir=str(folder.runinfo), **options)
    click.echo(f"scan:   {location}")
    click.echo(f"config: {Path(config_file).resolve()} (fingerprint {cfg.fingerprint()})")
    click.echo(f"output: {out_dir}/point_<k>.h5 (site {site}, Parsl logs in {folder.runinfo}, "
               f"progress in {folder.status})")
    return RunSetup(cfg, location, out_dir, parsl_config, Console())


def start_transfers(cfg: Any, out_dir: Path) -> Any:
    """The Globus Transfer hooks of the configuration's ``transfer`` section (None without one); a
    missing login stops here (exit 2), before anything runs."""
    from .transfer import TransferHooks

    with _input_errors():
        hooks = TransferHooks.start(cfg, out_dir, say=click.echo, note=_echo_err)
    if hooks is not None:
        click.echo(f"transfer: finished files go to {cfg.transfer.destination}:"
                   f"{hooks.transfers.destination_dir}")
    return hooks


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
        workers: int | None, force: bool, per_depth_files: bool, staging: bool) -> None:
    """Reconstruct the scan in SCAN_DIR into one HDF5 file per scan point.

    A rerun keeps the points and blocks that are up to date and computes the rest; progress is in
    OUT/status.json while it runs.
    """
    from . import provenance
    from .progress import reporter
    from .watch import sigterm_as_interrupt
    from .workflow import dag

    setup = prepare_run(scan_dir, config_file, out_dir, site, site_option, endpoint, workers)
    transfers = start_transfers(setup.cfg, setup.out_dir)
    hooks = [reporter(setup.console), *([transfers] if transfers else [])]
    options = dag.RunOptions(points=points, block_pixels=block_pixels, site_config=setup.site_config,
                             command_line=provenance.command_line(), force=force,
                             per_depth_files=per_depth_files, staging=staging)
    with _input_errors(), sigterm_as_interrupt():
        try:
            result = dag.run(setup.location, setup.cfg, setup.out_dir, options, hooks=hooks)
        except KeyboardInterrupt:
            result = None
    if transfers is not None:
        result = transfers.finish(result)
    finish_run(result, setup.console)


# ----------------------------------------------------------------------------------------------
# watch


@main.command()
@click.argument("scan_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--points", "max_points", type=click.IntRange(min=1), metavar="N",
              help="Stop once points 0 to N-1 are reconstructed (default: no limit).")
@click.option("--until-idle", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Stop after SECONDS without new or growing frame files (default: only on Ctrl-C).")
@click.option("--poll-interval", type=click.FloatRange(min=0.05), default=2.0, show_default=True,
              metavar="SECONDS", help="Seconds between two listings of the folder.")
@run_options
def watch(scan_dir: Path, max_points: int | None, until_idle: float | None, poll_interval: float,
          config_file: Path | None, out_dir: Path | None, block_pixels: int | None, site: str,
          site_option: tuple[str, ...], endpoint: str | None, workers: int | None, force: bool,
          per_depth_files: bool, staging: bool) -> None:
    """Reconstruct the scan points of SCAN_DIR as their frames arrive.

    A point is taken once all its frame files are complete (size unchanged between two listings, and
    the file opens with its image dataset).  Sites, options, outputs, resume and OUT/status.json are
    those of `laueflow run`; each point's lag (from its last frame to its output) is printed and kept
    in status.json.  Ctrl-C stops it; a restart resumes.
    """
    from . import provenance
    from .progress import reporter
    from .watch import PointFeed, WatchHooks, sigterm_as_interrupt
    from .workflow import dag

    setup = prepare_run(scan_dir, config_file, out_dir, site, site_option, endpoint, workers)
    with _input_errors():
        feed = PointFeed(setup.cfg, setup.location, poll_interval=poll_interval, until_idle=until_idle,
                         max_points=max_points)
    click.echo(f"watch:  {feed.describe()}")
    transfers = start_transfers(setup.cfg, setup.out_dir)
    watching = WatchHooks(feed, say=click.echo, warn=lambda message: _echo_err(f"warning: {message}"))
    hooks = [reporter(setup.console), watching, *([transfers] if transfers else [])]
    result, interrupted = None, False
    with _input_errors(), sigterm_as_interrupt():
        try:
            first = feed.wait_first()
            if first:
                options = dag.RunOptions(points=first, block_pixels=block_pixels,
                                         site_config=setup.site_config,
                                         command_line=provenance.command_line(), force=force,
                                         per_depth_files=per_depth_files, staging=staging,
                                         poll_interval=poll_interval)
                result = dag.run(setup.location, setup.cfg, setup.out_dir, options, hooks=hooks, feed=feed)
        except KeyboardInterrupt:
            interrupted = True
    if feed.stop_reason and not interrupted:
        click.echo(f"watch stopped: {feed.stop_reason}")
    pending = feed.incomplete()
    if pending:
        shown = "; ".join(f"{p.name}: {why}" for p, why in pending[:3])
        more = f" ... ({len(pending)} in all)" if len(pending) > 3 else ""
        held = ", ".join(str(k) for k in feed.unfinished_points())
        click.echo(f"warning: {_plural(len(pending), 'frame file')} not complete when the watch stopped "
                   f"({shown}{more}); points not taken: {held or 'none'}", err=True)
    if result is None and not interrupted:
        click.echo("no scan point became complete; nothing was reconstructed")
        sys.exit(0)
    if transfers is not None:
        result = transfers.finish(result)
    finish_run(result, setup.console)


# ----------------------------------------------------------------------------------------------
# simulate


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", type=click.Choice(["thin", "extended", "overlap", "multipoint", "film"]),
              default="thin",
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
@click.option("--film-depth", type=float, metavar="UM",
              help="Depth of the film preset's thin film, um on the output depth axis (default 50).")
@click.option("--pose-error", metavar="NAME=VALUE,...",
              help="Write config.yaml with the mask pose off by this (e.g. cenx=0.02,dist=-0.03,angley=0.3; "
                   "mm and degrees); the frames use the true pose, which truth.h5 keeps.")
def simulate(out_dir: Path, preset: str, seed: int, frames: int | None, points: int, noise: bool,
             single_file: bool, config_file: Path | None, region: int, geometry: str,
             film_depth: float | None, pose_error: str | None) -> None:
    """Write a synthetic scan (frames, config.yaml, truth.h5) into OUT_DIR."""
    from .simulate import parse_pose
    from .simulate import simulate as sim

    if config_file is not None:
        _load_config(config_file)  # report its problems the usual way before simulating
    try:
        with _input_errors():
            info = sim(out_dir, preset=preset, seed=seed, frames=frames, points=points, noise=noise,
                       single_file=single_file, config=config_file, region=region, geometry=geometry,
                       film_depth=film_depth, pose_error=parse_pose(pose_error or ""))
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
    from .io.pointfile import read_profiles

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
            rows, cols, profiles = read_profiles(path)
        except (OSError, KeyError) as exc:
            click.echo(f"point {k:5d}: unreadable point file {path}: {exc}", err=True)
            unreadable += 1
            continue
        note = "" if k in known else " (no spot pixels in the truth for this point)"
        click.echo(f"point {k:5d}: {score(truth.for_point(k), rows, cols, profiles).summary()}{note}")
    sys.exit(1 if unreadable else 0)


# ----------------------------------------------------------------------------------------------
# transfer


@main.command("transfer")
@click.argument("out_dir", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="Configuration whose transfer section to use (default: the one the run used).")
@click.option("--source", help="Source collection UUID (where OUT_DIR lies).")
@click.option("--destination", help="Destination collection UUID.")
@click.option("--destination-path", help="Destination folder; OUT_DIR arrives as <path>/<OUT_DIR name>.")
@click.option("--source-root", help="Local folder that the source collection's / corresponds to.")
@click.option("--sync-level", type=click.Choice(["exists", "size", "mtime", "checksum"]),
              help="When a file already at the destination is sent again.")
@click.option("--verify/--no-verify", "verify_checksum", default=None,
              help="Compare checksums after copying.")
@click.option("--retries", type=click.IntRange(min=0), help="Resubmissions of a failed or timed-out task.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
              help="Seconds a task may take before it is cancelled and resent.")
@click.option("--client-id", help="Globus native-app client ID for logging in.")
@click.option("--wait", type=click.FloatRange(min=0),
              help="Seconds to wait for all transfers (default: long enough for every retry).")
@click.option("--interval", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Seconds between checks of the tasks.")
@click.option("--login", is_flag=True, help="Log in to Globus first (interactive); OUT_DIR is then optional.")
def transfer_command(out_dir: Path | None, config_file: Path | None, wait: float | None, interval: float,
                     login: bool, **options: Any) -> None:
    """Send (or send again) the finished result files of OUT_DIR with Globus Transfer.

    Point files and per-depth files go to <destination-path>/<OUT_DIR name>/ on the destination
    collection; settings come from the transfer section of the configuration, options override them.
    Exit status 0 when every file arrived, 1 when some did not, 2 on bad settings or a missing login."""
    from .config import ConfigError, transfer_settings
    from .transfer import TransferError, Transfers, record_status, recorded_settings, run_files, settings_dict
    from .transfer import transfer_client as make_client

    if out_dir is None and not login:
        _fail("give OUT_DIR (a run's output folder), or --login to log in only")
    base = _load_config(config_file).transfer if config_file is not None else (
        recorded_settings(out_dir) if out_dir is not None else None)
    section = settings_dict(base) if base is not None else {}
    section.update({k: v for k, v in options.items() if v is not None})
    if not {"source", "destination", "destination_path"} <= set(section):
        _fail("no transfer settings: give --config FILE with a transfer section, or --source, --destination "
              "and --destination-path")
    files = run_files(out_dir) if out_dir is not None else []
    if out_dir is not None and not files:
        _fail(f"{out_dir}: no finished result files (point_<k>.h5) to transfer")
    try:
        settings = transfer_settings(section, "transfer settings")
        client = make_client(settings, login=login)
        if login:
            click.echo("logged in to Globus")
        if out_dir is None:
            return
        transfers = Transfers(settings, out_dir, client, report=click.echo, poll_interval=interval)
    except (ConfigError, TransferError) as exc:
        _fail(str(exc))
    click.echo(f"sending {_plural(len(files), 'file')} from {settings.source}:{transfers.source_dir} to "
               f"{settings.destination}:{transfers.destination_dir}")
    transfers.add(files)
    ok = transfers.finish(transfers.patience() if wait is None else wait)
    if not record_status(out_dir, transfers.snapshot()):
        click.echo(f"(transfer states not recorded: {RunFolder(out_dir).status} is missing or its run is "
                   "still going)", err=True)
    click.echo(transfers.summary())
    sys.exit(0 if ok else 1)


# ----------------------------------------------------------------------------------------------
# show, export


@main.command("show")
@click.argument("point_file", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the PNG files (default: beside POINT_FILE).")
@click.option("--truth", "use_truth", is_flag=True,
              help="Overlay the true depths of a simulated scan (truth.h5 beside the scan).")
@click.option("--truth-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The truth file when it is not beside the scan (implies --truth).")
@click.option("--slices", type=click.IntRange(1, 48), default=12, show_default=True,
              help="Panels of the depth-slice montage.")
def show(point_file: Path, out_dir: Path | None, use_truth: bool, truth_file: Path | None,
         slices: int) -> None:
    """Write quick-look PNGs of POINT_FILE and print a summary of it.

    The figures (<point>_<figure>.png): the depth-integrated image (integrated), intensity versus
    depth (intensity), depth slices where the signal is (slices), and the depth of maximum intensity
    of each pixel (depthmap)."""
    from .runs import ResultError, open_point

    if point_file.is_dir():
        _fail(f"{point_file} is a folder; give a point file, e.g. {point_file / 'point_00000.h5'}")
    if not point_file.exists():
        _fail(f"{point_file}: point file does not exist")
    try:
        from .quicklook import save_quicklooks
    except ImportError as exc:
        _fail(f"laueflow show draws with matplotlib, which cannot be imported ({exc}); "
              "install it with: pip install 'laueflow[notebooks]'")
    try:
        point = open_point(point_file)
        truth = None
        if use_truth or truth_file is not None:
            truth = point.truth(truth_file)
            if truth is None:
                _fail(f"{point_file}: no truth.h5 beside its scan ({point.scan_dir}); --truth needs a scan "
                      "written by `laueflow simulate` (or give --truth-file)")
        click.echo(point.describe())
        if truth is not None:
            click.echo(f"{'truth':<10s}  {point.score(truth).summary()}")
        written = save_quicklooks(point, out_dir, truth=truth, slices=slices)
    except ResultError as exc:
        _fail(str(exc))
    for name, path in written.items():
        click.echo(f"wrote {name:<10s}  {path}")


@main.command("export")
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--points", help="Points to export: 5, 0,2,4, 3:7 (end exclusive) or all (default: every "
              "finished point).")
@click.option("--dest", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the depth files, one sub-folder point_<k>/ per point "
              "(default: OUT_DIR/depths).")
@click.option("--force", is_flag=True, help="Rewrite depth files that are up to date.")
def export_command(out_dir: Path, points: str | None, dest: Path | None, force: bool) -> None:
    """Write one HDF5 image file per depth of the finished points of the run in OUT_DIR.

    Each file holds entry1/data/data (float32 image over the region, attribute frame = [r0, r1, c0, c1])
    and entry1/depth (um), the layout the indexing chain reads.  Files that are up to date are kept.
    Exit status 0 when every selected point was exported, 1 when some could not be (not finished,
    unreadable), 2 on bad input."""
    from .io.export import ExportError, export_point_detailed
    from .io.scan import select_points
    from .runs import ResultError, open_run

    try:
        run_ = open_run(out_dir)
    except ResultError as exc:
        _fail(str(exc))
    if not run_.points:
        _fail(f"{out_dir}: no scan points here (no point_<k>.h5 files and no status.json)")
    with _input_errors():
        chosen = sorted(select_points(points, run_.points, "this run")) if points else list(run_.points)
    root = (dest if dest is not None else RunFolder(out_dir).depths_root).resolve()
    exported, waiting, failed, written, kept = 0, [], 0, 0, 0
    for k in chosen:
        info = run_.points[k]
        if info.file is None:
            waiting.append(k)
            if points:
                click.echo(f"point {k:5d}: not exported, no result file (state {info.state})", err=True)
            continue
        try:
            r = export_point_detailed(info.file, root / point_dir_name(k), force=force)
        except ExportError as exc:
            click.echo(f"point {k:5d}: not exported: {exc}", err=True)
            failed += 1
            continue
        exported += 1
        written, kept = written + r.written, kept + r.kept
        extra = f", {r.removed} of an older depth grid removed" if r.removed else ""
        click.echo(f"point {k:5d}: {_plural(len(r.files), 'depth file')} in {r.dest} ({r.written} written, "
                   f"{r.kept} up to date{extra})")
    tail = ""
    if waiting:
        tail = f"; {_plural(len(waiting), 'point')} not finished yet ({', '.join(map(str, waiting[:10]))}"
        tail += " ...)" if len(waiting) > 10 else ")"
    if failed:
        tail += f"; {failed} failed"
    click.echo(f"exported {_plural(exported, 'point')} into {root}: {written} files written, "
               f"{kept} up to date{tail}")
    sys.exit(1 if failed or (points and waiting) or exported == 0 else 0)


if __name__ == "__main__":
    main()
