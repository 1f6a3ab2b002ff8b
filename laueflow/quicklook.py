"""Quick-look figures of a point file and of a run (``laueflow show``): what a scientist checks first.

Per point (:data:`FIGURES`):

- ``integrated``: the depth-integrated image of the detector region;
- ``intensity``: intensity versus depth over the whole depth grid (bins marked) and zoomed on the signal;
- ``slices``: a montage of depth slices where the signal is;
- ``depthmap``: the depth of maximum intensity of each pixel; with the truth of a simulated scan, the
  true map and the error map (decoded minus true depth of each spot pixel) beside it;
- ``quality``: the decoder's quality flags and the misfit (reduced chi-square) of each decoded pixel.

A pixel without a decoded value is never drawn as a value: each state of the point file's pixel state
map (not selected, saturated, in a failed block) has its own colour, named with its count in a legend.

Per run: :func:`overview_figure` (integrated intensity and mean depth of the signal against the scan
position, else the point number) and :func:`save_run_quicklooks`, which writes every point's figures,
the overview and ``index.html`` (plain HTML: the summary table and each point's figures) into one folder.

Figures are built as ``matplotlib.figure.Figure`` objects without pyplot, so they render with any
backend (Agg in scripts and tests) and display in a notebook with ``display(fig)``.  matplotlib is
imported at the top: this module is the figures; the command line imports it only for ``laueflow show``.
"""

from __future__ import annotations

import html
import os
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.colors import ListedColormap, LogNorm, PowerNorm
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter
from matplotlib.transforms import blended_transform_factory

from .errors import LaueflowError, ResultError
from .evaluate import centroids
from .io.atomic import atomic_path
from .io.pointfile import (
    PIXEL_DECODED,
    PIXEL_NO_BLOCK,
    PIXEL_NOT_SELECTED,
    PIXEL_SATURATED,
    signal_excess,
)
from .runs import SAMPLE_POSITIONS, Point, Run

FIGURES = ("integrated", "intensity", "slices", "depthmap", "quality")
UM = "\u00b5m"
MAP_FLOOR = 0.01  # the depth map shows pixels above this fraction of the brightest pixel's intensity
INDEX = "index.html"
OVERVIEW = "overview.png"

# Colours.  Intensities use "magma" (black = no counts, so a decoded pixel without signal reads as
# empty).  Depths use "plasma": perceptually uniform (lightness rises steadily with depth, so equal depth
# steps look equal and the map reads in grey too) and its two ends differ in both hue and lightness
# (dark blue-violet for the shallowest, bright yellow for the deepest), where "turbo" is dark at both
# ends and not uniform.  "plasma" holds no neutral grey, green or cyan, which the masks below use;
# "cividis", uniform too, passes through a neutral grey that the pixels not decoded would blend into.
# The misfit uses "inferno" (log scale) and the depth error the diverging "berlin", centred on 0 and
# dark there, so a pixel decoded at its true depth stays visible on the white of the pixels without a spot.
# Every mask colour is at least 30 CIELAB units from every colour of the maps it is drawn on.
INTENSITY_CMAP = "magma"
DEPTH_CMAP = "plasma"
MISFIT_CMAP = "inferno"
ERROR_CMAP = "berlin"  # matplotlib 3.10 and later; older ones draw "RdBu_r" (white at 0)
ERROR_CMAP_OLD = "RdBu_r"
STATE_COLOURS = {PIXEL_NOT_SELECTED: "#a0a0a0", PIXEL_SATURATED: "#00e5ff", PIXEL_NO_BLOCK: "#00a000"}
OTHER_STATE_COLOUR = "#1e90ff"  # a state value this laueflow does not know (a newer file)
EMPTY_COLOUR = "#ffffff"  # decoded, but nothing to show: below the depth map's floor, no spot in the truth
NO_SPOT = "truth and error maps: no spot in the truth"
MISSED_COLOUR = "#ff00ff"  # error map: a spot pixel with no decoded intensity
GOOD_COLOUR = "#4477aa"  # quality map: decoded, no flag
BIT_COLOURS = ("#eee8d5", "#ccbb44", "#aa3377", "#ee6677", "#ff8c00")  # quality bits 1, 2, 4, 8, 16 alone
# other flag values, most common first (the last one takes all the rest when there are more)
COMBO_COLOURS = ("#000000", "#44aa99", "#8c564b", "#f7b6d2", "#332288")
RING_ABOVE = 200  # regions wider than this (pixels) also ring rare masked pixels, too small to see at 120 dpi
RING_MOST = 500  # ... when a category has at most this many pixels


def _figure(width: float, height: float) -> Any:

    return Figure(figsize=(width, height), layout="constrained")


def _title(point: Point, what: str) -> str:
    note = "" if point.complete else "\n(incomplete: some blocks failed, their pixels were not decoded)"
    return f"point {point.point} ({point.path.name}): {what}{note}"


def _detector_axes(ax: Any, label_x: bool = True, label_y: bool = True) -> None:
    if label_x:
        ax.set_xlabel("detector column (px)")
    if label_y:
        ax.set_ylabel("detector row (px)")


# ----------------------------------------------------------------------------------------------
# Masks: pixels drawn in a flat colour instead of a value


@dataclass
class Category:
    """Pixels of a map drawn in one flat colour and named in the legend."""

    where: np.ndarray  # (rows, cols) bool over the region
    colour: str
    label: str


