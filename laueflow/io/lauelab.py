"""Export to the lauelab reconstruction point format (``lauelab-reconstruction-point``, version 2).

lauelab (AdvancedPhotonSource/lauelab, docs/development/reconstruction-scan-format.md) defines the
beamline's point format for depth-resolved results: the stack at ``/entry1/data/data``
(n_depth, rows, cols), the depths at ``/entry1/depth`` (um), the frame's acquisition metadata at its
original paths, and ``/entry1/reconstruction`` (NXprocess) with the point, execution, acquisition,
detector (ROI start and binning), normalization and settings groups and the reference images
``first_raw``, ``sum_raw``, ``sum_reconstructed`` and the depth totals.

laueflow writes it as a separate, standalone point file (manifest index -1, no ``scan.h5`` catalog)
rather than inside its own point file: the format asks for ordinary datasets under ``/entry1`` and for
the raw reference images, which laueflow's point file does not hold, and links between files are not
allowed.  Values that describe lauelab's wire method and have no meaning for a coded aperture get the
format's "missing" values (-1, NaN, empty text); ``settings/wire_edge`` names the method,
``coded-aperture``.  The raw reference images are read from the point's frame files, which must still be
where the run read them.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import yaml

from .. import __version__
from ..config import from_dict
from ..errors import ConfigError, ExportError, ResultError, ScanError
from .atomic import atomic_h5
from .header import SCAN_NUMBER, configured_shape, copy_group, number, region_on_detector, text, write_region
from .pointfile import PointReader
from .scan import Tile, open_scan

FORMAT = "lauelab-reconstruction-point"
VERSION = 2
METHOD = "coded-aperture"  # settings/wire_edge: lauelab knows leading, trailing, both (wire edges)
# the format's description of raw_slices; laueflow's are the point's frames [first, last) in scan order
RAW_SELECTION = "laueflow: the point's frames [first, end) in scan order"
_FRAMES_AT_ONCE = 16  # raw frames summed a few at a time: bounded memory for large regions


def _text(group: h5py.Group, name: str, value: str, **attrs: Any) -> None:
    """A UTF-8 text dataset with the format's attributes (``missing`` ...)."""
    group.create_dataset(name, data=value, dtype=h5py.string_dtype()).attrs.update(attrs)


def _put(group: h5py.Group, name: str, value: Any, dtype: str, units: str | None = None,
         **attrs: Any) -> h5py.Dataset:
    """A dataset of the format's dtype with its ``units`` and other attributes (``missing``, ``order``,
    ``binning``, ``selection``: the conventions lauelab's readers check)."""
    ds = group.create_dataset(name, data=np.asarray(value, dtype=dtype))
    if units is not None:
        ds.attrs["units"] = units
    ds.attrs.update(attrs)
    return ds


