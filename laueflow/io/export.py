"""Per-depth export: one HDF5 image file per depth bin of a point, for the beamline's indexing chain.

The indexing software reads one file per depth with the detector-image layout (model.md section 6)::

    /entry1/data/data       (rows, cols) float32   the volume's slice at this depth, over file.frame
                            attrs frame = [r0, r1, c0, c1] (where the image lies on the detector),
                                  units, depth_index
    /entry1/depth           ()  float64, um        the depth bin centre
    /entry1/detector        attrs Nx, Ny (detector columns, rows), startx, endx, starty, endy, binx, biny
                            (the region, as the beamline's image files describe theirs)
    /entry1/provenance      attrs source_file, source_point, source_config_fingerprint,
                                  source_input_fingerprint, source_fingerprint, laueflow_version, created

Files go to ``OUT/depths/point_<k:05d>/depth_<j>_<z>um.h5`` (``j`` zero-padded, so names sort by
depth), each written atomically; images are gzip-compressed (deflate, in every HDF5 build), since
most pixels of most depths are zero.  Exporting again is cheap: a file whose recorded source fingerprint
matches the point file is kept, a stale one is rewritten, and depth files of the same point that no
longer belong to its grid are removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import yaml

from .. import __version__
from .. import provenance as prov
from ..errors import ExportError  # noqa: F401 (re-exported)
from .atomic import atomic_h5
from .layout import DEPTHS_DIR, RunFolder, point_of
from .pointfile import PointReader

__all__ = ["DEPTHS_DIR", "ExportError", "ExportResult", "default_dest", "depth_file_name", "export_point",
           "export_point_detailed"]

EXPORT_FORMAT = 1
_DEPTH_FILE = re.compile(r"depth_\d+_.*um\.h5")


@dataclass
class ExportResult:
    """What exporting one point did."""

    point: int
    dest: Path
    files: list[Path] = field(default_factory=list)  # every depth file of the point, in depth order
    written: int = 0
    kept: int = 0  # up to date, left alone
    removed: int = 0  # depth files of an earlier grid


def default_dest(point_file: str | os.PathLike, point: int) -> Path:
    """``OUT/depths/point_<k:05d>/`` for a point file in OUT."""
    return RunFolder(Path(point_file).resolve().parent).depths(point)


def depth_file_name(index: int, depth_um: float, n_depths: int) -> str:
    """``depth_<index>_<depth>um.h5``, the index zero-padded to the grid's width so names sort by depth."""
    width = max(4, len(str(max(n_depths - 1, 0))))
    return f"depth_{index:0{width}d}_{depth_um:.2f}um.h5"


def _read_source(point_file: Path) -> dict[str, Any]:
    """What the export needs from a point file, and the fingerprint that identifies its content."""
    try:
        with PointReader(point_file) as r:
            depth = r.depth()
            info = r.provenance()
            frame = list(r.frame())
            complete = r.complete()
            shape = tuple(int(v) for v in r.volume.shape)
            stored = r.intensity_vs_depth()
            summed = np.zeros(0, np.float32) if stored is None else np.asarray(stored, dtype=np.float32)
    except (OSError, KeyError, ValueError) as exc:
        raise ExportError(f"{point_file}: not a readable laueflow point file: {exc}") from None
    if len(shape) != 3 or shape[0] != depth.size:
        raise ExportError(f"{point_file}: volume {list(shape)} does not match {depth.size} depth bins")
    named = point_of(point_file)
    point = int(info["point"]) if "point" in info else named if named is not None else -1
    # what identifies the content: the provenance, the summed intensity, and the file itself (a point
    # file is only ever replaced whole, so a rewrite changes its modification time)
    st = point_file.stat()
    ident = {"format": EXPORT_FORMAT, "config": str(info.get(prov.CONFIG_FINGERPRINT, "")),
             "input": str(info.get(prov.INPUT_FINGERPRINT, "")), "end_time": str(info.get("end_time", "")),
             "complete": complete, "frame": frame, "shape": list(shape), "size": st.st_size,
             "mtime_ns": st.st_mtime_ns, "summed": hashlib.sha256(summed.tobytes()).hexdigest()}
    return {"point": point, "depth": depth, "frame": frame, "complete": complete, "info": info,
            "fingerprint": hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]}


def _recorded(path: Path) -> tuple[str, str] | None:
    """(source fingerprint, source file) a depth file records; None when it is missing, unreadable or
    not written by this export."""
    try:
        with h5py.File(path, "r") as f:
            attrs = f["entry1/provenance"].attrs
            fp, source = attrs.get("source_fingerprint"), attrs.get("source_file")
    except (OSError, KeyError):
        return None
    if fp is None or source is None:
        return None
    return tuple(v.decode() if isinstance(v, bytes) else str(v) for v in (fp, source))  # type: ignore[return-value]


