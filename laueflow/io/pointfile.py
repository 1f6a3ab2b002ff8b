"""The point file ``point_<k:05d>.h5``: a scan point's result, written and read here only.

A NeXus file (format 2) that silx, h5web and NeXpy open on its default plot::

    /                                  NXroot, @default = "entry", @laueflow_point_format = 2
    /entry                             NXentry, @default = "reconstruction"
    /entry/reconstruction              NXdata, @signal = "volume", @axes = [depth, row, col]
        volume   (J, rows, cols) float32  counts per frame of each depth bin, over the region file.frame
                                          (@frame = [r0, r1, c0, c1]; pixels not decoded stay 0)
        depth    (J,) um                  depth bin centres along the beam
        row, col (rows,), (cols,) pixel   the detector row and column of each voxel
        @n_pixels, @complete (False: some blocks failed), @checksum (of every dataset, :func:`checksum`)
    /entry/intensity_vs_depth          NXdata: intensity (J,) counts, the volume summed over pixels;
                                       depth (a hard link to the volume's depth)
    /entry/pixel_state                 NXdata: state (rows, cols) uint8 over the region, one of
                                       laueflow.flags.PIXEL_STATES (CF flag_values / flag_meanings);
                                       row, col (links)
    /entry/diagnostics                 NXcollection of the P decoded pixels: index (P, 2) detector row,
                                       col; background (counts), residual (reduced chi-square), quality
                                       (bits of laueflow.flags.QUALITY_FLAGS, CF flag_masks /
                                       flag_meanings), energy, energy_sigma (keV); quality_flags, the table
    /entry/acquisition                 NXcollection: the header of the point's first frame file as the
                                       detector wrote it (its groups and datasets, the image left out)
    /entry/provenance                  NXprocess: program, version, date; configuration (NXnote, YAML);
                                       see laueflow.provenance

Intensities are in one unit everywhere, ``counts``: detector counts per frame (frames scaled to the
scan's mean monitor I0).  :func:`write_point` stitches a point's block files into it atomically
(laueflow.io.atomic); :class:`PointReader` is the read side that the result API (laueflow.runs), the
export, scoring and resuming use, and refuses a file of another format; :func:`verify` checks a file's
stored checksum before a rerun keeps it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .. import provenance as prov
from ..errors import ResultError
from ..flags import (
    PIXEL_DECODED,
    PIXEL_NO_BLOCK,
    PIXEL_NOT_SELECTED,
    PIXEL_SATURATED,
    PIXEL_STATES,
    QUALITY_FLAGS,
    Flag,
)
from .atomic import atomic_h5
from .blocks import PIXEL_DTYPES, PIXEL_FIELDS, read_block
from .header import copy_header
from .scan import square_side

__all__ = ["ACQUISITION", "DIAGNOSTICS", "INTENSITY_UNITS", "PIXEL_DECODED", "PIXEL_NOT_SELECTED",
           "PIXEL_NO_BLOCK", "PIXEL_SATURATED", "PIXEL_STATES", "POINT_FORMAT", "PointReader", "checksum",
           "point_summary", "read_profiles", "read_provenance", "signal_excess", "signal_range", "verify",
           "write_point"]

# 1: laueflow 0.1 before NeXus defaults (diagnostics in reconstruction/pixels, no state map or header)
POINT_FORMAT = 2
FORMAT_ATTR = "laueflow_point_format"  # attribute of the root
ENTRY = "entry"
RECONSTRUCTION = "entry/reconstruction"
INTENSITY = "entry/intensity_vs_depth"
STATE = "entry/pixel_state"
DIAGNOSTICS = "entry/diagnostics"
ACQUISITION = "entry/acquisition"
PROVENANCE = "entry/provenance"
CHECKSUM = "checksum"  # attribute of RECONSTRUCTION
CHECKSUM_METHOD = "sha256/stored-bytes/1"
INTENSITY_UNITS = "counts"
INTENSITY_MEANING = "detector counts per frame (frames scaled to the mean monitor I0)"
PIXEL_UNITS = {"background": INTENSITY_UNITS, "residual": "1", "energy": "keV", "energy_sigma": "keV"}
PIXEL_MEANINGS = {"background": "background under the pixel's trace, " + INTENSITY_MEANING,
                  "residual": "reduced chi-square of the pixel's fit (1: within the noise)",
                  "quality": "quality flag bits, 0 = good (see quality_flags)",
                  "energy": "energy of the pixel's spot, NaN where not estimated",
                  "energy_sigma": "standard error of energy"}


def _chunks(n_depth: int, n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """Chunks of about 1 MiB that suit both block-by-block writing and depth-slice reading."""
    return (min(n_depth, 16), min(n_rows, 128), min(n_cols, 128))


def _band_cache(n_depth: int, n_rows: int, n_cols: int) -> dict[str, int]:
    """A chunk cache for the volume that holds one band of chunk rows (every depth and column chunk of
    128 detector rows), up to 512 MiB: blocks arrive tile row by tile row, and a chunk evicted before
    its last tile is written would be compressed, read back and decompressed again (a third of the
    stitching time of a 1200 x 1200 point)."""
    cd, cr, cc = _chunks(n_depth, n_rows, n_cols)
    band = -(-n_depth // cd) * -(-n_cols // cc)
    nbytes = min(max(band * cd * cr * cc * 4 * 5 // 4, 64 << 20), 512 << 20)
    return {"rdcc_nbytes": nbytes, "rdcc_nslots": 20011}  # a prime, well above the chunks held


def signal_excess(intensity: np.ndarray, fraction: float = 0.1) -> np.ndarray | None:
    """How far each depth bin's summed intensity rises above its floor (the median, which noise and
    background-level pixels set), 0 where it rises by less than ``fraction`` of the peak; None when
    nothing rises (no signal, or values that are not finite).  The bins with signal of a point."""
    intensity = np.asarray(intensity, dtype=np.float64)
    if intensity.size == 0 or not np.isfinite(intensity).all():
        return None
    excess = intensity - np.median(intensity)
    if excess.max() <= 0:
        return None
    return np.where(excess >= fraction * excess.max(), excess, 0.0)


def signal_range(depth_um: np.ndarray, intensity: np.ndarray,
                 fraction: float = 0.1) -> tuple[float, float] | None:
    """Depth interval (um) of the bins with signal (:func:`signal_excess`); None when there is none."""
    excess = signal_excess(intensity, fraction)
    if excess is None:
        return None
    above = np.flatnonzero(excess)
    return float(depth_um[above[0]]), float(depth_um[above[-1]])


# ----------------------------------------------------------------------------------------------
# Writing


def _nxdata(group: h5py.Group, signal: str, axes: Sequence[str]) -> None:
    group.attrs["NX_class"] = "NXdata"
    group.attrs["signal"] = signal
    group.attrs["axes"] = list(axes)
    for i, name in enumerate(axes):
        if name != ".":
            group.attrs[f"{name}_indices"] = i


def _describe(ds: h5py.Dataset, units: str | None, long_name: str) -> None:
    if units is not None:
        ds.attrs["units"] = units
    ds.attrs["long_name"] = long_name


def _flag_table(group: h5py.Group, name: str, flags: Sequence[Flag]) -> None:
    """A small table (value, name, meaning) that defines a code's values inside the file."""
    text = h5py.string_dtype()
    kind = np.dtype([("value", np.uint8), ("name", text), ("meaning", text)])
    table = np.array([(f.value, f.name, f.meaning) for f in flags], dtype=kind)
    group.create_dataset(name, data=table)


