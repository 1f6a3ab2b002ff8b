"""Threads in one process (tests, debugging, small regions): no worker processes to start or stop.

Reading and writing run in parallel threads; decoding takes one block at a time per process (see
``laueflow.workflow.tasks``), so use the local site for speed.  A thread cannot be stopped: on Ctrl-C
the queued blocks are dropped, and a block being decoded ends in the background (`laueflow run` does
not wait for it; what it writes goes under a temporary name, removed by the next run).
"""

from __future__ import annotations

import os
from functools import partial

from parsl.config import Config
from parsl.executors import ThreadPoolExecutor

from .base import COMMON_OPTIONS, Option, assemble, option_env_var, resolve_options

SITE = "threads"

OPTIONS: dict[str, Option] = {"stitch_threads": COMMON_OPTIONS["stitch_threads"]}

env_var = partial(option_env_var, SITE)


def config(workers: int | None = None, run_dir: str = "runinfo", **options) -> Config:
    """Decode threads (``workers``, default one per core) and ``stitch_threads`` writers; no retries and
    no scaling strategy (there are no blocks to replace)."""
    opts = resolve_options(SITE, OPTIONS, options)
    decode = ThreadPoolExecutor(label="decode", max_threads=workers or os.cpu_count() or 1)
    return assemble(decode, run_dir, opts["stitch_threads"], strategy="none")
