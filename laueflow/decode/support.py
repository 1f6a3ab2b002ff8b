"""Support selection: which columns of the code grid each pixel's refit may use, chosen by forward
selection on refits (the fewest pieces of pass 1's fit that explain the trace), with the neighbours'
consensus lowering the bar for depths a spot's other pixels hold."""

from __future__ import annotations

import numpy as np

from .block import Block
from .neighbourhood import grow, neighbour_count, runs
from .solvers import fit_supports

# a support piece at depths where the neighbouring pixels agree on one needs only this fraction of the
# significance: the depth is given, so the test is of one location, not of all K
NEIGHBOUR_FRACTION = 0.25

# the model's mismatch with a bright pixel's trace (the depth bins' discretisation, the attenuation
# levels, a film thinner than a bin) leaves a chi-square that grows with the trace's own chi-square:
# a support piece beyond the first must explain this fraction of the trace's chi-square on top of
# the significance, or it only absorbs that mismatch
MISMATCH = 0.003


# support selection: the components of pass 1 a pixel may build its support from (the largest first),
# and the additions to a support at most
_CANDIDATES = 6
_STEPS = 6


def component_energy(h: np.ndarray, labels: np.ndarray, gram: np.ndarray, band: int) -> np.ndarray:
    """|A h_c|^2 of every component c (the chi-square it explains), with A'A taken as banded.

    Returns (P, C+1) indexed by label.  Only pairs of non-zero entries contribute, so it runs over
    those (h is sparse) rather than over the whole (P, K) grid."""
    p, k = h.shape
    n_lab = int(labels.max(initial=0)) + 1
    r, i = np.nonzero(h)
    lab = labels[r, i]
    acc = np.zeros(r.size)
    for o in range(-band, band + 1):
        j = np.clip(i + o, 0, k - 1)
        same = (i + o >= 0) & (i + o < k) & (labels[r, j] == lab)
        acc += np.where(same, h[r, j] * gram[i, j], 0.0)
    return np.bincount(r * n_lab + lab, weights=h[r, i] * acc, minlength=p * n_lab).reshape(p, n_lab)


