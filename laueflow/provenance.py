"""Provenance of a result: what produced it, from what, where and when.

Stored in each point file under ``/entry/provenance`` (a NeXus NXprocess: attributes, a few datasets
and the configuration as an NXnote), so that a result can be traced and a rerun can tell whether an
existing file is still valid (the configuration and input fingerprints; the decoder's tiles,
``recon.tile_pixels``, are part of the configuration, while the cut into tasks is not recorded: results
do not depend on it).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
import shlex
import socket
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

import h5py
import numpy as np

from . import __version__

# attribute names that decide whether a point file can be reused on a rerun
CONFIG_FINGERPRINT = "config_fingerprint"
INPUT_FINGERPRINT = "input_fingerprint"


def now() -> str:
    """The current time, ISO 8601 with the local UTC offset."""
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command line of this process, shell-quoted."""
    return shlex.join(sys.argv if argv is None else argv)


def input_fingerprint(files: Sequence[Mapping[str, Any]]) -> str:
    """One hash over the per-file fingerprints (name, size, sha256 of first and last MiB) of a scan point."""
    rows = [[str(f["name"]), int(f["size"]), str(f["sha256"])] for f in files]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def calibration(record: Mapping[str, Any] | None, focus: Any = None, mask: Any = None) -> str:
    """One line naming where the mask pose came from: the ``calibration`` record of a configuration
    written by ``laueflow calibrate`` (its date, film scans and the fitted values, taken from ``focus``
    and ``mask`` where given), or ``none (nominal pose)``."""
    if not record:
        return "none (nominal pose)"
    scans = ", ".join(f"{s.get('path', '?')} (film at {s.get('film_depth_um', '?')} um)"
                      for s in record.get("scans") or [])
    fitted = []
    for name in record.get("fitted") or []:
        holder = mask if name in ("shift", "thickness") else focus
        value = getattr(holder, name, None) if holder is not None else None
        fitted.append(name if value is None else f"{name}={value:.6g}")
    return (f"{record.get('by', 'laueflow calibrate')} on {record.get('date', '?')} from {scans or '?'}; "
            f"fitted {', '.join(fitted) or '?'}")


def build(*, config_yaml: str, config_fingerprint: str, inputs: Sequence[Mapping[str, Any]],
          start_time: str, end_time: str | None = None, command: str | None = None,
          host: str | None = None, **extra: Any) -> dict[str, Any]:
    """Everything recorded about one result, as a plain dictionary (``extra`` adds scalar attributes)."""
    return {
        "laueflow_version": __version__,
        "python_version": platform.python_version(),
        "parsl_version": metadata.version("parsl"),  # from its metadata: importing Parsl takes seconds
        "command_line": command if command is not None else command_line(),
        "host": host or socket.gethostname(),
        "start_time": start_time,
        "end_time": end_time or now(),
        CONFIG_FINGERPRINT: config_fingerprint,
        INPUT_FINGERPRINT: input_fingerprint(inputs),
        "config": config_yaml,
        "inputs": [dict(name=str(f["name"]), size=int(f["size"]), sha256=str(f["sha256"])) for f in inputs],
        **extra,
    }


def write(group: Any, prov: Mapping[str, Any]) -> None:
    """Write a provenance dictionary into an h5py group, a NeXus NXprocess (``program``, ``version``,
    ``date``): scalars as attributes, the configuration YAML as the NXnote ``configuration``
    (``type`` text/yaml, ``data``) and the input files as datasets ``inputs/{name,size,sha256}``."""
    text = h5py.string_dtype()
    group.attrs["NX_class"] = "NXprocess"
    group.create_dataset("program", data="laueflow", dtype=text)
    group.create_dataset("version", data=str(prov.get("laueflow_version", __version__)), dtype=text)
    if prov.get("end_time"):
        group.create_dataset("date", data=str(prov["end_time"]), dtype=text)
    for key, value in prov.items():
        if key == "config":
            note = group.create_group("configuration")
            note.attrs["NX_class"] = "NXnote"
            note.create_dataset("type", data="text/yaml", dtype=text)
            note.create_dataset("description", data="the configuration the result was computed with",
                                dtype=text)
            note.create_dataset("data", data=value, dtype=text)
        elif key == "inputs":
            inp = group.create_group("inputs")
            for key2 in ("name", "sha256"):
                inp.create_dataset(key2, data=np.array([f[key2] for f in value], dtype=object), dtype=text)
            inp.create_dataset("size", data=np.array([f["size"] for f in value], dtype=np.int64))
            inp.attrs["hashed"] = "sha256 of the first and last MiB of each file"
        elif value is None:
            continue
        elif isinstance(value, list | tuple):
            group.attrs[key] = np.asarray(value)
        else:
            group.attrs[key] = value


def read(group: Any) -> dict[str, Any]:
    """Read back what :func:`write` stored (strings as ``str``)."""
    out: dict[str, Any] = {}
    for key, value in group.attrs.items():
        out[key] = value.decode() if isinstance(value, bytes) else value
    if "configuration" in group:
        out["config"] = group["configuration/data"].asstr()[()]
    if "inputs" in group:
        inp = group["inputs"]
        names, sizes, hashes = inp["name"].asstr()[()], inp["size"][()], inp["sha256"].asstr()[()]
        out["inputs"] = [dict(name=n, size=int(s), sha256=h)
                         for n, s, h in zip(names, sizes, hashes, strict=True)]
    return out
