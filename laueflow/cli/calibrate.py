"""``laueflow calibrate``: the mask pose from thin-film scans, written as a calibrated configuration.

Bad input (no film, mismatched scans, film depths off the grid) exits with status 2, a fit that ran
but failed with status 1; either way nothing is written, and the nominal file is never modified.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import numpy as np

from ..errors import CalibrationFailed
from .common import echo_err, input_errors, load_config
from .config import refuse_out

FIT_FAILED = 1


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


@click.command("calibrate")
@click.argument("scans", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--config",
    "config_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The nominal configuration (its geo.mask.focus is the starting pose).",
)
@click.option(
    "--film-depth",
    "film_depths",
    type=float,
    multiple=True,
    required=True,
    metavar="UM",
    help="The film's centre on the output depth axis, um: one per scan, in order.",
)
@click.option(
    "--out",
    "out_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The calibrated configuration to write; an existing file only with --force.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing --out file.")
@click.option(
    "--fit",
    "fit_names",
    default="cenx,dist,cenz,anglex,angley,anglez",
    show_default=True,
    help="Parameters to fit (geo.mask.focus keys; shift and thickness of geo.mask may be added).",
)
@click.option(
    "--pixels",
    type=click.IntRange(min=20),
    default=600,
    show_default=True,
    help="Bright film pixels used per scan at most (spread over its spots).",
)
def calibrate(
    scans: tuple[Path, ...],
    config_file: Path,
    film_depths: tuple[float, ...],
    out_file: Path,
    force: bool,
    fit_names: str,
    pixels: int,
) -> None:
    """Fit the mask pose to thin-film SCANS (folders or stack files) and write the calibrated
    configuration: the nominal one with geo.mask.focus replaced and a calibration record.  An existing
    --out file is replaced only with --force; the nominal file never."""
    # JAX and the fit load in seconds: only when calibrating, not for `laueflow --help`
    from ..calibration.films import read_films
    from ..calibration.fit import UNITS, fit_pose
    from ..config import write_calibrated

    cfg = load_config(config_file)
    fit = _names(fit_names)
    refuse_out(out_file, config_file, force, "nominal configuration", "calibrated one")
    t0 = time.perf_counter()
    with input_errors():
        films = read_films(cfg, scans, film_depths, pixels)
        t_read = time.perf_counter() - t0
        try:
            result = fit_pose(cfg, films, fit, progress=echo_err)
        except CalibrationFailed as exc:
            click.echo(f"error: calibration failed: {exc}; nothing written", err=True)
            sys.exit(FIT_FAILED)
    result.seconds = {"reading": t_read, **result.seconds}

    click.echo(f"{'parameter':<10s} {'nominal':>12s} {'fitted':>12s} {'1-sigma':>10s}  unit  determined")
    for i, name in enumerate(result.names):
        sig = "-" if np.isnan(result.sigma[i]) else f"{result.sigma[i]:.2g}"
        click.echo(
            f"{name:<10s} {result.nominal[i]:12.5f} {result.fitted[i]:12.5f} {sig:>10s}  "
            f"{UNITS[name]:<4s}  {'yes' if result.determined[i] else 'no'}"
        )
    for line in result.undetermined:
        click.echo(f"not determined: {line}")
    for a, b, rho in result.strong_correlations():
        click.echo(f"correlated: {a} and {b} (correlation {rho:+.2f})")
    click.echo(
        f"fit: {result.pixels} pixels, {result.iterations} iterations, reduced chi-square "
        f"{result.chi2_red:.2f}; " + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    )
    for film in result.films:
        click.echo(f"film at {film.depth_um:g} um ({film.film}): depth per spot before -> after")
        for s, n, b, a in zip(film.spots, film.pixels, film.before, film.after, strict=True):
            click.echo(f"  spot {s:3d} ({n:3d} px): {b:8.2f} -> {a:8.2f} um")
        click.echo(
            f"  spread over spots (std): {np.std(film.before):.2f} -> {np.std(film.after):.2f} um; "
            f"pixels within 1 um: {film.within_1um_before:.0%} -> {film.within_1um_after:.0%}"
        )

    with input_errors():
        record = result.record(config_file.resolve(), [Path(s).resolve() for s in scans], film_depths)
        write_calibrated(config_file, out_file, result.values(), record, force=force)
    click.echo(f"wrote {out_file}")
