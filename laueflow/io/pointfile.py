"""The point file ``point_<k:05d>.h5``: a scan point's result, written and read here only.

Layout::

    /entry/reconstruction/depth               (J,)  depth bin centres, um
    /entry/reconstruction/volume              (J, rows, cols) float32 over file.frame, attr frame
    /entry/reconstruction/intensity_vs_depth  (J,)  volume summed over pixels
    /entry/reconstruction/pixels/index        (P, 2) detector row, col of reconstructed pixels
    /entry/reconstruction/pixels/{background, residual, quality, energy, energy_sigma}  (P,)
    /entry/reconstruction attrs n_pixels, complete (False: some blocks failed, their pixels are 0),
                          checksum (of every dataset's stored bytes, see :func:`checksum`)
    /entry/provenance                          see laueflow.provenance

:func:`write_point` stitches a point's block files into it atomically (laueflow.io.atomic);
:class:`PointReader` is the read side that the result API (laueflow.runs), the export, scoring and
resuming use; :func:`verify` checks a file's stored checksum before a rerun keeps it.
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
from .atomic import atomic_h5
from .blocks import PIXEL_DTYPES, PIXEL_FIELDS, read_block

RECONSTRUCTION = "entry/reconstruction"
PROVENANCE = "entry/provenance"
CHECKSUM = "checksum"  # attribute of RECONSTRUCTION
CHECKSUM_METHOD = "sha256/stored-bytes/1"


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


def signal_range(depth_um: np.ndarray, intensity: np.ndarray,
                 fraction: float = 0.1) -> tuple[float, float] | None:
    """Depth interval (um) where the summed intensity rises above its floor (the median, which noise and
    background-level pixels set) by more than ``fraction`` of the peak; None when there is no peak."""
    intensity = np.asarray(intensity, dtype=np.float64)
    if intensity.size == 0 or not np.isfinite(intensity).all():
        return None
    excess = intensity - np.median(intensity)
    if excess.max() <= 0:
        return None
    above = np.flatnonzero(excess >= fraction * excess.max())
    return float(depth_um[above[0]]), float(depth_um[above[-1]])


# ----------------------------------------------------------------------------------------------
# Writing


def write_point(path: str | os.PathLike, block_files: Sequence[str | os.PathLike], *,
                frame: Sequence[int], depths_mm: Sequence[float], provenance: Mapping[str, Any],
                complete: bool = True, compression: str = "gzip",
                stamp: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Stitch block files into one point file, atomically, holding one block in memory at a time.

    ``frame`` = [r0, r1, c0, c1] is the detector region of the volume; pixels outside every block
    stay 0.  ``complete`` False marks a point some of whose blocks failed (a rerun redoes it).
    ``stamp``: block fields (point, fingerprints) every block must carry; a block that does not (it
    was replaced after it was checked) raises :class:`ResultError` and nothing is written.
    Returns a summary: n_pixels, depth range with signal (um) and the file name.
    """
    r0, r1, c0, c1 = (int(v) for v in frame)
    depth_um = np.round(np.asarray(depths_mm, dtype=np.float64) * 1000.0, 6)  # mm -> um, without float noise
    n_depth, n_rows, n_cols = depth_um.size, r1 - r0, c1 - c0
    total = np.zeros(n_depth, dtype=np.float64)
    n_pixels = 0
    opts: dict[str, Any] = {"compression": compression, "shuffle": True}
    if compression == "gzip":
        opts["compression_opts"] = 1
    path = Path(path)
    with atomic_h5(path, **_band_cache(n_depth, n_rows, n_cols)) as f:
        entry = f.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        rec = entry.create_group("reconstruction")
        rec.attrs["NX_class"] = "NXdata"
        d = rec.create_dataset("depth", data=depth_um)
        d.attrs["units"] = "um"
        vol = rec.create_dataset("volume", shape=(n_depth, n_rows, n_cols), dtype=np.float32,
                                 chunks=_chunks(n_depth, n_rows, n_cols), fillvalue=0.0, **opts)
        vol.attrs["frame"] = np.array([r0, r1, c0, c1], dtype=np.int64)
        vol.attrs["axes"] = "depth, row, col"
        vol.attrs["units"] = "counts"
        pix = rec.create_group("pixels")
        index = pix.create_dataset("index", shape=(0, 2), maxshape=(None, 2), dtype=np.int32,
                                   chunks=(4096, 2))
        index.attrs["columns"] = "detector row, col"
        fields = {k: pix.create_dataset(k, shape=(0,), maxshape=(None,), dtype=PIXEL_DTYPES[k],
                                        chunks=(4096,)) for k in PIXEL_FIELDS}
        pix["energy"].attrs["units"] = "keV"
        pix["energy_sigma"].attrs["units"] = "keV"
        pix["quality"].attrs["meaning"] = "0 = good, nonzero = flag bits"

        for name in block_files:
            b = read_block(name)
            if stamp and any(getattr(b, k) != v for k, v in stamp.items()):
                raise ResultError(f"{name}: block file replaced by one of other inputs or another "
                                  "configuration while the point was stitched")
            if b.n_pixels == 0:
                continue
            br0, br1, bc0, bc1 = b.tile
            if not (r0 <= br0 < br1 <= r1 and c0 <= bc0 < bc1 <= c1):
                raise ValueError(f"{name}: tile {list(b.tile)} lies outside the region {[r0, r1, c0, c1]}")
            if b.profiles.shape[1] != n_depth:
                raise ValueError(f"{name}: {b.profiles.shape[1]} depth bins, the point file has {n_depth}")
            dense = np.zeros((n_depth, br1 - br0, bc1 - bc0), dtype=np.float32)
            dense[:, b.rows - br0, b.cols - bc0] = b.profiles.T
            vol[:, br0 - r0:br1 - r0, bc0 - c0:bc1 - c0] = dense
            total += b.profiles.sum(axis=0, dtype=np.float64)
            n0, n1 = n_pixels, n_pixels + b.n_pixels
            index.resize((n1, 2))
            index[n0:n1] = np.stack([b.rows, b.cols], axis=1)
            for k, ds in fields.items():
                ds.resize((n1,))
                ds[n0:n1] = b.fields[k]
            n_pixels = n1

        rec.create_dataset("intensity_vs_depth", data=total.astype(np.float32))
        rec["intensity_vs_depth"].attrs["units"] = "counts"
        rec.attrs["n_pixels"] = n_pixels
        rec.attrs["complete"] = bool(complete)
        rec.attrs["signal"] = "volume"
        rec.attrs["axes"] = ["depth", ".", "."]
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


