"""Sites: where a reconstruction runs.

A site is a Python module defining ``config(workers, run_dir, **options)`` that returns a
``parsl.Config`` with executors labelled ``decode`` (block tasks) and ``stitch`` (reading each point's
frames once, writing the results).

The named sites (``local``, ``threads``, ``polaris``, ``slurm``, ``in-job``, ``globus-compute``) are
modules of this package, shipped with it; their shared option handling and assembly is
:mod:`laueflow.sites.base`.  Any other file can be given by path (``--site my/site.py``; see
``configs/README.md``).  This module lists, finds and loads sites without importing Parsl, so that
``laueflow sites`` starts fast.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import SiteError  # noqa: F401 (re-exported)

LABELS = ("decode", "stitch")

PACKAGE_DIR = Path(__file__).resolve().parent
# Globus Compute endpoint templates shipped with the package (package data): one folder per machine
ENDPOINT_TEMPLATES = PACKAGE_DIR / "endpoints"
# modules of this package that are not sites
_NOT_SITES = frozenset({"base"})
# the shared helpers, importable from here as before they moved to base (which imports Parsl): see __getattr__
_BASE_NAMES = frozenset({"COMMON_OPTIONS", "FAILED_BLOCKS_LIMIT", "assemble", "option_env_var",
                         "resolve_options", "this_environment", "workers_config"})


def __getattr__(name: str) -> Any:
    """``from laueflow.sites import assemble`` (and the other shared helpers) still works for site files,
    without making every import of this module pay for Parsl."""
    if name in _BASE_NAMES:
        return getattr(importlib.import_module(".base", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def sites_dir() -> Path:
    """The folder of named sites: ``$LAUEFLOW_SITES`` if set, else this package's folder."""
    env = os.environ.get("LAUEFLOW_SITES")
    if env:
        return Path(env)
    return PACKAGE_DIR


def _summary(path: Path) -> str:
    """First line of the module docstring, read without importing the module."""
    try:
        doc = ast.get_docstring(ast.parse(path.read_text()))
    except (OSError, SyntaxError):
        return ""
    return doc.strip().splitlines()[0] if doc else ""


def _is_site(path: Path) -> bool:
    return path.is_file() and not path.name.startswith("_") and not (
        path.parent.resolve() == PACKAGE_DIR and path.stem in _NOT_SITES)


def list_sites() -> list[tuple[str, str]]:
    """(name, one-line description) of every named site."""
    folder = sites_dir()
    if not folder.is_dir():
        return []
    # A file name's underscores read as dashes: in_job.py is the site "in-job".
    return [(p.stem.replace("_", "-"), _summary(p)) for p in sorted(folder.glob("*.py")) if _is_site(p)]


def find_site(site: str | os.PathLike) -> Path:
    """The file of a site given by name (``local``) or by path (``my/site.py``)."""
    text = str(site)
    path = Path(text).expanduser()
    if text.endswith(".py") or os.sep in text or path.is_file():
        if not path.is_file():
            raise SiteError(f"site file {path} does not exist")
        return path.resolve()
    named = sites_dir() / f"{text}.py"
    if not _is_site(named):
        named = sites_dir() / f"{text.replace('-', '_')}.py"
    if not _is_site(named):
        names = ", ".join(n for n, _ in list_sites()) or "none"
        raise SiteError(f"unknown site {text!r} (known: {names}; or give a path to a site file)")
    return named


def _import(path: Path) -> ModuleType:
    """A named site as the package module it is; any other file under its own module name, so that
    site files never shadow each other."""
    if path.resolve().parent == PACKAGE_DIR:
        return importlib.import_module(f"{__name__}.{path.stem}")
    tag = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    spec = importlib.util.spec_from_file_location(f"laueflow_site_{path.stem}_{tag}", path)
    if spec is None or spec.loader is None:
        raise SiteError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_site(site: str | os.PathLike) -> ModuleType:
    """Import a site's module."""
    path = find_site(site)
    try:
        module = _import(path)
    except SiteError:
        raise
    except Exception as exc:  # a broken site file: report it as such, whatever it raised
        raise SiteError(f"{path}: failed to import: {type(exc).__name__}: {exc}") from exc
    if not callable(getattr(module, "config", None)):
        raise SiteError(f"{path}: a site must define config(workers=None, run_dir='runinfo', **options)")
    return module


def site_config(site: str | os.PathLike, workers: int | None = None, run_dir: str = "runinfo",
                **options: Any) -> Any:
    """Build the ``parsl.Config`` of a site and check that it has the ``decode`` and ``stitch`` executors."""
    module = load_site(site)
    try:
        cfg = module.config(workers=workers, run_dir=str(run_dir), **options)
    except TypeError as exc:
        raise SiteError(f"{module.__file__}: config(...) rejected its arguments: {exc}") from exc
    except SiteError:
        raise
    except ValueError as exc:  # a missing or bad site option (e.g. the polaris account): an input error
        raise SiteError(str(exc)) from exc
    labels = {getattr(ex, "label", None) for ex in getattr(cfg, "executors", ())}
    missing = [label for label in LABELS if label not in labels]
    if missing:
        raise SiteError(f"{module.__file__}: the Parsl configuration has no executor labelled "
                        + " or ".join(repr(m) for m in missing) + f" (found {sorted(map(str, labels))})")
    return cfg
