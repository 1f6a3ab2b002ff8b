"""The block's background: the pixels whose traces show no code modulation, and the background level
(counts per frame) fitted to them as a plane across the tile.

Products over pixels in the decoder's NumPy code are written with ``np.einsum`` (NumPy's own loops),
not ``@`` or LAPACK: OpenBLAS rounds differently with another thread count, and the count it uses is
not the same in every thread of a process (threadpoolctl lets only one thread change it), so a
result computed through BLAS would depend on which thread decoded the block."""

from __future__ import annotations

import numpy as np


def estimate_background(traces: np.ndarray, rows, cols, dark: np.ndarray) -> np.ndarray | None:
    """Per-pixel background level (counts per frame) from the block's dark pixels: a plane in
    (row, col) fitted to their mean counts, refitted without pixels that stand above it (a broad
    depth profile modulates little but still raises the mean).  None with fewer than 8 dark pixels."""
    use = dark.copy()
    rows, cols = np.asarray(rows, np.float64), np.asarray(cols, np.float64)
    design = np.stack([np.ones(rows.size), rows - rows.min(), cols - cols.min()], axis=1)
    m = traces.mean(axis=1)
    full = None
    for _ in range(3):
        if use.sum() < 8:
            return full
        if np.ptp(rows[use]) == 0 or np.ptp(cols[use]) == 0:
            coef = np.array([np.median(m[use]), 0.0, 0.0])
        else:
            x = design[use]
            coef = np.linalg.solve(np.einsum("pi,pj->ij", x, x), np.einsum("pi,p->i", x, m[use]))
        full = np.maximum(np.einsum("pi,i->p", design, coef), 0.0)
        tol = 4 * np.sqrt(np.maximum(full, 1.0) / traces.shape[1]) + 0.01 * full
        use = dark & (m - full <= tol)
    return full


def dark_pixels(traces: np.ndarray, usable: np.ndarray, dictionary: np.ndarray) -> np.ndarray:
    """Pixels whose trace shows no code modulation: their centred trace is no closer to the
    dictionary than noise would be.  Judged by the largest normalised correlation with any column."""
    mean = traces.mean(axis=1, keepdims=True)
    sig = np.sqrt(np.maximum(mean, 1.0))
    d = (traces - mean) / sig
    a = dictionary - dictionary.mean(axis=0, keepdims=True)
    a = a / np.maximum(np.linalg.norm(a, axis=0, keepdims=True), 1e-12)
    score = np.abs(np.einsum("pn,nk->pk", d, a)).max(axis=1)  # ~ max of K unit normals for pure noise
    n = traces.shape[1]
    k = dictionary.shape[1]
    limit = np.sqrt(2 * np.log(max(k, 2))) + 2.0
    var_ok = np.abs(d.var(axis=1) - 1.0) < 4 * np.sqrt(2.0 / max(n, 2)) + 0.3
    return usable & (score < limit) & var_ok
