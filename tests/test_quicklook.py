"""Quick-look figures (laueflow.quicklook) and `laueflow show` on one point file, on point files that hold
the truth of a simulated scan exactly (so every figure can be checked against known depths), some with
pixels not decoded (below the threshold, saturated, in a failed block) to check how those are drawn."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402

from laueflow import provenance, quicklook  # noqa: E402
from laueflow.cli import main  # noqa: E402
from laueflow.config import load  # noqa: E402
from laueflow.flags import CONTRAST, NO_BACKGROUND, NO_SIGNAL, POOR_FIT  # noqa: E402
from laueflow.io import blocks, layout, pointfile  # noqa: E402
from laueflow.io.pointfile import PIXEL_NO_BLOCK, PIXEL_NOT_SELECTED, PIXEL_SATURATED  # noqa: E402
from laueflow.io.scan import open_scan  # noqa: E402
from laueflow.io.truth import load_truth  # noqa: E402
from laueflow.runs import open_point  # noqa: E402
from laueflow.simulate import simulate  # noqa: E402

REGION = 16
Pixels = Iterable[tuple[int, int]]


def perfect_point_file(scan: Path, out: Path, point: int = 0, recorded_scan: Path | None = None, *,
                       not_selected: Pixels = (), saturated: Pixels = (), failed_from_row: int | None = None,
                       shift: int = 0, quality: dict[tuple[int, int], int] | None = None,
                       residual: dict[tuple[int, int], float] | None = None) -> Path:
    """A point file (io.pointfile.write_point) whose volume is the scan's true profiles, moved ``shift``
    depth bins deeper; its provenance names ``recorded_scan`` (default: the scan) as the scan it came
    from and it keeps the header of the point's first frame.  The region is two tiles split at
    ``failed_from_row`` (absolute row), the second one failed (no block file); ``not_selected`` and
    ``saturated`` pixels are left out of the first; ``quality`` and ``residual`` set those fields of
    some pixels (else 0 where the profile is not zero, NO_SIGNAL elsewhere, residual 1)."""
    cfg = load(scan / "config.yaml")
    truth = load_truth(scan / "truth.h5").for_point(point)
    r0, r1, c0, c1 = cfg.file.frame
    true = np.zeros((r1 - r0, c1 - c0, truth.depth.size), np.float32)
    for (r, c), prof in zip(truth.pixels, truth.profiles, strict=True):
        true[r - r0, c - c0] = np.roll(prof, shift)
        if shift > 0:
            true[r - r0, c - c0, :shift] = 0.0
    split = r1 if failed_from_row is None else failed_from_row
    left_out = {tuple(p) for p in not_selected} | {tuple(p) for p in saturated}
    rows, cols = (g.ravel() for g in np.mgrid[r0:split, c0:c1])
    keep = np.array([(int(r), int(c)) not in left_out for r, c in zip(rows, cols, strict=True)], bool)
    rows, cols = rows[keep], cols[keep]
    profiles = true[rows - r0, cols - c0]
    n = rows.size
    q = np.where(profiles.sum(1) > 0, 0, NO_SIGNAL).astype(np.uint8)
    res = np.ones(n)
    where = {(int(r), int(c)): i for i, (r, c) in enumerate(zip(rows, cols, strict=True))}
    for (r, c), v in (quality or {}).items():
        q[where[(r, c)]] = v
    for (r, c), v in (residual or {}).items():
        res[where[(r, c)]] = v
    decoded = SimpleNamespace(rows=rows, cols=cols, profiles=profiles, background=np.full(n, 50.0),
                              residual=res, quality=q, energy=np.full(n, np.nan),
                              energy_sigma=np.full(n, np.nan))
    sat = np.array(sorted(tuple(p) for p in saturated), dtype=np.int32).reshape(-1, 2)
    block = out / ".blocks" / f"block_{point}.npz"
    blocks.write_block(block, point=point, tile=(r0, split, c0, c1), config_fingerprint=cfg.fingerprint(),
                       n_depths=truth.depth.size, decoded=decoded, saturated=(sat[:, 0], sat[:, 1]))
    record = provenance.build(config_yaml=cfg.to_yaml(), config_fingerprint=cfg.fingerprint(),
                              inputs=[{"name": "scan_0.h5", "size": 1, "sha256": "00"}],
                              start_time=provenance.now(), point=point, scan=str(recorded_scan or scan),
                              config_file=str((recorded_scan or scan) / "config.yaml"))
    path = out / layout.point_name(point)
    first_frame = open_scan(cfg, scan, check=False).point_frames(point)[0][0]
    pointfile.write_point(path, [block], frame=cfg.file.frame, depths_mm=cfg.geo.source.depths,
                          provenance=record, complete=failed_from_row is None,
                          header=(first_frame, cfg.file.h5_key))
    return path


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("quicklook")
    scan = root / "scan"
    simulate(scan, preset="thin", region=REGION, seed=4, frames=64)
    path = perfect_point_file(scan, root / "recon")
    point = open_point(path)
    return SimpleNamespace(root=root, scan=scan, path=path, point=point, truth=point.truth())


@pytest.fixture(scope="module")
def flawed(case) -> SimpleNamespace:
    """A point with pixels of every state: two not selected, two saturated, the rows from 8 on in a
    failed block, a few quality flags and one large misfit."""
    r0, _, c0, _ = case.point.frame
    spot = [tuple(int(v) for v in p) for p in case.truth.pixels if p[0] < r0 + 8]
    dark = [(r, c) for r in range(r0, r0 + 8) for c in range(c0, c0 + REGION) if (r, c) not in spot]
    not_selected, saturated = dark[:2], dark[2:4]
    quality = {spot[0]: POOR_FIT, spot[1]: CONTRAST | POOR_FIT, dark[4]: NO_SIGNAL | NO_BACKGROUND}
    path = perfect_point_file(case.scan, case.root / "flawed", not_selected=not_selected, saturated=saturated,
                              failed_from_row=r0 + 8, quality=quality, residual={spot[2]: 40.0})
    return SimpleNamespace(point=open_point(path), not_selected=not_selected, saturated=saturated,
                           failed=(r0 + 8, c0 + 3), spot=spot, quality=quality, dark=dark)


# ----------------------------------------------------------------------------------------------
# reading colours back from a rendered figure


def rendered(fig) -> np.ndarray:
    """The figure drawn by Agg, as an (H, W, 3) float array in 0-1."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3] / 255.0


