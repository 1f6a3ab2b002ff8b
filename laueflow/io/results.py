"""The old import path of the result files, kept for code written against it.

Each format now has its own module: the run folder's names in :mod:`laueflow.io.layout`, atomic
writing in :mod:`laueflow.io.atomic`, block files in :mod:`laueflow.io.blocks` and the point file in
:mod:`laueflow.io.pointfile`.  New code imports from those.
"""

from __future__ import annotations

from .atomic import atomic_h5, atomic_path
from .blocks import (
    BLOCK_FORMAT,
    PIXEL_DTYPES,
    PIXEL_FIELDS,
    BlockResult,
    read_block,
    read_block_meta,
    write_block,
)
from .layout import POINT_FILE, TMP_MARK, point_files, point_name, tmp_name
from .pointfile import point_summary, read_provenance, signal_range, write_point

__all__ = ["BLOCK_FORMAT", "PIXEL_DTYPES", "PIXEL_FIELDS", "POINT_FILE", "TMP_MARK", "BlockResult",
           "atomic_h5", "atomic_path", "point_files", "point_name", "point_summary", "read_block",
           "read_block_meta", "read_provenance", "signal_range", "tmp_name", "write_block", "write_point"]
