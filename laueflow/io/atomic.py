"""Files that appear complete or not at all: written under a temporary name, then renamed.

Atomic means: write ``<name>.tmp-<pid>`` in the same folder (laueflow.io.layout.tmp_name), flush,
then ``os.replace`` it onto the final name.  A reader (or a rerun) therefore sees either no file or a
complete one, never a half-written one, even when a run is killed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py

from .layout import tmp_name


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path``, on failure remove it."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_h5(path: str | os.PathLike, **kwargs: Any) -> Iterator[h5py.File]:
    """An HDF5 file open for writing that appears at ``path`` only once it is complete and closed."""
    with atomic_path(path) as tmp:
        f = h5py.File(tmp, "w", **kwargs)
        try:
            yield f
            f.flush()
        finally:
            f.close()
