"""`laueflow show RUN_DIR`: every point's figures, the overview against the scan position and index.html,
on a run folder made of point files that hold the truth of the shared simulated scan."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from test_quicklook import perfect_point_file  # noqa: E402

from laueflow import quicklook  # noqa: E402
from laueflow.cli import main  # noqa: E402
from laueflow.workflow.status import FORMAT  # noqa: E402


class Links(HTMLParser):
    """The links and images of a page, and the text of its table rows."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []
        self.rows: list[list[str]] = []
        self.scripts = 0
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "a" and a.get("href") and not a["href"].startswith("#"):
            self.targets.append(a["href"])
        if tag == "img":
            self.targets.append(a["src"] or "")
        if tag == "script":
            self.scripts += 1
        if tag == "tr":
            self._row = []
        if tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        if tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse(path: Path) -> Links:
    page = Links()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def write_status(run: Path, points: dict[int, dict]) -> None:
    (run / "status.json").write_text(json.dumps({"format": FORMAT, "state": "finished",
                                                 "points": {str(k): v for k, v in points.items()}}))


@pytest.fixture(scope="module")
def run_dir(multipoint_scan: Path, tmp_path_factory) -> Path:
    """Points 0 and 2 of the shared scan with their files, point 1 failed (status.json only)."""
    run = tmp_path_factory.mktemp("show") / "recon"
    for k in (0, 2):
        perfect_point_file(multipoint_scan, run, point=k)
    shutil.rmtree(run / ".blocks")
    write_status(run, {0: {"state": "done", "file": "point_00000.h5"},
                       1: {"state": "failed", "reason": "block 0 failed: worker lost"},
                       2: {"state": "done", "file": "point_00002.h5"}})
    return run


def show(*args: object):
    return CliRunner().invoke(main, ["show", *map(str, args)])


def test_show_run_writes_figures_overview_and_index(run_dir, tmp_path):
    run = tmp_path / "recon"
    shutil.copytree(run_dir, run)
    r = show(run, "--slices", "2")
    assert r.exit_code == 0, r.output
    figures = run / "figures"
    for k in (0, 2):
        assert f"point     {k}: {len(quicklook.FIGURES)} figures" in r.stdout
        for name in quicklook.FIGURES:
            assert (figures / f"point_0000{k}_{name}.png").is_file()
    assert "1 point without a result yet: 1" in r.stdout
    assert (figures / "overview.png").is_file() and (figures / "index.html").is_file()
    page = parse(figures / "index.html")
    assert page.scripts == 0
    # every link and image resolves to a file beside the page, every figure is linked
    assert page.targets and all((figures / t).is_file() for t in page.targets)
    assert {p.name for p in figures.glob("*.png")} == set(page.targets)
    head, *rows = page.rows
    assert head[:2] == ["point", "state"] and "pixels decoded" in head and "complete" in head
    assert [row[0] for row in rows] == ["0", "1", "2"]  # every point, the failed one too
    by_point = {row[0]: dict(zip(head, row, strict=True)) for row in rows}
    assert by_point["1"]["state"] == "failed" and by_point["1"]["figures"] == "block 0 failed: worker lost"
    assert by_point["0"]["complete"] == "yes" and by_point["0"]["pixels decoded"] == "256"
    assert " to " in by_point["2"]["depth range with signal (\u00b5m)"]
    assert by_point["2"]["sampleX (micron)"] == "2"  # the scan position the frame header records


