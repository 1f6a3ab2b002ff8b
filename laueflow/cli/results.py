"""`laueflow score`, `show` and `export`: read the point files of a run."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import click
import numpy as np

from ..config import load
from ..errors import ExportError
from ..evaluate import load_truth, score
from ..io.export import export_point_detailed
from ..io.layout import RunFolder, point_dir_name, point_files
from ..io.pointfile import read_profiles
from ..io.scan import select_points
from ..progress import plural
from ..runs import open_point, open_run
from .common import fail, input_errors


@click.command("score")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--truth", "truth_file", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="truth.h5 written by `laueflow simulate` beside the scan.")
@click.option("--point", "point", type=click.IntRange(min=0), help="Score only this scan point.")
def score_command(run_dir: Path, truth_file: Path, point: int | None) -> None:
    """Compare the point files in RUN_DIR with the truth of a simulated scan, one line per point.

    Exit status 0 when every point file was scored, 1 when some could not be read, 2 when there is
    nothing to score or the truth file is unusable."""
    files = point_files(run_dir)
    if point is not None:
        if point not in files:
            fail(f"{run_dir}: no point file {point:05d} (found {plural(len(files), 'point file')})")
        files = {point: files[point]}
    if not files:
        fail(f"{run_dir}: no point files point_<k>.h5 to score")
    try:
        truth = load_truth(truth_file)
    except (OSError, KeyError) as exc:
        fail(f"{truth_file}: not a truth file written by `laueflow simulate`: {exc}")
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


@click.command("export")
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
    with input_errors():
        run_ = open_run(out_dir)
    if not run_.points:
        fail(f"{out_dir}: no scan points here (no point_<k>.h5 files and no status.json)")
    with input_errors():
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
        click.echo(f"point {k:5d}: {plural(len(r.files), 'depth file')} in {r.dest} ({r.written} written, "
                   f"{r.kept} up to date{extra})")
    tail = ""
    if waiting:
        tail = f"; {plural(len(waiting), 'point')} not finished yet ({', '.join(map(str, waiting[:10]))}"
        tail += " ...)" if len(waiting) > 10 else ")"
    if failed:
        tail += f"; {failed} failed"
    click.echo(f"exported {plural(exported, 'point')} into {root}: {written} files written, "
               f"{kept} up to date{tail}")
    sys.exit(1 if failed or (points and waiting) or exported == 0 else 0)