def _detector_shape(info: dict[str, Any], frame: list[int]) -> tuple[int, int]:
    """(columns, rows) of the whole detector from the recorded configuration, else the region's end."""
    try:
        shape = yaml.safe_load(info.get("config") or "")["geo"]["detector"]["shape"]
        return int(shape[0]), int(shape[1])
    except (TypeError, KeyError, IndexError, ValueError):
        return frame[3], frame[1]


def _write_depth(path: Path, image: np.ndarray, j: int, z: float, src: dict[str, Any],
                 point_file: Path, created: str) -> None:
    r0, r1, c0, c1 = src["frame"]
    info = src["info"]
    n_cols, n_rows = _detector_shape(info, src["frame"])
    with atomic_h5(path) as f:
        entry = f.create_group("entry1")
        entry.attrs["NX_class"] = "NXentry"
        data = entry.create_group("data")
        data.attrs["NX_class"] = "NXdata"
        data.attrs["signal"] = "data"
        ds = data.create_dataset("data", data=np.asarray(image, dtype=np.float32), chunks=image.shape,
                                 compression="gzip", compression_opts=1, shuffle=True)
        ds.attrs["frame"] = np.array([r0, r1, c0, c1], dtype=np.int64)
        ds.attrs["axes"] = "row, col"
        ds.attrs["units"] = "counts per frame per depth bin"
        ds.attrs["depth_index"] = j
        d = entry.create_dataset("depth", data=np.float64(z))
        d.attrs["units"] = "um"
        det = entry.create_group("detector")
        det.attrs.update({"Nx": n_cols, "Ny": n_rows, "startx": c0, "endx": c1 - 1, "starty": r0,
                          "endy": r1 - 1, "binx": 1, "biny": 1})
        pg = entry.create_group("provenance")
        pg.attrs.update({
            "source_file": str(point_file), "source_point": src["point"],
            "source_config_fingerprint": str(info.get(prov.CONFIG_FINGERPRINT, "")),
            "source_input_fingerprint": str(info.get(prov.INPUT_FINGERPRINT, "")),
            "source_end_time": str(info.get("end_time", "")), "source_complete": src["complete"],
            "source_fingerprint": src["fingerprint"], "export_format": EXPORT_FORMAT,
            "laueflow_version": __version__, "created": created})


def export_point_detailed(point_file: str | os.PathLike, dest_dir: str | os.PathLike | None = None,
                          *, force: bool = False) -> ExportResult:
    """Export one point file as one image file per depth bin; see the module description.

    ``dest_dir`` defaults to ``OUT/depths/point_<k:05d>/`` beside the point file.  Files whose
    recorded source fingerprint matches are kept unless ``force``.
    """
    point_file = Path(point_file).resolve()
    if not point_file.is_file():
        raise ExportError(f"{point_file}: point file does not exist")
    src = _read_source(point_file)
    dest = Path(dest_dir).resolve() if dest_dir is not None else default_dest(point_file, src["point"])
    dest.mkdir(parents=True, exist_ok=True)
    depth = src["depth"]
    names = [depth_file_name(j, z, depth.size) for j, z in enumerate(depth)]
    result = ExportResult(point=src["point"], dest=dest, files=[dest / n for n in names])
    current = (src["fingerprint"], str(point_file))
    stale = [j for j, path in enumerate(result.files) if force or _recorded(path) != current]
    result.kept = depth.size - len(stale)
    if stale:
        created = prov.now()
        todo = set(stale)
        with PointReader(point_file) as r:
            vol = r.volume
            step = max(1, (vol.chunks or (16,))[0])  # read whole depth chunks: each decompressed once
            for j0 in range(0, depth.size, step):
                wanted = [j for j in range(j0, min(j0 + step, depth.size)) if j in todo]
                if not wanted:
                    continue
                block = vol[j0:min(j0 + step, depth.size)]
                for j in wanted:
                    _write_depth(result.files[j], block[j - j0], j, float(depth[j]), src, point_file, created)
                    result.written += 1
    keep = set(names)
    for old in dest.iterdir():  # depth files of this point from an earlier depth grid
        if old.name not in keep and _DEPTH_FILE.fullmatch(old.name):
            recorded = _recorded(old)
            if recorded is not None and recorded[1] == str(point_file):
                old.unlink()
                result.removed += 1
    return result


def export_point(point_file: str | os.PathLike, dest_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write one HDF5 image file per depth of a point file (``entry1/data/data``, ``entry1/depth`` in um)
    into ``dest_dir`` (default ``OUT/depths/point_<k:05d>/``); returns the files in depth order.

    Idempotent: up-to-date files are kept, stale ones rewritten (see :func:`export_point_detailed`).
    """
    return export_point_detailed(point_file, dest_dir).files
