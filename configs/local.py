"""This machine: a HighThroughputExecutor on loopback (one worker per core) plus a stitching thread pool.

Block tasks go to the executor labelled ``decode`` (separate worker processes, each caching its
geometry and mask), staging frames, stitching and writing to ``stitch`` (threads in the driver).
"""

from __future__ import annotations

import os
from typing import Any

from parsl.config import Config
from parsl.executors import HighThroughputExecutor
from parsl.providers import LocalProvider

from laueflow.sites import COMMON_OPTIONS, assemble, option_env_var, resolve_options, this_environment

SITE = "local"


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
    init, keywords = this_environment(opts["worker_init"], sep="; ")
    decode = HighThroughputExecutor(
        label="decode",
        address="127.0.0.1",
        loopback_address="127.0.0.1",
        max_workers_per_node=workers,
        cores_per_worker=opts["cores_per_worker"],
        provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1, worker_init=init),
        **keywords,
    )
    return assemble(decode, run_dir, opts["stitch_threads"], opts["retries"])
