"""Per-depth export: one HDF5 image file per depth bin of a point, for the beamline's indexing chain.

The chain (LaueGo's peak search, pyLaueGo, lauelab's per-depth reader) reads one file per depth in the
layout of the detector's own frame files, the metadata as datasets (model.md section 6)::

    /entry1/...             the header of the point's first frame file, every group it has, copied as the
                            detector wrote it (monitor, sample, scanNum, microDiffraction, ...)
    /entry1/data/data       (rows, cols) float32   the volume's slice at this depth, over file.frame,
                            counts per frame (NXdata: @signal = data, @axes = [".", "."])
    /entry1/depth           (1,) float64, um       the depth bin centre
    /entry1/detector/       startx, endx, starty, endy: where the image lies on the detector (datasets,
                            inclusive, unbinned pixels: the frame's own start plus the region's offset);
                            Nx, Ny, binx, biny from the frame (or the configuration when it has none)
    /entry1/laueflow        NXprocess: the point file, its fingerprints and the export's own

Files are ``<prefix>_<j>.h5`` in ``OUT/depths/point_<k:05d>/`` (``j`` the depth index), the prefix by
default ``out_<scanNum>`` as the chain's repack step names them (``out_<k>`` when the frames carry no
scan number).  Each is written atomically and gzip-compressed (most pixels of most depths are zero).
Exporting again is cheap: a file whose recorded source fingerprint matches the point file is kept, a
stale one is rewritten, and depth files of the same point that no longer belong to its grid are
removed.  A folder holding anything else is refused: the export never overwrites or mixes with files it
did not write.
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

from .. import __version__
from .. import provenance as prov
from ..errors import ExportError, ResultError
from .atomic import atomic_h5
from .header import SCAN_NUMBER, configured_shape, copy_group, number, region_on_detector, write_region
from .lauelab import export_lauelab
from .layout import DEPTHS_DIR, TMP_MARK, RunFolder, point_dir_name, point_name, point_of
from .pointfile import PointReader

__all__ = ["DEPTHS_DIR", "FORMATS", "ExportError", "ExportResult", "default_dest", "default_prefix",
           "default_root", "depth_file_name", "depth_files", "export_point", "export_point_detailed",
           "export_run_point"]

FORMATS = ("depths", "lauelab")  # laueflow export --format

EXPORT_FORMAT = 2  # 1: depth_<j>_<z>um.h5, detector fields as attributes, no frame header
MARK = "entry1/laueflow"  # the group that says laueflow wrote the file, and from what
_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


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


def depth_file_name(prefix: str, index: int) -> str:
    """``<prefix>_<index>.h5``, the chain's naming (the index not padded)."""
    return f"{prefix}_{index}.h5"


def default_prefix(header: h5py.Group, point: int) -> str:
    """``out_<scanNum>`` from the frame header, else ``out_<point>``."""
    scan = number(header, SCAN_NUMBER)
    return f"out_{point}" if scan is None else f"out_{int(scan)}"


def _read_source(point_file: Path) -> dict[str, Any]:
    """What the export needs from a point file, and the fingerprint that identifies its content."""
    try:
        with PointReader(point_file) as r:
            depth = r.depth()
            info = r.provenance()
            frame = list(r.frame())
            complete = r.complete()
            shape = tuple(int(v) for v in r.volume.shape)
            summed = np.asarray(r.intensity_vs_depth(), dtype=np.float32)
            has_header = "entry1" in r.acquisition()
            prefix = default_prefix(r.acquisition(), int(info.get("point", -1)))
    except ResultError as exc:
        raise ExportError(str(exc)) from None
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
            "has_header": has_header, "prefix": prefix,
            "fingerprint": hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]}


_LEGACY_MARK = "entry1/provenance"  # export format 1 (depth_<j>_<z>um.h5): replaced when met


def _recorded(path: Path) -> dict[str, Any] | None:
    """What a depth file written by laueflow's export records (source fingerprint and file); None when
    it is missing, unreadable or not written by laueflow's export."""
    try:
        with h5py.File(path, "r") as f:
            group = f[MARK] if MARK in f else f[_LEGACY_MARK]
            attrs = dict(group.attrs)
    except (OSError, KeyError):
        return None
    out = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
    return out if {"source_fingerprint", "source_file"} <= set(out) else None


