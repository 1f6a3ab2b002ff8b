"""34-ID-E geoN geometry files (``geoN_<date>.xml``, written by LaueGo): the detectors' calibrated pose.

Layout (root ``<geoN>``, in the namespace ``http://sector34.xray.aps.anl.gov/34ide/geoN``; any namespace
is accepted)::

    <Sample>  <Origin unit="micron">x y z</Origin>  <R unit="radian">...</R>  </Sample>
    <Detectors Ndetectors="3">
      <Detector N="0">
        <Npixels>2048 2048</Npixels>            Nx Ny, the full un-binned chip
        <size unit="mm">409.6 409.6</size>      sizeX sizeY, outside edges of the chip
        <R unit="radian">rx ry rz</R>           Rodrigues rotation vector
        <P unit="mm">px py pz</P>               translation, applied before the rotation
        <timeMeasured>, <note>, <ID>            ID: the detector's unique name, also in its images
        <m1> <m2> <m3>                          optional directions of detector translators
      </Detector> ...
    </Detectors>
    <Wire> ... </Wire>                           the wire of wire scans

Detectors are numbered by their ``N`` attribute (not necessarily 0, 1, 2) and named by ``<ID>``; the first
``Ndetectors`` of them are in use, as LaueGo reads them.  Units are converted explicitly (:data:`LENGTH_MM`,
:data:`ANGLE_RAD`); an element without a ``unit`` attribute is read in the unit LaueGo writes and assumes
(mm for size and P, radian for R, micron for the origins).  Files written before late 2012 mark comments
``<-- ... -->``, which is not XML; these are read as the comments they are meant to be.

A pixel (px, py) of detector d lies at R(d.R) (xd + P) in the beamline frame (X outboard, Y up, Z
downstream), xd = ((px - (Nx-1)/2) sizeX/Nx, (py - (Ny-1)/2) sizeY/Ny, 0): exactly laueflow's model
(model.md section 2, which takes X, Y, Z as -e3, e2, e1) with columns along x and rows along y, so
:func:`detector_keys` copies the numbers over as they are (see there).
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from ..errors import GeometryFileError

__all__ = ["ANGLE_RAD", "LENGTH_MM", "Conversion", "GeoNDetector", "GeoNFile", "GeoNSample",
           "GeometryFileError", "detector_keys", "read_geon"]

# factor from a unit found in a file to laueflow's unit (mm for lengths, radian for angles)
LENGTH_MM: dict[str, float] = {
    "mm": 1.0, "millimeter": 1.0, "millimeters": 1.0,
    "micron": 1e-3, "microns": 1e-3, "um": 1e-3, "\u00b5m": 1e-3, "\u03bcm": 1e-3, "micrometer": 1e-3,
    "nm": 1e-6, "cm": 10.0, "m": 1e3,
}
ANGLE_RAD: dict[str, float] = {
    "radian": 1.0, "radians": 1.0, "rad": 1.0, "mrad": 1e-3,
    "degree": math.pi / 180, "degrees": math.pi / 180, "deg": math.pi / 180,
}
_TABLES = {"mm": LENGTH_MM, "rad": ANGLE_RAD}


@dataclass(frozen=True)
class Conversion:
    """How one element's numbers became laueflow's: the unit in the file (None: no ``unit`` attribute,
    ``assumed`` taken) and the factor to ``target``."""

    element: str  # e.g. "P", "size", "Sample/Origin"
    unit: str | None  # as written in the file
    assumed: str  # the unit used when the file gives none (LaueGo's)
    target: str  # "mm" or "rad"
    factor: float

    def how(self) -> str:
        """``micron x 0.001 -> mm``, ``radian, as given`` or ``no unit given, mm assumed``."""
        if self.unit is None:
            given = f"no unit given, {self.assumed} assumed"
            return given if self.factor == 1.0 else f"{given}, x {self.factor:g} -> {self.target}"
        if self.factor == 1.0:
            return f"{self.unit}, as given"
        return f"{self.unit} x {self.factor:g} -> {self.target}"

    def describe(self) -> str:
        """One line for people, e.g. ``P: micron x 0.001 -> mm``."""
        return f"{self.element}: {self.how()}"


@dataclass(frozen=True)
class GeoNDetector:
    """One ``<Detector>``, in laueflow's units: size and pos in mm, rot in radian."""

    number: int  # the N attribute
    id: str  # <ID>
    npixels: tuple[int, int]  # (Nx, Ny), full un-binned chip
    size: tuple[float, float]  # (sizeX, sizeY), mm
    rot: tuple[float, float, float]  # R, Rodrigues vector, rad
    pos: tuple[float, float, float]  # P, mm
    conversions: tuple[Conversion, ...]  # of size, R, P
    time_measured: str | None = None
    note: str | None = None
    translators: tuple[tuple[float, float, float], ...] = ()  # m1..m3 in use (non-zero, finite)

    def label(self) -> str:
        return f"N={self.number} (ID '{self.id}')"


