"""The header of a detector frame file: what the beamline writes beside the image, kept with results.

A 34-ID-E frame file holds, besides ``entry1/data/data``, groups the indexing chain reads as datasets
(``entry1/detector/{Nx, Ny, startx, endx, starty, endy, binx, biny, ID, exposure}``,
``entry1/monitor/I0``, ``entry1/sample/*``, ``entry1/scanNum``, ``entry1/microDiffraction/*``).  A point
file keeps the header of its first frame (laueflow.io.pointfile, ``/entry/acquisition``), and the
exports copy it from there into every file they write (laueflow.io.export, laueflow.io.lauelab), with
the detector fields rewritten to where the exported region lies on the detector.
"""

from __future__ import annotations

import os
from typing import Any

import h5py
import numpy as np
import yaml

DETECTOR = "entry1/detector"
SCAN_NUMBER = "entry1/scanNum"
HEADER_LIMIT = 1 << 20  # header datasets above this size (bytes) are not copied: image stacks, not metadata


NEXUS_ATTRS = ("NX_class", "default")  # a group's own NeXus role: never taken over from a copied header


def copy_header(source: str | os.PathLike, image_key: str, dest: h5py.Group) -> None:
    """Copy a frame file's header into ``dest``: every group (with its attributes) and every dataset but
    the image ``image_key`` and datasets above HEADER_LIMIT, the root's attributes onto ``dest`` (but
    its NeXus class and default).  The paths stay as the detector wrote them (``entry1/detector/startx``
    ...).  The file is opened read-only."""
    image = image_key.strip("/")
    with h5py.File(source, "r") as src:
        dest.attrs.update({k: v for k, v in src.attrs.items() if k not in NEXUS_ATTRS})

        def visit(name: str, obj: Any) -> None:
            if name == image:
                return
            if isinstance(obj, h5py.Group):
                dest.require_group(name).attrs.update({k: v for k, v in obj.attrs.items()})
            elif isinstance(obj, h5py.Dataset) and obj.dtype.itemsize * obj.size <= HEADER_LIMIT:
                parent = name.rpartition("/")[0]
                src.copy(obj, dest.require_group(parent) if parent else dest, name.rpartition("/")[2])

        src.visititems(visit)


def copy_group(source: h5py.Group, dest: h5py.Group) -> None:
    """Copy every attribute (but ``dest``'s own NeXus class and default), group and dataset of ``source``
    into ``dest`` (merging with what exists)."""
    dest.attrs.update({k: v for k, v in source.attrs.items() if k not in NEXUS_ATTRS or dest.name != "/"})
    for name, obj in source.items():
        if isinstance(obj, h5py.Group):
            copy_group(obj, dest.require_group(name))
        elif name not in dest:
            source.copy(obj, dest, name)


def number(header: h5py.Group, key: str) -> float | None:
    """A numeric header value (the first, for a per-frame array); None when absent or not a number."""
    ds = header.get(key)
    if isinstance(ds, h5py.Dataset) and ds.size >= 1 and np.issubdtype(ds.dtype, np.number):
        return float(np.ravel(ds[()])[0])
    return None


def text(header: h5py.Group, key: str) -> str:
    """A text header value; empty when absent."""
    ds = header.get(key)
    if isinstance(ds, h5py.Dataset) and h5py.check_string_dtype(ds.dtype) is not None:
        return str(ds.asstr()[()])
    return ""


def region_on_detector(header: h5py.Group, frame: list[int], shape: tuple[int, int]) -> dict[str, int]:
    """The detector fields of an image over ``frame`` = [r0, r1, c0, c1] of a frame whose header is
    ``header``: startx/endx (columns), starty/endy (rows), inclusive, in unbinned detector pixels (the
    frame's own start plus the region's offset times the binning); Nx, Ny, binx, biny as the frame says,
    or the configured detector ``shape`` (columns, rows) and 1 when it says nothing."""
    r0, r1, c0, c1 = frame

    def get(key: str, default: int) -> int:
        value = number(header, f"{DETECTOR}/{key}")
        return default if value is None else int(value)

    binx, biny = get("binx", 1), get("biny", 1)
    sx, sy = get("startx", 0), get("starty", 0)
    return {"Nx": get("Nx", shape[0]), "Ny": get("Ny", shape[1]), "binx": binx, "biny": biny,
            "startx": sx + c0 * binx, "endx": sx + c1 * binx - 1, "starty": sy + r0 * biny,
            "endy": sy + r1 * biny - 1}


def write_region(root: h5py.Group, fields: dict[str, int]) -> None:
    """Write the detector fields of :func:`region_on_detector` as datasets under ``root`` (a file),
    replacing the copied frame's own, in the frame's dtype where it had them (LaueGo writes floats)."""
    det = root.require_group(DETECTOR)
    for key, value in fields.items():
        old = det.get(key)
        numeric = isinstance(old, h5py.Dataset) and np.issubdtype(old.dtype, np.number)
        dtype = old.dtype if numeric else np.int32
        if key in det:
            del det[key]
        det.create_dataset(key, data=np.asarray(value, dtype=dtype))


def configured_shape(info: dict[str, Any], frame: list[int]) -> tuple[int, int]:
    """(columns, rows) of the whole detector from a point's recorded configuration (provenance ``info``),
    else the region's end: what the detector fields say when the frame header does not."""
    try:
        shape = yaml.safe_load(info.get("config") or "")["geo"]["detector"]["shape"]
        return int(shape[0]), int(shape[1])
    except (TypeError, KeyError, IndexError, ValueError):
        return frame[3], frame[1]
