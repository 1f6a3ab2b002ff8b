"""Sites: where a reconstruction runs.

A site is a Python file defining ``config(workers, run_dir, **options)`` that returns a
``parsl.Config`` with executors labelled ``decode`` (block tasks) and ``stitch`` (reading each point's
frames once, writing the results).

Named sites live in the repository's ``configs/`` folder; any other file can be given by path.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from .errors import SiteError  # noqa: F401 (re-exported)

LABELS = ("decode", "stitch")


def sites_dir() -> Path:
    """The folder of named sites: ``$LAUEFLOW_SITES`` if set, else ``configs/`` beside the package."""
    env = os.environ.get("LAUEFLOW_SITES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "configs"


def _summary(path: Path) -> str:
    """First line of the module docstring, read without importing the module."""
    try:
        doc = ast.get_docstring(ast.parse(path.read_text()))
    except (OSError, SyntaxError):
        return ""
    return doc.strip().splitlines()[0] if doc else ""


def list_sites() -> list[tuple[str, str]]:
    """(name, one-line description) of every named site."""
    folder = sites_dir()
    if not folder.is_dir():
        return []
    # A file name's underscores read as dashes: configs/in_job.py is the site "in-job".
    return [(p.stem.replace("_", "-"), _summary(p)) for p in sorted(folder.glob("*.py"))
            if not p.name.startswith("_")]


def find_site(site: str | os.PathLike) -> Path:
    """The file of a site given by name (``local``) or by path (``my/site.py``)."""
    text = str(site)
    path = Path(text).expanduser()
    if text.endswith(".py") or os.sep in text or path.is_file():
        if not path.is_file():
            raise SiteError(f"site file {path} does not exist")
        return path.resolve()
    named = sites_dir() / f"{text}.py"
    if not named.is_file():
        named = sites_dir() / f"{text.replace('-', '_')}.py"
    if not named.is_file():
        names = ", ".join(n for n, _ in list_sites()) or "none"
        raise SiteError(f"unknown site {text!r} (known: {names}; or give a path to a site file)")
    return named


def load_site(site: str | os.PathLike) -> ModuleType:
    """Import a site's module (each file under its own module name, so sites never shadow each other)."""
    path = find_site(site)
    tag = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    spec = importlib.util.spec_from_file_location(f"laueflow_site_{path.stem}_{tag}", path)
    if spec is None or spec.loader is None:
        raise SiteError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
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


def option_env_var(site: str, name: str) -> str:
    """The environment variable that sets a site option: LAUEFLOW_<SITE>_<OPTION>."""
    return f"LAUEFLOW_{site.upper().replace('-', '_')}_{name.upper()}"


def resolve_options(site: str, table: dict, options: dict) -> dict:
    """A site's option values: a keyword option wins, then LAUEFLOW_<SITE>_<OPTION>, then the default
    of ``table`` (name -> (default, type, help); a None default means the option is required)."""
    unknown = sorted(set(options) - set(table))
    if unknown:
        raise TypeError(f"{site} site: unknown options {unknown} (known: {sorted(table)})")
    values = {}
    for name, (default, kind, _) in table.items():
        var = option_env_var(site, name)
        value = options.get(name, os.environ.get(var, default))
        if value is None:
            raise ValueError(f"{site} site: option {name!r} is required: pass {name}=... or set {var}")
        try:
            values[name] = kind(value)
        except ValueError:
            raise ValueError(f"{site} site: option {name!r} (or {var}) must be {kind.__name__}, "
                             f"not {value!r}") from None
    return values


# options every cluster site has, in the (default, type, help) form of the sites' OPTIONS tables
COMMON_OPTIONS: dict = {
    "worker_init": ("", str, "shell lines run before the workers start (e.g. activate an environment)"),
    "retries": (2, int, "Parsl retries of a failed task"),
    "stitch_threads": (2, int, "threads in the driver that stage points and write results"),
}


def this_environment(*extra_init: str, sep: str = "\n") -> tuple[str, dict[str, Any]]:
    """Worker initialisation and HighThroughputExecutor keywords that run the workers and the
    interchange from this interpreter's environment, even when it was not activated (e.g.
    ``.venv/bin/laueflow run ...``): its bin folder goes first on PATH and the interchange is launched
    with this interpreter.  ``extra_init``: further shell lines (empty ones are dropped)."""
    import sys

    bin_dir = Path(sys.executable).parent
    init = [f'export PATH="{bin_dir}:$PATH"', "export XLA_PYTHON_CLIENT_PREALLOCATE=false",
            *(line for line in extra_init if line)]
    keywords: dict[str, Any] = {}
    interchange = bin_dir / "interchange.py"
    if interchange.exists():
        keywords["interchange_launch_cmd"] = [sys.executable, str(interchange)]
    return sep.join(init), keywords


# failed blocks in a row after which an executor gives up (see assemble)
FAILED_BLOCKS_LIMIT = 3


def assemble(decode, run_dir: str, stitch_threads: int, retries: int = 0):
    """A site's parsl.Config: its ``decode`` executor plus stitching threads in the driver, under the
    two labels every site shares, so that the same task graph runs everywhere.

    A lost block (a node that failed, a worker pool that died) is replaced by the scaling strategy and
    its tasks are retried; only ``FAILED_BLOCKS_LIMIT`` failed blocks in a row (a broken worker
    environment, a rejected submission) stop the executor.  Parsl's default gives up at the first
    failed block when a site starts one block.
    """
    from functools import partial

    from parsl.config import Config
    from parsl.executors import ThreadPoolExecutor
    from parsl.jobs.error_handlers import windowed_error_handler

    if getattr(decode, "provider", None) is not None and hasattr(decode, "block_error_handler"):
        decode.block_error_handler = partial(windowed_error_handler, threshold=FAILED_BLOCKS_LIMIT)

    stitch = ThreadPoolExecutor(label="stitch", max_threads=stitch_threads)
    return Config(executors=[decode, stitch], run_dir=run_dir, retries=retries, strategy="simple",
                  usage_tracking=0)
