"""ALCF Polaris: PBS Pro jobs of 4-GPU nodes (one decode worker per A100), stitching in the driver.

Options (keyword, else ``LAUEFLOW_POLARIS_<OPTION>``, else the default): see ``laueflow sites show polaris``.
``account`` is required.  Run the driver on a login node (it submits PBS jobs) or use the ``in-job`` site
from inside an allocation.
"""

from __future__ import annotations

import logging
from functools import partial

from parsl.addresses import address_by_interface
from parsl.config import Config
from parsl.launchers import MpiExecLauncher
from parsl.providers import PBSProProvider

from ..errors import SiteError
from .base import COMMON_OPTIONS, Option, option_env_var, resolve_options, workers_config

SITE = "polaris"
QUEUES = ("debug", "debug-scaling", "prod", "preemptable", "demand")
# ALCF's binding of the 4 GPUs of a Polaris node to the CPU cores (and hyperthreads) nearest to each.
CPU_AFFINITY = "list:24-31,56-63:16-23,48-55:8-15,40-47:0-7,32-39"

# name: (default, type, help); None with "required" in the help means there is no default.
OPTIONS: dict[str, Option] = {
    "account": (None, str, "PBS project to charge (#PBS -A); required"),
    "queue": ("debug", str, "PBS queue: " + ", ".join(QUEUES)),
    "walltime": ("01:00:00", str, "walltime of each block (HH:MM:SS)"),
    "nodes_per_block": (1, int, "nodes per PBS job"),
    "max_blocks": (1, int, "most PBS jobs at once"),
    "gpus_per_node": (4, int, "GPUs per node (one decode worker each)"),
    "cpu_affinity": ("", str, "worker CPU binding (default: ALCF's per-GPU list, else block-reverse)"),
    "filesystems": ("home:eagle", str, "#PBS -l filesystems=..."),
    "interface": ("bond0", str, "network interface the workers reach the driver on"),
    "address": ("", str, "driver address for the workers (default: the address of `interface`)"),
    **COMMON_OPTIONS,
}

env_var = partial(option_env_var, SITE)


def _address(opts: dict) -> str | None:
    if opts["address"]:
        return opts["address"]
    try:
        return address_by_interface(opts["interface"])
    except OSError:  # not on a Polaris node (e.g. building the configuration offline): let Parsl probe
        logging.getLogger(__name__).warning("no interface %s; Parsl will probe the address",
                                            opts["interface"])
        return None


def config(workers: int | None = None, run_dir: str = "runinfo", **options) -> Config:
    """A Parsl configuration for Polaris; ``workers``: decode workers per node (default one per GPU)."""
    opts = resolve_options(SITE, OPTIONS, options)
    if opts["queue"] not in QUEUES:
        raise SiteError(f"{SITE} site: queue {opts['queue']!r} is not one of {', '.join(QUEUES)} "
                        f"(option queue, {env_var('queue')})")
    gpus = opts["gpus_per_node"]
    workers = workers or gpus
    affinity = opts["cpu_affinity"] or (CPU_AFFINITY if workers == 4 == gpus else "block-reverse")
    return workers_config(
        opts, run_dir,
        lambda init: PBSProProvider(
            account=opts["account"],
            queue=opts["queue"],
            walltime=opts["walltime"],
            nodes_per_block=opts["nodes_per_block"],
            init_blocks=1,
            min_blocks=0,
            max_blocks=opts["max_blocks"],
            cpus_per_node=64,
            select_options=f"ngpus={gpus}",
            # Parsl passes -A and -q to qsub; the same lines in the script keep it submittable by hand.
            scheduler_options=(f"#PBS -l filesystems={opts['filesystems']}\n#PBS -A {opts['account']}\n"
                               f"#PBS -q {opts['queue']}"),
            worker_init=init,
            launcher=MpiExecLauncher(bind_cmd="--cpu-bind", overrides="--depth=64 --ppn 1"),
        ),
        init=("export TMPDIR=/tmp",),
        address=_address(opts),
        max_workers_per_node=workers,
        available_accelerators=gpus,
        cpu_affinity=affinity,
    )
