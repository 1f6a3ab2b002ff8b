"""Operations on a block's pixels as an image and on their masks along the code grid: combining each
pixel with its neighbours in the tile (a spot's pixels see the same depths), and growing, bridging,
splitting and labelling the runs of columns of each pixel's mask."""

from __future__ import annotations

import warnings

import numpy as np


def neighbourhood(values: np.ndarray, ri: np.ndarray, ci: np.ndarray, radius: int, how: str) -> np.ndarray:
    """Combine each pixel's values with those of the pixels within ``radius`` (a square) in the tile:
    ``how`` = "any" (boolean OR of (P, K) masks), "sum" (of numbers, itself included) or "median"
    (nan-median of (P,) values)."""
    h, w = ri.max() + 1, ci.max() + 1
    shape = (h + 2 * radius, w + 2 * radius) + values.shape[1:]
    grid = np.full(shape, np.nan) if how == "median" else np.zeros(shape, values.dtype)
    grid[ri + radius, ci + radius] = values
    stack = [
        grid[radius + dr + ri, radius + dc + ci]
        for dr in range(-radius, radius + 1)
        for dc in range(-radius, radius + 1)
    ]
    if how == "any":
        return np.logical_or.reduce(stack)
    if how == "sum":
        return np.sum(stack, axis=0)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN neighbourhoods give NaN
        return np.nanmedian(np.stack(stack), axis=0)


def neighbour_count(mask: np.ndarray, ri: np.ndarray, ci: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each pixel, how many of its 8 neighbours in the tile have each column set in ``mask`` (P, K),
    and how many have any set."""
    own = mask.astype(np.int32)
    has = own.max(axis=1, initial=0)
    return neighbourhood(own, ri, ci, 1, "sum") - own, neighbourhood(has, ri, ci, 1, "sum") - has


def grow(mask: np.ndarray, by: int) -> np.ndarray:
    """Each row of ``mask`` (P, K) with its True runs widened by ``by`` columns on either side."""
    out = mask.copy()
    for s in range(1, by + 1):
        out[:, s:] |= mask[:, :-s]
        out[:, :-s] |= mask[:, s:]
    return out


def fill_gaps(mask: np.ndarray, width: int) -> np.ndarray:
    """Set the runs of False no longer than ``width`` that lie between two True runs of a row."""
    out = mask.copy()
    k = mask.shape[1]
    idx = np.arange(k)
    last_on = np.maximum.accumulate(np.where(mask, idx, -1), axis=1)  # last True at or before
    next_on = np.flip(np.minimum.accumulate(np.flip(np.where(mask, idx, k), axis=1), axis=1), axis=1)
    gap = (last_on >= 0) & (next_on < k) & (next_on - last_on - 1 <= width)
    out |= gap
    return out


def runs(mask: np.ndarray, min_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The runs of True of each row of ``mask`` (P, K) at least ``min_size`` long, one row each:
    (the row they come from (R,), the run (R, K))."""
    starts = mask & ~np.pad(mask, ((0, 0), (1, 0)))[:, :-1]
    lab = np.where(mask, np.cumsum(starts, axis=1), 0)
    per_row = lab.max(axis=1, initial=0)
    rows = np.repeat(np.arange(mask.shape[0]), per_row)
    ids = np.arange(rows.size) - np.repeat(np.cumsum(per_row) - per_row, per_row) + 1
    each = lab[rows] == ids[:, None]
    long = each.sum(axis=1) >= min_size
    return rows[long], each[long]


def components(h: np.ndarray, rel: float = 1e-3, gap: int = 2) -> np.ndarray:
    """Label the runs of the support of each row of h (gaps of up to ``gap`` bins bridged); 0 = off."""
    on = h > rel * np.maximum(h.max(axis=1, keepdims=True), 1e-30)
    grown = on.copy()
    for s in range(1, gap // 2 + 1 + gap % 2):
        grown[:, s:] |= on[:, :-s]
        grown[:, :-s] |= on[:, s:]
    starts = grown & ~np.concatenate([np.zeros((h.shape[0], 1), bool), grown[:, :-1]], axis=1)
    return np.where(grown, np.cumsum(starts, axis=1), 0)