def _utc(stamp: str) -> str:
    """An ISO 8601 time as UTC (the format's dates are UTC); now when ``stamp`` is empty or unreadable."""
    try:
        when = datetime.fromisoformat(stamp)
    except ValueError:
        when = datetime.now(UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _params(parent: h5py.Group, name: str) -> h5py.Group:
    g = parent.create_group(name)
    g.attrs["NX_class"] = "NXparameters"
    return g


def _scalar(header: h5py.Group, key: str) -> float:
    value = number(header, key)
    return float("nan") if value is None else value


def _raw_references(info: dict[str, Any], point: int, frame: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The first raw frame of the point and the sum of all its raw frames, over the region."""
    scan_path = info.get("scan")
    try:
        cfg = from_dict(yaml.safe_load(info.get("config") or ""),
                        source=str(info.get("config_file") or "<point file>"), check_files=False)
        scan = open_scan(cfg, scan_path, check=False, warn_trailing=False)
        tile = Tile(*frame)
        n = len(scan.point_frames(point))
        first = scan.read_region(point, tile, slice(0, 1))[0]
        total = np.zeros(first.shape, np.int64 if np.issubdtype(first.dtype, np.integer) else np.float64)
        for k in range(0, n, _FRAMES_AT_ONCE):
            chunk = scan.read_region(point, tile, slice(k, k + _FRAMES_AT_ONCE))
            total += chunk.sum(axis=0, dtype=total.dtype)
    except (ConfigError, ScanError, OSError, TypeError) as exc:
        raise ExportError(f"the lauelab format holds the point's raw reference images, read from its frames "
                          f"in {scan_path}: {exc}") from None
    return first, total


def export_lauelab(point_file: str | os.PathLike, dest: str | os.PathLike, *, force: bool = False) -> bool:
    """Write ``dest`` as a lauelab point file of ``point_file``; False when an up-to-date one is kept.

    A ``dest`` that exists and was not written by this export is refused (:class:`ExportError`)."""
    point_file, dest = Path(point_file).resolve(), Path(dest).resolve()
    try:
        reader = PointReader(point_file)
    except ResultError as exc:
        raise ExportError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise ExportError(f"{point_file}: not a readable laueflow point file: {exc}") from None
    with reader as r:
        info = r.provenance()
        st = point_file.stat()
        ident = hashlib.sha256(json.dumps([str(point_file), st.st_size, st.st_mtime_ns,
                                           str(info.get("end_time"))]).encode()).hexdigest()[:16]
        if dest.exists():
            try:
                with h5py.File(dest, "r") as old:
                    mine = old.attrs.get("format") == FORMAT and "laueflow_source" in old.attrs
                    current = old.attrs.get("laueflow_source") == ident
            except OSError:
                mine = current = False
            if not mine:
                raise ExportError(f"{dest}: exists and was not written by laueflow's lauelab export; "
                                  "choose another destination or move it away")
            if current and not force:
                return False
        point = int(info.get("point", -1))
        frame = list(r.frame())
        depth = r.depth()
        first_raw, sum_raw = _raw_references(info, point, frame)
        header = r.acquisition()
        det = region_on_detector(header, frame, configured_shape(info, frame))
        names = [str(f["name"]) for f in info.get("inputs") or []]
        first_frame = Path(str(info.get("scan", ""))) / names[0] if names else Path()
        with atomic_h5(dest) as f:
            if "entry1" in header:
                copy_group(header, f)
                f.attrs.pop("source_file", None)
                for gone in ("entry1/wire", "entry1/data", "entry1/depth"):
                    if gone in f:
                        del f[gone]
            write_region(f, det)  # the copied detector fields describe the stored region, not the frame
            f.attrs.update({"format": FORMAT, "version": VERSION, "default": "entry1", "NX_class": "NXroot",
                            "laueflow_source": ident, "file_name": dest.name})
            entry = f.require_group("entry1")
            entry.attrs.update({"NX_class": "NXentry", "default": "data"})
            d = _put(entry, "depth", depth.astype(np.float64), "<f8", units="um")
            data = entry.create_group("data")
            data.attrs.update({"NX_class": "NXdata", "signal": "data", "axes": ["depth", ".", "."]})
            vol = r.volume
            out = data.create_dataset("data", shape=vol.shape, dtype=np.float32, chunks=vol.chunks,
                                      compression="gzip", compression_opts=1, shuffle=True)
            out.attrs["values"] = "stored"
            step = max(1, (vol.chunks or (16,))[0])
            totals = np.zeros(depth.size, np.float64)
            image_sum = np.zeros(vol.shape[1:], np.float64)
            for j0 in range(0, depth.size, step):
                block = vol[j0:j0 + step]
                out[j0:j0 + block.shape[0]] = block
                totals[j0:j0 + block.shape[0]] = block.sum(axis=(1, 2), dtype=np.float64)
                image_sum += block.sum(axis=0, dtype=np.float64)
            data["depth"] = d

            rec = entry.create_group("reconstruction")
            rec.attrs["NX_class"] = "NXprocess"
            _text(rec, "program", "laueflow")
            _text(rec, "version", __version__)
            _text(rec, "date", _utc(str(info.get("end_time", ""))))
            g = _params(rec, "point")
            _text(g, "id", f"point_{point:05d}")
            _put(g, "manifest_index", -1, "<i8", missing=-1)
            _text(g, "native_version", "")
            g = _params(rec, "execution")
            _put(g, "num_threads", 1, "<i4")
            _put(g, "rows_per_stripe", -1, "<i4")
            g = _params(rec, "acquisition")
            _text(g, "source_path", str(first_frame))
            size, mtime = (first_frame.stat().st_size, first_frame.stat().st_mtime_ns) \
                if first_frame.is_file() else (-1, -1)
            _put(g, "source_size", size, "<i8", units="bytes", missing=-1)
            _put(g, "source_mtime_ns", mtime, "<i8", missing=-1)
            scan_number = _scalar(header, SCAN_NUMBER)
            _put(g, "scan_number", scan_number if np.isfinite(scan_number) else -1, "<i4", missing=-1)
            position = [_scalar(header, f"entry1/sample/sample{a}") for a in "XYZ"]
            _put(g, "sample_position", position, "<f8", units="um", missing="nan")
            _put(g, "energy_kev", _scalar(header, "entry1/sample/incident_energy"), "<f8", units="keV",
                 missing="nan")
            _put(g, "raw_slices", [0, len(names)], "<i8", selection=RAW_SELECTION)
            g = _params(rec, "detector")
            _text(g, "id", text(header, "entry1/detector/ID"), missing="")
            _put(g, "size", (det["Nx"], det["Ny"]), "<i4", units="pixel", order="x,y", binning="unbinned")
            _put(g, "roi_start", (det["startx"], det["starty"]), "<i4", units="pixel", order="x,y",
                 binning="unbinned")
            _put(g, "roi_group", (det["binx"], det["biny"]), "<i4", order="x,y")
            g = _params(rec, "normalization")
            _put(g, "threshold", np.nan, "<f8", missing="nan")
            _put(g, "rescale", 1.0, "<f8")
            g = _params(rec, "settings")
            _put(g, "detector", 0, "<i4")
            _put(g, "depth_range", [depth[0], depth[-1]], "<f8", units="um")
            _put(g, "resolution", float(depth[1] - depth[0]) if depth.size > 1 else 0.0, "<f8", units="um")
            _text(g, "wire_edge", METHOD)
            _put(g, "percent_brightest", 100.0, "<f8")
            # lauelab names the normalisation vector by its path under entry1
            _text(g, "normalization", "monitor/I0" if "entry1/monitor/I0" in header else "", missing="")
            _put(g, "norm_exponent", np.nan, "<f8", missing="nan")
            _put(g, "norm_threshold", np.nan, "<f8", missing="nan")
            _put(g, "cosmic_filter", 0, "u1")
            _put(g, "output_pixel_type", -1, "<i4", missing=-1)
            _put(g, "rows_per_stripe", -1, "<i4", missing=-1)
            _put(g, "memory_limit_mb", -1, "<i4", units="MiB")
            g = _params(rec, "geometry")
            _text(g, "path", str(info.get("config_file", "")), missing="")
            _text(g, "xml", "")  # laueflow's geometry is its YAML configuration, kept beside it
            _text(rec, "laueflow_configuration", str(info.get("config", "")))
            for name, values, kind in (("first_raw", first_raw, "raw"), ("sum_raw", sum_raw, "raw"),
                                       ("sum_reconstructed", image_sum, "stored"),
                                       ("stored_depth_intensity", totals, "stored"),
                                       ("computed_depth_intensity", totals, "computed")):
                grp = rec.create_group(name)
                grp.attrs.update({"NX_class": "NXdata", "signal": "data",
                                  "axes": ["depth"] if values.ndim == 1 else [".", "."]})
                grp.create_dataset("data", data=values).attrs["values"] = kind
                if values.ndim == 1:
                    grp["depth"] = d
            _put(rec["point"], "complete", 1, "u1")  # set last
    return True
