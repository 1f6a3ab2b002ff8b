"""`laueflow show`: quick-look figures of a point file, a run folder or a calibration."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import click
import numpy as np

from ..config import load
from ..runs import open_point
from .common import fail, input_errors


@click.command("show")
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
    of each pixel (depthmap).  Given a configuration written by `laueflow calibrate` (.yaml) instead,
    it writes <name>_calibration.png: each film's depth per spot at the nominal and the fitted pose."""
    if point_file.suffix in (".yaml", ".yml"):
        show_calibration(point_file, out_dir)
        return
    if point_file.is_dir():
        fail(f"{point_file} is a folder; give a point file, e.g. {point_file / 'point_00000.h5'}")
    if not point_file.exists():
        fail(f"{point_file}: point file does not exist")
    save_quicklooks = _quicklook().save_quicklooks
    with input_errors():
        point = open_point(point_file)
        truth = None
        if use_truth or truth_file is not None:
            truth = point.truth(truth_file)
            if truth is None:
                fail(f"{point_file}: no truth.h5 beside its scan ({point.scan_dir}); --truth needs a scan "
                     "written by `laueflow simulate` (or give --truth-file)")
        click.echo(point.describe())
        if truth is not None:
            click.echo(f"{'truth':<10s}  {point.score(truth).summary()}")
        written = save_quicklooks(point, out_dir, truth=truth, slices=slices)
    for name, path in written.items():
        click.echo(f"wrote {name:<10s}  {path}")


def _quicklook() -> ModuleType:
    """laueflow.quicklook, imported here, not at the top: matplotlib is optional and slow to import."""
    try:
        return importlib.import_module("laueflow.quicklook")
    except ImportError as exc:
        fail(f"laueflow show draws with matplotlib, which cannot be imported ({exc}); "
             "install it with: pip install 'laueflow[notebooks]'")


def show_calibration(config_file: Path, out_dir: Path | None) -> None:
    """`laueflow show CALIBRATED.yaml`: the calibration's film depths, before and after."""
    if not config_file.exists():
        fail(f"{config_file}: configuration does not exist")
    save_calibration_figure = _quicklook().save_calibration_figure
    with input_errors():
        cfg = load(config_file, check_files=False)
    record = cfg.calibration
    if not record:
        fail(f"{config_file}: no calibration record; give a configuration written by `laueflow calibrate`")
    if not record.get("films"):
        fail(f"{config_file}: its calibration record holds no film depths (an older laueflow calibrate); "
             "run laueflow calibrate again")
    out = out_dir if out_dir is not None else config_file.parent
    out.mkdir(parents=True, exist_ok=True)
    click.echo(f"calibration {record.get('date', '?')}, fitted {', '.join(record.get('fitted') or [])}")
    for film in record["films"]:
        before, after = film["before_um"], film["after_um"]
        click.echo(f"film at {film['film_depth_um']:g} um: {len(film['spots'])} spots, spread "
                   f"{np.std(before):.2f} -> {np.std(after):.2f} um, pixels within 1 um "
                   f"{film['within_1um_before']:.0%} -> {film['within_1um_after']:.0%}")
    path = save_calibration_figure(record, out / f"{config_file.stem}_calibration.png")
    click.echo(f"wrote calibration  {path}")
