"""The estimator's solvers: over-relaxed ADMM for

    min_{h >= 0}  1/2 |d - D h|^2 + sparsity * sum h + 1/2 smoothness * |L h|^2

over the whole code grid (one factorisation per dictionary shared by all pixels, a matrix product per
iteration for a batch of pixels) and over each pixel's support (a few tens of columns, one small
factorisation per pixel), with the dictionaries (Level) they fit and the row batching.  Each solver is a
jit-compiled function of padded shapes (rows and support sizes in a few buckets), so few shapes are
compiled."""

from __future__ import annotations

from functools import cached_property, partial

import jax
import jax.numpy as jnp
import numpy as np

from .settings import DecodeSettings

# ADMM settings, measured against converged solutions on simulated blocks of both geometries.  Pass 1
# (whole grid, from zero): a penalty of three times the mean diagonal of the Gram matrix with
# over-relaxation stops after 60-80 iterations, 40 times closer to the solution than 150 iterations of
# penalty = mean diagonal without relaxation.  Support refits (warm-started): penalty = mean diagonal.
# Iterations run in sweeps of _SWEEP until a pixel's solution moves by no more than the tolerance
# (relative) over a sweep, at most recon.iterations; each pixel stops on its own.
_RHO_FULL, _TOL_FULL = 3.0, 3e-4
_RHO_SUPPORT, _TOL_SUPPORT = 1.0, 1e-5
_RELAX = 1.8
_SWEEP = 10


def _admm(solve, b, ok, z0, threshold, rho, iterations: int, tol: float):
    """Over-relaxed ADMM for min 1/2 h'Qh - b'h + sparsity sum h, h >= 0, h = 0 where not ``ok``, for a
    batch of rows (the last axis is h's).  ``solve(v)`` applies (Q + rho I)^-1 (Q includes the smoothness
    prior) to each row; ``threshold`` = sparsity / rho.  Runs sweeps of _SWEEP iterations, at most
    ``iterations`` in all; a row stops (keeps the solution of its last sweep) once it moved by no more
    than ``tol`` relative to its size over a sweep.  Each row stops by its own rule, so its result does
    not depend on the other rows of the batch (which pixels share a call, or the padding).  Pure JAX,
    for jit."""

    def step(_, carry):
        z, u = carry
        x = _RELAX * solve(b + rho * (z - u)) + (1.0 - _RELAX) * z
        z_new = jnp.where(ok, jnp.maximum(x + u - threshold, 0.0), 0.0)
        return z_new, u + x - z_new

    def sweep(carry):
        z, u, done, active = carry
        n = jnp.minimum(_SWEEP, iterations - done)
        z_new, u_new = jax.lax.fori_loop(0, n, step, (z, u))
        size = jnp.maximum(jnp.linalg.norm(z_new, axis=-1), 1e-6)
        moved = jnp.linalg.norm(z_new - z, axis=-1) / size
        keep = active[..., None]
        return (jnp.where(keep, z_new, z), jnp.where(keep, u_new, u), done + n, active & (moved > tol))

    def unfinished(carry):
        return (carry[2] < iterations) & jnp.any(carry[3])

    start = (z0, jnp.zeros_like(z0), jnp.int32(0), jnp.ones(z0.shape[:-1], bool))
    return jax.lax.while_loop(unfinished, sweep, start)[0]


def _spd_inverse(m):
    """Inverse of symmetric positive definite matrices (..., s, s) by Gauss-Jordan elimination on the
    diagonal pivots (stable without pivoting for these matrices).

    Written in plain XLA operations, element by element, rather than through LAPACK: JAX's CPU
    Cholesky and triangular solves call OpenBLAS, whose results change with its thread count, and
    that count differs between threads of one process (a decision of the support selection must not
    depend on which thread decoded the block)."""
    n = m.shape[-1]
    index = jnp.arange(n)

    def pivot(k, a):
        at_k = index == k
        row_k = jax.lax.dynamic_index_in_dim(a, k, axis=-2, keepdims=False)  # (..., n)
        col_k = jax.lax.dynamic_index_in_dim(a, k, axis=-1, keepdims=False)  # (..., n)
        p = jax.lax.dynamic_index_in_dim(row_k, k, axis=-1, keepdims=True)  # (..., 1)
        row = jnp.where(at_k, 1.0, row_k) / p  # the pivot row, scaled; its own column becomes 1/p
        factor = jnp.where(at_k, 0.0, col_k)
        rest = jnp.where(at_k[None, :], 0.0, a) - factor[..., :, None] * row[..., None, :]
        return jnp.where(at_k[:, None], row[..., None, :], rest)

    return jax.lax.fori_loop(0, n, pivot, m)


