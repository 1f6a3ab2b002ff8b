"""laueflow: depth-resolved reconstruction of coded-aperture Laue micro-diffraction scans."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("laueflow")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.1.0+source"

__all__ = ["__version__", "open_run"]


def __getattr__(name: str) -> object:
    """``laueflow.open_run`` without importing h5py and numpy on ``import laueflow``."""
    if name == "open_run":
        from .runs import open_run

        return open_run
    raise AttributeError(f"module 'laueflow' has no attribute {name!r}")