def select_support(blk: Block, level1: np.ndarray, h: np.ndarray, labels: np.ndarray, gain: np.ndarray):
    """Each pixel's support by forward selection on refits, the fewest pieces that explain its trace.

    With 0.5 um steps a scan sees little code per depth, and a sparse fit of the whole grid explains
    the smooth tail of an extended grain as well by pieces tens of um away: their energies in pass 1
    pass any fixed test.  So the support starts from the one pass-1 component that alone explains most
    chi-square (the refit of every candidate on its own), then grows by the candidate whose refit gains
    most: another component, or the band of columns on either side of a piece (an extended grain's
    tail), while that gain exceeds ``significance``.  A second round redoes the pixels whose neighbours
    agree on depths the pixel left out (a spot's pixels see the same grains): there a candidate those
    neighbours hold, or the columns they hold, need only a fraction of the gain.

    Returns the support (P, K): the selected pieces, components grown by a quarter band."""
    sig = blk.settings.significance
    band = blk.band
    n, k = h.shape
    widen = max(1, band // 4)
    # candidates: each pixel's largest components, grown by a quarter band
    top = np.argsort(-gain, axis=1, kind="stable")[:, :_CANDIDATES]
    top_gain = np.take_along_axis(gain, top, axis=1)
    cand_pix, slot = np.nonzero(top_gain >= sig * NEIGHBOUR_FRACTION)
    cand_gain = top_gain[cand_pix, slot]
    cand_mask = grow(labels[cand_pix] == top[cand_pix, slot][:, None], widen)
    own = np.zeros((n, k), bool)
    chi = np.zeros(n)
    sel = _Selection(blk, level1, h, own, chi, band)
    first = np.unique(cand_pix[cand_gain >= sig])
    sel.primary(first, cand_pix, cand_mask)
    sig_px = sig + MISMATCH * np.einsum("pn,pn->p", blk.d, blk.d)
    sel.forward(first, cand_pix, cand_mask, None, lambda rows, new: sig_px[rows])

    # the neighbours' consensus: columns in the supports of at least a third of the neighbours that
    # have one (and at least two)
    count, with_support = neighbour_count(own, blk.ri, blk.ci)
    near = count >= np.maximum(2, np.ceil(with_support / 3))[:, None]

    def seen(rows, new):
        return (near[rows] & new).sum(axis=1) > 0.5 * new.sum(axis=1)

    fresh = (near & ~grow(own, widen)).sum(axis=1) >= 3
    useful = (cand_gain >= sig) | seen(cand_pix, cand_mask)
    cand_pix, cand_mask = cand_pix[useful], cand_mask[useful]
    redo = np.intersect1d(np.flatnonzero(fresh), cand_pix)
    if redo.size:
        own[redo] = False
        sel.primary(redo, cand_pix, cand_mask)
        sel.forward(redo, cand_pix, cand_mask, grow(near, widen),
                    lambda rows, new: np.where(seen(rows, new), NEIGHBOUR_FRACTION, 1.0) * sig_px[rows])
    return own


def _best_per_pixel(pixels: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Index of the highest score of each distinct pixel (first of equals)."""
    order = np.lexsort((-score, pixels))
    return order[np.r_[True, pixels[order][1:] != pixels[order][:-1]]]


class _Selection:
    """The state of the support selection: each pixel's support ``own`` (P, K) and the misfit of its
    contrast-free refit ``chi`` (P,), updated in place."""

    def __init__(self, blk: Block, level1, h, own, chi, band: int) -> None:
        self.blk, self.level1, self.h, self.own, self.chi, self.band = blk, level1, h, own, chi, band

    def _misfit(self, pixels: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """|d - A h|^2 of the refit (pass 2's estimator) of each pixel's trace on the columns of masks."""
        levs = np.unique(self.level1[pixels])
        blk = self.blk
        return fit_supports(
            [blk.level(lev) for lev in levs], np.searchsorted(levs, self.level1[pixels]),
            np.arange(pixels.size), blk.d[pixels], masks, self.h[pixels], blk.weak,
        )[1]

    def primary(self, pixels: np.ndarray, cand_pix: np.ndarray, cand_mask: np.ndarray) -> None:
        """Start each of ``pixels`` from its candidate that alone leaves the least misfit."""
        rows = np.isin(cand_pix, pixels)
        if not rows.any():
            return
        rp, masks = cand_pix[rows], cand_mask[rows]
        chi = self._misfit(rp, masks)
        best = _best_per_pixel(rp, -chi)
        self.own[rp[best]] = masks[best]
        self.chi[rp[best]] = chi[best]

    def forward(self, pixels, cand_pix, cand_mask, near: np.ndarray | None, threshold) -> None:
        """Grow the supports of ``pixels`` by the addition (a candidate component, the band beside a
        piece, or a run of ``near`` columns) whose refit gains most over ``threshold(rows, new columns)``,
        while one does."""
        own = self.own
        active = np.intersect1d(pixels, np.flatnonzero(own.any(axis=1)))
        for _ in range(_STEPS):
            if active.size == 0:
                return
            rows = np.isin(cand_pix, active)
            cp, new = cand_pix[rows], cand_mask[rows] & ~own[cand_pix[rows]]
            mostly_new = new.sum(axis=1) > 0.5 * cand_mask[rows].sum(axis=1)
            parts = [(cp[mostly_new], new[mostly_new])]
            side, run = runs(grow(own[active], self.band) & ~own[active])
            parts.append((active[side], run))
            if near is not None:
                side, run = runs(near[active] & ~own[active], 3)
                parts.append((active[side], run))
            rp = np.concatenate([p for p, _ in parts])
            if rp.size == 0:
                return
            new = np.concatenate([m for _, m in parts])
            masks = own[rp] | new
            chi = self._misfit(rp, masks)
            score = self.chi[rp] - chi - threshold(rp, new)
            best = _best_per_pixel(rp, score)
            best = best[score[best] >= 0]
            own[rp[best]] = masks[best]
            self.chi[rp[best]] = chi[best]
            active = rp[best]
