"""Slurm clusters (e.g. NERSC Perlmutter): sbatch jobs launched with srun, stitching in the driver.

Options (keyword, else ``LAUEFLOW_SLURM_<OPTION>``, else the default): see ``laueflow sites show slurm``.
With ``gpus_per_node`` > 0 each node gets that many decode workers, one per GPU.
"""

from __future__ import annotations

from functools import partial

from parsl.config import Config
from parsl.launchers import SrunLauncher
from parsl.providers import SlurmProvider

from .base import COMMON_OPTIONS, Option, option_env_var, resolve_options, workers_config

SITE = "slurm"

# name: (default, type, help)
OPTIONS: dict[str, Option] = {
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


env_var = partial(option_env_var, SITE)


def config(workers: int | None = None, run_dir: str = "runinfo", **options) -> Config:
    """A Parsl configuration for a Slurm cluster; ``workers``: decode workers per node."""
    opts = resolve_options(SITE, OPTIONS, options)
    gpus = opts["gpus_per_node"]
    return workers_config(
        opts, run_dir,
        lambda init: SlurmProvider(
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
        ),
        address=opts["address"] or None,
        max_workers_per_node=workers or gpus or None,
        available_accelerators=gpus or (),
        cpu_affinity="block" if gpus else "none",
    )