def _cf_flags(ds: h5py.Dataset, flags: Sequence[Flag], bits: bool) -> None:
    """CF attributes naming a code's values (``flag_masks`` for bits, ``flag_values`` for states)."""
    ds.attrs["flag_masks" if bits else "flag_values"] = np.array([f.value for f in flags], dtype=ds.dtype)
    ds.attrs["flag_meanings"] = " ".join(f.name for f in flags)


def write_point(path: str | os.PathLike, block_files: Sequence[str | os.PathLike], *,
                frame: Sequence[int], depths_mm: Sequence[float], provenance: Mapping[str, Any],
                complete: bool = True, compression: str = "gzip",
                stamp: Mapping[str, Any] | None = None,
                header: tuple[str | os.PathLike, str] | None = None,
                tile_pixels: int | None = None) -> dict[str, Any]:
    """Stitch block files into one point file, atomically, holding one block in memory at a time.

    ``frame`` = [r0, r1, c0, c1] is the detector region of the volume; pixels outside every block
    stay 0 (state ``no_block``).  ``complete`` False marks a point some of whose blocks failed (a rerun
    redoes it).  ``stamp``: block fields (point, fingerprints) every block must carry; a block that does
    not (it was replaced after it was checked) raises :class:`ResultError` and nothing is written.
    ``header``: (frame file, image dataset key) whose header is copied into ``/entry/acquisition``.
    ``tile_pixels``: the decoder's tiles (see Scan.tiles); the summed intensity adds the tiles' sums in
    tile order and the diagnostics list the pixels row by row, so that the file does not depend on
    how the tiles were grouped into blocks.
    Returns a summary: n_pixels, depth range with signal (um) and the file name.
    """
    r0, r1, c0, c1 = (int(v) for v in frame)
    depth_um = np.round(np.asarray(depths_mm, dtype=np.float64) * 1000.0, 6)  # mm -> um, without float noise
    n_depth, n_rows, n_cols = depth_um.size, r1 - r0, c1 - c0
    side = square_side(tile_pixels) if tile_pixels else max(n_rows, n_cols)
    tile_sums: dict[tuple[int, int], np.ndarray] = {}
    decoded: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
    opts: dict[str, Any] = {"compression": compression, "shuffle": True}
    if compression == "gzip":
        opts["compression_opts"] = 1
    path = Path(path)
    with atomic_h5(path, **_band_cache(n_depth, n_rows, n_cols)) as f:
        f.attrs["NX_class"] = "NXroot"
        f.attrs["default"] = "entry"
        f.attrs["creator"] = "laueflow"
        f.attrs[FORMAT_ATTR] = POINT_FORMAT
        entry = f.create_group(ENTRY)
        entry.attrs["NX_class"] = "NXentry"
        entry.attrs["default"] = "reconstruction"
        rec = entry.create_group("reconstruction")
        _nxdata(rec, "volume", ["depth", "row", "col"])
        d = rec.create_dataset("depth", data=depth_um)
        _describe(d, "um", "depth along the beam (bin centre)")
        row = rec.create_dataset("row", data=np.arange(r0, r1, dtype=np.int32))
        _describe(row, "pixel", "detector row")
        col = rec.create_dataset("col", data=np.arange(c0, c1, dtype=np.int32))
        _describe(col, "pixel", "detector column")
        vol = rec.create_dataset("volume", shape=(n_depth, n_rows, n_cols), dtype=np.float32,
                                 chunks=_chunks(n_depth, n_rows, n_cols), fillvalue=0.0, **opts)
        vol.attrs["frame"] = np.array([r0, r1, c0, c1], dtype=np.int64)
        _describe(vol, INTENSITY_UNITS, "intensity of each depth bin, " + INTENSITY_MEANING)
        state_map = np.full((n_rows, n_cols), PIXEL_NO_BLOCK, dtype=np.uint8)

        diag = entry.create_group("diagnostics")
        diag.attrs["NX_class"] = "NXcollection"
        for name in block_files:
            b = read_block(name)
            if stamp and any(getattr(b, k) != v for k, v in stamp.items()):
                raise ResultError(f"{name}: block file replaced by one of other inputs or another "
                                  "configuration while the point was stitched")
            br0, br1, bc0, bc1 = b.tile
            if not (r0 <= br0 < br1 <= r1 and c0 <= bc0 < bc1 <= c1):
                raise ValueError(f"{name}: tile {list(b.tile)} lies outside the region {[r0, r1, c0, c1]}")
            state_map[br0 - r0:br1 - r0, bc0 - c0:bc1 - c0] = PIXEL_NOT_SELECTED
            state_map[b.saturated_rows - r0, b.saturated_cols - c0] = PIXEL_SATURATED
            if b.n_pixels == 0:
                continue
            state_map[b.rows - r0, b.cols - c0] = PIXEL_DECODED
            if b.profiles.shape[1] != n_depth:
                raise ValueError(f"{name}: {b.profiles.shape[1]} depth bins, the point file has {n_depth}")
            dense = np.zeros((n_depth, br1 - br0, bc1 - bc0), dtype=np.float32)
            dense[:, b.rows - br0, b.cols - bc0] = b.profiles.T
            vol[:, br0 - r0:br1 - r0, bc0 - c0:bc1 - c0] = dense
            tr, tc = (b.rows - r0) // side, (b.cols - c0) // side
            for t in sorted(set(zip(tr.tolist(), tc.tolist(), strict=True))):
                mine = (tr == t[0]) & (tc == t[1])
                part = b.profiles[mine].sum(axis=0, dtype=np.float64)
                tile_sums[t] = tile_sums[t] + part if t in tile_sums else part
            decoded.append((np.stack([b.rows, b.cols], axis=1).astype(np.int32), b.fields))
        total = np.zeros(n_depth, dtype=np.float64)
        for t in sorted(tile_sums):
            total += tile_sums[t]
        where = np.concatenate([w for w, _ in decoded]) if decoded else np.zeros((0, 2), np.int32)
        order = np.lexsort((where[:, 1], where[:, 0]))  # row by row
        n_pixels = int(where.shape[0])
        chunk = max(1, min(4096, n_pixels))
        index = diag.create_dataset("index", data=where[order], maxshape=(None, 2), chunks=(chunk, 2))
        _describe(index, "pixel", "detector row, col of each decoded pixel")
        for k in PIXEL_FIELDS:
            values = (np.concatenate([f[k] for _, f in decoded]) if decoded
                      else np.zeros(0, PIXEL_DTYPES[k]))
            ds = diag.create_dataset(k, data=values[order].astype(PIXEL_DTYPES[k]), maxshape=(None,),
                                     chunks=(chunk,))
            _describe(ds, PIXEL_UNITS.get(k), PIXEL_MEANINGS[k])
            if k == "quality":
                _cf_flags(ds, QUALITY_FLAGS, bits=True)
        _flag_table(diag, "quality_flags", QUALITY_FLAGS)

        rec.attrs["n_pixels"] = n_pixels
        rec.attrs["complete"] = bool(complete)

        ivd = entry.create_group("intensity_vs_depth")
        _nxdata(ivd, "intensity", ["depth"])
        inten = ivd.create_dataset("intensity", data=total.astype(np.float32))
        _describe(inten, INTENSITY_UNITS, "volume summed over the region's pixels, " + INTENSITY_MEANING)
        ivd["depth"] = d  # hard links: the same dataset, no copy

        st = entry.create_group("pixel_state")
        _nxdata(st, "state", ["row", "col"])
        sds = st.create_dataset("state", data=state_map, chunks=(min(n_rows, 256), min(n_cols, 256)), **opts)
        _describe(sds, None, "what became of each pixel of the region (see states)")
        _cf_flags(sds, PIXEL_STATES, bits=False)
        _flag_table(st, "states", PIXEL_STATES)
        st["row"], st["col"] = row, col

        acq = entry.create_group("acquisition")
        acq.attrs["NX_class"] = "NXcollection"
        if header is not None:
            acq.attrs["source_file"] = str(header[0])
            copy_header(header[0], header[1], acq)

        pg = entry.create_group("provenance")
        prov.write(pg, provenance)
        f.flush()  # the chunks on disk, as checksum() reads them
        rec.attrs[CHECKSUM] = f"{CHECKSUM_METHOD}:{checksum(f)}"
    rng = signal_range(depth_um, total)
    return {"file": str(path), "n_pixels": n_pixels, "depth_range_um": rng, "complete": complete}