# ----------------------------------------------------------------------------------------------
# Reading


class PointReader:
    """A point file open read-only, its layout's parts by name; reads only what is asked.

    Opening raises what h5py raises (OSError, ValueError) and a missing part raises KeyError, so each
    caller words the error for its own layer.  Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        # HDF5's default file locking, so that other readers in the same process can open it too
        self.file = h5py.File(self.path, "r")

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
        """Detector region (r0, r1, c0, c1) of the volume (the whole volume when not recorded)."""
        vol = self.volume
        fr = vol.attrs.get("frame")
        if fr is None:
            return (0, int(vol.shape[1]), 0, int(vol.shape[2]))
        return tuple(int(v) for v in fr)  # type: ignore[return-value]

    def complete(self, default: bool = True) -> bool:
        """False when some blocks of the point failed (their pixels are 0)."""
        return bool(self.rec.attrs.get("complete", default))

    def n_pixels(self) -> int:
        """Number of reconstructed pixels."""
        rec = self.rec
        return int(rec.attrs.get("n_pixels", rec["pixels/index"].shape[0]))

    def intensity_vs_depth(self) -> np.ndarray | None:
        """The volume summed over pixels, per depth bin, as stored (float32); None when absent."""
        rec = self.rec
        return rec["intensity_vs_depth"][()] if "intensity_vs_depth" in rec else None

    def pixel_index(self) -> tuple[np.ndarray, np.ndarray]:
        """Detector rows and columns (int64) of the reconstructed pixels."""
        index = np.asarray(self.rec["pixels/index"][()], dtype=np.int64).reshape(-1, 2)
        return index[:, 0], index[:, 1]

    def pixel_fields(self, n: int) -> dict[str, np.ndarray]:
        """The per-pixel fields of the ``n`` reconstructed pixels (NaN for a field the file lacks)."""
        pix = self.rec["pixels"]
        return {k: pix[k][()] if k in pix else np.full(n, np.nan) for k in PIXEL_FIELDS}

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
    except (OSError, KeyError):
        return None


def point_summary(path: str | os.PathLike) -> dict[str, Any]:
    """n_pixels and depth range with signal (um) of an existing point file (used when it is reused)."""
    with PointReader(path) as r:
        return {"file": str(path), "n_pixels": r.n_pixels(),
                "depth_range_um": signal_range(r.rec["depth"][()], r.rec["intensity_vs_depth"][()])}
