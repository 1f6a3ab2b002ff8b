"""What every site shares: its options (keyword, else ``LAUEFLOW_<SITE>_<OPTION>``, else the default),
the workers' environment, and the assembly of its ``decode`` executor with the ``stitch`` threads into
one ``parsl.Config``.

A site module holds only what differs: its ``OPTIONS`` table (name -> (default, type, help)) and the
executor or provider it builds.  User site files may use these helpers too (see ``configs/README.md``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import parsl
from parsl.config import Config
from parsl.executors import HighThroughputExecutor, ThreadPoolExecutor
from parsl.executors.status_handling import BlockProviderExecutor
from parsl.jobs.error_handlers import windowed_error_handler
from parsl.providers.base import ExecutionProvider

from ..errors import SiteError

# an option's (default, type, help); a None default means the option is required
Option = tuple[Any, type, str]

# options every cluster site has
COMMON_OPTIONS: dict[str, Option] = {
    "worker_init": ("", str, "shell lines run before the workers start (e.g. activate an environment)"),
    "retries": (2, int, "Parsl retries of a failed task"),
    "stitch_threads": (2, int, "threads in the driver that stage points and write results"),
}

# failed blocks in a row after which an executor gives up (see assemble)
FAILED_BLOCKS_LIMIT = 3

# How Parsl's interchange is started (see this_environment): in a session of its own, so that a
# Ctrl-C in the terminal (SIGINT to the whole foreground process group) reaches only the driver,
# which then stops it and the workers in order, instead of killing it under the driver with a
# traceback; and it ends itself once the driver is gone (its parent changes), so that a killed
# driver leaves no interchange behind to keep worker pools alive.  Its log file (in the run folder)
# failing to take a record, on a full disk, must not print a traceback per record on the terminal.
INTERCHANGE_LAUNCHER = """\
import logging, os, runpy, signal, sys, threading, time
logging.raiseExceptions = False
os.setsid()
parent = os.getppid()
def watch():
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=watch, daemon=True).start()
runpy.run_path(sys.argv[1], run_name="__main__")
"""


def option_env_var(site: str, name: str) -> str:
    """The environment variable that sets a site option: LAUEFLOW_<SITE>_<OPTION>."""
    return f"LAUEFLOW_{site.upper().replace('-', '_')}_{name.upper()}"


def resolve_options(site: str, table: dict[str, Option], options: dict) -> dict:
    """A site's option values: a keyword option wins, then LAUEFLOW_<SITE>_<OPTION>, then the default
    of ``table``.  An unknown keyword is a TypeError (as for any function); a missing required option or
    a value of the wrong type is a SiteError naming the option and its variable."""
    unknown = sorted(set(options) - set(table))
    if unknown:
        raise TypeError(f"{site} site: unknown options {unknown} (known: {sorted(table)})")
    values = {}
    for name, (default, kind, _) in table.items():
        var = option_env_var(site, name)
        value = options.get(name, os.environ.get(var, default))
        if value is None:
            raise SiteError(f"{site} site: option {name!r} is required: pass {name}=... or set {var}")
        try:
            values[name] = kind(value)
        except ValueError:
            raise SiteError(f"{site} site: option {name!r} (or {var}) must be {kind.__name__}, "
                            f"not {value!r}") from None
    return values


def this_environment(*extra_init: str, sep: str = "\n") -> tuple[str, dict[str, Any]]:
    """Worker initialisation and HighThroughputExecutor keywords that run the workers and the
    interchange from this interpreter's environment, even when it was not activated (e.g.
    ``.venv/bin/laueflow run ...``): its bin folder goes first on PATH and the interchange is launched
    with this interpreter, detached from the terminal (``INTERCHANGE_LAUNCHER``).  ``extra_init``:
    further shell lines (empty ones are dropped)."""
    bin_dir = Path(sys.executable).parent
    init = [f'export PATH="{bin_dir}:$PATH"', "export XLA_PYTHON_CLIENT_PREALLOCATE=false",
            *(line for line in extra_init if line)]
    spec = importlib.util.find_spec("parsl.executors.high_throughput.interchange")
    keywords: dict[str, Any] = {
        "interchange_launch_cmd": [sys.executable, "-c", INTERCHANGE_LAUNCHER, str(spec.origin)]}
    return sep.join(init), keywords


def assemble(decode: Any, run_dir: str, stitch_threads: int, retries: int = 0,
             strategy: str = "simple") -> Config:
    """A site's parsl.Config: its ``decode`` executor plus stitching threads in the driver, under the
    two labels every site shares, so that the same task graph runs everywhere.

    A lost block (a node that failed, a worker pool that died) is replaced by the scaling strategy and
    its tasks are retried; only ``FAILED_BLOCKS_LIMIT`` failed blocks in a row (a broken worker
    environment, a rejected submission) stop the executor.  Parsl's default gives up at the first
    failed block when a site starts one block.
    """
    if getattr(decode, "provider", None) is not None and hasattr(decode, "block_error_handler"):
        decode.block_error_handler = partial(windowed_error_handler, threshold=FAILED_BLOCKS_LIMIT)

    stitch = ThreadPoolExecutor(label="stitch", max_threads=stitch_threads)
    return Config(executors=[decode, stitch], run_dir=run_dir, retries=retries, strategy=strategy,
                  usage_tracking=0)


def workers_config(opts: dict, run_dir: str, provider: Callable[[str], ExecutionProvider], *,
                   init: tuple[str, ...] = (), sep: str = "\n", **executor: Any) -> Config:
    """The Config of a site whose ``decode`` executor is a HighThroughputExecutor (every site but
    threads and globus-compute).

    ``opts``: the resolved options (with those of ``COMMON_OPTIONS``); ``provider(worker_init)`` builds
    the provider of the worker blocks from the workers' shell set-up (this environment, then the
    ``init`` lines, then the ``worker_init`` option, joined by ``sep``); ``executor``: the site's own
    executor keywords (address, workers per node, accelerators, CPU binding).
    """
    worker_init, keywords = this_environment(*init, opts["worker_init"], sep=sep)
    decode = HighThroughputExecutor(label="decode", provider=provider(worker_init), **executor, **keywords)
    return assemble(decode, run_dir, opts["stitch_threads"], opts["retries"])


def stop_now(dfk: Any, timeout: float = 10.0) -> bool:
    """Stop a loaded Parsl configuration at once (Ctrl-C, SIGTERM) instead of letting its tasks end.

    Parsl's own cleanup asks the interchange which worker blocks are idle before it scales them in,
    and waits for the tasks of its thread pools; when the interchange is gone that question hangs, and
    a staging or stitching thread can run for a long time.  So the worker blocks of every executor
    with a provider are cancelled directly (LocalProvider: the worker pool's process group is
    terminated; a batch provider: its jobs are cancelled), its tasks fail at once (bad state, so the
    cleanup does not scale in again), queued thread-pool tasks are dropped, and the cleanup runs in a
    helper thread for at most ``timeout`` seconds: a thread-pool task already running finishes in the
    background (every file is written under a temporary name first).  Returns whether the cleanup
    ended in time; if not, the configuration is unloaded anyway, so that another can be loaded.
    """
    reason = RuntimeError("the run was interrupted")
    for executor in dfk.executors.values():
        if isinstance(executor, ThreadPoolExecutor):
            executor.executor.shutdown(wait=False, cancel_futures=True)
            continue
        if isinstance(executor, BlockProviderExecutor) and executor.provider is not None:
            jobs = list(executor.blocks_to_job_id.values())
            try:
                if jobs:
                    executor.provider.cancel(jobs)
            except Exception:  # stopping: a provider that cannot cancel must not keep the rest running
                pass
            if not executor.bad_state_is_set:
                executor.set_bad_state_and_fail_all(reason)
    cleanup = threading.Thread(target=dfk.cleanup, name="laueflow-parsl-cleanup", daemon=True)
    cleanup.start()
    cleanup.join(timeout)
    if cleanup.is_alive():
        parsl.clear()
        return False
    return True
