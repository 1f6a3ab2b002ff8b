"""This machine: a HighThroughputExecutor on loopback (one worker per core) plus a stitching thread pool.

Block tasks go to the executor labelled ``decode`` (separate worker processes, each caching its
geometry and mask), stitching and writing to ``stitch`` (threads in the driver, next to the output).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from parsl.config import Config
from parsl.executors import HighThroughputExecutor
from parsl.providers import LocalProvider

from laueflow.sites import COMMON_OPTIONS, assemble, option_env_var, resolve_options

SITE = "local"


def _bin_dir() -> Path:
    """The folder holding this interpreter's console scripts (process_worker_pool.py, interchange.py)."""
    return Path(sys.executable).parent


# name: (default, type, help)
OPTIONS: dict[str, tuple[Any, type, str]] = {
    "cores_per_worker": (1.0, float, "cores each decode worker may use"),
    **COMMON_OPTIONS,
}


def env_var(name: str) -> str:
    return option_env_var(SITE, name)


def config(workers: int | None = None, run_dir: str = "runinfo", **options) -> Config:
    """A Parsl configuration for one machine; ``workers``: decode worker processes (default: one per
    core); options as in ``OPTIONS`` (keyword, else LAUEFLOW_LOCAL_<OPTION>, else the default)."""
    opts = resolve_options(SITE, OPTIONS, options)
    workers = workers or os.cpu_count() or 1
    # Workers and the interchange are console scripts of this environment: make them findable even
    # when the environment was not activated (e.g. `.venv/bin/laueflow run ...`).
    bin_dir = _bin_dir()
    init = [f'export PATH="{bin_dir}:$PATH"', "export XLA_PYTHON_CLIENT_PREALLOCATE=false"]
    if opts["worker_init"]:
        init.append(opts["worker_init"])
    extra = {}
    interchange = bin_dir / "interchange.py"
    if interchange.exists():
        extra["interchange_launch_cmd"] = [sys.executable, str(interchange)]
    decode = HighThroughputExecutor(
        label="decode",
        address="127.0.0.1",
        loopback_address="127.0.0.1",
        max_workers_per_node=workers,
        cores_per_worker=opts["cores_per_worker"],
        provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1, worker_init="; ".join(init)),
        **extra,
    )
    return assemble(decode, run_dir, opts["stitch_threads"], opts["retries"])