@dataclass(frozen=True)
class GeoNSample:
    """``<Sample>``: the sample positioner's origin (mm, and as given) and rotation (rad)."""

    origin: tuple[float, float, float]  # mm
    origin_given: tuple[float, float, float]  # the numbers in the file, in origin_conversion.unit
    origin_conversion: Conversion
    rot: tuple[float, float, float] | None  # rad


@dataclass(frozen=True)
class GeoNFile:
    """A read geoN file: its detectors in use, in file order, and what else laueflow reports."""

    path: Path
    detectors: tuple[GeoNDetector, ...]
    sample: GeoNSample | None = None
    date_written: str | None = None
    file_note: str | None = None
    has_wire: bool = False

    def listing(self) -> str:
        """The detectors, for messages: ``N=0 (ID 'PE1621 723-3335'), N=1 (ID '...')``."""
        return ", ".join(d.label() for d in self.detectors)

    def select(self, which: str | int | None = None) -> GeoNDetector:
        """The detector named ``which``: its ID, else its number N; None picks the only one.

        Several detectors and none asked for, or one not in the file, is a :class:`GeometryFileError`
        naming the detectors the file has.
        """
        if which is None:
            if len(self.detectors) == 1:
                return self.detectors[0]
            raise GeometryFileError(f"{self.path}: holds {len(self.detectors)} detectors: {self.listing()}; "
                                    f"choose one by its ID or number (--detector)")
        text = str(which).strip()
        for d in self.detectors:
            if d.id == text:
                return d
        if re.fullmatch(r"[+-]?\d+", text):
            for d in self.detectors:
                if d.number == int(text):
                    return d
        raise GeometryFileError(f"{self.path}: has no detector with ID or number {text!r}; "
                                f"it has {self.listing()}")


def detector_keys(d: GeoNDetector) -> dict[str, list]:
    """laueflow's ``geo.detector`` keys from a geoN detector.

    shape = Npixels [Nx, Ny] and size = size [sizeX, sizeY] (mm): laueflow's columns run along shape[0]
    and x, its rows along shape[1] and y (geometry.pixel_centres: x = (c - (n0-1)/2) s0/n0 + P[0]),
    which is LaueGo's pixel px along x and py along y.  rot = R (rad) and pos = P (mm) enter the same
    formula q = R(rot) (x, y, pos[2]) in both, so no sign or order changes.  Npixels counts the full
    un-binned chip: the frames must be full-chip, un-binned images for this to hold.
    """
    return {"shape": list(d.npixels), "size": list(d.size), "rot": list(d.rot), "pos": list(d.pos)}


# ----------------------------------------------------------------------------------------------
# Reading


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _children(elem: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in elem if isinstance(c.tag, str) and _local(c.tag) == name]


def _text(elem: ET.Element, name: str) -> str | None:
    found = _children(elem, name)
    if not found or found[0].text is None or not found[0].text.strip():
        return None
    return found[0].text.strip()


