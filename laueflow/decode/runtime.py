"""Process-wide settings the decoder needs while it runs: BLAS and LAPACK held to one thread, and JAX's
64-bit mode switched on when float64 is asked for."""

from __future__ import annotations

import importlib
import threading

import jax
from threadpoolctl import threadpool_limits


def enable_precision(dtype: str) -> None:
    """Switch JAX to 64-bit for ``dtype`` "float64" (process-wide and for good: JAX cannot go back to
    32-bit arrays once 64-bit ones exist); nothing for "float32"."""
    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)


class OneBlasThread:
    """BLAS and LAPACK (NumPy's, and those behind JAX's CPU factorisations) held to one thread while any
    block is decoded in this process.

    The decoder's factorisations are small (a pixel's support, or a few hundred columns shared by a
    block): more threads do not speed them up, and idle OpenBLAS threads busy-wait, taking the cores
    from XLA's threads and from the other workers (measured several times slower on a loaded node).
    Thread-safe and re-entrant: the limits in force before come back when the last decode finishes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._limits: threadpool_limits | None = None

    def __enter__(self) -> OneBlasThread:
        with self._lock:
            if self._active == 0:
                # JAX's CPU factorisations call SciPy's LAPACK, loaded on first use: load it now so that
                # the limit covers it from the first block on
                importlib.import_module("scipy.linalg.cython_lapack")
                self._limits = threadpool_limits(limits=1, user_api="blas")
            self._active += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0 and self._limits is not None:
                self._limits.restore_original_limits()
                self._limits = None


ONE_BLAS_THREAD = OneBlasThread()
