"""`laueflow score` and `export`: read the point files of a run."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import ExportError
from ..evaluate import score
from ..io.export import FORMATS, default_root, export_run_point
from ..io.layout import point_files
from ..io.pointfile import read_profiles
from ..io.scan import select_points
from ..io.truth import load_truth
from ..progress import plural
from ..runs import open_run
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


@click.command("export")
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--points", help="Points to export: 5, 0,2,4, 3:7 (end exclusive) or all (default: every "
              "finished point).")
@click.option("--dest", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the exported files: one sub-folder point_<k>/ per point of depth files "
              "(default: OUT_DIR/depths), or the lauelab point files (default: OUT_DIR/lauelab).")
@click.option("--force", is_flag=True, help="Rewrite files that are up to date.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="depths",
              show_default=True,
              help="depths: one image file per depth for the indexing chain; lauelab: one lauelab "
              "reconstruction point file per point (OUT_DIR/lauelab/point_<k>.h5 by default).")
@click.option("--prefix", help="Name of the depth files, <prefix>_<j>.h5 (default: out_<scanNum> from the "
              "frames' header, as the chain names them).")
def export_command(out_dir: Path, points: str | None, dest: Path | None, force: bool, fmt: str,
                   prefix: str | None) -> None:
    """Export the finished points of the run in OUT_DIR for the beamline's other tools.

    --format depths (default): one HDF5 file per depth, <prefix>_<j>.h5 in a folder per point, with the
    frame's header (detector fields as datasets), entry1/data/data (float32 image over the region) and
    entry1/depth (um), the layout the indexing chain reads.  --format lauelab: the lauelab point format.
    Files that are up to date are kept; a folder or file laueflow did not write is never overwritten.
    Exit status 0 when every selected point was exported, 1 when some could not be (not finished,
    unreadable), 2 on bad input."""
    with input_errors():
        run_ = open_run(out_dir)
    if not run_.points:
        fail(f"{out_dir}: no scan points here (no point_<k>.h5 files and no status.json)")
    with input_errors():
        chosen = sorted(select_points(points, run_.points, "this run")) if points else list(run_.points)
    root = (dest if dest is not None else default_root(out_dir, fmt)).resolve()
    exported, waiting, failed, written, kept = 0, [], 0, 0, 0
    for k in chosen:
        info = run_.points[k]
        if info.file is None:
            waiting.append(k)
            if points:
                click.echo(f"point {k:5d}: not exported, no result file (state {info.state})", err=True)
            continue
        try:
            r = export_run_point(info.file, k, root, fmt=fmt, force=force, prefix=prefix)
        except ExportError as exc:
            click.echo(f"point {k:5d}: not exported: {exc}", err=True)
            failed += 1
            continue
        exported += 1
        written, kept = written + r.written, kept + r.kept
        if fmt == "lauelab":
            click.echo(f"point {k:5d}: {r.files[0]} ({'written' if r.written else 'up to date'})")
            continue
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
