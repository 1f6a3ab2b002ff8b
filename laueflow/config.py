"""The beamline configuration (YAML sections file / comp / geo / algo, plus laueflow's `recon`).

Existing beamline files load unchanged.  Every key is typed and validated here, once, so the
rest of laueflow can trust what it gets.  Problems raise :class:`ConfigError`, whose message
names the key and the file; unknown or unused keys are collected and reported as a warning.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import os
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from ruamel.yaml import YAML
from ruamel.yaml import YAMLError as RuamelYAMLError
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.representer import RoundTripRepresenter

from .errors import ConfigError  # noqa: F401 (re-exported)
from .io.atomic import atomic_path


class ConfigWarning(UserWarning):
    """Keys that laueflow does not know or does not use."""


# Keys of the reference decoder and of the beamline's compute set-up: accepted, reported as unused.
_UNUSED_SECTIONS = ("comp", "algo")

_REQUIRED = object()

# Keys the beamline's files always carry and for which no default is safe: a wrong value silently
# changes the model (the thickness sets the bar blur, the pose and the detector place every ray).
REQUIRED_KEYS: dict[str, str] = {
    "file.path": "where the frames are",
    "geo.mask.bitsizes": "widths of a 0 bit and a 1 bit, um",
    "geo.mask.thickness": "gold thickness of the mask, um",
    "geo.mask.focus.cenx": "mask centre x, mm",
    "geo.mask.focus.dist": "mask distance from the beam, mm",
    "geo.mask.focus.cenz": "mask centre z, mm",
    "geo.mask.focus.anglex": "mask orientation, degrees",
    "geo.mask.focus.angley": "mask orientation, degrees",
    "geo.mask.focus.anglez": "mask orientation, degrees",
    "geo.scanner.step": "mask step per frame, um",
    "geo.scanner.axis": "scan direction",
    "geo.detector.shape": "detector pixels [n0, n1]",
    "geo.detector.size": "detector size [s0, s1], mm",
    "geo.detector.rot": "detector Rodrigues rotation, rad",
    "geo.detector.pos": "detector position, mm",
    "geo.source.grid": "output depth grid [start, stop, step], mm",
}


@dataclass(frozen=True)
class FileConfig:
    """Where the frames of a scan are and which of them and which pixels to use."""

    path: str
    stacked: bool = True
    ext: str = "h5"
    h5_key: str = "/entry1/data/data"
    range: tuple[int, int, int] = (0, 201, 1)
    threshold: float = 0.0
    frame: tuple[int, int, int, int] = (0, 2048, 0, 2048)
    monitor: bool = True

    @property
    def n_frames(self) -> int:
        """Frames in one scan point."""
        b, e, s = self.range
        return len(range(b, e, s))


@dataclass(frozen=True)
class Focus:
    """Mask centre (mm) and orientation (degrees)."""

    cenx: float = 0.0
    dist: float = 1.0
    cenz: float = 0.0
    anglex: float = 0.0
    angley: float = 0.0
    anglez: float = 0.0


@dataclass(frozen=True)
class MaskConfig:
    """The gold coded aperture.  ``path`` None means a generated binary de Bruijn code B(2, 8).

    ``sha256`` is the hash of the code read from ``path`` (:func:`read_code`), filled in at load: it
    puts the code itself, not only its file name, into the fingerprint and the provenance.  Given in a
    file, it pins the code: a file whose code hashes otherwise is refused.
    """

    path: str | None = None
    reversed: bool = False
    bitsizes: tuple[float, float] = (15.0, 7.5)
    thickness: float = 3.7
    resolution: float = 0.5
    widening: float = 0.0
    pad: float = 150.0
    stretch: float = 1.0
    shift: float = 0.0
    focus: Focus = field(default_factory=Focus)
    sha256: str | None = None


@dataclass(frozen=True)
class ScannerConfig:
    """Mask stepping: ``step`` um per frame along ``R(rot) axis``."""

    step: float = 1.0
    axis: tuple[float, float, float] = (1.0, 0.0, 0.0)
    rot: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class DetectorConfig:
    """Area detector: pixels, physical size (mm), Rodrigues rotation (rad) and position (mm)."""

    shape: tuple[int, int] = (2048, 2048)
    size: tuple[float, float] = (409.6, 409.6)
    rot: tuple[float, float, float] = (-1.20, -1.21, -1.22)
    pos: tuple[float, float, float] = (28.8, 2.7, 513.0)


@dataclass(frozen=True)
class SourceConfig:
    """Incident beam: origin shift along e1 (mm), output depth grid [start, stop, step] (mm), tilt."""

    grid: tuple[float, float, float] = (-0.1, 0.25, 0.001)
    offset: float = 0.0
    beta: float = 0.00342

    @property
    def depths(self) -> Any:
        """Depth bin centres in mm (numpy array)."""

        start, stop, step = self.grid
        n = int(math.floor((stop - start) / step + 1e-9))
        return start + step * np.arange(n)


@dataclass(frozen=True)
class GeoConfig:
    mask: MaskConfig = field(default_factory=MaskConfig)
    scanner: ScannerConfig = field(default_factory=ScannerConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    source: SourceConfig = field(default_factory=SourceConfig)


@dataclass(frozen=True)
class ReconConfig:
    """laueflow's own estimator options (section ``recon``)."""

    energy: float = 20.0  # keV assumed for the gold attenuation when the energy is not estimated
    estimate_energy: bool = False
    energy_range: tuple[float, float] = (5.0, 40.0)  # keV searched when estimating
    sparsity: float = 0.3  # L1 weight, in units of the universal noise threshold
    smoothness: float = 10.0  # first-difference weight, relative to the noise-normalised data
    significance: float = 25.0  # chi-square a support component must explain to be kept
    refit_sparsity: float = 0.25  # L1 weight of the refit on the kept support, relative to sparsity
    iterations: int = 150
    dtype: str = "float32"
    tile_pixels: int = 4096  # the decoder's tile (a model setting): background, dictionary, neighbours
    block_pixels: int = 4096  # pixels per task, in whole tiles (work only: results do not depend on it)
    oversample: int = 1  # code-coordinate samples per depth bin