# ----------------------------------------------------------------------------------------------
# Integrity


def _hash_dataset(h: Any, name: str, ds: h5py.Dataset) -> None:
    h.update(f"{name}|{ds.dtype.str}|{ds.shape}\n".encode())
    if ds.chunks is not None:
        # the chunks as stored (compressed): no decompression, so a 1 GB volume costs its file size
        chunks: list[tuple[tuple[int, ...], int]] = []
        ds.id.chunk_iter(lambda info: chunks.append((tuple(info.chunk_offset), info.size)))
        for offset, size in sorted(chunks):
            mask, data = ds.id.read_direct_chunk(offset)
            h.update(f"{offset}|{mask}|{size}\n".encode())
            h.update(data)
    elif h5py.check_string_dtype(ds.dtype) is not None:
        for text in np.atleast_1d(ds.asstr()[()]).ravel():
            raw = str(text).encode()
            h.update(f"{len(raw)}:".encode() + raw)
    elif ds.dtype.hasobject:  # a table with text fields: its values, not the addresses of its strings
        raw = repr(np.asarray(ds[()]).tolist()).encode()
        h.update(f"{len(raw)}:".encode() + raw)
    else:
        h.update(np.ascontiguousarray(ds[()]).tobytes())


def checksum(f: h5py.File) -> str:
    """SHA-256 over every dataset of a point file in name order: its name, type, shape and stored
    bytes (chunked datasets chunk by chunk as stored, so the volume is not decompressed)."""
    found: list[tuple[str, h5py.Dataset]] = []
    f.visititems(lambda name, obj: found.append((name, obj)) if isinstance(obj, h5py.Dataset) else None)
    h = hashlib.sha256()
    for name, ds in sorted(found, key=lambda item: item[0]):
        _hash_dataset(h, name, ds)
    return h.hexdigest()