def test_overview_against_the_recorded_scan_position(run_dir):
    """The simulated frames record sampleX (1 micron a point): the overview is drawn against it, the
    failed point marked where its number puts it; without positions, against the point number."""
    from laueflow.runs import open_run

    run = open_run(run_dir)
    entries = [quicklook.point_entry(run.point(k)) if run.points[k].file else
               quicklook.PointEntry(point=k, state=run.points[k].state) for k in run.points]
    assert entries[1].positions == {} and entries[2].positions["sampleX"] == (2.0, "micron")
    fig = quicklook.overview_figure(entries, "test")
    top, bottom = fig.axes
    assert bottom.get_xlabel() == "sample position sampleX (micron)"
    assert list(top.get_lines()[0].get_xdata()) == [0.0, 2.0]
    assert list(top.get_lines()[0].get_ydata()) == [entries[0].intensity, entries[2].intensity]
    assert "2 of 3 points with a result" in fig.get_suptitle()
    one = quicklook.overview_figure([entries[2]]).axes[1].get_xlabel()
    assert one == "scan point number (one point)"  # a position is recorded, but one point cannot move
    for e in entries:
        e.positions = {}
    fig = quicklook.overview_figure(entries)
    assert fig.axes[1].get_xlabel() == "scan point number (no sample position recorded)"
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [0.0, 2.0]
    missed = [line for line in fig.axes[0].get_lines() if line.get_label().startswith("no result")]
    assert list(missed[0].get_xdata()) == [1.0]
    entries[0].positions = {"sampleX": (0.0, "micron"), "sampleY": (0.0, "micron")}
    entries[2].positions = {"sampleX": (1.0, "micron"), "sampleY": (5.0, "micron")}
    label = quicklook.overview_figure(entries).axes[1].get_xlabel()
    assert label == "scan point number (the sample moves along sampleX and sampleY)"


def test_show_run_with_truth_into_another_folder(run_dir, tmp_path):
    r = show(run_dir, "--truth", "--out", tmp_path / "figs", "--slices", "2")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "figs" / "index.html").is_file()
    assert not (run_dir / "figures").exists()
    assert len(list((tmp_path / "figs").glob("point_*_depthmap.png"))) == 2


def test_show_run_again_and_never_over_someone_else_s_files(run_dir, tmp_path):
    """A folder of figures laueflow wrote is written again; an index.html or figure names laueflow did not
    write stop the command with one error line, and nothing in the folder changes."""
    figs = tmp_path / "figs"
    assert show(run_dir, "--out", figs, "--slices", "2").exit_code == 0
    again = show(run_dir, "--out", figs, "--slices", "2")
    assert again.exit_code == 0, again.output
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "index.html").write_text("<html>the beamline's page</html>")
    r = show(run_dir, "--out", theirs)
    assert r.exit_code == 2 and r.stderr.startswith("error:") and "not written by laueflow show" in r.stderr
    assert sorted(p.name for p in theirs.iterdir()) == ["index.html"]
    (theirs / "index.html").unlink()
    (theirs / "overview.png").write_bytes(b"a figure of someone else")
    r = show(run_dir, "--out", theirs)
    assert r.exit_code == 2 and "holds figures laueflow show did not write (overview.png)" in r.stderr
    assert (theirs / "overview.png").read_bytes() == b"a figure of someone else"


def test_show_run_reports_an_unreadable_point(run_dir, tmp_path):
    run = tmp_path / "recon"
    shutil.copytree(run_dir, run)
    (run / "point_00000.h5").write_bytes(b"not hdf5")
    r = show(run, "--slices", "2")
    assert r.exit_code == 1
    assert "point     0: no figures, unreadable:" in r.stderr
    rows = {row[0]: row for row in parse(run / "figures" / "index.html").rows[1:]}
    assert rows["0"][-1].startswith("unreadable:") and (run / "figures" / "point_00002_slices.png").is_file()


def test_show_run_on_a_folder_without_results(tmp_path):
    empty = show(tmp_path)
    assert empty.exit_code == 2 and empty.stderr.startswith("error:")
    assert "no scan points here" in empty.stderr and "point file" in empty.stderr
    assert not (tmp_path / "figures").exists()
    write_status(tmp_path, {0: {"state": "running"}, 1: {"state": "pending"}})
    waiting = show(tmp_path)
    assert waiting.exit_code == 2
    assert "no point has a result file yet (1 running, 1 pending)" in waiting.stderr
    assert not (tmp_path / "figures").exists()