def colour_at(fig, image: np.ndarray, ax, row: int, col: int) -> np.ndarray:
    """The rendered colour at the centre of detector pixel (row, col) of ``ax``."""
    x, y = ax.transData.transform((col, row))
    return image[int(round(image.shape[0] - y)), int(round(x))]


def assert_colour(got: np.ndarray, want: str | np.ndarray, tol: float = 0.02) -> None:
    want = np.asarray(to_rgb(want) if isinstance(want, str) else want[:3])
    assert np.abs(got - want).max() <= tol, f"{got} is not {want}"


def image_axes(fig) -> list:
    return [ax for ax in fig.axes if ax.images]


def legend_texts(fig) -> list[str]:
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    return [" ".join(t.get_text().split()) for leg in legends for t in leg.get_texts()]  # unwrapped


def lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB colours in 0-1."""
    rgb = np.asarray(rgb, dtype=np.float64)
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


# ----------------------------------------------------------------------------------------------
# one point


def test_integrated_image_figure(case):
    fig = quicklook.integrated_figure(case.point)
    image_ax, bar_ax = fig.axes  # the image and its colour bar
    assert _labels(image_ax) == ("detector column (px)", "detector row (px)")
    assert "counts/frame" in bar_ax.get_ylabel()
    assert fig.get_suptitle().startswith("point 0 (point_00000.h5)")
    np.testing.assert_allclose(image_ax.images[0].get_array(), case.point.integrated_image())
    assert len(image_ax.images) == 1 and not fig.legends  # every pixel decoded: no masks, no legend
    r0, r1, c0, c1 = case.point.frame
    assert image_ax.images[0].get_extent() == [c0 - 0.5, c1 - 0.5, r1 - 0.5, r0 - 0.5]


def _labels(ax) -> tuple[str, str]:
    return ax.get_xlabel(), ax.get_ylabel()


def test_pixels_not_decoded_have_their_state_colour(flawed):
    """Integrated image, every slice and the depth map draw each pixel not decoded in its state's colour
    (read back from the rendered figure), decoded pixels in the map's colours, and name the states with
    their counts in a legend."""
    pt = flawed.point
    state = pt.pixel_state()
    r0, _, c0, _ = pt.frame
    assert {int(state[r - r0, c - c0]) for r, c in flawed.not_selected} == {PIXEL_NOT_SELECTED}
    assert {int(state[r - r0, c - c0]) for r, c in flawed.saturated} == {PIXEL_SATURATED}
    assert int(state[flawed.failed[0] - r0, flawed.failed[1] - c0]) == PIXEL_NO_BLOCK
    expected = [(flawed.not_selected, quicklook.STATE_COLOURS[PIXEL_NOT_SELECTED]),
                (flawed.saturated, quicklook.STATE_COLOURS[PIXEL_SATURATED]),
                ([flawed.failed], quicklook.STATE_COLOURS[PIXEL_NO_BLOCK])]
    bright = max(flawed.spot, key=lambda p: pt.integrated_image()[p[0] - r0, p[1] - c0])
    for fig in (quicklook.integrated_figure(pt), quicklook.slices_figure(pt, n=3),
                quicklook.depth_map_figure(pt)):
        image = rendered(fig)
        axes = image_axes(fig)
        assert axes and "incomplete" in fig.get_suptitle()
        for ax in axes:
            for pixels, colour in expected:
                for r, c in pixels:
                    assert_colour(colour_at(fig, image, ax, r, c), colour)
            got = colour_at(fig, image, ax, *bright)  # a decoded pixel: not a mask colour
            assert all(np.abs(got - to_rgb(c)).max() > 0.1 for c in quicklook.STATE_COLOURS.values())
        texts = legend_texts(fig)
        assert any(t.startswith("not decoded: some frame reached 65535") and "(2 px)" in t for t in texts)
        assert any("below file.threshold" in t and "(2 px)" in t for t in texts)
        assert any("block holding it failed" in t and f"({int((state == PIXEL_NO_BLOCK).sum())} px)" in t
                   for t in texts)


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


@pytest.mark.parametrize("rng", [(-100.0, 180.0), (20.0, 20.0), (-150.0, 199.0)])
def test_signal_band_marks_the_range_not_the_whole_zoom(case, rng):
    """However wide the signal range, the zoom leaves room on both sides: the band covers the range's
    bins and at most 60 % of the zoom panel."""
    z = case.point.depth
    step = float(z[1] - z[0])
    lo, hi = quicklook.zoom_window(z, rng)
    band = (rng[0] - step / 2, rng[1] + step / 2)
    assert lo < band[0] and band[1] < hi
    assert (band[1] - band[0]) / (hi - lo) <= 0.6
    fig = quicklook.intensity_figure(case.point)
    rendered(fig)
    zoom = fig.axes[1]
    band = [p for p in zoom.patches if p.get_label() == "signal range"][0].get_window_extent()
    panel = zoom.get_window_extent()
    assert panel.x0 < band.x0 and band.x1 < panel.x1 and band.width / panel.width <= 0.6


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
    panels = image_axes(fig)
    assert len(panels) == len(quicklook.signal_slabs(pt, n=6))
    assert all("\u00b5m" in ax.get_title() for ax in panels)
    assert any("counts/frame" in ax.get_ylabel() for ax in fig.axes if not ax.images)  # the colour bar


def test_depth_map_matches_the_true_depths(case):
    fig = quicklook.depth_map_figure(case.point, case.truth)
    recon_ax, truth_ax, error_ax = image_axes(fig)
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
    assert recon_ax.images[0].get_cmap().name == quicklook.DEPTH_CMAP
    assert any("depth of maximum" in ax.get_ylabel() for ax in fig.axes if not ax.images)
    # the error of a perfect reconstruction is 0 at every spot pixel, none missed
    error = np.ma.filled(error_ax.images[0].get_array(), np.nan)
    spot = np.isfinite(true)
    np.testing.assert_allclose(error[spot], 0.0, atol=1e-4)
    assert not np.isfinite(error[~spot]).any()
    assert "0 of" in error_ax.get_title() and "missed" in error_ax.get_title()


def test_error_map_sign_and_colour(case, tmp_path):
    """A reconstruction 3 bins too deep: +3 um at every spot pixel, drawn on the positive side of a
    colour scale centred on 0; a spot pixel left undecoded is marked missed in its own colour."""
    r0, _, c0, _ = case.point.frame
    spot = [tuple(int(v) for v in p) for p in case.truth.pixels]
    path = perfect_point_file(case.scan, tmp_path, shift=3, not_selected=spot[:1])
    point = open_point(path)
    step = float(point.depth[1] - point.depth[0])
    error = quicklook.depth_error_map(point, case.truth)
    values = np.array([error[r - r0, c - c0] for r, c in spot[1:]])
    np.testing.assert_allclose(values, 3 * step, atol=1e-3)
    assert np.isnan(error[spot[0][0] - r0, spot[0][1] - c0])
    fig = quicklook.depth_map_figure(point, case.truth)
    error_ax = image_axes(fig)[-1]
    im = error_ax.images[0]
    vmin, vmax = im.get_clim()
    assert vmin == -vmax and vmax >= 3 * step  # centred on 0
    assert im.get_cmap().name == quicklook.ERROR_CMAP
    image = rendered(fig)
    r, c = spot[1]
    assert_colour(colour_at(fig, image, error_ax, r, c), im.cmap(im.norm(3 * step)))
    assert np.abs(colour_at(fig, image, error_ax, r, c) - im.cmap(im.norm(-3 * step))[:3]).max() > 0.2
    assert_colour(colour_at(fig, image, error_ax, *spot[0]), quicklook.MISSED_COLOUR)
    assert "1 of" in error_ax.get_title()
    assert any("decoded deeper" in ax.get_ylabel() for ax in fig.axes)


def test_quality_figure_maps_flags_and_misfit(flawed):
    fig = quicklook.quality_figure(flawed.point)
    flags_ax, misfit_ax = image_axes(fig)
    image = rendered(fig)
    spot = flawed.spot
    # each single flag has its bit's colour, a decoded pixel without flags the good colour, a combination
    # one of the combination colours, the states their own
    poor_fit = quicklook.BIT_COLOURS[POOR_FIT.bit_length() - 1]
    assert_colour(colour_at(fig, image, flags_ax, *spot[0]), poor_fit)
    assert_colour(colour_at(fig, image, flags_ax, *spot[3]), quicklook.GOOD_COLOUR)
    no_signal = quicklook.BIT_COLOURS[NO_SIGNAL.bit_length() - 1]
    assert_colour(colour_at(fig, image, flags_ax, *flawed.dark[5]), no_signal)
    combo = [tuple(colour_at(fig, image, flags_ax, *p).round(2)) for p in (spot[1], flawed.dark[4])]
    assert len(set(combo)) == 2
    for got in combo:
        assert min(np.abs(got - np.array(to_rgb(c))).max() for c in quicklook.COMBO_COLOURS) <= 0.02
    assert_colour(colour_at(fig, image, flags_ax, *flawed.saturated[0]),
                  quicklook.STATE_COLOURS[PIXEL_SATURATED])
    texts = legend_texts(fig)
    assert any(t.startswith("poor_fit: reduced chi-square") and "(1 px)" in t for t in texts)
    assert "contrast + poor_fit (1 px)" in texts and "no_signal + no_background (1 px)" in texts
    # misfit: log scale, the large one at the top of the scale
    im = misfit_ax.images[0]
    assert type(im.norm).__name__ == "LogNorm" and im.norm.vmax == pytest.approx(40.0)
    assert_colour(colour_at(fig, image, misfit_ax, *spot[2]), im.cmap(1.0))
    assert_colour(colour_at(fig, image, misfit_ax, *spot[3]), im.cmap(im.norm(1.0)))
    assert_colour(colour_at(fig, image, misfit_ax, *flawed.not_selected[0]),
                  quicklook.STATE_COLOURS[PIXEL_NOT_SELECTED])


def test_mask_colours_stand_apart_from_the_colour_maps():
    """The comment's promise: every mask colour is at least 30 CIELAB units from every colour of the
    maps it is drawn on, and the depth map's two ends differ."""
    cmaps = [matplotlib.colormaps[n](np.linspace(0, 1, 256))[:, :3]
             for n in (quicklook.INTENSITY_CMAP, quicklook.DEPTH_CMAP, quicklook.MISFIT_CMAP)]
    masks = [*quicklook.STATE_COLOURS.values(), quicklook.OTHER_STATE_COLOUR]
    for colours in cmaps:
        for mask in masks:
            assert np.linalg.norm(lab(colours) - lab(to_rgb(mask)), axis=1).min() >= 30, mask
    depth = matplotlib.colormaps[quicklook.DEPTH_CMAP](np.linspace(0, 1, 256))[:, :3]
    for mask in [quicklook.EMPTY_COLOUR, *quicklook.STATE_COLOURS.values()]:
        assert np.linalg.norm(lab(depth) - lab(to_rgb(mask)), axis=1).min() >= 30, mask
    misfit = matplotlib.colormaps[quicklook.MISFIT_CMAP](np.linspace(0, 1, 256))[:, :3]
    assert np.linalg.norm(lab(misfit) - lab(to_rgb(quicklook.EMPTY_COLOUR)), axis=1).min() >= 30
    assert np.linalg.norm(lab(depth[0]) - lab(depth[-1])) > 100
    error = matplotlib.colormaps[quicklook.ERROR_CMAP](np.linspace(0, 1, 256))[:, :3]
    for mask in (quicklook.EMPTY_COLOUR, quicklook.MISSED_COLOUR):
        assert np.linalg.norm(lab(error) - lab(to_rgb(mask)), axis=1).min() >= 30, mask


def test_show_writes_readable_pngs_and_a_summary(case, tmp_path):
    r = CliRunner().invoke(main, ["show", str(case.path), "--truth", "--out", str(tmp_path / "figs")])
    assert r.exit_code == 0, r.output
    assert re.search(r"^point +0  \(point_00000.h5\)$", r.stdout, re.MULTILINE)
    for key in ("region", "depth grid", "pixels", "signal", "truth", "covered 100.0%"):
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