class _Reader:
    """Reads the elements of one file, each problem a GeometryFileError naming the file and the element."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, why: str) -> GeometryFileError:
        return GeometryFileError(f"{self.path}: {where}: {why}")

    def element(self, parent: ET.Element, name: str, where: str) -> ET.Element:
        found = _children(parent, name)
        if not found:
            raise self.fail(where, f"<{name}> is missing")
        return found[0]

    def numbers(self, elem: ET.Element, n: int, where: str) -> list[float]:
        words = [w for w in re.split(r"[\s,]+", (elem.text or "").strip()) if w]
        if len(words) != n:
            raise self.fail(where, f"expected {n} numbers, got {' '.join(words) or 'none'!r}")
        try:
            values = [float(w) for w in words]
        except ValueError:
            raise self.fail(where, f"expected {n} numbers, got {' '.join(words)!r}") from None
        if not all(math.isfinite(v) for v in values):
            raise self.fail(where, f"expected finite numbers, got {' '.join(words)!r}")
        return values

    def quantity(self, parent: ET.Element, name: str, n: int, target: str, assumed: str,
                 where: str, label: str) -> tuple[list[float], list[float], Conversion]:
        """``n`` numbers of element ``name`` converted to ``target`` (and as given), with the conversion
        (``label``: the element's name in it)."""
        elem = self.element(parent, name, where)
        here = f"{where}/{name}"
        unit = elem.get("unit")
        table = _TABLES[target]
        key = (assumed if unit is None else unit).strip()
        factor = table.get(key, table.get(key.lower()))
        if factor is None:
            raise self.fail(here, f"unknown unit {unit!r}; known units: {', '.join(table)}")
        given = self.numbers(elem, n, here)
        # 15 significant digits: 409600 micron is 409.6 mm, not 409.59999999999997
        values = given if factor == 1.0 else [float(f"{v * factor:.15g}") for v in given]
        return values, given, Conversion(label, unit, assumed, target, factor)

    def detector(self, elem: ET.Element, index: int) -> GeoNDetector:
        number_text = elem.get("N")
        if number_text is None or not re.fullmatch(r"\s*[+-]?\d+\s*", number_text):
            raise self.fail(f"<Detector> number {index + 1} in <Detectors>",
                            f"needs an integer N attribute, got {number_text!r}")
        number = int(number_text)
        where = f"Detector N={number}"
        det_id = _text(elem, "ID")
        if det_id is None:
            raise self.fail(where, "<ID> is missing or empty")
        npix = self.numbers(self.element(elem, "Npixels", where), 2, f"{where}/Npixels")
        if not all(v.is_integer() and v > 0 for v in npix):
            raise self.fail(f"{where}/Npixels", f"expected two positive whole numbers of pixels, got {npix}")
        size, _, c_size = self.quantity(elem, "size", 2, "mm", "mm", where, "size")
        if not all(v > 0 for v in size):
            raise self.fail(f"{where}/size", f"expected positive sizes, got {size} mm")
        rot, _, c_rot = self.quantity(elem, "R", 3, "rad", "radian", where, "R")
        pos, _, c_pos = self.quantity(elem, "P", 3, "mm", "mm", where, "P")
        translators = []
        for name in ("m1", "m2", "m3"):
            found = _children(elem, name)
            if not found or not (found[0].text or "").strip():
                continue
            try:
                m = self.numbers(found[0], 3, f"{where}/{name}")
            except GeometryFileError:  # LaueGo: a NaN or missing value means the translator is unused
                continue
            if any(m):
                translators.append((m[0], m[1], m[2]))
        return GeoNDetector(
            number=number, id=det_id, npixels=(int(npix[0]), int(npix[1])), size=(size[0], size[1]),
            rot=(rot[0], rot[1], rot[2]), pos=(pos[0], pos[1], pos[2]), conversions=(c_size, c_rot, c_pos),
            time_measured=_text(elem, "timeMeasured"), note=_text(elem, "note"),
            translators=tuple(translators),
        )

    def sample(self, root: ET.Element) -> GeoNSample | None:
        found = _children(root, "Sample")
        if not found or not _children(found[0], "Origin"):
            return None
        origin, given, conv = self.quantity(found[0], "Origin", 3, "mm", "micron", "Sample",
                                            "Sample/Origin")
        rot = None
        if _children(found[0], "R"):
            r, _, _ = self.quantity(found[0], "R", 3, "rad", "radian", "Sample", "Sample/R")
            rot = (r[0], r[1], r[2])
        return GeoNSample(origin=(origin[0], origin[1], origin[2]),
                          origin_given=(given[0], given[1], given[2]), origin_conversion=conv, rot=rot)


def read_geon(path: str | Path) -> GeoNFile:
    """Read a geoN geometry file; every problem is one :class:`GeometryFileError` naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise GeometryFileError(f"{path}: geoN geometry file does not exist") from None
    except OSError as exc:
        raise GeometryFileError(f"{path}: cannot read the geoN file: {exc.strerror or exc}") from None
    data = data.replace(b"<--", b"<!--")  # LaueGo's comments before late 2012 ('<!--' never holds '<--')
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        line, column = exc.position
        why = str(exc).split(":")[0]  # expat's words, without its own position
        raise GeometryFileError(f"{path}: not valid XML: line {line}, column {column + 1}: {why}") from None
    r = _Reader(path)
    if _local(root.tag) != "geoN":
        raise GeometryFileError(f"{path}: the root element is <{_local(root.tag)}>, not <geoN>: "
                                f"not a geoN geometry file")
    detectors_elem = r.element(root, "Detectors", "geoN")
    elems = _children(detectors_elem, "Detector")
    if not elems:
        raise r.fail("Detectors", "holds no <Detector>")
    count = detectors_elem.get("Ndetectors")
    if count is not None:
        if not re.fullmatch(r"\s*\d+\s*", count) or int(count) < 1:
            raise r.fail("Detectors", f"Ndetectors must be a positive whole number, got {count!r}")
        if int(count) > len(elems):
            raise r.fail("Detectors", f"Ndetectors={int(count)} but only {len(elems)} <Detector> elements")
        elems = elems[: int(count)]
    detectors = [r.detector(e, i) for i, e in enumerate(elems)]
    for attr, what in (("number", "number N"), ("id", "ID")):
        seen: dict = {}
        for d in detectors:
            key = getattr(d, attr)
            if key in seen:
                raise r.fail("Detectors", f"two detectors share the {what} {key!r}: {seen[key].label()} and "
                                          f"{d.label()}")
            seen[key] = d
    return GeoNFile(path=path, detectors=tuple(detectors), sample=r.sample(root),
                    date_written=_text(root, "dateWritten"), file_note=_text(root, "fileNote"),
                    has_wire=bool(_children(root, "Wire")))