def verify(path: str | os.PathLike) -> None:
    """Raise :class:`ResultError` naming a point file whose datasets no longer match their stored
    checksum (damaged in place), that has none (written before laueflow stored one), or that cannot be
    read at all."""
    try:
        with h5py.File(path, "r") as f:
            _check_format(f, path)
            stored = f[RECONSTRUCTION].attrs.get(CHECKSUM)
            if stored is None:
                raise ResultError(f"{path}: no checksum stored (an older point file)")
            stored = stored.decode() if isinstance(stored, bytes) else str(stored)
            method, _, digest = stored.rpartition(":")
            if method != CHECKSUM_METHOD:
                raise ResultError(f"{path}: checksum of an unknown kind ({method})")
            if checksum(f) != digest:
                raise ResultError(f"{path}: damaged (its datasets do not match their stored checksum)")
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise ResultError(f"{path}: damaged ({type(exc).__name__}: {exc})") from None


def _check_format(f: h5py.File, path: Path | str | os.PathLike) -> None:
    """Raise :class:`ResultError` for a file that is not a point file of this format."""
    found = f.attrs.get(FORMAT_ATTR)
    if found is None:
        if "entry/reconstruction/volume" in f:
            raise ResultError(f"{path}: a point file of an older laueflow format (1); this laueflow reads "
                              f"format {POINT_FORMAT}: run `laueflow run` on its scan again to rewrite it")
        raise ResultError(f"{path}: not a laueflow point file (no {FORMAT_ATTR} attribute)")
    if int(found) != POINT_FORMAT:
        raise ResultError(f"{path}: laueflow point file format {int(found)}; this laueflow reads format "
                          f"{POINT_FORMAT}: use the laueflow that wrote it, or run `laueflow run` again")


