"""Results on disk: per-block intermediate files and the per-point HDF5 file, both written atomically.

Atomic means: write ``<name>.tmp-<pid>`` in the same folder, flush, then ``os.replace`` it onto the
final name.  A reader (or a rerun) therefore sees either no file or a complete one, never a
half-written one, even when a run is killed.

Point file layout (``point_<k:05d>.h5``)::

    /entry/reconstruction/depth               (J,)  depth bin centres, um
    /entry/reconstruction/volume              (J, rows, cols) float32 over file.frame, attr frame
    /entry/reconstruction/intensity_vs_depth  (J,)  volume summed over pixels
    /entry/reconstruction/pixels/index        (P, 2) detector row, col of reconstructed pixels
    /entry/reconstruction/pixels/{background, residual, quality, energy, energy_sigma}  (P,)
    /entry/provenance                          see laueflow.provenance
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .. import provenance as prov

PIXEL_FIELDS = ("background", "residual", "quality", "energy", "energy_sigma")
PIXEL_DTYPES = {"background": np.float32, "residual": np.float32, "quality": np.uint8,
                "energy": np.float32, "energy_sigma": np.float32}
# 2: profiles stored for the pixels with signal only ("lit": their rows in rows/cols); most are zero
BLOCK_FORMAT = 2


def point_name(point: int) -> str:
    """File name of a scan point's result."""
    return f"point_{point:05d}.h5"


POINT_FILE = re.compile(r"point_(\d+)\.h5")


def point_files(out_dir: str | os.PathLike) -> dict[int, Path]:
    """The point files ``point_<k>.h5`` of a run folder by point number, in order (files under their
    temporary names are not point files)."""
    found = {}
    for path in Path(out_dir).glob("point_*.h5"):
        m = POINT_FILE.fullmatch(path.name)
        if m and path.is_file():
            found[int(m.group(1))] = path
    return dict(sorted(found.items()))


TMP_MARK = ".tmp-"


def tmp_name(path: Path) -> Path:
    """The temporary name a file is written under before it is moved into place."""
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


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


# ----------------------------------------------------------------------------------------------
# Block files: one decoded tile of one point, the unit that stitching and resuming work with


@dataclass
class BlockResult:
    """What a block file holds: the decoded pixels of one tile (possibly none) and why, if skipped."""

    point: int
    tile: tuple[int, int, int, int]
    config_fingerprint: str
    skipped: str  # "" when decoded
    rows: np.ndarray
    cols: np.ndarray
    profiles: np.ndarray
    fields: dict[str, np.ndarray]
    host: str = ""
    seconds: float = 0.0

    @property
    def n_pixels(self) -> int:
        return int(self.rows.size)


def write_block(path: str | os.PathLike, *, point: int, tile: Sequence[int], config_fingerprint: str,
                n_depths: int, decoded: Any = None, skipped: str = "", host: str = "",
                seconds: float = 0.0) -> None:
    """Write one block result (``decoded`` has rows, cols, profiles and the per-pixel fields) atomically."""
    if decoded is None:
        arrays: dict[str, np.ndarray] = {
            "rows": np.zeros(0, np.int32), "cols": np.zeros(0, np.int32), "lit": np.zeros(0, np.int32),
            "profiles": np.zeros((0, n_depths), np.float32),
            **{k: np.zeros(0, PIXEL_DTYPES[k]) for k in PIXEL_FIELDS}}
    else:
        profiles = np.asarray(decoded.profiles, np.float32).reshape(-1, n_depths)
        lit = np.flatnonzero(profiles.any(axis=1)).astype(np.int32)
        arrays = {"rows": np.asarray(decoded.rows, np.int32), "cols": np.asarray(decoded.cols, np.int32),
                  "lit": lit, "profiles": profiles[lit],
                  **{k: np.asarray(getattr(decoded, k), PIXEL_DTYPES[k]) for k in PIXEL_FIELDS}}
    meta = {"format": np.array(BLOCK_FORMAT), "point": np.array(point), "tile": np.asarray(tile, np.int64),
            "config_fingerprint": np.array(config_fingerprint), "skipped": np.array(skipped),
            "host": np.array(host), "seconds": np.array(seconds)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays, **meta)
        fh.flush()


def _meta(z: Any) -> dict[str, Any]:
    return {"point": int(z["point"]), "tile": tuple(int(v) for v in z["tile"]),
            "config_fingerprint": str(z["config_fingerprint"]), "skipped": str(z["skipped"]),
            "host": str(z["host"]), "seconds": float(z["seconds"])}


def read_block_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """The small fields of a block file (point, tile, fingerprint, skipped, n_pixels); None if unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["format"]) != BLOCK_FORMAT:
                return None
            return {**_meta(z), "n_pixels": int(z["rows"].size)}
    except (OSError, ValueError, KeyError, EOFError):
        return None


def read_block(path: str | os.PathLike) -> BlockResult:
    """Load a block file completely (profiles of every decoded pixel, zeros where there is no signal)."""
    with np.load(path, allow_pickle=False) as z:
        rows, lit, stored = z["rows"], z["lit"], z["profiles"]
        profiles = np.zeros((rows.size, stored.shape[1]), np.float32)
        profiles[lit] = stored
        return BlockResult(**_meta(z), rows=rows, cols=z["cols"], profiles=profiles,
                           fields={k: z[k] for k in PIXEL_FIELDS})


# ----------------------------------------------------------------------------------------------
# Point files


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


def write_point(path: str | os.PathLike, block_files: Sequence[str | os.PathLike], *,
                frame: Sequence[int], depths_mm: Sequence[float], provenance: Mapping[str, Any],
                complete: bool = True, compression: str = "gzip") -> dict[str, Any]:
    """Stitch block files into one point file, atomically, holding one block in memory at a time.

    ``frame`` = [r0, r1, c0, c1] is the detector region of the volume; pixels outside every block
    stay 0.  ``complete`` False marks a point some of whose blocks failed (a rerun redoes it).
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
    rng = signal_range(depth_um, total)
    return {"file": str(path), "n_pixels": n_pixels, "depth_range_um": rng, "complete": complete}


def read_provenance(path: str | os.PathLike) -> dict[str, Any] | None:
    """The provenance of an existing point file plus its ``complete`` flag; None if the file is unusable."""
    try:
        with h5py.File(path, "r") as f:
            out = prov.read(f["entry/provenance"])
            out["complete"] = bool(f["entry/reconstruction"].attrs.get("complete", False))
            return out
    except (OSError, KeyError):
        return None


def point_summary(path: str | os.PathLike) -> dict[str, Any]:
    """n_pixels and depth range with signal (um) of an existing point file (used when it is reused)."""
    with h5py.File(path, "r") as f:
        rec = f["entry/reconstruction"]
        return {"file": str(path), "n_pixels": int(rec.attrs.get("n_pixels", rec["pixels/index"].shape[0])),
                "depth_range_um": signal_range(rec["depth"][()], rec["intensity_vs_depth"][()])}
