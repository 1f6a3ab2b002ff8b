"""Quick-look figures of one point file (``laueflow show``): what a scientist checks first.

- the depth-integrated image of the detector region;
- intensity versus depth over the whole depth grid (bins marked) and zoomed on the signal;
- a montage of depth slices where the signal is;
- a depth map: the depth of maximum intensity of each pixel, colour-coded.

With the truth of a simulated scan, the intensity plot and the depth map show the true depths too.
Figures are built as ``matplotlib.figure.Figure`` objects without pyplot, so they render with any
backend (Agg in scripts and tests) and display in a notebook with ``display(fig)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .io.atomic import atomic_path
from .runs import Point

FIGURES = ("integrated", "intensity", "slices", "depthmap")
UM = "\u00b5m"
MAP_FLOOR = 0.01  # the depth map shows pixels above this fraction of the brightest pixel's intensity


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _title(point: Point, what: str) -> str:
    note = "" if point.complete else " (incomplete: some blocks failed)"
    return f"point {point.point} ({point.path.name}): {what}{note}"


def _detector_axes(ax: Any, label_x: bool = True, label_y: bool = True) -> None:
    if label_x:
        ax.set_xlabel("detector column (px)")
    if label_y:
        ax.set_ylabel("detector row (px)")


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
    excess = ivd - np.median(ivd)
    if excess.max() <= 0:
        return [np.array([int(np.argmax(ivd))])]
    above = np.flatnonzero(excess >= fraction * excess.max())
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


def integrated_figure(point: Point) -> Any:
    """The depth-integrated image (square-root colour scale, so weak spots show beside strong ones)."""
    from matplotlib.colors import PowerNorm

    img = point.integrated_image()
    fig = _figure(6.4, 5.4)
    ax = fig.add_subplot()
    vmax = float(img.max()) if img.size and img.max() > 0 else 1.0
    im = ax.imshow(img, extent=point.extent, origin="upper", cmap="viridis", interpolation="nearest",
                   norm=PowerNorm(0.5, vmin=0.0, vmax=vmax))
    _detector_axes(ax)
    ax.set_title(_title(point, "depth-integrated intensity"), fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.9, label="intensity summed over depth (counts/frame, sqrt scale)")
    return fig


def intensity_figure(point: Point, truth: Any = None) -> Any:
    """Intensity versus depth: the whole grid with every bin marked, and a zoom on the signal."""
    z, ivd = point.depth, point.intensity_vs_depth
    step = float(z[1] - z[0]) if z.size > 1 else 1.0
    true = truth.profiles.sum(axis=0) if truth is not None and len(truth.pixels) else None
    rng = point.signal_range()
    fig = _figure(8.0, 6.4)
    axes = fig.subplots(2, 1)
    zoom = None
    if rng is not None:
        pad = max(5 * step, 0.1 * (rng[1] - rng[0]))
        zoom = (rng[0] - pad, rng[1] + pad)
    for ax, window in zip(axes, (None, zoom), strict=True):
        ax.plot(z, ivd, drawstyle="steps-mid", color="C0", lw=1.2, label="reconstructed")
        ax.plot(z, ivd, ".", color="C0", ms=2.5, label=f"bin centres ({z.size} bins, {step:g} {UM} apart)")
        if true is not None:
            ax.plot(truth.depth, true, drawstyle="steps-mid", color="C3", lw=1.0, ls="--",
                    label="truth (simulated)")
        if rng is not None:
            ax.axvspan(rng[0] - step / 2, rng[1] + step / 2, color="0.85", zorder=0, label="signal range")
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


def slices_figure(point: Point, n: int = 12) -> Any:
    """A montage of depth slices where the signal is, on one colour scale."""
    groups = signal_slabs(point, n)
    images = [point.slab(g) / g.size for g in groups]  # mean per bin, so thick and thin panels compare
    cols = min(4, max(1, len(images)))
    rows = max(1, -(-len(images) // cols))
    fig = _figure(3.0 * cols + 1.2, 2.8 * rows + 0.6)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    vmax = max((float(im.max()) for im in images), default=1.0) or 1.0
    shown = None
    for i, ax in enumerate(axes):
        if i >= len(images):
            ax.set_axis_off()
            continue
        shown = ax.imshow(images[i], extent=point.extent, origin="upper", cmap="magma",
                          interpolation="nearest", vmin=0.0, vmax=vmax)
        ax.set_title(_slab_label(point, groups[i]), fontsize=9)
        _detector_axes(ax, label_x=i // cols == rows - 1 or i + cols >= len(images), label_y=i % cols == 0)
        ax.tick_params(labelsize=7)
    fig.suptitle(_title(point, "depth slices where the signal is"), fontsize=10)
    if shown is not None:
        fig.colorbar(shown, ax=list(axes), shrink=0.8, label="intensity (counts/frame per bin)")
    return fig


def depth_map_figure(point: Point, truth: Any = None, floor: float = MAP_FLOOR) -> Any:
    """Depth of maximum intensity per pixel, colour-coded; beside it the true map when ``truth`` is given.

    Pixels whose depth-integrated intensity is below ``floor`` of the brightest pixel's are left blank.
    """
    import matplotlib as mpl

    recon = point.depth_map().copy()
    img = point.integrated_image()
    recon[img < floor * (img.max() if img.size else 0.0)] = np.nan
    maps = [("reconstructed", recon)]
    if truth is not None:
        maps.append(("truth (simulated)", truth_depth_map(point, truth)))
    values = np.concatenate([m[np.isfinite(m)] for _, m in maps]) if maps else np.zeros(0)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (point.depth[0], point.depth[-1])
    if hi <= lo:
        lo, hi = lo - 1.0, hi + 1.0
    cmap = mpl.colormaps["turbo"].with_extremes(bad="0.9")
    fig = _figure(6.4 * len(maps) - 0.6 * (len(maps) - 1), 5.4)
    axes = np.atleast_1d(fig.subplots(1, len(maps), squeeze=False)).ravel()
    shown = None
    for i, (ax, (label, m)) in enumerate(zip(axes, maps, strict=True)):
        shown = ax.imshow(np.ma.masked_invalid(m), extent=point.extent, origin="upper", cmap=cmap,
                          interpolation="nearest", vmin=lo, vmax=hi)
        _detector_axes(ax, label_y=i == 0)
        ax.set_title(label, fontsize=9)
    fig.suptitle(_title(point, f"depth of maximum intensity (pixels above {floor:.0%} of the brightest)"),
                 fontsize=10)
    fig.colorbar(shown, ax=list(axes), shrink=0.9, label=f"depth of maximum ({UM})")
    return fig


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
              "depthmap": lambda: depth_map_figure(point, truth)}
    unknown = [w for w in which if w not in makers]
    if unknown:
        raise ValueError(f"unknown figures {unknown}; choose from {', '.join(FIGURES)}")
    written: dict[str, Path] = {}
    for name in which:
        fig = makers[name]()
        path = out / f"{point.path.stem}_{name}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
        written[name] = path
    return written


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
    path = Path(path)
    fig = calibration_figure(record)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path
