"""Threads in one process (tests, debugging, small regions): no worker processes to start or stop.

Reading and writing run in parallel threads; decoding takes one block at a time per process (see
``laueflow.workflow.tasks``), so use the local site for speed.
"""

from __future__ import annotations

import os

from parsl.config import Config
from parsl.executors import ThreadPoolExecutor


def config(workers: int | None = None, run_dir: str = "runinfo", **options) -> Config:
    """Decode threads (``workers``, default one per core) and ``stitch_threads`` (default 2) writers."""
    workers = workers or os.cpu_count() or 1
    stitch_threads = int(options.pop("stitch_threads", 2))
    if options:
        raise TypeError(f"threads site: unknown options {sorted(options)}")
    return Config(
        executors=[ThreadPoolExecutor(label="decode", max_threads=workers),
                   ThreadPoolExecutor(label="stitch", max_threads=stitch_threads)],
        run_dir=run_dir,
        strategy="none",
        usage_tracking=0,
    )