def state_categories(point: Point, state: np.ndarray | None = None) -> list[Category]:
    """One category per state of a pixel without a decoded value (not selected, saturated, in a failed
    block), labelled with the meaning the point file gives it."""
    state = point.pixel_state() if state is None else state
    meanings = {f.value: f.meaning for f in point.pixel_states()}
    out = [Category(state == value, colour, meanings.get(value, f"pixel state {value}"))
           for value, colour in STATE_COLOURS.items()]
    other = (state != PIXEL_DECODED) & ~np.isin(state, list(STATE_COLOURS))
    out.append(Category(other, OTHER_STATE_COLOUR, "not decoded: a state this laueflow does not know"))
    return out


def _draw_categories(ax: Any, point: Point, categories: Iterable[Category]) -> list[Any]:
    """Draw the categories present over the axes' image, each in its flat colour; returns their legend
    handles (label with the pixel count).  On a large region the rare ones are ringed as well: one
    pixel of a 1000-pixel-wide region is less than one pixel of the PNG."""

    present = [c for c in categories if c.where.any()]
    if not present:
        return []
    codes = np.full(present[0].where.shape, -1, dtype=np.int16)
    for i, c in enumerate(present):
        codes[c.where & (codes < 0)] = i
    ax.imshow(np.ma.masked_less(codes, 0), extent=point.extent, origin="upper", interpolation="nearest",
              cmap=ListedColormap([c.colour for c in present]), vmin=-0.5, vmax=len(present) - 0.5)
    r0, _, c0, _ = point.frame
    big = max(codes.shape) > RING_ABOVE
    handles = []
    for c in present:
        n = int(c.where.sum())
        handles.append(Patch(facecolor=c.colour, edgecolor="0.3", linewidth=0.5,
                             label=f"{c.label} ({n:,} px)"))
        if big and n <= RING_MOST:
            rows, cols = np.nonzero(c.where)
            ax.autoscale(False)
            ax.scatter(cols + c0, rows + r0, s=40, facecolors="none", edgecolors=c.colour, linewidths=1.0)
    return handles


def _legend_below(fig: Any, handles: list[Any]) -> None:
    """One legend under the figure's panels: each label once, in one or two columns, long labels
    wrapped to the figure's width (a legend wider than the figure squeezes the panels to nothing)."""

    unique = list({h.get_label(): h for h in handles}.values())
    if not unique:
        return
    width = fig.get_figwidth()
    ncols = 2 if width >= 10 and len(unique) > 2 else 1
    chars = max(30, int(width * 14 / ncols) - 6)
    for h in unique:
        h.set_label(textwrap.fill(h.get_label(), chars, subsequent_indent="  "))
    fig.legend(handles=unique, loc="outside lower center", ncols=ncols, fontsize=8, frameon=False)


def _decoded_values(image: np.ndarray, state: np.ndarray) -> np.ndarray:
    """The image with every pixel that was not decoded masked."""
    return np.ma.masked_array(image, mask=state != PIXEL_DECODED)


# ----------------------------------------------------------------------------------------------
# Depths


def truth_depth_map(point: Point, truth: Any) -> np.ndarray:
    """Depth (um) of the maximum of each truth pixel's profile over the point's region, NaN elsewhere.

    A thin grain's true profile is flat over its thickness, so the maximum is taken as the middle of
    the first run of bins within 1 % of it (not its first bin, which would put every grain at its top
    face).
    """
    r0, r1, c0, c1 = point.frame
    out = np.full((r1 - r0, c1 - c0), np.nan)
    if truth is None or len(truth.pixels) == 0:
        return out
    rows, cols = truth.pixels[:, 0], truth.pixels[:, 1]
    inside = (rows >= r0) & (rows < r1) & (cols >= c0) & (cols < c1) & (truth.profiles.max(axis=1) > 0)
    prof = truth.profiles[inside]
    first = prof.argmax(axis=1)
    index = np.arange(prof.shape[1])
    below = (prof < 0.99 * prof.max(axis=1, keepdims=True)) & (index[None, :] > first[:, None])
    end = np.where(below.any(axis=1), below.argmax(axis=1), prof.shape[1])  # end of the first plateau
    out[rows[inside] - r0, cols[inside] - c0] = np.interp((first + end - 1) / 2, index, truth.depth)
    return out