def _difference_gram(adjacent, dtype):
    """L'L (..., s, s) of the first differences between neighbouring columns; ``adjacent`` (..., s-1)
    says whether columns i and i+1 are neighbours (a difference is taken only between those)."""
    w = adjacent.astype(dtype)
    edge = [(0, 0)] * (w.ndim - 1)
    diag = jnp.pad(w, [*edge, (1, 0)]) + jnp.pad(w, [*edge, (0, 1)])  # differences each column is in
    off = jnp.pad(w, [*edge, (0, 1)])
    s = diag.shape[-1]
    eye, upper = jnp.eye(s, dtype=dtype), jnp.eye(s, k=1, dtype=dtype)
    return diag[..., :, None] * eye - off[..., :, None] * upper - off[..., None, :] * upper.T


@jax.jit
def _gram(a):
    """A'A of a dictionary (N, K)."""
    return a.T @ a


@jax.jit
def _full_inverse(gram, smooth, rho):
    """(A'A + smoothness L'L + rho I)^-1 over the whole code grid: pass 1's factorisation, shared by all
    pixels fitted with this dictionary."""
    k = gram.shape[0]
    lap = _difference_gram(jnp.ones(k - 1, bool), gram.dtype)
    return _spd_inverse(gram + smooth * lap + rho * jnp.eye(k, dtype=gram.dtype))


@partial(jax.jit, static_argnames=("iterations",))
def _fit_full(a, minv, data, threshold, rho, iterations: int):
    """The estimator over the whole code grid for a batch of rows: data (P, N) -> h (P, K).  Each
    iteration is one product of the batch with the shared inverse."""
    b = data @ a
    return _admm(lambda v: v @ minv, b, True, jnp.zeros_like(b), threshold, rho, iterations, _TOL_FULL)


@partial(jax.jit, static_argnames=("iterations",))
def _fit_support(a, gram, data, idx, valid, init, smooth, sparsity, iterations: int):
    """The same estimator restricted to each row's support: s << K columns ``idx`` (R, s) of the
    dictionary a (N, K), of which ``valid`` (R, s) are used, warm-started from ``init`` (R, s).  One small
    factorisation per row; the smoothness links only neighbouring columns of the support.  Returns h
    on the whole grid (R, K) and the misfit |d - A h|^2 (R,), from the residual itself (no cancellation
    in float32)."""
    dtype = gram.dtype
    rows = jnp.arange(idx.shape[0])[:, None]
    q = jnp.where(valid[:, :, None] & valid[:, None, :], gram[idx[:, :, None], idx[:, None, :]], 0.0)
    # every product is taken row by row (batched over rows, never one matrix product across rows), so
    # that a row's arithmetic, hence its support decisions, do not depend on the rows it is batched with
    cols = a.T[idx]  # (R, s, N): each row's support columns of the dictionary
    b = jnp.where(valid, jnp.einsum("rsn,rn->rs", cols, data), 0.0)
    adjacent = (idx[:, 1:] == idx[:, :-1] + 1) & valid[:, 1:] & valid[:, :-1]
    used = jnp.maximum(jnp.sum(valid, axis=1), 1)
    rho = _RHO_SUPPORT * jnp.sum(jnp.where(valid, jnp.diagonal(q, axis1=1, axis2=2), 0.0), axis=1) / used
    rho = jnp.maximum(rho, 1e-6)[:, None]
    # unused columns get a unit diagonal (and stay zero), so every system is positive definite
    diagonal = (jnp.where(valid, 0.0, 1.0) + rho)[:, :, None] * jnp.eye(idx.shape[1], dtype=dtype)
    minv = _spd_inverse(q + smooth * _difference_gram(adjacent, dtype) + diagonal)

    def solve(v):
        return jnp.einsum("rij,rj->ri", minv, v)

    z = _admm(solve, b, valid, init * valid, sparsity / rho, rho, iterations, _TOL_SUPPORT)
    z = jnp.where(valid, z, 0.0)
    h = jnp.zeros((idx.shape[0], a.shape[1]), dtype).at[rows, idx].add(z)
    return h, jnp.sum((data - jnp.einsum("rs,rsn->rn", z, cols)) ** 2, axis=1)


# support sizes (columns) of the support fit, padded up to these so that few shapes are compiled; rows
# per call of the support fit and of the full fit, always this many (the last call padded).  One row
# count per solver: XLA's products and sums over a row round differently for different row counts, and
# a support decision must not depend on how many pixels happened to share a call.
_SUPPORT_SIZES = (16, 32, 48, 64, 96, 128, 192, 256)
_SUPPORT_ROWS = 32
_FULL_ROWS = 64


def _row_chunks(n: int, rows: int):
    """Split n rows into calls of ``rows`` rows; yields (start, stop, rows)."""
    for start in range(0, n, rows):
        yield start, min(start + rows, n), rows


def _padded(x: np.ndarray, rows: int, dtype=None) -> np.ndarray:
    """``x`` with zero rows appended up to ``rows``."""
    out = np.zeros((rows, *x.shape[1:]), dtype=x.dtype if dtype is None else dtype)
    out[: len(x)] = x
    return out