def _write_depth(path: Path, image: np.ndarray, j: int, z: float, src: dict[str, Any],
                 header: h5py.Group, point_file: Path, created: str) -> None:
    with atomic_h5(path) as f:
        if src["has_header"]:
            copy_group(header, f)
            f.attrs.pop("source_file", None)  # the point file's note of where the header came from
        f.attrs["file_name"] = path.name  # as the detector's files name themselves
        f.attrs["NX_class"] = "NXroot"
        f.attrs["default"] = "entry1"
        entry = f.require_group("entry1")
        entry.attrs["NX_class"] = "NXentry"
        entry.attrs["default"] = "data"
        for stale in ("data", "depth", "laueflow"):
            if stale in entry:
                del entry[stale]
        data = entry.create_group("data")
        data.attrs.update({"NX_class": "NXdata", "signal": "data", "axes": [".", "."]})
        ds = data.create_dataset("data", data=np.asarray(image, dtype=np.float32), chunks=image.shape,
                                 compression="gzip", compression_opts=1, shuffle=True)
        ds.attrs["units"] = "counts"
        ds.attrs["long_name"] = "intensity at this depth, detector counts per frame"
        d = entry.create_dataset("depth", data=np.array([z], dtype=np.float64))
        d.attrs["units"] = "um"
        d.attrs["long_name"] = "depth along the beam (bin centre)"
        write_region(f, region_on_detector(header, src["frame"], configured_shape(src["info"], src["frame"])))
        info = src["info"]
        mark = entry.create_group("laueflow")
        mark.attrs["NX_class"] = "NXprocess"
        mark.create_dataset("program", data="laueflow export")
        mark.create_dataset("version", data=__version__)
        mark.attrs.update({
            "source_file": str(point_file), "source_point": src["point"], "depth_index": j,
            "source_relative": os.path.relpath(point_file, path.parent),
            "frame": np.array(src["frame"], dtype=np.int64),
            "source_config_fingerprint": str(info.get(prov.CONFIG_FINGERPRINT, "")),
            "source_input_fingerprint": str(info.get(prov.INPUT_FINGERPRINT, "")),
            "source_end_time": str(info.get("end_time", "")), "source_complete": src["complete"],
            "source_fingerprint": src["fingerprint"], "export_format": EXPORT_FORMAT,
            "laueflow_version": __version__, "created": created})


def _same_point(recorded: dict[str, Any], depth_file: Path, point_file: Path) -> bool:
    """Whether a depth file was exported from ``point_file``: its recorded path relative to itself leads
    there (so a run folder moved or copied whole still owns its depth files); files of the first export
    format recorded only the absolute path."""
    relative = recorded.get("source_relative")
    if relative is None:
        return str(recorded["source_file"]) == str(point_file)
    return (depth_file.parent / str(relative)).resolve() == point_file


def _this_points_files(dest: Path, point_file: Path) -> tuple[dict[Path, dict[str, Any]], list[str]]:
    """The depth files in ``dest`` this export wrote for ``point_file``, with what each records, and the
    names of everything else there (temporaries of an interrupted export are neither: replaced on write)."""
    mine: dict[Path, dict[str, Any]] = {}
    foreign: list[str] = []
    for entry in sorted(dest.iterdir()):
        if TMP_MARK in entry.name:
            continue
        recorded = _recorded(entry) if entry.is_file() else None
        if recorded is None or not _same_point(recorded, entry, point_file):
            foreign.append(entry.name)
        else:
            mine[entry] = recorded
    return mine, foreign


def _check_folder(dest: Path, point_file: Path) -> dict[Path, dict[str, Any]]:
    """This point's depth files in ``dest`` with what they record; anything in ``dest`` that the export
    did not write (or wrote for another point) raises :class:`ExportError`."""
    mine, foreign = _this_points_files(dest, point_file)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ExportError(f"{dest}: holds files that are not this point's per-depth files ({shown}); "
                          "export into an empty folder (--dest) or move them away")
    return mine


