"""The run folder: every name a run writes under ``OUT``, in one place.

::

    OUT/point_<k:05d>.h5                     a scan point's result (laueflow.io.pointfile)
    OUT/status.json                          what the run is doing (laueflow.workflow.status)
    OUT/.lock                                held by the run that owns the folder
    OUT/.runinfo/                            Parsl's logs
    OUT/.blocks/config.yaml                  the configuration the tasks read, when it is not on disk
    OUT/.blocks/point_<k:05d>/               a point's block files (laueflow.io.blocks) until it is
                                             stitched, and its staged frames (laueflow.io.staging)
    OUT/.blocks/point_<k:05d>/block_r<r0:05d>_c<c0:05d>.npz
    OUT/.blocks/point_<k:05d>/frames.stage   (and its description frames.stage.json)
    OUT/depths/point_<k:05d>/                per-depth files (laueflow.io.export)
    OUT/lauelab/point_<k:05d>.h5             lauelab point files (laueflow.io.lauelab, on request)

``OUT`` is ``<scan>_recon`` beside the scan unless the command line names another folder
(:func:`default_out_dir`).  The scan folder's own names (``config.yaml``, ``truth.h5``) are here too.

Every file is written under a temporary name ``<name>.tmp-<pid>`` beside its final one and then
renamed (laueflow.io.atomic), so a name without the mark is always a complete file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

POINT_FILE = re.compile(r"point_(\d+)\.h5")
STATUS_FILE = "status.json"
LOCK_FILE = ".lock"
RUNINFO_DIR = ".runinfo"
BLOCKS_DIR = ".blocks"
CONFIG_FILE = "config.yaml"
STAGE_NAME = "frames.stage"
DESCRIPTION_SUFFIX = ".json"  # a staged point's description: <data file name>.json beside it
DEPTHS_DIR = "depths"
LAUELAB_DIR = "lauelab"
TMP_MARK = ".tmp-"
RESULT_SUFFIX = ".h5"  # result files: point files, per-depth files, lauelab point files
RUN_FOLDER_SUFFIX = "_recon"  # the default OUT: <scan>_recon beside the scan

# The scan folder: files laueflow expects beside a scan's frames.  They are named here, beside the run
# folder's names, so that every file name laueflow uses by convention lives in one light module (no
# numpy, h5py or JAX): the CLI, calibration, runs and simulate all import it.  io/scan.py only reads
# the frames, wherever the configuration says they are.
SCAN_CONFIG_FILE = "config.yaml"  # the scan's beamline configuration (run, watch, calibrate, simulate)
TRUTH_FILE = "truth.h5"  # a simulated scan's truth (written and read by laueflow.simulate)


def point_name(point: int) -> str:
    """File name of a scan point's result."""
    return f"point_{point:05d}.h5"


def point_dir_name(point: int) -> str:
    """Folder name of a point's blocks and of its per-depth files."""
    return f"point_{point:05d}"


def block_name(r0: int, c0: int) -> str:
    """File name of the block of the tile whose first row and column are ``r0``, ``c0``."""
    return f"block_r{r0:05d}_c{c0:05d}.npz"


def stage_description(path: str | os.PathLike) -> Path:
    """The JSON description beside a staged point's data file (``frames.stage.json``)."""
    path = Path(path)
    return path.with_name(path.name + DESCRIPTION_SUFFIX)


def default_out_dir(scan_path: str | os.PathLike) -> Path:
    """``<scan>_recon`` beside the scan folder or stack file (never inside the input)."""
    scan_path = Path(scan_path).resolve()
    name = scan_path.stem if scan_path.is_file() else scan_path.name
    return scan_path.parent / f"{name}{RUN_FOLDER_SUFFIX}"


def tmp_name(path: Path) -> Path:
    """The temporary name a file is written under before it is moved into place."""
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


