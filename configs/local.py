"""This machine: a HighThroughputExecutor on loopback (one worker per core) plus a stitching thread pool.

Block tasks go to the executor labelled ``decode`` (separate worker processes, each caching its
geometry and mask), stitching and writing to ``stitch`` (threads in the driver, next to the output).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from parsl.config import Config
from parsl.executors import HighThroughputExecutor
from parsl.providers import LocalProvider

from laueflow.sites import assemble


def _bin_dir() -> Path:
    """The folder holding this interpreter's console scripts (process_worker_pool.py, interchange.py)."""
    return Path(sys.executable).parent


def config(workers: int | None = None, run_dir: str = "runinfo", **options) -> Config:
    """A Parsl configuration for one machine.

    ``workers``: decode worker processes (default: one per core).  ``options``: ``stitch_threads``
    (default 2), ``worker_init`` (shell lines run before the workers start), and anything else is
    passed on to the HighThroughputExecutor (e.g. ``available_accelerators``).
    """
    workers = workers or os.cpu_count() or 1
    stitch_threads = int(options.pop("stitch_threads", 2))
    # Workers and the interchange are console scripts of this environment: make them findable even
    # when the environment was not activated (e.g. `.venv/bin/laueflow run ...`).
    bin_dir = _bin_dir()
    init = [f'export PATH="{bin_dir}:$PATH"', "export XLA_PYTHON_CLIENT_PREALLOCATE=false"]
    extra_init = options.pop("worker_init", "")
    if extra_init:
        init.append(extra_init)
    interchange = bin_dir / "interchange.py"
    if interchange.exists():
        options.setdefault("interchange_launch_cmd", [sys.executable, str(interchange)])
    decode = HighThroughputExecutor(
        label="decode",
        address="127.0.0.1",
        loopback_address="127.0.0.1",
        max_workers_per_node=workers,
        cores_per_worker=1,
        provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1, worker_init="; ".join(init)),
        **options,
    )
    return assemble(decode, run_dir, stitch_threads)