def export_point_detailed(point_file: str | os.PathLike, dest_dir: str | os.PathLike | None = None,
                          *, force: bool = False, prefix: str | None = None) -> ExportResult:
    """Export one point file as one image file per depth bin; see the module description.

    ``dest_dir`` defaults to ``OUT/depths/point_<k:05d>/`` beside the point file, ``prefix`` to
    ``out_<scanNum>``.  Files whose recorded source fingerprint matches are kept unless ``force``.
    """
    point_file = Path(point_file).resolve()
    if not point_file.is_file():
        raise ExportError(f"{point_file}: point file does not exist")
    if prefix is not None and not _PREFIX.fullmatch(prefix):
        raise ExportError(f"file prefix {prefix!r}: use letters, digits, '_', '-' or '.', starting with a "
                          "letter or digit")
    src = _read_source(point_file)
    prefix = prefix or src["prefix"]
    dest = Path(dest_dir).resolve() if dest_dir is not None else default_dest(point_file, src["point"])
    if dest.exists() and not dest.is_dir():
        raise ExportError(f"{dest}: not a folder")
    depth = src["depth"]
    names = [depth_file_name(prefix, j) for j in range(depth.size)]
    present = _check_folder(dest, point_file) if dest.is_dir() else {}
    keep = set(names)
    old = [path for path in present if path.name not in keep]
    dest.mkdir(parents=True, exist_ok=True)
    result = ExportResult(point=src["point"], dest=dest, files=[dest / n for n in names])
    stale = [j for j, path in enumerate(result.files)
             if force or present.get(path, {}).get("source_fingerprint") != src["fingerprint"]]
    result.kept = depth.size - len(stale)
    if stale:
        created = prov.now()
        todo = set(stale)
        with PointReader(point_file) as r:
            header = r.acquisition()
            vol = r.volume
            step = max(1, (vol.chunks or (16,))[0])  # read whole depth chunks: each decompressed once
            for j0 in range(0, depth.size, step):
                wanted = [j for j in range(j0, min(j0 + step, depth.size)) if j in todo]
                if not wanted:
                    continue
                block = vol[j0:min(j0 + step, depth.size)]
                for j in wanted:
                    _write_depth(result.files[j], block[j - j0], j, float(depth[j]), src, header, point_file,
                                 created)
                    result.written += 1
    for path in old:  # this point's depth files of an earlier grid or prefix
        path.unlink()
        result.removed += 1
    return result


def depth_files(point_file: str | os.PathLike, point: int) -> list[Path]:
    """The depth files the export wrote for ``point_file`` (scan point ``point``) in its default folder
    ``OUT/depths/point_<k:05d>/``, in depth order; none when there is no such folder.  Temporaries of an
    unfinished export and files it did not write for this point file are not listed."""
    point_file = Path(point_file).resolve()
    dest = default_dest(point_file, point)
    if not dest.is_dir():
        return []
    mine, _ = _this_points_files(dest, point_file)
    found = [(int(recorded["depth_index"]), path) for path, recorded in mine.items()
             if "depth_index" in recorded]
    return [path for _, path in sorted(found)]


def export_point(point_file: str | os.PathLike, dest_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write one HDF5 image file per depth of a point file (``entry1/data/data``, ``entry1/depth`` in um,
    the frame's header) into ``dest_dir`` (default ``OUT/depths/point_<k:05d>/``); returns the files in
    depth order.  Idempotent: up-to-date files are kept, stale ones rewritten (see
    :func:`export_point_detailed`)."""
    return export_point_detailed(point_file, dest_dir).files


def default_root(run_dir: str | os.PathLike, fmt: str) -> Path:
    """Where a run's exports go by default: ``OUT/depths`` (a folder per point) or ``OUT/lauelab``."""
    folder = RunFolder(Path(run_dir))
    return folder.depths_root if fmt == "depths" else folder.lauelab_root


def export_run_point(point_file: str | os.PathLike, point: int, root: str | os.PathLike, *,
                     fmt: str = "depths", force: bool = False, prefix: str | None = None) -> ExportResult:
    """Export one point of a run under ``root`` in format ``fmt`` (see :data:`FORMATS`): its depth files
    in ``root/point_<k:05d>/``, or its lauelab point file ``root/point_<k:05d>.h5``."""
    root = Path(root)
    if fmt == "lauelab":
        if prefix is not None:
            raise ExportError("a file prefix names per-depth files; the lauelab format writes one file "
                              "per point")
        root.mkdir(parents=True, exist_ok=True)
        target = root / point_name(point)
        written = export_lauelab(point_file, target, force=force)
        return ExportResult(point=point, dest=root, files=[target], written=int(written),
                            kept=int(not written))
    if fmt != "depths":
        raise ExportError(f"export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    return export_point_detailed(point_file, root / point_dir_name(point), force=force, prefix=prefix)