def point_files(out_dir: str | os.PathLike) -> dict[int, Path]:
    """The point files ``point_<k>.h5`` of a folder by point number, in order (files under their
    temporary names are not point files)."""
    found = {}
    for path in Path(out_dir).glob("point_*.h5"):
        m = POINT_FILE.fullmatch(path.name)
        if m and path.is_file():
            found[int(m.group(1))] = path
    return dict(sorted(found.items()))


def point_of(path: str | os.PathLike) -> int | None:
    """The point number in a point file's name, None when it is not named like one."""
    m = POINT_FILE.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


class RunFolder:
    """The paths of one run folder ``OUT``; nothing is created until a writer asks for it."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.root = Path(out_dir)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.root)!r})"

    @property
    def status(self) -> Path:
        """``OUT/status.json``."""
        return self.root / STATUS_FILE

    @property
    def lock(self) -> Path:
        """``OUT/.lock``."""
        return self.root / LOCK_FILE

    @property
    def runinfo(self) -> Path:
        """``OUT/.runinfo``: Parsl's run folder."""
        return self.root / RUNINFO_DIR

    @property
    def blocks_root(self) -> Path:
        """``OUT/.blocks``: every point's blocks and staged frames."""
        return self.root / BLOCKS_DIR

    @property
    def config(self) -> Path:
        """``OUT/.blocks/config.yaml``: the configuration written for the tasks."""
        return self.blocks_root / CONFIG_FILE

    @property
    def depths_root(self) -> Path:
        """``OUT/depths``: the per-depth files of every point."""
        return self.root / DEPTHS_DIR

    @property
    def lauelab_root(self) -> Path:
        """``OUT/lauelab``: the points exported in the lauelab format."""
        return self.root / LAUELAB_DIR

    def point_file(self, point: int) -> Path:
        """``OUT/point_<k:05d>.h5``."""
        return self.root / point_name(point)

    def point_files(self) -> dict[int, Path]:
        """The point files present, by point number."""
        return point_files(self.root)

    def blocks(self, point: int) -> Path:
        """``OUT/.blocks/point_<k:05d>``: a point's block files and staged frames."""
        return self.blocks_root / point_dir_name(point)

    def block_dirs(self) -> Iterator[Path]:
        """The points' block folders present."""
        return (p for p in self.blocks_root.glob("point_*") if p.is_dir())

    def block_file(self, point: int, r0: int, c0: int) -> Path:
        """The block file of point ``point``'s tile starting at row ``r0``, column ``c0``."""
        return self.blocks(point) / block_name(r0, c0)

    def block_files(self, point: int) -> list[Path]:
        """The block files present in a point's block folder, sorted (none under temporary names)."""
        return sorted(self.blocks(point).glob("block_*.npz"))

    def staged(self, point: int) -> Path:
        """``OUT/.blocks/point_<k:05d>/frames.stage``: a point's staged frames."""
        return self.blocks(point) / STAGE_NAME

    def staged_description(self, point: int) -> Path:
        """``OUT/.blocks/point_<k:05d>/frames.stage.json``: the description of a point's staged frames."""
        return stage_description(self.staged(point))

    def depths(self, point: int) -> Path:
        """``OUT/depths/point_<k:05d>``: a point's per-depth files."""
        return self.depths_root / point_dir_name(point)

    def result_files(self) -> list[Path]:
        """The finished result files: the point files first (by point), then the HDF5 files in
        subfolders (per-depth and lauelab files), sorted; never files in hidden folders (``.blocks``,
        ``.runinfo``) or under temporary names."""
        others = sorted(p for p in self.root.rglob(f"*{RESULT_SUFFIX}")
                        if p.parent != self.root and p.is_file() and TMP_MARK not in p.name
                        and not any(part.startswith(".") for part in p.relative_to(self.root).parts))
        return [*self.point_files().values(), *others]

    def temporaries(self) -> Iterator[Path]:
        """Files left under their temporary names in OUT and in the points' block folders."""
        for folder in (self.root, *self.block_dirs()):
            yield from folder.glob(f"*{TMP_MARK}*")
