"""Quick-look figures (laueflow.quicklook) and `laueflow show`, on a point file that holds the truth of a
simulated scan exactly (so every figure can be checked against known depths)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from laueflow import provenance, quicklook  # noqa: E402
from laueflow.cli import main  # noqa: E402
from laueflow.config import load  # noqa: E402
from laueflow.evaluate import load_truth  # noqa: E402
from laueflow.io import blocks, layout, pointfile  # noqa: E402
from laueflow.runs import open_point  # noqa: E402
from laueflow.simulate import simulate  # noqa: E402

REGION = 16


def perfect_point_file(scan: Path, out: Path, point: int = 0, recorded_scan: Path | None = None) -> Path:
    """A point file (io.pointfile.write_point) whose volume is the scan's true profiles; its provenance
    names ``recorded_scan`` (default: the scan) as the scan it came from."""
    cfg = load(scan / "config.yaml")
    truth = load_truth(scan / "truth.h5").for_point(point)
    r0, r1, c0, c1 = cfg.file.frame
    rows, cols = (g.ravel() for g in np.mgrid[r0:r1, c0:c1])
    profiles = np.zeros((rows.size, truth.depth.size), np.float32)
    where = {(int(r), int(c)): i for i, (r, c) in enumerate(zip(rows, cols, strict=True))}
    for (r, c), prof in zip(truth.pixels, truth.profiles, strict=True):
        profiles[where[(int(r), int(c))]] = prof
    n = rows.size
    quality = np.where(profiles.sum(1) > 0, 0, 1).astype(np.uint8)
    decoded = SimpleNamespace(rows=rows, cols=cols, profiles=profiles, background=np.full(n, 50.0),
                              residual=np.ones(n), quality=quality, energy=np.full(n, np.nan),
                              energy_sigma=np.full(n, np.nan))
    block = out / ".blocks" / "block.npz"
    blocks.write_block(block, point=point, tile=cfg.file.frame, config_fingerprint=cfg.fingerprint(),
                        n_depths=truth.depth.size, decoded=decoded)
    record = provenance.build(config_yaml=cfg.to_yaml(), config_fingerprint=cfg.fingerprint(),
                              inputs=[{"name": "scan_0.h5", "size": 1, "sha256": "00"}],
                              start_time=provenance.now(), point=point, scan=str(recorded_scan or scan),
                              config_file=str((recorded_scan or scan) / "config.yaml"))
    path = out / layout.point_name(point)
    pointfile.write_point(path, [block], frame=cfg.file.frame, depths_mm=cfg.geo.source.depths,
                        provenance=record)
    return path


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("quicklook")
    scan = root / "scan"
    simulate(scan, preset="thin", region=REGION, seed=4, frames=64)
    path = perfect_point_file(scan, root / "recon")
    point = open_point(path)
    return SimpleNamespace(root=root, scan=scan, path=path, point=point, truth=point.truth())


def _labels(ax) -> tuple[str, str]:
    return ax.get_xlabel(), ax.get_ylabel()


def test_integrated_image_figure(case):
    fig = quicklook.integrated_figure(case.point)
    image_ax, bar_ax = fig.axes  # the image and its colour bar
    assert _labels(image_ax) == ("detector column (px)", "detector row (px)")
    assert "counts/frame" in bar_ax.get_ylabel()
    assert image_ax.get_title().startswith("point 0 (point_00000.h5)")
    np.testing.assert_allclose(image_ax.images[0].get_array(), case.point.integrated_image())
    r0, r1, c0, c1 = case.point.frame
    assert image_ax.images[0].get_extent() == [c0 - 0.5, c1 - 0.5, r1 - 0.5, r0 - 0.5]


def test_intensity_figure_marks_the_grid_and_shows_the_truth(case):
    fig = quicklook.intensity_figure(case.point, case.truth)
    whole, zoom = fig.axes
    assert whole.get_xlabel() == "depth (\u00b5m)" and "counts/frame" in whole.get_ylabel()
    z = case.point.depth
    labels = [line.get_label() for line in whole.get_lines()]
    assert labels[0] == "reconstructed" and labels[1].startswith(f"bin centres ({z.size} bins")
    assert "truth (simulated)" in labels
    np.testing.assert_array_equal(whole.get_lines()[1].get_xdata(), z)  # every bin marked
    lo, hi = case.point.signal_range()
    assert zoom.get_xlim()[0] < lo and zoom.get_xlim()[1] > hi
    assert zoom.get_xlim()[1] - zoom.get_xlim()[0] < z[-1] - z[0]
    assert "point 0" in fig.get_suptitle()


def test_montage_panels_lie_where_the_signal_is(case):
    pt = case.point
    groups = quicklook.signal_slabs(pt, n=12)
    assert 1 <= len(groups) <= 12
    excess = pt.intensity_vs_depth - np.median(pt.intensity_vs_depth)
    for g in groups:
        assert (np.diff(g) == 1).all()  # adjacent bins only
        assert (excess[g] >= 0.05 * excess.max()).all()
    covered = np.concatenate(groups)
    assert int(np.argmax(pt.intensity_vs_depth)) in covered
    # every grain of the truth shows up in some panel
    for grain in set(case.truth.grain.tolist()):
        peak = case.truth.depth[case.truth.profiles[case.truth.grain == grain].sum(0).argmax()]
        assert np.abs(pt.depth[covered] - peak).min() <= 1.0
    fig = quicklook.slices_figure(pt, n=6)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == len(quicklook.signal_slabs(pt, n=6))
    assert all("\u00b5m" in ax.get_title() for ax in panels)
    assert any("counts/frame" in ax.get_ylabel() for ax in fig.axes if not ax.images)  # the colour bar


def test_depth_map_matches_the_true_depths(case):
    fig = quicklook.depth_map_figure(case.point, case.truth)
    recon_ax, truth_ax = [ax for ax in fig.axes if ax.images]
    recon = np.ma.filled(recon_ax.images[0].get_array(), np.nan)
    true = np.ma.filled(truth_ax.images[0].get_array(), np.nan)
    shown = np.isfinite(recon)
    assert shown.sum() > 10
    # The volume is the truth.  A thin grain's profile is flat over its thickness: the reconstructed map
    # takes the first bin at the maximum, the truth map the middle of that plateau.
    t = case.truth
    r0, _, c0, _ = case.point.frame
    step = float(np.diff(t.depth).mean())
    half = np.full(true.shape, np.nan)
    top = t.profiles >= 0.99 * t.profiles.max(axis=1, keepdims=True)
    half[t.pixels[:, 0] - r0, t.pixels[:, 1] - c0] = (top.sum(axis=1) - 1) * step / 2
    np.testing.assert_allclose(true[shown] - recon[shown], half[shown], atol=1e-6)
    assert recon_ax.images[0].get_clim() == truth_ax.images[0].get_clim()
    assert any("depth of maximum" in ax.get_ylabel() for ax in fig.axes if not ax.images)


def test_show_writes_readable_pngs_and_a_summary(case, tmp_path):
    r = CliRunner().invoke(main, ["show", str(case.path), "--truth", "--out", str(tmp_path / "figs")])
    assert r.exit_code == 0, r.output
    for key in ("point       0", "region", "depth grid", "pixels", "signal", "truth", "covered 100.0%"):
        assert key in r.stdout
    names = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert names == sorted(f"point_00000_{f}.png" for f in quicklook.FIGURES)
    for name in names:
        img = mpimg.imread(tmp_path / "figs" / name)
        assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500

    beside = CliRunner().invoke(main, ["show", str(case.path), "--slices", "4"])
    assert beside.exit_code == 0, beside.output
    assert (case.path.parent / "point_00000_slices.png").is_file()


def test_show_reports_bad_input(case, tmp_path):
    def run(*args):
        return CliRunner().invoke(main, ["show", *map(str, args)])

    missing = run(tmp_path / "point_00009.h5")
    assert missing.exit_code == 2 and missing.stderr.startswith("error:")
    assert "does not exist" in missing.stderr
    folder = run(case.path.parent)
    assert folder.exit_code == 2 and "is a folder" in folder.stderr
    (tmp_path / "notes.h5").write_text("text")
    assert run(tmp_path / "notes.h5").exit_code == 2
    # a point whose scan folder has no truth.h5
    (tmp_path / "scan").mkdir()
    other = perfect_point_file(case.scan, tmp_path / "recon", recorded_scan=tmp_path / "scan")
    no_truth = run(other, "--truth")
    assert no_truth.exit_code == 2 and "no truth.h5" in no_truth.stderr
    given = run(other, "--truth-file", case.scan / "truth.h5", "--out", tmp_path / "figs")
    assert given.exit_code == 0, given.output


def test_calibration_figure_one_panel_per_film(tmp_path):
    """One panel per film with the film depth line and both poses; a record without film depths is refused."""
    film = {"film_depth_um": 20.0, "spots": [1, 2, 3], "pixels": [9, 8, 7], "before_um": [41.2, 41.6, 41.4],
            "after_um": [20.1, 19.9, 20.0], "within_1um_before": 0.0, "within_1um_after": 1.0}
    record = {"date": "2026-12-01T10:00:00Z", "films": [film, {**film, "film_depth_um": 80.0}]}
    fig = quicklook.calibration_figure(record)
    axes = fig.get_axes()
    assert len(axes) == 2
    labels = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert labels[0] == "film depth 20 \u00b5m" and "nominal pose" in labels[1] and "fitted pose" in labels[2]
    path = quicklook.save_calibration_figure(record, tmp_path / "cal.png")
    assert mpimg.imread(path).shape[2] in (3, 4)
    with pytest.raises(ValueError, match="no film depths"):
        quicklook.calibration_figure({"date": "x"})
