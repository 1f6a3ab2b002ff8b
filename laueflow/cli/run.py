"""`laueflow run` and `laueflow watch`: reconstruct a scan, or a scan folder as its frames arrive."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
from rich.console import Console

from .. import provenance, sites
from ..io.layout import SCAN_CONFIG_FILE, RunFolder, default_out_dir
from ..progress import plural, reporter
from ..transfer import TransferHooks
from ..watch import PointFeed, WatchHooks, sigterm_as_interrupt
from ..workflow.status import RunLock
from .common import echo_err, fail, input_errors, load_config

if TYPE_CHECKING:
    from ..workflow.dag import RunOptions


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
            fail(f"--site-option {pair!r}: expected KEY=VALUE (see `laueflow sites show SITE`)")
        options[key.strip().replace("-", "_")] = value
    if endpoint:
        options["endpoint"] = endpoint
    return options


def run_options(func: Callable) -> Callable:
    """The options `laueflow run` and `laueflow watch` share."""
    options = [
        click.option("--config", "config_file", type=click.Path(path_type=Path),
                     help=f"Beamline configuration (default: SCAN_DIR/{SCAN_CONFIG_FILE})."),
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
    config_file = config_file or (scan_dir if scan_dir.is_dir() else scan_dir.parent) / SCAN_CONFIG_FILE
    cfg = load_config(config_file)
    location = _scan_location(scan_dir, cfg)
    out_dir = (out_dir or default_out_dir(scan_dir)).resolve()
    options = _site_options(site_option, endpoint)
    folder = RunFolder(out_dir)
    with input_errors():
        parsl_config = sites.site_config(site, workers=workers, run_dir=str(folder.runinfo), **options)
    click.echo(f"scan:   {location}")
    click.echo(f"config: {Path(config_file).resolve()} (fingerprint {cfg.fingerprint()})")
    click.echo(f"output: {out_dir}/point_<k>.h5 (site {site}, Parsl logs in {folder.runinfo}, "
               f"progress in {folder.status})")
    return RunSetup(cfg, location, out_dir, parsl_config, Console())


def make_options(setup: RunSetup, points: str | Sequence[int] | None, block_pixels: int | None, force: bool,
                 per_depth_files: bool, staging: bool, **more: Any) -> RunOptions:
    """The ``workflow.dag.RunOptions`` of `run` and `watch` from their shared options (``more``: the
    watch's own, such as ``poll_interval``), with this command line for the provenance."""
    from ..workflow import dag  # the driver loads Parsl and JAX (seconds): only once a run starts

    return dag.RunOptions(points=points, block_pixels=block_pixels, site_config=setup.site_config,
                          command_line=provenance.command_line(), force=force,
                          per_depth_files=per_depth_files, staging=staging, **more)


def start_transfers(cfg: Any, out_dir: Path) -> Any:
    """The Globus Transfer hooks of the configuration's ``transfer`` section (None without one); a
    missing login stops here (exit 2), before anything runs."""
    with input_errors():
        hooks = TransferHooks.start(cfg, out_dir, say=click.echo, note=echo_err)
    if hooks is not None:
        click.echo(f"transfer: finished files go to {cfg.transfer.destination}:"
                   f"{hooks.transfers.destination_dir}")
    return hooks


def quiet_logging_errors() -> None:
    """A log file that cannot be written (Parsl's, in OUT/.runinfo, on a full disk) must not print a
    traceback for every record: the run reports the disk itself, once."""
    logging.raiseExceptions = False


def interrupted(exc: KeyboardInterrupt) -> NoReturn:
    """Ctrl-C, SIGTERM or SIGHUP stopped the run (its workers are stopped, status.json says
    ``interrupted``): say so and exit with 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM).

    A task that was running in one of the driver's threads (staging, stitching, or decoding on the
    threads site) cannot be stopped and would hold the exit until it ends; it writes only under a
    temporary name, so the process ends at once instead (``os._exit``)."""
    code = getattr(exc, "exit_status", 128 + signal.SIGINT)
    click.echo("interrupted: finished points and blocks are kept; run again to resume", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    if any(t is not threading.current_thread() and not t.daemon and t.is_alive()
           for t in threading.enumerate()):
        os._exit(code)
    sys.exit(code)


def finish_run(result: Any, console: Any) -> NoReturn:
    """Print the summary (and again the points that need attention) and exit with the run's status."""
    if console.is_terminal:  # the bar printed the point lines; repeat the ones that need attention
        for p in result.points:
            if not p.ok:
                click.echo(p.line(), err=True)
    click.echo(result.summary())
    sys.exit(result.exit_code)


@click.command()
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
    from ..workflow import dag  # the driver loads Parsl and JAX (seconds): only once a run starts

    setup = prepare_run(scan_dir, config_file, out_dir, site, site_option, endpoint, workers)
    transfers = start_transfers(setup.cfg, setup.out_dir)
    hooks = [reporter(setup.console), *([transfers] if transfers else [])]
    options = make_options(setup, points, block_pixels, force, per_depth_files, staging)
    quiet_logging_errors()
    stop: KeyboardInterrupt | None = None
    with input_errors(), sigterm_as_interrupt():
        try:
            result = dag.run(setup.location, setup.cfg, setup.out_dir, options, hooks=hooks)
        except KeyboardInterrupt as exc:
            result, stop = None, exc
    if transfers is not None:
        result = transfers.finish(result)
    if stop is not None:
        interrupted(stop)
    finish_run(result, setup.console)





@click.command()
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
    from ..workflow import dag  # the driver loads Parsl and JAX (seconds): only once a watch starts

    setup = prepare_run(scan_dir, config_file, out_dir, site, site_option, endpoint, workers)
    with input_errors():
        feed = PointFeed(setup.cfg, setup.location, poll_interval=poll_interval, until_idle=until_idle,
                         max_points=max_points)
    click.echo(f"watch:  {feed.describe()}")
    transfers = start_transfers(setup.cfg, setup.out_dir)
    watching = WatchHooks(feed, say=click.echo, warn=lambda message: echo_err(f"warning: {message}"))
    hooks = [reporter(setup.console), watching, *([transfers] if transfers else [])]
    quiet_logging_errors()
    result, stop = None, None
    with input_errors():  # the folder is this watch's from the start, not from its first point on
        lock = RunLock(setup.out_dir).acquire()
    try:
        with input_errors(), sigterm_as_interrupt():
            try:
                first = feed.wait_first()
                if first:
                    options = make_options(setup, first, block_pixels, force, per_depth_files, staging,
                                           poll_interval=poll_interval)
                    result = dag.run(setup.location, setup.cfg, setup.out_dir, options, hooks=hooks,
                                     feed=feed, lock=lock)
            except KeyboardInterrupt as exc:
                stop = exc
    finally:
        lock.release()
    if feed.stop_reason and stop is None:
        click.echo(f"watch stopped: {feed.stop_reason}")
    pending = feed.incomplete()
    if pending:
        shown = "; ".join(f"{p.name}: {why}" for p, why in pending[:3])
        more = f" ... ({len(pending)} in all)" if len(pending) > 3 else ""
        held = ", ".join(str(k) for k in feed.unfinished_points())
        click.echo(f"warning: {plural(len(pending), 'frame file')} not complete when the watch stopped "
                   f"({shown}{more}); points not taken: {held or 'none'}", err=True)
    if result is None and stop is None:
        click.echo("no scan point became complete; nothing was reconstructed")
        sys.exit(0)
    if transfers is not None:
        result = transfers.finish(result)
    if stop is not None:
        interrupted(stop)
    finish_run(result, setup.console)