SYNC_LEVELS = ("exists", "size", "mtime", "checksum")


@dataclass(frozen=True)
class TransferConfig:
    """Globus Transfer of finished results (section ``transfer``, see :mod:`laueflow.transfer`).

    It moves results without changing them, so it is not part of the configuration fingerprint.
    """

    source: str  # collection UUID of the machine that writes the output folder
    destination: str  # collection UUID that receives the results
    destination_path: str  # destination folder: a run's folder OUT arrives as <destination_path>/<OUT name>
    source_root: str = "/"  # local folder that the source collection's "/" corresponds to
    sync_level: str = "checksum"  # when a file already at the destination is sent again
    verify_checksum: bool = True  # compare checksums after each file is copied
    batch_files: int = 16  # submit a task once this many files wait ...
    batch_seconds: float = 30.0  # ... or once the oldest waiting file has waited this long
    retries: int = 3  # resubmissions of a failed or timed-out task (and of a failed submission)
    timeout: float = 3600.0  # seconds a task may take before it is cancelled and resubmitted
    remove_local: bool = False  # delete a local file once its transfer has succeeded
    client_id: str | None = None  # Globus native-app client ID for user logins
    data_access: tuple[str, ...] = ()  # mapped collections that need data_access consent


@dataclass(frozen=True)
class Config:
    """A whole, validated configuration."""

    file: FileConfig
    geo: GeoConfig = field(default_factory=GeoConfig)
    recon: ReconConfig = field(default_factory=ReconConfig)
    comp: dict = field(default_factory=dict)
    algo: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)  # how the mask pose was calibrated (laueflow calibrate)
    source_file: str | None = None
    unknown: tuple[str, ...] = ()
    transfer: TransferConfig | None = None
    defaults: tuple[str, ...] = field(default=(), compare=False)  # keys absent from the file: defaulted

    def to_dict(self) -> dict:
        """The resolved configuration in the beamline schema (what ``config show`` prints)."""
        d = asdict(self)
        f = d["file"]
        f["h5"] = {"key": f.pop("h5_key")}
        if d["geo"]["mask"]["sha256"] is None:  # a generated code, or one not read (check_files=False)
            del d["geo"]["mask"]["sha256"]
        out = {"file": f, "comp": d["comp"], "geo": d["geo"], "algo": d["algo"], "recon": d["recon"]}
        if self.transfer is not None:
            out["transfer"] = d["transfer"]
        if self.calibration:
            out["calibration"] = d["calibration"]
        return _plain(out)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def fingerprint(self) -> str:
        """A hash of everything that changes results (not the input location).

        The mask enters by its code's hash (``geo.mask.sha256``) where the code was read, so that a
        changed code changes the fingerprint and a moved one does not; else by its path.
        """
        d = self.to_dict()
        d["file"] = {k: v for k, v in d["file"].items() if k != "path"}
        if d["geo"]["mask"].get("sha256"):
            del d["geo"]["mask"]["path"]
        d.pop("comp", None)
        d.pop("transfer", None)  # where results are sent does not change them
        d.pop("calibration", None)  # the record of how the pose was found; the pose itself counts
        d["recon"].pop("block_pixels", None)  # how the work is cut into tasks, not what is computed
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def resolve(self, relative: str | None) -> Path | None:
        """A path from the configuration, relative to the configuration file's folder."""
        if relative is None:
            return None
        p = Path(relative).expanduser()
        if not p.is_absolute() and self.source_file:
            p = Path(self.source_file).parent / p
        return p


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------
# Loading and validation


