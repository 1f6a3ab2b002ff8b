"""Example user site: this workstation, a fixed pool of decode workers, GPUs shared between them.

Use it as ``laueflow run SCAN --site configs/example_site.py`` and see its options with
``laueflow sites show configs/example_site.py``; copy it anywhere and change what differs.
"""

from __future__ import annotations

from functools import partial

from parsl.config import Config
from parsl.providers import LocalProvider

from laueflow.sites.base import COMMON_OPTIONS, option_env_var, resolve_options, workers_config

SITE = "example"  # options come from LAUEFLOW_EXAMPLE_<OPTION> too

# name: (default, type, help); a None default would make the option required
OPTIONS = {
    "gpus": (0, int, "GPUs on this machine (0: decode on the CPU)"),
    "workers_per_gpu": (1, int, "decode workers sharing each GPU"),
    **COMMON_OPTIONS,  # worker_init, retries, stitch_threads
}

env_var = partial(option_env_var, SITE)  # lets `laueflow sites show` name the variables


def config(workers: int | None = None, run_dir: str = "runinfo", **options) -> Config:
    """``workers``: decode worker processes (default: 4, or ``workers_per_gpu`` per GPU)."""
    opts = resolve_options(SITE, OPTIONS, options)
    gpus = opts["gpus"]
    accelerators = [str(i) for i in range(gpus) for _ in range(opts["workers_per_gpu"])]
    return workers_config(
        opts, run_dir,
        # the provider starts the one block of workers here; init: the shell set-up of the workers
        lambda init: LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1, worker_init=init),
        address="127.0.0.1",
        loopback_address="127.0.0.1",
        max_workers_per_node=workers or len(accelerators) or 4,
        available_accelerators=accelerators,
    )