def _spot_pixels(point: Point, truth: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Region row, column and truth index of the truth's spot pixels inside the point's region."""
    r0, r1, c0, c1 = point.frame
    if truth is None or len(truth.pixels) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    rows, cols = truth.pixels[:, 0], truth.pixels[:, 1]
    inside = (rows >= r0) & (rows < r1) & (cols >= c0) & (cols < c1) & (truth.profiles.max(axis=1) > 0)
    return rows[inside] - r0, cols[inside] - c0, np.flatnonzero(inside)


def _profiles_at(point: Point, rr: np.ndarray, cc: np.ndarray) -> np.ndarray:
    """(n, depth bins) profiles of region pixels (rr, cc), read a few depth chunks at a time."""
    vol = point.volume_data
    out = np.zeros((rr.size, vol.shape[0]), dtype=np.float64)
    if rr.size == 0:
        return out
    step = max(1, (vol.chunks or (16,))[0])
    for j0 in range(0, vol.shape[0], step):
        block = vol[j0:j0 + step]
        out[:, j0:j0 + block.shape[0]] = block[:, rr, cc].T
    return out


def depth_error_map(point: Point, truth: Any) -> np.ndarray:
    """Decoded minus true depth (um) of each spot pixel of the truth, NaN elsewhere and where the pixel has
    no decoded intensity.

    A pixel's depth is the intensity-weighted mean depth of its profile, the centroid whose absolute
    error ``laueflow score`` reports (a perfect reconstruction gives 0 for thick grains too, where the
    depth of maximum is anywhere on a flat top).  Positive: decoded deeper than the truth.
    """
    r0, r1, c0, c1 = point.frame
    out = np.full((r1 - r0, c1 - c0), np.nan)
    rr, cc, idx = _spot_pixels(point, truth)
    if idx.size == 0:
        return out
    decoded = centroids(_profiles_at(point, rr, cc), point.depth)
    out[rr, cc] = decoded - centroids(truth.profiles[idx].astype(np.float64), truth.depth)
    return out


def _error_limit(error: np.ndarray, step: float) -> tuple[float, bool]:
    """Colour scale limit of an error map: the 98th percentile of |error| (one outlier does not wash
    out the rest), at least one depth bin; and whether some errors lie beyond it."""
    found = np.abs(error[np.isfinite(error)])
    if found.size == 0:
        return step, False
    limit = max(float(np.percentile(found, 98)), step)
    return limit, bool(found.max() > limit)


# ----------------------------------------------------------------------------------------------
# Figures of one point


def integrated_figure(point: Point) -> Any:
    """The depth-integrated image (square-root colour scale, so weak spots show beside strong ones);
    pixels not decoded in their state's colour."""

    img = point.integrated_image()
    state = point.pixel_state()
    shown = _decoded_values(img, state)
    fig = _figure(6.4, 6.2)
    ax = fig.add_subplot()
    vmax = float(shown.max()) if shown.count() and shown.max() > 0 else 1.0
    im = ax.imshow(shown, extent=point.extent, origin="upper", cmap=INTENSITY_CMAP, interpolation="nearest",
                   norm=PowerNorm(0.5, vmin=0.0, vmax=vmax))
    handles = _draw_categories(ax, point, state_categories(point, state))
    _detector_axes(ax)
    fig.suptitle(_title(point, "depth-integrated intensity"), fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.9, label="intensity summed over depth (counts/frame, sqrt scale)")
    _legend_below(fig, handles)
    return fig


def zoom_window(depth: np.ndarray, rng: tuple[float, float] | None) -> tuple[float, float] | None:
    """The depth window (um) of the zoom on the signal range ``rng``: the range (its bins' full width)
    with a margin of 40 % of its width each side, at least 5 bins, so the range fills at most 56 % of
    the window and the intensity on both sides of it shows."""
    if rng is None:
        return None
    step = float(depth[1] - depth[0]) if depth.size > 1 else 1.0
    lo, hi = rng[0] - step / 2, rng[1] + step / 2
    pad = max(5 * step, 0.4 * (hi - lo))
    return lo - pad, hi + pad


def intensity_figure(point: Point, truth: Any = None) -> Any:
    """Intensity versus depth: the whole grid with every bin marked, and a zoom on the signal."""
    z, ivd = point.depth, point.intensity_vs_depth
    step = float(z[1] - z[0]) if z.size > 1 else 1.0
    true = truth.profiles.sum(axis=0) if truth is not None and len(truth.pixels) else None
    rng = point.signal_range()
    fig = _figure(8.0, 6.4)
    axes = fig.subplots(2, 1)
    zoom = zoom_window(z, rng)
    for ax, window in zip(axes, (None, zoom), strict=True):
        ax.plot(z, ivd, drawstyle="steps-mid", color="C0", lw=1.2, label="reconstructed")
        ax.plot(z, ivd, ".", color="C0", ms=2.5, label=f"bin centres ({z.size} bins, {step:g} {UM} apart)")
        if true is not None:
            ax.plot(truth.depth, true, drawstyle="steps-mid", color="C3", lw=1.0, ls="--",
                    label="truth (simulated)")
        if rng is not None:
            ax.axvspan(rng[0] - step / 2, rng[1] + step / 2, color="0.9", zorder=0, label="signal range")
        ax.set_xlabel(f"depth ({UM})")
        ax.set_ylabel("intensity (counts/frame per bin)")
        ax.grid(alpha=0.3)
        if window is not None:
            ax.set_xlim(*window)
    axes[0].set_xlim(z[0] - step / 2, z[-1] + step / 2)
    fig.suptitle(_title(point, "intensity versus depth"), fontsize=10)
    axes[0].set_title(f"whole depth grid: {z[0]:g} to {z[-1]:g} {UM}", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=8)
    if zoom is not None:
        axes[1].set_title(f"zoom on the signal: {rng[0]:.1f} to {rng[1]:.1f} {UM}", fontsize=9)
    else:
        axes[1].set_title("no signal above the floor", fontsize=9)
    return fig


def signal_slabs(point: Point, n: int = 12, fraction: float = 0.05) -> list[np.ndarray]:
    """Depth-bin groups for a montage of up to ``n`` panels, all where the signal is.

    The bins whose summed intensity rises above its floor by ``fraction`` of the peak form runs of
    neighbouring bins (one per grain, roughly).  Each run gets panels in proportion to its length, at
    least one (the ``n`` brightest runs when there are more); a panel is one bin, or a few adjacent
    bins of one run.  Without signal: the single brightest bin.
    """
    ivd = point.intensity_vs_depth
    if ivd.size == 0:
        return []
    excess = signal_excess(ivd, fraction)
    if excess is None:
        return [np.array([int(np.argmax(ivd))])]
    above = np.flatnonzero(excess)
    runs = np.split(above, np.flatnonzero(np.diff(above) != 1) + 1)
    if len(runs) > n:
        brightest = sorted(np.argsort([-ivd[r].sum() for r in runs])[:n])
        runs = [runs[i] for i in brightest]
    total = sum(r.size for r in runs)
    budget = min(n, total)
    share = [max(1, int(budget * r.size / total)) for r in runs]
    while sum(share) > budget:  # rounding up the small runs may overshoot: take from the largest
        share[int(np.argmax(share))] -= 1
    while sum(share) < budget:  # hand what is left to the runs with most bins per panel
        share[int(np.argmax([r.size / s for r, s in zip(runs, share, strict=True)]))] += 1
    return [g for r, s in zip(runs, share, strict=True) for g in np.array_split(r, min(s, r.size)) if g.size]


def _slab_label(point: Point, idx: np.ndarray) -> str:
    z = point.depth
    if idx.size == 1:
        return f"{z[idx[0]]:.1f} {UM}"
    return f"{z[idx[0]]:.1f} to {z[idx[-1]]:.1f} {UM} ({idx.size} bins)"


def slices_figure(point: Point, n: int = 12) -> Any:
    """A montage of depth slices where the signal is, on one colour scale; pixels not decoded in their
    state's colour."""
    groups = signal_slabs(point, n)
    state = point.pixel_state()
    images = [_decoded_values(point.slab(g) / g.size, state) for g in groups]  # mean per bin: comparable
    categories = state_categories(point, state)
    cols = min(4, max(1, len(images)))
    rows = max(1, -(-len(images) // cols))
    fig = _figure(3.0 * cols + 1.2, 2.8 * rows + 0.6 + 0.25 * sum(c.where.any() for c in categories))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    vmax = max((float(im.max()) for im in images if im.count()), default=1.0) or 1.0
    shown, handles = None, []
    for i, ax in enumerate(axes):
        if i >= len(images):
            ax.set_axis_off()
            continue
        shown = ax.imshow(images[i], extent=point.extent, origin="upper", cmap=INTENSITY_CMAP,
                          interpolation="nearest", vmin=0.0, vmax=vmax)
        handles = _draw_categories(ax, point, categories)
        ax.set_title(_slab_label(point, groups[i]), fontsize=9)
        _detector_axes(ax, label_x=i // cols == rows - 1 or i + cols >= len(images), label_y=i % cols == 0)
        ax.tick_params(labelsize=7)
    fig.suptitle(_title(point, "depth slices where the signal is"), fontsize=10)
    if shown is not None:
        fig.colorbar(shown, ax=list(axes), shrink=0.8, label="intensity (counts/frame per bin)")
    _legend_below(fig, handles)
    return fig


def depth_map_figure(point: Point, truth: Any = None, floor: float = MAP_FLOOR) -> Any:
    """Depth of maximum intensity per pixel, colour-coded; with ``truth``, the true map and the error map
    (:func:`depth_error_map`) beside it.

    Decoded pixels whose depth-integrated intensity is below ``floor`` of the brightest pixel's are left
    white, pixels not decoded are drawn in their state's colour.
    """

    state = point.pixel_state()
    img = point.integrated_image()
    decoded = state == PIXEL_DECODED
    brightest = float(img[decoded].max()) if decoded.any() else 0.0
    recon = point.depth_map().copy()
    weak = decoded & ((img < floor * brightest) | ~np.isfinite(recon))
    recon[~decoded | weak] = np.nan
    maps = [("reconstructed", recon)]
    true_map = error = None
    if truth is not None:
        true_map = truth_depth_map(point, truth)
        error = depth_error_map(point, truth)
        maps.append(("truth (simulated)", true_map))
    values = np.concatenate([m[np.isfinite(m)] for _, m in maps])
    lo, hi = (float(values.min()), float(values.max())) if values.size else (point.depth[0], point.depth[-1])
    if hi <= lo:
        lo, hi = lo - 1.0, hi + 1.0
    cmap = mpl.colormaps[DEPTH_CMAP]
    panels = len(maps) + (error is not None)
    fig = _figure(6.0 * panels, 6.6)
    axes = np.atleast_1d(fig.subplots(1, panels, squeeze=False)).ravel()

    ax = axes[0]
    shown = ax.imshow(np.ma.masked_invalid(recon), extent=point.extent, origin="upper", cmap=cmap,
                      interpolation="nearest", vmin=lo, vmax=hi)
    empty = Category(weak, EMPTY_COLOUR, f"{'reconstructed map: ' if truth is not None else ''}decoded, "
                     f"below {floor:.0%} of the brightest pixel")
    handles = _draw_categories(ax, point, [empty, *state_categories(point, state)])
    ax.set_title("reconstructed: depth of maximum", fontsize=9)
    _detector_axes(ax)
    if true_map is not None and error is not None:
        ax = axes[1]
        ax.imshow(np.ma.masked_invalid(true_map), extent=point.extent, origin="upper", cmap=cmap,
                  interpolation="nearest", vmin=lo, vmax=hi)
        no_spot = Category(~np.isfinite(true_map), EMPTY_COLOUR, NO_SPOT)
        handles += _draw_categories(ax, point, [no_spot])
        ax.set_title("truth (simulated): depth of maximum", fontsize=9)
        _detector_axes(ax, label_y=False)
    fig.colorbar(shown, ax=list(axes[:len(maps)]), shrink=0.9, label=f"depth of maximum ({UM})")
    if error is not None and true_map is not None:
        handles += _error_panel(fig, axes[-1], point, error, np.isfinite(true_map))
    fig.suptitle(_title(point, "depth of maximum intensity"), fontsize=10)
    _legend_below(fig, handles)
    return fig


def _error_panel(fig: Any, ax: Any, point: Point, error: np.ndarray, spot: np.ndarray) -> list[Any]:
    """The error map on ``ax`` with its colour bar; returns the legend handles of its masks."""

    z = point.depth
    step = float(abs(z[1] - z[0])) if z.size > 1 else 1.0
    limit, beyond = _error_limit(error, step)
    cmap = ERROR_CMAP if ERROR_CMAP in mpl.colormaps else ERROR_CMAP_OLD
    im = ax.imshow(np.ma.masked_invalid(error), extent=point.extent, origin="upper", cmap=cmap,
                   interpolation="nearest", vmin=-limit, vmax=limit)
    missed = spot & ~np.isfinite(error)
    categories = [Category(~spot, EMPTY_COLOUR, NO_SPOT),
                  Category(missed, MISSED_COLOUR, "error map: spot pixel without decoded intensity (missed)")]
    handles = _draw_categories(ax, point, categories)
    found = np.abs(error[np.isfinite(error)])
    median = f"median |error| {np.median(found):.2f} {UM}" if found.size else "no spot pixel found"
    ax.set_title(f"decoded minus true depth (mean depth of each profile)\n{median}, "
                 f"{int(missed.sum())} of {int(spot.sum())} spot pixels missed", fontsize=9)
    _detector_axes(ax, label_y=False)
    fig.colorbar(im, ax=ax, shrink=0.9, extend="both" if beyond else "neither",
                 label=f"decoded minus true depth ({UM}; > 0: decoded deeper)")
    return handles


def _flag_label(value: int, flags: Sequence[Any]) -> str:
    names = [f.name for f in flags if value & f.value]
    unknown = value & ~sum(f.value for f in flags)
    if unknown:
        names.append(f"bits {unknown:#x}")
    return " + ".join(names)


def quality_categories(point: Point) -> list[Category]:
    """One category per quality value among the decoded pixels: no flag, each single flag (a fixed colour
    per bit, the same in every point), and the combinations of flags (most common first)."""
    r0, r1, c0, c1 = point.frame
    px = point.pixels
    flags = point.quality_flags()
    meanings = {f.value: f.meaning for f in flags}
    quality = np.full((r1 - r0, c1 - c0), -1, dtype=np.int64)
    quality[px.rows - r0, px.cols - c0] = px.quality.astype(np.int64)
    values, counts = np.unique(quality[quality >= 0], return_counts=True)
    singles, combos = [], []
    for value, count in zip(values.tolist(), counts.tolist(), strict=True):
        where = quality == value
        if value == 0:
            singles.append((0, Category(where, GOOD_COLOUR, "no flag")))
        elif value & (value - 1) == 0 and value.bit_length() <= len(BIT_COLOURS) and value in meanings:
            label = f"{_flag_label(value, flags)}: {meanings[value]}"
            singles.append((value, Category(where, BIT_COLOURS[value.bit_length() - 1], label)))
        else:
            combos.append((count, value, where))
    out = [c for _, c in sorted(singles, key=lambda s: s[0])]
    combos.sort(key=lambda c: (-c[0], c[1]))
    for i, (_, value, where) in enumerate(combos[:len(COMBO_COLOURS) - 1]):
        out.append(Category(where, COMBO_COLOURS[i], _flag_label(value, flags)))
    rest = combos[len(COMBO_COLOURS) - 1:]
    if len(rest) == 1:
        out.append(Category(rest[0][2], COMBO_COLOURS[-1], _flag_label(rest[0][1], flags)))
    elif rest:
        where = np.logical_or.reduce([w for _, _, w in rest])
        out.append(Category(where, COMBO_COLOURS[-1], f"{len(rest)} other combinations of flags"))
    return out


def quality_figure(point: Point) -> Any:
    """The quality flags of each decoded pixel (a categorical map) and its misfit (reduced chi-square,
    log colour scale); pixels not decoded in their state's colour."""

    state = point.pixel_state()
    states = state_categories(point, state)
    fig = _figure(12.4, 7.0)
    flags_ax, misfit_ax = fig.subplots(1, 2)
    blank = np.ma.masked_all(state.shape)
    flags_ax.imshow(blank, extent=point.extent, origin="upper")
    handles = _draw_categories(flags_ax, point, [*quality_categories(point), *states])
    flags_ax.set_title("quality flags of the decoder", fontsize=9)
    _detector_axes(flags_ax)

    residual = point.pixels.image("residual", point.frame)
    valid = np.isfinite(residual) & (residual > 0)
    if valid.any():
        lo, hi = float(residual[valid].min()), float(residual[valid].max())
        norm = LogNorm(vmin=lo, vmax=hi if hi > lo else lo * 10)
    else:
        norm = LogNorm(vmin=0.1, vmax=10.0)
    im = misfit_ax.imshow(np.ma.masked_array(residual, ~valid), extent=point.extent, origin="upper",
                          cmap=MISFIT_CMAP, interpolation="nearest", norm=norm)
    no_value = Category((state == PIXEL_DECODED) & ~valid, EMPTY_COLOUR, "decoded, no misfit recorded")
    handles += _draw_categories(misfit_ax, point, [no_value, *states])
    median = f", median {np.median(residual[valid]):.2f}" if valid.any() else ""
    misfit_ax.set_title(f"misfit: reduced chi-square of each pixel's fit{median}", fontsize=9)
    _detector_axes(misfit_ax, label_y=False)
    bar = fig.colorbar(im, ax=misfit_ax, shrink=0.9,
                       label="reduced chi-square (1: within the noise; log scale)")
    _plain_log_ticks(bar.ax.yaxis, norm.vmin, norm.vmax)
    fig.suptitle(_title(point, "quality flags and misfit"), fontsize=10)
    _legend_below(fig, handles)
    return fig


def _plain_log_ticks(axis: Any, lo: float, hi: float) -> None:
    """Ticks of a log axis as plain numbers (0.5, 1, 2, not 5e-1), at 1, 2, 5 (and 1.5, 3, 7 over a
    short range) of each decade."""

    subs = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if hi / max(lo, 1e-300) < 30 else (1.0, 2.0, 5.0)
    axis.set_major_locator(LogLocator(subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _save(fig: Any, path: Path, dpi: int) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def save_quicklooks(point: Point, out_dir: str | os.PathLike | None = None, truth: Any = None,
                    dpi: int = 120, which: Sequence[str] = FIGURES, slices: int = 12) -> dict[str, Path]:
    """Write the quick-look PNGs of a point (``<stem>_<figure>.png``) into ``out_dir`` (default: beside
    the point file), each atomically; returns their paths by figure name.  ``slices`` is the number
    of montage panels."""
    out = Path(out_dir) if out_dir is not None else point.path.parent
    out.mkdir(parents=True, exist_ok=True)
    makers = {"integrated": lambda: integrated_figure(point),
              "intensity": lambda: intensity_figure(point, truth),
              "slices": lambda: slices_figure(point, slices),
              "depthmap": lambda: depth_map_figure(point, truth),
              "quality": lambda: quality_figure(point)}
    unknown = [w for w in which if w not in makers]
    if unknown:
        raise ValueError(f"unknown figures {unknown}; choose from {', '.join(FIGURES)}")
    return {name: _save(makers[name](), out / f"{point.path.stem}_{name}.png", dpi) for name in which}


# ----------------------------------------------------------------------------------------------
# A run: overview figure and index.html

@dataclass
class PointEntry:
    """One scan point of a run as the overview and the index show it."""

    point: int
    state: str
    file: Path | None = None
    pixels: int | None = None  # decoded pixels
    signal: tuple[float, float] | None = None  # depth range with signal, um
    complete: bool | None = None
    intensity: float | None = None  # the volume summed, counts per frame
    mean_depth: float | None = None  # intensity-weighted mean depth of the signal, um
    positions: dict[str, tuple[float, str]] = field(default_factory=dict)  # sample position: value, units
    figures: dict[str, Path] = field(default_factory=dict)
    problem: str = ""  # why there are no figures


def signal_mean_depth(depth: np.ndarray, intensity: np.ndarray, fraction: float = 0.1) -> float | None:
    """Mean depth (um) of the signal: the depth bins whose intensity rises above the floor (the median)
    by ``fraction`` of the peak, weighted by that excess (the bins of ``io.pointfile.signal_range``);
    None without signal.  The floor keeps noise spread over the whole grid from pulling it to the middle."""
    weight = signal_excess(intensity, fraction)
    return None if weight is None else float((weight * depth).sum() / weight.sum())


def point_entry(point: Point, state: str = "done") -> PointEntry:
    """The overview's and index's numbers of one point."""
    ivd = point.intensity_vs_depth
    return PointEntry(point=point.point, state=state, file=point.path, pixels=point.n_pixels,
                      signal=point.signal_range(), complete=point.complete, intensity=float(ivd.sum()),
                      mean_depth=signal_mean_depth(point.depth, ivd),
                      positions=point.sample_position())


def scan_axis(entries: Sequence[PointEntry]) -> tuple[str | None, str]:
    """What the points of a run are drawn against: the one sample position that changes from point to
    point, recorded by every point with a result (its name and an axis label), else the point number
    (None, and a label that says why)."""
    ready = [e for e in entries if e.intensity is not None]
    names = [n for n in (k.rsplit("/", 1)[1] for k in SAMPLE_POSITIONS) if ready and all(n in e.positions
                                                                                       for e in ready)]
    moving = [n for n in names if len({e.positions[n][0] for e in ready}) > 1]
    if len(moving) == 1:
        name = moving[0]
        units = ready[0].positions[name][1]
        return name, f"sample position {name} ({units or 'units not recorded'})"
    if len(moving) > 1:
        return None, f"scan point number (the sample moves along {' and '.join(moving)})"
    if names and len(ready) > 1:
        return None, "scan point number (the recorded sample position does not change)"
    if names:
        return None, "scan point number (one point)"
    return None, "scan point number (no sample position recorded)"


def overview_figure(entries: Sequence[PointEntry], title: str = "") -> Any:
    """Integrated intensity and mean depth of the signal (bars: the depth range with signal) of every
    point with a result, against the sample position when one changes from point to point
    (:func:`scan_axis`), else against the point number; points without a result are marked along the
    bottom (at their point number, or where their recorded position puts them)."""

    axis, label = scan_axis(entries)

    def x_of(e: PointEntry) -> float:
        return e.positions[axis][0] if axis is not None and axis in e.positions else float(e.point)

    ready = [e for e in entries if e.intensity is not None]
    missing = [e for e in entries if e.intensity is None and (axis is None or axis in e.positions)]
    fig = _figure(8.0, 6.4)
    top, bottom = fig.subplots(2, 1, sharex=True)
    style = {"marker": "o", "ms": 4, "lw": 1.0} if len(ready) < 200 else {"marker": ".", "ms": 2, "lw": 0.6}
    top.plot([x_of(e) for e in ready], [e.intensity for e in ready], color="C0", **style)
    top.set_ylim(bottom=0.0)
    top.set_ylabel("integrated intensity\n(counts/frame over region and depth)")
    with_depth = [e for e in ready if e.mean_depth is not None and e.signal is not None]
    if with_depth:
        mean = np.array([e.mean_depth for e in with_depth], dtype=np.float64)
        lo = np.array([e.signal[0] for e in with_depth if e.signal is not None])
        hi = np.array([e.signal[1] for e in with_depth if e.signal is not None])
        bottom.errorbar([x_of(e) for e in with_depth], mean, yerr=[mean - lo, hi - mean], color="C1",
                        ecolor="0.6", elinewidth=1.0, capsize=2,
                        label="mean depth of the signal (bar: depth range with signal)", **style)
    bottom.set_ylabel(f"depth ({UM})")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        if missing:
            trans = blended_transform_factory(ax.transData, ax.transAxes)
            ax.plot([x_of(e) for e in missing], [0.04] * len(missing), "x", color="C3", transform=trans,
                    label=f"no result ({len(missing)})")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    if axis is None:
        bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_xlabel(label)
    head = f"{len(ready)} of {len(entries)} points with a result"
    fig.suptitle(f"{title}: {head}" if title else head, fontsize=10)
    return fig


def _cell(value: Any, left: bool = False) -> str:
    align = ' class="l"' if left else ""
    return f"<td{align}>{html.escape(str(value))}</td>"


def index_html(entries: Sequence[PointEntry], title: str, lines: Sequence[str] = (),
               overview: str | None = None) -> str:
    """A self-contained HTML page (no script): the overview, a table of the points (point, state, sample
    position when it changes, pixels, depth range with signal, complete) and each point's figures,
    linked by file name relative to the page."""
    axis, _ = scan_axis(entries)
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', GENERATOR,
           f"<title>{html.escape(title)}</title>",
           "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
           "td,th{border:1px solid #bbb;padding:2px 8px;text-align:right}th{background:#eee}"
           "td.l{text-align:left}"
           "img{max-width:100%;border:1px solid #ddd;margin:4px}.figs img{width:32%;min-width:320px}"
           "</style>", "</head>", "<body>", f"<h1>{html.escape(title)}</h1>"]
    out += [f"<p>{html.escape(line)}</p>" for line in lines]
    if overview:
        src = html.escape(overview, quote=True)
        out.append(f'<p><a href="{src}"><img src="{src}" alt="overview of the run"></a></p>')
    units = next((e.positions[axis][1] for e in entries if axis is not None and axis in e.positions), "")
    position_head = f"<th>{html.escape(axis)} ({html.escape(units)})</th>" if axis is not None else ""
    out += ["<table>", f"<tr><th>point</th><th>state</th>{position_head}<th>pixels decoded</th>"
            f"<th>depth range with signal ({UM})</th><th>complete</th><th>figures</th></tr>"]
    for e in entries:
        point = f'<a href="#point-{e.point}">{e.point}</a>' if e.figures else str(e.point)
        position = ""
        if axis is not None:
            position = _cell(f"{e.positions[axis][0]:g}" if axis in e.positions else "-")
        signal = "-" if e.signal is None else f"{e.signal[0]:.1f} to {e.signal[1]:.1f}"
        complete = "-" if e.complete is None else "yes" if e.complete else "no (some blocks failed)"
        pixels = "-" if e.pixels is None else f"{e.pixels:,}"
        figs = " ".join(f'<a href="{html.escape(p.name, quote=True)}">{html.escape(name)}</a>'
                        for name, p in e.figures.items())
        figs = f'<td class="l">{figs}</td>' if figs else _cell(e.problem or "-", left=True)
        out.append(f"<tr><td>{point}</td>{_cell(e.state)}{position}{_cell(pixels)}{_cell(signal)}"
                   f"{_cell(complete)}{figs}</tr>")
    out.append("</table>")
    for e in entries:
        if not e.figures:
            continue
        name = e.file.name if e.file is not None else ""
        out.append(f'<h2 id="point-{e.point}">point {e.point} <small>{html.escape(name)}</small></h2>')
        out.append('<div class="figs">')
        for fig_name, p in e.figures.items():
            src = html.escape(p.name, quote=True)
            alt = html.escape(f"point {e.point}: {fig_name}", quote=True)
            out.append(f'<a href="{src}"><img src="{src}" alt="{alt}" loading="lazy"></a>')
        out.append("</div>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


@dataclass
class RunFigures:
    """What :func:`save_run_quicklooks` wrote."""

    folder: Path
    index: Path
    overview: Path | None
    entries: list[PointEntry]

    @property
    def failed(self) -> list[PointEntry]:
        """Points with a result file whose figures could not be made."""
        return [e for e in self.entries if e.file is not None and not e.figures]


GENERATOR = '<meta name="generator" content="laueflow show">'  # marks an index.html laueflow wrote


def _check_figures_folder(out: Path) -> None:
    """Refuse a folder whose run figures laueflow did not write: an ``index.html`` without laueflow's
    mark, or, without an index, files named as laueflow names its figures (``overview.png``,
    ``point_*.png``), so that ``show RUN --out DIR`` never replaces someone else's files."""
    if not out.is_dir():
        return
    index = out / INDEX
    if index.is_file():
        if GENERATOR not in index.read_text(encoding="utf-8", errors="replace")[:4096]:
            raise ResultError(f"{index}: not written by laueflow show; choose another --out folder")
        return
    clash = sorted(p.name for p in out.iterdir() if p.name == OVERVIEW
                   or (p.name.startswith("point_") and p.suffix == ".png"))
    if clash:
        raise ResultError(f"{out}: holds figures laueflow show did not write ({', '.join(clash[:3])}"
                          f"{' ...' if len(clash) > 3 else ''}); choose another --out folder")


def save_run_quicklooks(run: Run, out_dir: str | os.PathLike | None = None, truth: Any = None,
                        slices: int = 12, dpi: int = 120,
                        on_point: Callable[[PointEntry], None] | None = None) -> RunFigures:
    """Write the figures of every point of ``run`` that has a result, the overview (``overview.png``) and
    ``index.html`` into ``out_dir`` (default: ``RUN/figures``).  ``truth`` is the simulated scan's
    truth (laueflow.evaluate.Truth, all points).  A point whose file cannot be read is listed with the
    reason; ``on_point`` is called with each point's entry once its figures are written."""
    out = Path(out_dir) if out_dir is not None else run.path / "figures"
    _check_figures_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for k, info in run.points.items():
        if info.file is None:
            entry = PointEntry(point=k, state=info.state, problem=info.reason or f"no result ({info.state})")
        else:
            try:
                with run.point(k) as point:
                    entry = point_entry(point, info.state)
                    entry.figures = save_quicklooks(point, out, truth=truth.for_point(k) if truth else None,
                                                    dpi=dpi, slices=slices)
            except (LaueflowError, OSError, KeyError, ValueError) as exc:
                entry = PointEntry(point=k, state=info.state, file=info.file, problem=f"unreadable: {exc}")
        entries.append(entry)
        if on_point is not None:
            on_point(entry)
    overview = None
    title = f"laueflow run {run.path.name}"
    if any(e.intensity is not None for e in entries):
        overview = _save(overview_figure(entries, title), out / OVERVIEW, dpi)
    lines = [f"run folder {run.path}", run.progress()]
    if run.status is not None and run.status.scan:
        lines.append(f"scan {run.status.scan}")
    page = index_html(entries, title, lines, overview.name if overview else None)
    index = out / INDEX
    with atomic_path(index) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return RunFigures(folder=out, index=index, overview=overview, entries=entries)


# ----------------------------------------------------------------------------------------------
# Calibration


def calibration_figure(record: dict) -> Any:
    """A calibration's film depths (the ``calibration`` record of a configuration written by ``laueflow
    calibrate``): each spot's apparent depth at the nominal pose and at the fitted pose, one panel per
    film, with the film's depth and the spread over spots before and after."""
    films = record.get("films") or []
    if not films:
        raise ValueError("the calibration record holds no film depths (written by an older laueflow "
                         "calibrate; run it again)")
    fig = _figure(4.2 * len(films), 3.6)
    axes = fig.subplots(1, len(films), squeeze=False)[0]
    for ax, film in zip(axes, films, strict=True):
        spots = np.arange(len(film["spots"]))
        before, after = np.asarray(film["before_um"]), np.asarray(film["after_um"])
        depth = film["film_depth_um"]
        ax.axhline(depth, color="0.4", lw=1, ls="--", label=f"film depth {depth:g} {UM}")
        ax.plot(spots, before, "o", mfc="none", color="tab:red",
                label=f"nominal pose (spread {np.std(before):.2f} {UM})")
        ax.plot(spots, after, "o", color="tab:blue", label=f"fitted pose (spread {np.std(after):.2f} {UM})")
        ax.set_xticks(spots, [str(s) for s in film["spots"]], fontsize=7)
        ax.set_xlabel("spot")
        ax.set_ylabel(f"apparent depth ({UM})")
        ax.set_title(f"film at {depth:g} {UM}: pixels within 1 {UM} "
                     f"{film['within_1um_before']:.0%} -> {film['within_1um_after']:.0%}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"calibration {record.get('date', '')}: depth per spot, nominal -> fitted pose", fontsize=10)
    return fig


def save_calibration_figure(record: dict, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write :func:`calibration_figure` of ``record`` to ``path`` (PNG, atomically); returns the path."""
    return _save(calibration_figure(record), Path(path), dpi)
