"""`laueflow simulate`: write a synthetic scan."""

from __future__ import annotations

from pathlib import Path

import click

from .common import input_errors, load_config


@click.command()
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
    from ..simulate import parse_pose  # JAX (seconds): only when simulating
    from ..simulate import simulate as sim

    if config_file is not None:
        load_config(config_file)  # report its problems the usual way before simulating
    with input_errors():  # SimulateError, and ConfigError from --config
        info = sim(out_dir, preset=preset, seed=seed, frames=frames, points=points, noise=noise,
                   single_file=single_file, config=config_file, region=region, geometry=geometry,
                   film_depth=film_depth, pose_error=parse_pose(pose_error or ""))
    what = "one stack file" if info.get("layout") == "stack" else f"{info.get('frames')} frame files"
    click.echo(f"wrote {what}: {info.get('points')} points x {info.get('frames_per_point')} frames, "
               f"region {info.get('region')}, {info.get('grains')} grains, "
               f"{info.get('spot_pixels')} spot pixels")
    click.echo(f"scan:   {info.get('out_dir')}")
    click.echo(f"config: {info.get('config')}")
    click.echo(f"truth:  {info.get('truth')}")
    click.echo(f"next:   laueflow run {info.get('out_dir')}")