class _Reader:
    """Walks a YAML mapping, converting and checking values, remembering which keys were used."""

    def __init__(self, data: Mapping, source: str):
        self.data = data
        self.source = source
        self.used: set[str] = set()
        self.defaulted: list[str] = []  # keys absent from the file, given laueflow's default

    def fail(self, key: str, why: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {why}")

    def section(self, key: str) -> Mapping:
        value = self._lookup(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(key, f"expected a section (mapping), got {type(value).__name__}")
        return value

    def _lookup(self, key: str, default: Any = None) -> Any:
        node: Any = self.data
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return default
            node = node[part]
        return node

    def get(self, key: str, conv: Callable[[Any, str], Any], default: Any = _REQUIRED) -> Any:
        sentinel = object()
        value = self._lookup(key, sentinel)
        if value is not sentinel:
            self.used.add(key)
        if value is sentinel or value is None:
            if default is _REQUIRED:
                raise self.fail(key, "required key is missing")
            if key not in self.defaulted:
                self.defaulted.append(key)
            return default
        return conv(value, key)

    # converters -------------------------------------------------------------------------------
    def number(self, value: Any, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"expected a number, got {value!r}")
        if not math.isfinite(value):
            raise self.fail(key, f"expected a finite number, got {value!r}")
        return float(value)

    def integer(self, value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
            raise self.fail(key, f"expected an integer, got {value!r}")
        return int(value)

    def boolean(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {value!r}")
        return value

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise self.fail(key, f"expected a string, got {value!r}")
        return str(value)

    def vector(self, n: int, conv: str = "number") -> Callable[[Any, str], tuple]:
        def convert(value: Any, key: str) -> tuple:
            if not isinstance(value, list | tuple) or len(value) != n:
                raise self.fail(key, f"expected a list of {n} values, got {value!r}")
            one = getattr(self, conv)
            return tuple(one(v, f"{key}[{i}]") for i, v in enumerate(value))

        return convert

    def unknown_keys(self) -> list[str]:
        """Dotted keys present in the file that were never read."""
        found: list[str] = []

        def walk(node: Any, prefix: str) -> None:
            if isinstance(node, Mapping):
                for k, v in node.items():
                    key = f"{prefix}.{k}" if prefix else str(k)
                    if key in self.used:
                        continue
                    if isinstance(v, Mapping) and v:
                        walk(v, key)
                    elif isinstance(v, Mapping):
                        continue
                    else:
                        found.append(key)

        walk(self.data, "")
        return found


def _positive(r: _Reader, key: str, value: float, allow_zero: bool = False) -> float:
    if value < 0 or (value == 0 and not allow_zero):
        raise r.fail(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value:g}")
    return value


def from_dict(data: Mapping, source: str = "<configuration>", check_files: bool = True) -> Config:
    """Build a validated :class:`Config` from a parsed YAML mapping."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: expected a YAML mapping with sections file / geo, got {type(data).__name__}"
        )
    r = _Reader(data, source)
    for sec in ("file", "geo", "recon", "comp", "algo", "transfer", "calibration", "file.h5", "geo.mask",
                "geo.mask.focus", "geo.scanner", "geo.detector", "geo.source"):
        r.section(sec)
    _check_required(r)
    num, integer, boolean, string = r.number, r.integer, r.boolean, r.string
    d = FileConfig(path="")

    rng = r.get("file.range", r.vector(3, "integer"), d.range)
    if rng[0] < 0 or rng[2] < 1 or len(range(*rng)) == 0:
        raise r.fail(
            "file.range", f"empty or invalid frame range {list(rng)} (need 0 <= begin < end, step >= 1)"
        )
    frame = r.get("file.frame", r.vector(4, "integer"), d.frame)
    fcfg = FileConfig(
        path=r.get("file.path", string),
        stacked=r.get("file.stacked", boolean, d.stacked),
        ext=r.get("file.ext", string, d.ext).lstrip("."),
        h5_key=r.get("file.h5.key", string, d.h5_key),
        range=rng,
        threshold=_positive(r, "file.threshold", r.get("file.threshold", num, d.threshold), allow_zero=True),
        frame=frame,
        monitor=r.get("file.monitor", boolean, d.monitor),
    )

    dm = MaskConfig()
    focus = Focus(
        **{k: r.get(f"geo.mask.focus.{k}", num) for k in ("cenx", "cenz", "anglex", "angley", "anglez")},
        dist=_positive(r, "geo.mask.focus.dist", r.get("geo.mask.focus.dist", num)),
    )
    bitsizes = r.get("geo.mask.bitsizes", r.vector(2))
    for i, b in enumerate(bitsizes):
        _positive(r, f"geo.mask.bitsizes[{i}]", b)
    mask = MaskConfig(
        path=r.get("geo.mask.path", string, None),
        reversed=r.get("geo.mask.reversed", boolean, dm.reversed),
        bitsizes=bitsizes,
        thickness=_positive(r, "geo.mask.thickness", r.get("geo.mask.thickness", num)),
        resolution=_positive(r, "geo.mask.resolution", r.get("geo.mask.resolution", num, dm.resolution)),
        widening=_positive(
            r, "geo.mask.widening", r.get("geo.mask.widening", num, dm.widening), allow_zero=True
        ),
        pad=_positive(r, "geo.mask.pad", r.get("geo.mask.pad", num, dm.pad), allow_zero=True),
        stretch=_positive(r, "geo.mask.stretch", r.get("geo.mask.stretch", num, dm.stretch)),
        shift=r.get("geo.mask.shift", num, dm.shift),
        focus=focus,
        sha256=r.get("geo.mask.sha256", string, None),
    )
    ds = ScannerConfig()
    step = r.get("geo.scanner.step", num)
    if step <= 0:
        raise r.fail("geo.scanner.step", f"the step per frame must be > 0 um, got {step:g}")
    axis = r.get("geo.scanner.axis", r.vector(3))
    if math.hypot(*axis) < 1e-9:
        raise r.fail("geo.scanner.axis", "the scan direction must not be the zero vector")
    scanner = ScannerConfig(step=step, axis=axis, rot=r.get("geo.scanner.rot", r.vector(3), ds.rot))

    shape = r.get("geo.detector.shape", r.vector(2, "integer"))
    for i, n in enumerate(shape):
        if n <= 0:
            raise r.fail(f"geo.detector.shape[{i}]", f"must be > 0 pixels, got {n}")
    size = r.get("geo.detector.size", r.vector(2))
    for i, s in enumerate(size):
        _positive(r, f"geo.detector.size[{i}]", s)
    detector = DetectorConfig(
        shape=shape,
        size=size,
        rot=r.get("geo.detector.rot", r.vector(3)),
        pos=r.get("geo.detector.pos", r.vector(3)),
    )

    grid = r.get("geo.source.grid", r.vector(3))
    if grid[2] <= 0 or grid[1] <= grid[0] or (grid[1] - grid[0]) / grid[2] < 1:
        raise r.fail(
            "geo.source.grid", f"need start < stop and 0 < step <= stop - start (mm), got {list(grid)}"
        )
    if (grid[1] - grid[0]) / grid[2] > 20000:
        raise r.fail(
            "geo.source.grid", f"{(grid[1] - grid[0]) / grid[2]:.0f} depth bins is too many (max 20000)"
        )
    beam = SourceConfig(
        grid=grid,
        offset=r.get("geo.source.offset", num, 0.0),
        beta=r.get("geo.source.beta", num, SourceConfig.beta),
    )

    # frame within the detector: columns run along shape[0], rows along shape[1] (model.md section 2)
    r0, r1, c0, c1 = frame
    if not (0 <= r0 < r1 <= shape[1] and 0 <= c0 < c1 <= shape[0]):
        raise r.fail(
            "file.frame", f"region {list(frame)} is empty or outside the {shape[1]} x {shape[0]} detector"
        )

    dr = ReconConfig()
    e_range = r.get("recon.energy_range", r.vector(2), dr.energy_range)
    if not 1.0 <= e_range[0] < e_range[1] <= 200.0:
        raise r.fail("recon.energy_range", f"need 1 <= low < high <= 200 keV, got {list(e_range)}")
    energy = r.get("recon.energy", num, dr.energy)
    if not 1.0 <= energy <= 200.0:
        raise r.fail("recon.energy", f"the assumed energy must be within 1-200 keV, got {energy:g}")
    dtype = r.get("recon.dtype", string, dr.dtype)
    if dtype not in ("float32", "float64"):
        raise r.fail("recon.dtype", f"must be float32 or float64, got {dtype!r}")
    iterations = r.get("recon.iterations", integer, dr.iterations)
    tile = r.get("recon.tile_pixels", integer, dr.tile_pixels)
    block = r.get("recon.block_pixels", integer, dr.block_pixels)
    oversample = r.get("recon.oversample", integer, dr.oversample)
    for key, v in (
        ("recon.iterations", iterations),
        ("recon.tile_pixels", tile),
        ("recon.block_pixels", block),
        ("recon.oversample", oversample),
    ):
        if v < 1:
            raise r.fail(key, f"must be >= 1, got {v}")
    recon = ReconConfig(
        energy=energy,
        estimate_energy=r.get("recon.estimate_energy", boolean, dr.estimate_energy),
        energy_range=e_range,
        sparsity=_positive(r, "recon.sparsity", r.get("recon.sparsity", num, dr.sparsity), allow_zero=True),
        smoothness=_positive(
            r, "recon.smoothness", r.get("recon.smoothness", num, dr.smoothness), allow_zero=True
        ),
        significance=_positive(
            r, "recon.significance", r.get("recon.significance", num, dr.significance), allow_zero=True
        ),
        refit_sparsity=_positive(
            r, "recon.refit_sparsity", r.get("recon.refit_sparsity", num, dr.refit_sparsity), allow_zero=True
        ),
        iterations=iterations,
        dtype=dtype,
        tile_pixels=tile,
        block_pixels=block,
        oversample=oversample,
    )

    transfer = _transfer(r) if r.section("transfer") else None

    comp = copy.deepcopy(dict(r.section("comp")))
    calibration = copy.deepcopy(dict(r.section("calibration")))
    algo = copy.deepcopy(dict(r.section("algo")))
    unread = [k for k in r.unknown_keys() if k.split(".")[0] != "calibration"]  # a record, kept as it is
    unknown = [k for k in unread if k.split(".")[0] not in _UNUSED_SECTIONS]
    unused = [k for k in unread if k.split(".")[0] in _UNUSED_SECTIONS]

    if mask.sha256 is not None and mask.path is None:
        raise r.fail("geo.mask.sha256", "names the hash of a code file, but geo.mask.path is not set; "
                     "remove geo.mask.sha256 or give the file")
    cfg = Config(
        file=fcfg,
        geo=GeoConfig(mask=mask, scanner=scanner, detector=detector, source=beam),
        recon=recon,
        comp=comp,
        algo=algo,
        calibration=calibration,
        source_file=None if source.startswith("<") else os.path.abspath(source),
        unknown=tuple(unknown + unused),
        transfer=transfer,
        defaults=tuple(k for k in r.defaulted if k != "geo.mask.sha256"),  # absent: computed, not defaulted
    )
    if check_files and mask.path is not None:
        cfg = _with_code_hash(r, cfg)
    if unknown or unused:
        parts = []
        if unknown:
            parts.append("unknown keys (ignored): " + ", ".join(unknown))
        if unused:
            parts.append(
                "keys not used by laueflow (reference-decoder and compute options): " + ", ".join(unused)
            )
        warnings.warn(f"{source}: " + "; ".join(parts), ConfigWarning, stacklevel=2)
    return cfg


def _check_required(r: _Reader) -> None:
    """Stop on the first read when keys without a safe default are absent, naming all of them."""
    missing = [k for k in REQUIRED_KEYS if r._lookup(k) is None]
    if len(missing) == 1:
        key = missing[0]
        raise r.fail(key, f"required key is missing ({REQUIRED_KEYS[key]}); add it to the file, "
                          f"laueflow has no safe default for it")
    if missing:
        listed = ", ".join(f"{k} ({REQUIRED_KEYS[k]})" for k in missing)
        raise ConfigError(f"{r.source}: required keys are missing: {listed}; add them to the file, "
                          f"laueflow has no safe default for them")


def read_code(path: str | Path) -> np.ndarray:
    """Read a mask code from a .npy file: a non-empty 1-D array of 0 and 1 (returned as int8).

    Anything else (not a NumPy file, an archive, several dimensions, other values) is refused with
    :class:`ConfigError` naming the file, never flattened or rounded.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"mask code file {path} does not exist")
    try:
        code = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: not a NumPy .npy file holding the mask code ({why}); "
                          f"save the 0/1 code with numpy.save") from None
    if not isinstance(code, np.ndarray):  # a .npz archive
        code.close()
        raise ConfigError(f"{path}: is a NumPy archive (.npz), not a .npy array; save the 0/1 code "
                          f"with numpy.save")
    if code.ndim != 1:
        raise ConfigError(f"{path}: the mask code has shape {list(code.shape)}; it must be 1-D "
                          f"(one 0 or 1 per bit along the mask)")
    if code.size == 0:
        raise ConfigError(f"{path}: the mask code is empty")
    if not any(np.issubdtype(code.dtype, t) for t in (np.bool_, np.integer, np.floating)):
        raise ConfigError(f"{path}: the mask code has dtype {code.dtype}; it must hold the numbers 0 and 1")
    bad = np.flatnonzero((code != 0) & (code != 1))
    if bad.size:
        raise ConfigError(f"{path}: the mask code must hold only 0 and 1, but bit {bad[0]} is "
                          f"{code[bad[0]].item()!r} ({bad.size} of {code.size} bits are neither)")
    return code.astype(np.int8)


def code_sha256(code: np.ndarray) -> str:
    """The hash of a 0/1 code (its bits as int8), independent of the dtype it was saved with."""
    return hashlib.sha256(np.ascontiguousarray(code, dtype=np.int8).tobytes()).hexdigest()


def _with_code_hash(r: _Reader, cfg: Config) -> Config:
    """``cfg`` with the hash of its mask code filled in; the code is checked, and checked against a
    hash the file already gives."""
    mask = cfg.geo.mask
    path = cfg.resolve(mask.path)
    try:
        digest = code_sha256(read_code(path))
    except ConfigError as exc:
        raise r.fail("geo.mask.path", str(exc)) from None
    if mask.sha256 is not None and mask.sha256 != digest:
        raise r.fail("geo.mask.sha256", f"the code in {path} has sha256 {digest}, not {mask.sha256}: the "
                     f"mask file changed since this configuration was written; restore it, or remove "
                     f"geo.mask.sha256 to use the code as it is now")
    return replace(cfg, geo=replace(cfg.geo, mask=replace(mask, sha256=digest)))


def _uuid(r: _Reader, value: Any, key: str, what: str = "collection") -> str:
    try:
        return str(uuid.UUID(r.string(value, key)))
    except ValueError:
        raise r.fail(key, f"expected a Globus {what} UUID, got {value!r}") from None


def _transfer(r: _Reader) -> TransferConfig:
    """The ``transfer`` section (read only when present)."""
    d = TransferConfig(source="", destination="", destination_path="")

    def collection(value: Any, key: str) -> str:
        return _uuid(r, value, key)

    def client(value: Any, key: str) -> str:
        return _uuid(r, value, key, "client")

    def collections(value: Any, key: str) -> tuple[str, ...]:
        items = value if isinstance(value, list | tuple) else [value]
        return tuple(_uuid(r, v, f"{key}[{i}]") for i, v in enumerate(items))

    dest_path = r.get("transfer.destination_path", r.string)
    if not dest_path.startswith(("/", "~")):
        raise r.fail("transfer.destination_path", f"must be an absolute path on the destination collection "
                     f"(starting with / or ~), got {dest_path!r}")
    root = r.get("transfer.source_root", r.string, d.source_root)
    if not Path(root).expanduser().is_absolute():
        raise r.fail("transfer.source_root", f"must be an absolute local path, got {root!r}")
    sync = r.get("transfer.sync_level", r.string, d.sync_level)
    if sync not in SYNC_LEVELS:
        raise r.fail("transfer.sync_level", f"must be one of {', '.join(SYNC_LEVELS)}, got {sync!r}")
    settings = TransferConfig(
        source=r.get("transfer.source", collection),
        destination=r.get("transfer.destination", collection),
        destination_path=dest_path,
        source_root=root,
        sync_level=sync,
        verify_checksum=r.get("transfer.verify_checksum", r.boolean, d.verify_checksum),
        batch_files=r.get("transfer.batch_files", r.integer, d.batch_files),
        batch_seconds=_positive(r, "transfer.batch_seconds",
                                r.get("transfer.batch_seconds", r.number, d.batch_seconds), allow_zero=True),
        retries=r.get("transfer.retries", r.integer, d.retries),
        timeout=_positive(r, "transfer.timeout", r.get("transfer.timeout", r.number, d.timeout)),
        remove_local=r.get("transfer.remove_local", r.boolean, d.remove_local),
        client_id=r.get("transfer.client_id", client, None),
        data_access=r.get("transfer.data_access", collections, d.data_access),
    )
    if settings.batch_files < 1:
        raise r.fail("transfer.batch_files", f"must be >= 1, got {settings.batch_files}")
    if settings.retries < 0:
        raise r.fail("transfer.retries", f"must be >= 0, got {settings.retries}")
    return settings


def transfer_settings(section: Mapping, source: str = "<transfer settings>") -> TransferConfig:
    """Validate a ``transfer`` section on its own (settings given on the command line, say)."""
    r = _Reader({"transfer": section}, source)
    settings = _transfer(r)
    unknown = r.unknown_keys()
    if unknown:
        raise ConfigError(f"{source}: unknown transfer settings: {', '.join(unknown)}")
    return settings


def load(path: str | Path, check_files: bool = True) -> Config:
    """Load and validate a beamline YAML configuration file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: configuration file does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc}") from None
    return from_dict(data or {}, source=str(path), check_files=check_files)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """The parser's complaint on one line, with the line and column where it found the problem."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    words = [getattr(exc, "context", None), getattr(exc, "problem", None)]
    what = ", ".join(w for w in words if w) or " ".join(str(exc).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}" if mark is not None else what


def dump(cfg: Config, path: str | Path) -> None:
    """Write a configuration in the beamline schema."""
    Path(path).write_text(cfg.to_yaml())


# ----------------------------------------------------------------------------------------------
# Writing configurations: YAML that laueflow's own loader reads back as the values written

# keys holding paths relative to the configuration file's folder
PATH_KEYS = ("file.path", "geo.mask.path")


def _represent_float(representer: RoundTripRepresenter, value: float) -> Any:
    """A float PyYAML reads back as the same float: always with a point or as .inf / .nan (PyYAML reads
    1e-05 as a string, 1.0e-05 as a number)."""
    if math.isnan(value):
        text = ".nan"
    elif math.isinf(value):
        text = ".inf" if value > 0 else "-.inf"
    else:
        text = repr(float(value))
        if "." not in text:  # 1e-05 -> 1.0e-05; repr puts a point in every other finite float
            mantissa, _, exponent = text.partition("e")
            text = f"{mantissa}.0e{exponent}"
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


class _Representer(RoundTripRepresenter):
    """ruamel's round-trip representer with :func:`_represent_float` for new floats (values read from a
    file keep the text they had there)."""


_Representer.add_representer(float, _represent_float)


def yaml_writer() -> YAML:
    """ruamel's round-trip YAML for the configurations laueflow writes: comments and quotes of a file
    read with it are kept, new floats are written so that :func:`load` reads them back as numbers,
    lines run up to 120 characters."""
    writer = YAML()
    writer.Representer = _Representer
    writer.preserve_quotes = True
    writer.width = 120
    return writer


def yaml_text(writer: YAML, data: Any, header: Sequence[str] = ()) -> str:
    """``data`` dumped by ``writer`` (a :func:`yaml_writer`) as a string, after the ``header`` lines as
    comments."""
    buf = io.StringIO()
    writer.dump(data, buf)
    return "".join(f"# {line}\n" for line in header) + buf.getvalue()


def commented(obj: Any) -> Any:
    """Plain values as ruamel's nodes: mappings as CommentedMap, lists and tuples as CommentedSeq (of
    scalars in flow style, [a, b]), NumPy scalars as Python ones."""
    if isinstance(obj, Mapping):
        return CommentedMap((k, commented(v)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        seq = CommentedSeq(commented(v) for v in obj)
        if all(not isinstance(v, Mapping | list | tuple) for v in obj):
            seq.fa.set_flow_style()
        return seq
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _read_round_trip(writer: YAML, base: Path) -> CommentedMap:
    if not base.is_file():
        raise ConfigError(f"{base}: configuration file does not exist")
    try:
        data = writer.load(base.read_text())
    except (RuamelYAMLError, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{base}: cannot read the configuration: {' '.join(str(exc).split())}") from None
    if not isinstance(data, CommentedMap):
        raise ConfigError(f"{base}: expected a YAML mapping with sections file / geo")
    return data


def _at(data: CommentedMap, dotted: str) -> Any:
    """The value at ``dotted`` in ``data``, None where a key on the way is absent or not a mapping."""
    node: Any = data
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, CommentedMap) else None
    return node


def _section(base: Path, data: CommentedMap, dotted: str) -> CommentedMap:
    """The mapping at ``dotted`` in ``data``, created (empty) where it is absent or null."""
    node = data
    keys: list[str] = []
    for part in dotted.split(".") if dotted else ():
        keys.append(part)
        if node.get(part) is None:
            node[part] = CommentedMap()
        node = node[part]
        if not isinstance(node, CommentedMap):
            raise ConfigError(f"{base}: {'.'.join(keys)}: expected a section (mapping)")
    return node


def derived_yaml(base: str | Path, updates: Mapping[str, Any], *, out: str | Path | None = None,
                 header: Sequence[str] = (), notes: Mapping[str, str] | None = None,
                 what: str | None = None) -> tuple[str, Config]:
    """The configuration file ``base`` with ``updates`` applied, as YAML text, and the configuration it
    holds, checked as ``laueflow config check`` checks a file.

    ``updates`` maps dotted keys (``geo.detector.pos``) to values; sections on the way are created where
    absent, and every other key, value and comment of ``base`` is kept (ruamel.yaml round trip).
    Relative paths of ``base`` (:data:`PATH_KEYS`) are made absolute unless ``out``, where the text is
    meant to go, lies in the folder of ``base``.  ``header`` lines come first, as comments; ``notes``
    adds an end-of-line comment to each dotted key it names that has none.  A result that is not a
    valid configuration raises :class:`ConfigError` saying ``what`` it is (default: ``base`` with the
    keys updated).  Warnings of the result (unknown keys) are issued as :class:`ConfigWarning`.
    """
    base = Path(base)
    writer = yaml_writer()
    data = _read_round_trip(writer, base)
    if out is None or Path(out).resolve().parent != base.resolve().parent:  # relative paths would move
        for dotted in PATH_KEYS:
            value = _at(data, dotted)
            if isinstance(value, str) and not Path(value).expanduser().is_absolute():
                parent, _, leaf = dotted.rpartition(".")
                _at(data, parent)[leaf] = str((base.resolve().parent / value).resolve())
    for dotted, value in updates.items():
        parent, _, leaf = dotted.rpartition(".")
        _section(base, data, parent)[leaf] = commented(value)
    for dotted, comment in (notes or {}).items():
        parent, _, leaf = dotted.rpartition(".")
        node = _at(data, parent) if parent else data
        if isinstance(node, CommentedMap) and leaf in node and not node.ca.items.get(leaf):
            node.yaml_add_eol_comment(comment, leaf)
    text = yaml_text(writer, data, header)
    what = what or f"{base} with {', '.join(updates)}"
    try:
        cfg = from_dict(yaml.safe_load(text), source=str(base))
    except (ConfigError, yaml.YAMLError) as exc:
        raise ConfigError(f"{what} is not a valid configuration: {exc}") from None
    if out is not None:
        cfg = replace(cfg, source_file=os.path.abspath(out))
    return text, cfg


def write_derived(base: str | Path, out: str | Path, updates: Mapping[str, Any], *, force: bool = False,
                  header: Sequence[str] = (), notes: Mapping[str, str] | None = None,
                  what: str | None = None) -> Config:
    """Write ``out``: the configuration file ``base`` with ``updates`` (see :func:`derived_yaml`), and
    return the configuration written.

    Nothing is written unless the result is valid; ``out`` appears whole or not at all, never is
    ``base`` itself, and an existing ``out`` is replaced only with ``force``.  ``base`` is not touched.
    """
    base, out = Path(base), Path(out)
    if out.exists() and out.resolve() == base.resolve():
        raise ConfigError(f"{out}: is the configuration it would be derived from; write to another file")
    if out.exists() and not force:
        raise ConfigError(f"{out}: exists; overwriting it needs force")
    text, cfg = derived_yaml(base, updates, out=out, header=header, notes=notes, what=what)
    write_yaml(out, text)
    return cfg


def write_yaml(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (:func:`laueflow.io.atomic.atomic_path`); an OS
    error is a :class:`ConfigError` saying why."""
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None


def write_calibrated(nominal: str | Path, out: str | Path, values: Mapping[str, float],
                     record: Mapping, *, force: bool = False) -> None:
    """Write ``out``: the nominal file with the calibrated pose and a ``calibration`` record.

    ``values`` are geo.mask.focus keys (and ``shift``, ``thickness`` of geo.mask); the rest is
    :func:`write_derived`: comments kept, relative paths absolute when ``out`` lies in another folder,
    validated before it is written, written whole or not at all, the nominal file never touched.  The
    nominal file's own warnings are not repeated.
    """
    updates: dict[str, Any] = {
        f"geo.mask.{k}" if k in ("shift", "thickness") else f"geo.mask.focus.{k}": float(v)
        for k, v in values.items()
    }
    updates["calibration"] = dict(record)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        write_derived(nominal, out, updates, force=force, what=f"{nominal} with the calibrated pose")