# ----------------------------------------------------------------------------------------------
# Reading


class PointReader:
    """A point file open read-only, its layout's parts by name; reads only what is asked.

    Opening raises what h5py raises (OSError, ValueError), :class:`ResultError` for a file of another
    format, and a missing part raises KeyError, so each caller words the error for its own layer.  Use
    as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        # HDF5's default file locking, so that other readers in the same process can open it too
        self.file = h5py.File(self.path, "r")
        try:
            _check_format(self.file, self.path)
        except ResultError:
            self.file.close()
            raise

    def close(self) -> None:
        self.file.close()

    @property
    def valid(self) -> bool:
        """Whether the file is still open."""
        return bool(self.file.id.valid)

    def __enter__(self) -> PointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def rec(self) -> h5py.Group:
        """``/entry/reconstruction``."""
        return self.file[RECONSTRUCTION]

    @property
    def volume(self) -> h5py.Dataset:
        """The volume dataset (depth, row, col), for any h5py slicing."""
        return self.rec["volume"]

    def depth(self) -> np.ndarray:
        """Depth bin centres, um."""
        return np.asarray(self.rec["depth"][()], dtype=np.float64)

    def frame(self) -> tuple[int, int, int, int]:
        """Detector region (r0, r1, c0, c1) of the volume."""
        return tuple(int(v) for v in self.volume.attrs["frame"])  # type: ignore[return-value]

    def complete(self, default: bool = True) -> bool:
        """False when some blocks of the point failed (their pixels are 0)."""
        return bool(self.rec.attrs.get("complete", default))

    def n_pixels(self) -> int:
        """Number of reconstructed pixels."""
        return int(self.rec.attrs["n_pixels"])

    def intensity_vs_depth(self) -> np.ndarray:
        """The volume summed over pixels, per depth bin, as stored (float32)."""
        return self.file[INTENSITY]["intensity"][()]

    def pixel_index(self) -> tuple[np.ndarray, np.ndarray]:
        """Detector rows and columns (int64) of the reconstructed pixels."""
        index = np.asarray(self.file[DIAGNOSTICS]["index"][()], dtype=np.int64).reshape(-1, 2)
        return index[:, 0], index[:, 1]

    def pixel_fields(self) -> dict[str, np.ndarray]:
        """The per-pixel fields of the reconstructed pixels, in the order of :meth:`pixel_index`."""
        diag = self.file[DIAGNOSTICS]
        return {k: diag[k][()] for k in PIXEL_FIELDS}

    def pixel_state(self) -> np.ndarray:
        """(rows, cols) uint8 map over the region: one of laueflow.flags.PIXEL_STATES per pixel."""
        return self.file[STATE]["state"][()]

    def flag_table(self, which: str) -> tuple[Flag, ...]:
        """The code table stored in the file: ``quality`` (bits) or ``states`` (pixel states)."""
        ds = self.file[DIAGNOSTICS]["quality_flags"] if which == "quality" else self.file[STATE]["states"]
        return tuple(Flag(int(v), n.decode() if isinstance(n, bytes) else str(n),
                          m.decode() if isinstance(m, bytes) else str(m)) for v, n, m in ds[()])

    def acquisition(self) -> h5py.Group:
        """The copied header of the point's first frame file (empty when the run had none)."""
        return self.file[ACQUISITION]

    def provenance(self) -> dict[str, Any]:
        """What produced the file (laueflow.provenance); empty when not recorded."""
        return prov.read(self.file[PROVENANCE]) if PROVENANCE in self.file else {}

    def profiles(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """rows, cols (P,) and depth profiles (P, J) of the reconstructed pixels (reads the volume)."""
        rows, cols = self.pixel_index()
        r0, _, c0, _ = self.frame()
        volume = self.volume[()]
        profiles = volume[:, rows - r0, cols - c0].T if rows.size else np.zeros((0, volume.shape[0]))
        return rows, cols, profiles


def read_profiles(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """rows, cols (P,) and depth profiles (P, J) of the reconstructed pixels of a point file (scoring)."""
    with PointReader(path) as r:
        return r.profiles()


def read_provenance(path: str | os.PathLike) -> dict[str, Any] | None:
    """The provenance of an existing point file plus its ``complete`` flag; None if the file is unusable."""
    try:
        with PointReader(path) as r:
            out = prov.read(r.file[PROVENANCE])
            out["complete"] = r.complete(default=False)
            return out
    except (OSError, KeyError, ResultError):
        return None


def point_summary(path: str | os.PathLike) -> dict[str, Any]:
    """n_pixels and depth range with signal (um) of an existing point file (used when it is reused)."""
    with PointReader(path) as r:
        return {"file": str(path), "n_pixels": r.n_pixels(),
                "depth_range_um": signal_range(r.depth(), r.intensity_vs_depth())}
