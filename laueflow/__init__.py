"""laueflow: depth-resolved reconstruction of coded-aperture Laue micro-diffraction scans."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("laueflow")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.1.0+source"

__all__ = ["__version__"]
