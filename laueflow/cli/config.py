"""`laueflow config check|show`: validate or print a beamline configuration."""

from __future__ import annotations

from pathlib import Path

import click

from .common import load_config


@click.group("config")
def config_group() -> None:
    """Check or show a beamline configuration file."""


@config_group.command("check")
@click.argument("file", type=click.Path(path_type=Path))
def config_check(file: Path) -> None:
    """Validate FILE; list unknown or unused keys as warnings."""
    cfg = load_config(file)
    r0, r1, c0, c1 = cfg.file.frame
    click.echo(f"OK: {file}: {cfg.file.n_frames} frames per point, region {r1 - r0} x {c1 - c0} pixels, "
               f"{len(cfg.geo.source.depths)} depth bins")


@config_group.command("show")
@click.argument("file", type=click.Path(path_type=Path))
def config_show(file: Path) -> None:
    """Print FILE as laueflow resolves it, with every default filled in."""
    cfg = load_config(file)
    click.echo(cfg.to_yaml(), nl=False)
