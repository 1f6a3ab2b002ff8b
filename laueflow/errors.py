"""laueflow's errors: one base class, one subclass per layer.

Every error that a user can cause (a bad configuration, scan, site, point file, export folder,
transfer setting or simulation argument) is a :class:`LaueflowError`; the command line prints its
message as one ``error: ...`` line and exits with status 2.  Anything else is a bug and keeps its traceback.

The layer subclasses also derive from :class:`ValueError` where callers have long caught them as
such (a bad value given by the user).  Each module raises its own layer's class and re-exports it
(``from laueflow.config import ConfigError`` works), but the classes are defined here only.
"""

from __future__ import annotations


class LaueflowError(Exception):
    """Base of every error caused by laueflow's input (exit status 2 on the command line)."""


class ConfigError(LaueflowError, ValueError):
    """A beamline configuration file is invalid (names the key and the file)."""


class ScanError(LaueflowError):
    """A scan folder or stack file cannot be read as the configuration describes it."""


class WatchError(ScanError):
    """A scan folder cannot be watched (e.g. a single stack file)."""


class SiteError(LaueflowError, ValueError):
    """A site cannot be found, loaded or configured."""


class DecodeError(LaueflowError, ValueError):
    """A block's traces cannot be decoded (wrong shape, not finite, the geometry out of reach)."""


class RunError(LaueflowError, ValueError):
    """A run cannot start: bad points, an output folder that cannot be used."""


class RunLocked(RunError):
    """Another run holds the output folder."""


class ResultError(LaueflowError):
    """A run folder or point file cannot be read."""


class ExportError(LaueflowError, ValueError):
    """Per-depth files cannot be written (a folder holding other files, a bad point file)."""


class CalibrationError(LaueflowError, ValueError):
    """Film scans cannot calibrate the mask pose (no film, mismatched scans, film depths off the grid)."""


class CalibrationFailed(CalibrationError):
    """The pose fit ran but failed (no convergence, a bound reached): exit status 1, nothing written."""


class TransferError(LaueflowError, ValueError):
    """Globus Transfer settings or credentials are missing or wrong."""


class TransferAuthError(TransferError):
    """No usable Globus login: the user must log in once."""


class GeometryFileError(LaueflowError):
    """A geometry file of the beamline (geoN XML) cannot be read or lacks what is asked of it."""


class SimulateError(LaueflowError, ValueError):
    """A synthetic scan cannot be written as asked (unknown preset or geometry, a region, frame count,
    film depth or pose error out of range)."""
