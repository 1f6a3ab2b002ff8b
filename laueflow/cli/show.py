"""`laueflow show`: quick-look figures of a point file, a run folder or a calibration."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import click
import numpy as np

from ..config import load
from ..io.truth import load_truth
from ..progress import plural
from ..runs import open_point, open_run
from .common import fail, input_errors


@click.command("show")
@click.argument("point_file", metavar="POINT_FILE|RUN_DIR", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the PNG files (default: beside POINT_FILE; RUN_DIR/figures for a run).")
@click.option("--truth", "use_truth", is_flag=True,
              help="Overlay the true depths of a simulated scan and map the depth error (truth.h5 beside "
              "the scan).")
@click.option("--truth-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The truth file when it is not beside the scan (implies --truth).")
@click.option("--slices", type=click.IntRange(1, 48), default=12, show_default=True,
              help="Panels of the depth-slice montage.")
def show(point_file: Path, out_dir: Path | None, use_truth: bool, truth_file: Path | None,
         slices: int) -> None:
    """Write quick-look PNGs of POINT_FILE, or of every point of the run in RUN_DIR, and a summary.

    The figures (<point>_<figure>.png): the depth-integrated image (integrated), intensity versus
    depth (intensity), depth slices where the signal is (slices), the depth of maximum intensity of
    each pixel (depthmap; with --truth also the true depths and the error of each spot pixel), and the
    decoder's quality flags and misfit (quality).  Pixels not decoded (below the threshold, saturated,
    in a failed block) have a colour of their own, named in a legend.  For a run folder they go to
    RUN_DIR/figures with overview.png (intensity and depth against the scan position or point number)
    and index.html, a page with a table of the points and all their figures.  Given a configuration
    written by `laueflow calibrate` (.yaml) instead, it writes <name>_calibration.png: each film's depth
    per spot at the nominal and the fitted pose.

    Exit status 0 when every figure was written, 1 when some point of a run could not be read, 2 on bad
    input."""
    if point_file.suffix in (".yaml", ".yml"):
        show_calibration(point_file, out_dir)
        return
    if point_file.is_dir():
        show_run(point_file, out_dir, use_truth or truth_file is not None, truth_file, slices)
        return
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


def show_run(run_dir: Path, out_dir: Path | None, use_truth: bool, truth_file: Path | None,
             slices: int) -> None:
    """`laueflow show RUN_DIR`: every point's figures, the overview and index.html."""
    quicklook = _quicklook()
    with input_errors():
        run_ = open_run(run_dir)
    if not run_.points:
        fail(f"{run_dir}: no scan points here (no point_<k>.h5 files and no status.json); give the folder "
             "of a run (the --out of laueflow run) or a point file")
    if not run_.ready:
        states = ", ".join(f"{n} {state}" for state, n in run_.counts().items())
        fail(f"{run_dir}: no point has a result file yet ({states})")
    truth = None
    if use_truth:
        where = truth_file
        if where is None:
            with input_errors(), run_.point(run_.ready[0]) as first:
                where = first.truth_path
            if where is None:
                fail(f"{run_dir}: no truth.h5 beside its scan; --truth needs a scan written by "
                     "`laueflow simulate` (or give --truth-file)")
        try:
            truth = load_truth(where)
        except (OSError, KeyError) as exc:
            fail(f"{where}: not a truth file written by `laueflow simulate`: {exc}")
    click.echo(run_.progress())

    def report(entry: Any) -> None:
        if entry.figures:
            rng = entry.signal
            signal = "no signal" if rng is None else f"signal {rng[0]:.1f} to {rng[1]:.1f} um"
            click.echo(f"point {entry.point:5d}: {plural(len(entry.figures), 'figure')}, {entry.pixels} "
                       f"pixels, {signal}{'' if entry.complete else ', INCOMPLETE'}")
        elif entry.file is not None:
            click.echo(f"point {entry.point:5d}: no figures, {entry.problem}", err=True)

    with input_errors():
        result = quicklook.save_run_quicklooks(run_, out_dir, truth=truth, slices=slices, on_point=report)
    waiting = [e.point for e in result.entries if e.file is None]
    if waiting:
        click.echo(f"{plural(len(waiting), 'point')} without a result yet: "
                   f"{', '.join(map(str, waiting[:10]))}{' ...' if len(waiting) > 10 else ''}")
    if result.overview is not None:
        click.echo(f"wrote overview    {result.overview}")
    click.echo(f"wrote index       {result.index}")
    sys.exit(1 if result.failed else 0)


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
