"""This machine: a HighThroughputExecutor on loopback (one worker per core) plus a stitching thread pool.

Block tasks go to the executor labelled ``decode`` (separate worker processes, each caching its
geometry and mask), staging frames, stitching and writing to ``stitch`` (threads in the driver).

On loopback nothing delays a heartbeat, so the worker pool and the interchange exchange one every
``HEARTBEAT_PERIOD`` seconds and give each other up after ``HEARTBEAT_THRESHOLD`` (Parsl's defaults,
30 and 120 s, suit a network): a pool whose driver was killed ends within about that time.
"""

from __future__ import annotations

import os
from functools import partial

from parsl.config import Config
from parsl.providers import LocalProvider

from .base import COMMON_OPTIONS, Option, option_env_var, resolve_options, workers_config

SITE = "local"

OPTIONS: dict[str, Option] = {
    "cores_per_worker": (1.0, float, "cores each decode worker may use"),
    **COMMON_OPTIONS,
}

env_var = partial(option_env_var, SITE)

HEARTBEAT_PERIOD = 2  # seconds
HEARTBEAT_THRESHOLD = 15  # seconds without a word after which the other side is taken to be gone


def config(workers: int | None = None, run_dir: str = "runinfo", **options) -> Config:
    """A Parsl configuration for one machine; ``workers``: decode worker processes (default: one per
    core); options as in ``OPTIONS`` (keyword, else LAUEFLOW_LOCAL_<OPTION>, else the default)."""
    opts = resolve_options(SITE, OPTIONS, options)
    return workers_config(
        opts, run_dir,
        lambda init: LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1, worker_init=init),
        sep="; ",
        address="127.0.0.1",
        loopback_address="127.0.0.1",
        max_workers_per_node=workers or os.cpu_count() or 1,
        cores_per_worker=opts["cores_per_worker"],
        heartbeat_period=HEARTBEAT_PERIOD,
        heartbeat_threshold=HEARTBEAT_THRESHOLD,
    )
