"""Inside a PBS or Slurm allocation: decode workers on every node of the job, stitching in the driver.

The nodes come from ``$PBS_NODEFILE`` (launched with mpiexec) or ``$SLURM_JOB_NODELIST`` (srun).
Options (keyword, else ``LAUEFLOW_IN_JOB_<OPTION>``, else the default): see ``laueflow sites show in-job``.
"""

from __future__ import annotations

import os
import re
from functools import partial
from pathlib import Path

from parsl.config import Config
from parsl.launchers import MpiExecLauncher, SrunLauncher
from parsl.providers import LocalProvider

from ..errors import SiteError
from .base import COMMON_OPTIONS, Option, option_env_var, resolve_options, workers_config

SITE = "in-job"

# name: (default, type, help)
OPTIONS: dict[str, Option] = {
    "gpus_per_node": (0, int, "GPUs per node: one decode worker per GPU (Polaris: 4)"),
    "cpu_affinity": ("none", str, "worker CPU binding (none, block, block-reverse, alternating, list:...)"),
    "mpiexec_overrides": ("--depth=64 --ppn 1", str, "extra mpiexec arguments (PBS allocations)"),
    "srun_overrides": ("", str, "extra srun arguments (Slurm allocations)"),
    "address": ("", str, "driver address for the workers (default: Parsl probes)"),
    **COMMON_OPTIONS,
}


env_var = partial(option_env_var, SITE)


def expand_nodelist(text: str) -> list[str]:
    """Host names of a Slurm node list: ``a,b``, ``nid[001-003,010]``, ``nid[001-003],nid010``."""
    hosts: list[str] = []
    for prefix, ranges, suffix in re.findall(r"([^,\[\]]*)(?:\[([^\]]*)\])?([^,\[\]]*),?", text.strip()):
        if not ranges:
            if prefix + suffix:
                hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(f"{prefix}{lo}{suffix}")
                continue
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValueError(f"cannot read the node range {part!r} in {text!r}")
            hosts += [f"{prefix}{i:0{len(lo)}d}{suffix}" for i in range(int(lo), int(hi) + 1)]
    return hosts


def job_nodes() -> tuple[str, list[str]]:
    """(``"pbs"`` or ``"slurm"``, the distinct nodes of the current allocation)."""
    nodefile = os.environ.get("PBS_NODEFILE")
    if nodefile:
        lines = [line.strip() for line in Path(nodefile).read_text().splitlines() if line.strip()]
        return "pbs", list(dict.fromkeys(lines))
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if nodelist:
        return "slurm", list(dict.fromkeys(expand_nodelist(nodelist)))
    raise SiteError("in-job site: not inside a PBS or Slurm job (neither PBS_NODEFILE nor "
                     "SLURM_JOB_NODELIST is set); run the driver inside an allocation, "
                     "or use the polaris or slurm site")


def config(workers: int | None = None, run_dir: str = "runinfo", **options) -> Config:
    """A Parsl configuration using every node of the current job; ``workers``: decode workers per node."""
    opts = resolve_options(SITE, OPTIONS, options)
    scheduler, nodes = job_nodes()
    gpus = opts["gpus_per_node"]
    if scheduler == "pbs":
        launcher = MpiExecLauncher(bind_cmd="--cpu-bind", overrides=opts["mpiexec_overrides"])
    else:
        launcher = SrunLauncher(overrides=opts["srun_overrides"])
    return workers_config(
        opts, run_dir,
        lambda init: LocalProvider(nodes_per_block=len(nodes), init_blocks=1, min_blocks=0, max_blocks=1,
                                   launcher=launcher, worker_init=init),
        address=opts["address"] or None,
        max_workers_per_node=workers or gpus or None,
        available_accelerators=gpus or (),
        cpu_affinity=opts["cpu_affinity"],
    )
