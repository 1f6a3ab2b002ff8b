"""Slurm clusters (e.g. NERSC Perlmutter): sbatch jobs launched with srun, stitching in the driver.

Options (keyword, else ``LAUEFLOW_SLURM_<OPTION>``, else the default): see ``laueflow sites show slurm``.
With ``gpus_per_node`` > 0 each node gets that many decode workers, one per GPU.
"""

from __future__ import annotations

from typing import Any

from parsl.config import Config
from parsl.executors import HighThroughputExecutor
from parsl.launchers import SrunLauncher
from parsl.providers import SlurmProvider

from laueflow.sites import COMMON_OPTIONS, assemble, option_env_var, resolve_options, this_environment

SITE = "slurm"

# name: (default, type, help)
OPTIONS: dict[str, tuple[Any, type, str]] = {
    "partition": ("", str, "#SBATCH --partition (empty: the cluster's default)"),
    "account": ("", str, "#SBATCH --account (empty: your default account)"),
    "qos": ("", str, "#SBATCH --qos (e.g. debug, regular on Perlmutter)"),
    "constraint": ("", str, "#SBATCH --constraint (e.g. gpu on Perlmutter)"),
    "walltime": ("01:00:00", str, "walltime of each block (HH:MM:SS)"),
    "nodes_per_block": (1, int, "nodes per Slurm job"),
    "max_blocks": (1, int, "most Slurm jobs at once"),
    "cores_per_node": (0, int, "cores per node for the workers (0: all)"),
    "gpus_per_node": (0, int, "GPUs per node: #SBATCH --gpus-per-node and one decode worker per GPU"),
    "scheduler_options": ("", str, "extra #SBATCH lines"),
    "address": ("", str, "driver address for the workers (default: Parsl probes)"),
    **COMMON_OPTIONS,
}


def env_var(name: str) -> str:
    return option_env_var(SITE, name)


def _options(options: dict) -> dict:
    return resolve_options(SITE, OPTIONS, options)


def config(workers: int | None = None, run_dir: str = "runinfo", **options) -> Config:
    """A Parsl configuration for a Slurm cluster; ``workers``: decode workers per node."""
    opts = _options(options)
    gpus = opts["gpus_per_node"]
    init, keywords = this_environment(opts["worker_init"])
    provider = SlurmProvider(
        partition=opts["partition"] or None,
        account=opts["account"] or None,
        qos=opts["qos"] or None,
        constraint=opts["constraint"] or None,
        walltime=opts["walltime"],
        nodes_per_block=opts["nodes_per_block"],
        cores_per_node=opts["cores_per_node"] or None,
        gpus_per_node=gpus or None,
        init_blocks=1,
        min_blocks=0,
        max_blocks=opts["max_blocks"],
        scheduler_options=opts["scheduler_options"],
        worker_init=init,
        launcher=SrunLauncher(),
    )
    decode = HighThroughputExecutor(
        label="decode",
        address=opts["address"] or None,
        max_workers_per_node=workers or gpus or None,
        available_accelerators=gpus or (),
        cpu_affinity="block" if gpus else "none",
        provider=provider,
        **keywords,
    )
    return assemble(decode, run_dir, opts["stitch_threads"], opts["retries"])