class Level:
    """One dictionary of a block (an attenuation level; centred for traces with a free constant,
    or the transmission itself for traces with the background subtracted) and its solvers."""

    def __init__(self, transmission: np.ndarray, mu: float, settings: DecodeSettings, centred: bool = True):
        m = (1.0 - transmission) / -np.expm1(-mu)  # M = (1 - T) / (1 - exp(-mu)): the dip a unit of h makes
        self.mean = m.mean(axis=0)
        self.a = m - self.mean if centred else transmission
        self.centred, self.contrast = centred, float(-np.expm1(-mu))
        k = self.a.shape[1]
        # L1 weights are given in units of the universal threshold: the largest correlation of pure
        # unit-variance noise with any of the K (centred) columns is about |a| sqrt(2 ln K)
        self.unit = float(np.median(np.linalg.norm(m - self.mean, axis=0)) * np.sqrt(2 * np.log(k)))
        self.settings, self.dtype = settings, settings.float_type

    @cached_property
    def a_dev(self) -> jax.Array:
        """The dictionary as a JAX array of the working precision."""
        return jnp.asarray(self.a.astype(self.dtype))

    @cached_property
    def gram_dev(self) -> jax.Array:
        """A'A, computed by XLA."""
        return _gram(self.a_dev)

    @cached_property
    def gram(self) -> np.ndarray:
        """A'A as a NumPy array."""
        return np.asarray(self.gram_dev, dtype=np.float64)

    def full(self, d: np.ndarray, sparsity: float) -> np.ndarray:
        """Fit rows d (P, N) over the whole code grid (every column allowed), in batches of _FULL_ROWS
        that stop separately; all are dispatched before any result is read."""
        n, k = d.shape[0], self.a.shape[1]
        if n == 0:
            return np.zeros((0, k))
        t = self.dtype
        rho = _RHO_FULL * float(np.trace(self.gram)) / k
        minv = _full_inverse(self.gram_dev, t(self.settings.smoothness), t(rho))
        threshold = t(sparsity * self.unit / rho)
        parts = [
            (start, stop, _fit_full(self.a_dev, minv, _padded(d[start:stop], rows, t), threshold, t(rho),
                                    self.settings.iterations))
            for start, stop, rows in _row_chunks(n, _FULL_ROWS)
        ]
        h = np.zeros((n, k))
        for start, stop, part in parts:
            h[start:stop] = np.asarray(part)[: stop - start]
        return h


def fit_supports(
    levels: list[Level], level: np.ndarray, pixel: np.ndarray, data: np.ndarray, allowed: np.ndarray,
    init: np.ndarray, sparsity: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Fit rows r = (pixel[r], dictionary levels[level[r]]): the trace data[pixel[r]] restricted to the
    columns allowed[pixel[r]], warm-started from init[pixel[r]] (divided by the level's contrast for
    uncentred dictionaries).  Returns h (R, K) and the misfit |d - A h|^2 (R,); rows without support
    get h = 0 and |d|^2.

    Rows are grouped by dictionary and support size (padded up to _SUPPORT_SIZES), and every call is
    dispatched before any result is read, so that NumPy's gathering overlaps the solves."""
    n, k = len(level), allowed.shape[1]
    h = np.zeros((n, k))
    chi = np.einsum("rn,rn->r", data[pixel], data[pixel])
    size = allowed.sum(axis=1)[pixel]
    fit = np.flatnonzero(size > 0)
    if fit.size == 0:
        return h, chi
    caps = np.array([c for c in _SUPPORT_SIZES if c < k] + [k])
    need, where = np.unique(pixel[fit], return_inverse=True)
    order = np.argsort(~allowed[need], axis=1, kind="stable")  # each pixel's allowed columns first, in order
    group = level[fit] * len(caps) + np.searchsorted(caps, size[fit])
    sort = np.argsort(group, kind="stable")
    fit, where, group = fit[sort], where[sort], group[sort]
    starts = np.flatnonzero(np.diff(group, prepend=-1))
    pending = []
    for first, last in zip(starts, [*starts[1:], fit.size], strict=True):
        lev, cap = levels[group[first] // len(caps)], int(caps[group[first] % len(caps)])
        t = lev.dtype
        for start, stop, pad in _row_chunks(last - first, _SUPPORT_ROWS):
            rows = slice(first + start, first + stop)
            m = stop - start
            idx = np.zeros((pad, cap), np.int32)
            idx[:m] = order[where[rows], :cap]
            valid = np.zeros((pad, cap), bool)
            valid[:m] = np.arange(cap)[None, :] < size[fit[rows], None]
            p = pixel[fit[rows]]
            z0 = np.zeros((pad, cap), t)
            z0[:m] = np.take_along_axis(init[p], idx[:m], axis=1) / (1.0 if lev.centred else lev.contrast)
            d = np.zeros((pad, data.shape[1]), t)
            d[:m] = data[p]
            settings = lev.settings
            res = _fit_support(
                lev.a_dev, lev.gram_dev, d, idx, valid, z0, t(settings.smoothness), t(sparsity * lev.unit),
                settings.iterations,
            )
            pending.append((fit[rows], res))
    for r, (hr, c) in pending:
        h[r] = np.asarray(hr)[: r.size]
        chi[r] = np.asarray(c)[: r.size]
    return h, chi
