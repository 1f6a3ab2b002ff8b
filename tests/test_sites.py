"""The cluster sites (polaris, slurm, in-job), built offline: no scheduler is contacted."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
from click.testing import CliRunner

from laueflow import sites
from laueflow.cli import main

SITE_ENV = ("PBS_NODEFILE", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No site option or allocation leaks in from the environment running the tests."""
    import os

    for var in list(os.environ):
        if var.startswith("LAUEFLOW_") and var != "LAUEFLOW_SITES" or var in SITE_ENV:
            monkeypatch.delenv(var)


def _labels(cfg) -> set[str]:
    return {ex.label for ex in cfg.executors}


def _submit(cfg, tmp_path: Path, stdout: str) -> tuple[str, str]:
    """The submit script the decode executor's provider writes, and the submit command it runs."""
    provider = cfg.executors[0].provider
    tmp_path.mkdir(parents=True, exist_ok=True)
    provider.script_dir = str(tmp_path)
    with mock.patch.object(provider, "execute_wait", return_value=(0, stdout, "")) as run:
        provider.submit("echo worker", tasks_per_node=1)
    (script,) = [p for p in tmp_path.iterdir() if p.is_file() and not p.name.startswith("cmd_")]
    return script.read_text(), run.call_args[0][0]


def test_polaris_config_and_script(tmp_path):
    cfg = sites.site_config("polaris", run_dir=str(tmp_path / "run"), account="MyProj", queue="prod",
                            nodes_per_block=2)
    assert _labels(cfg) == {"decode", "stitch"}
    assert cfg.retries == 2
    decode = cfg.executors[0]
    assert decode.available_accelerators == ["0", "1", "2", "3"]
    assert decode.max_workers_per_node == 4 and decode.cpu_affinity.startswith("list:")
    script, qsub = _submit(cfg, tmp_path / "s", "123.polaris-pbs-01")
    assert "#PBS -l select=2:ncpus=64:ngpus=4" in script
    assert "#PBS -l filesystems=home:eagle" in script
    assert "#PBS -l walltime=01:00:00" in script
    assert "#PBS -A MyProj" in script and "#PBS -q prod" in script
    assert "export XLA_PYTHON_CLIENT_PREALLOCATE=false" in script and "export TMPDIR=/tmp" in script
    assert "mpiexec" in script and "--cpu-bind" in script and "--depth=64 --ppn 1" in script
    assert "-q prod" in qsub and "-A MyProj" in qsub


def test_polaris_needs_account(tmp_path):
    with pytest.raises(ValueError, match="LAUEFLOW_POLARIS_ACCOUNT"):
        sites.site_config("polaris", run_dir=str(tmp_path))
    with pytest.raises(ValueError, match="queue"):
        sites.site_config("polaris", run_dir=str(tmp_path), account="A", queue="nowhere")


def test_polaris_environment_overrides_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("LAUEFLOW_POLARIS_ACCOUNT", "EnvProj")
    monkeypatch.setenv("LAUEFLOW_POLARIS_WALLTIME", "00:30:00")
    monkeypatch.setenv("LAUEFLOW_POLARIS_RETRIES", "5")
    monkeypatch.setenv("LAUEFLOW_POLARIS_WORKER_INIT", "source ~/venvs/laue/bin/activate")
    cfg = sites.site_config("polaris", run_dir=str(tmp_path / "run"))
    assert cfg.retries == 5
    script, _ = _submit(cfg, tmp_path / "s", "1.pbs")
    assert "#PBS -A EnvProj" in script and "#PBS -l walltime=00:30:00" in script
    assert "source ~/venvs/laue/bin/activate" in script
    # a keyword option beats the environment
    cfg = sites.site_config("polaris", run_dir=str(tmp_path / "run"), walltime="02:00:00")
    assert cfg.executors[0].provider.walltime == "02:00:00"


def test_slurm_script(tmp_path):
    cfg = sites.site_config("slurm", run_dir=str(tmp_path / "run"), partition="gpu", account="m1234",
                            qos="debug", gpus_per_node=4)
    assert _labels(cfg) == {"decode", "stitch"}
    assert cfg.executors[0].available_accelerators == ["0", "1", "2", "3"]
    script, sbatch = _submit(cfg, tmp_path / "s", "Submitted batch job 42")
    assert sbatch.startswith("sbatch")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=m1234", "#SBATCH --qos=debug",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --time=60"):
        assert line in script
    assert "srun" in script


def test_in_job_pbs(tmp_path, monkeypatch):
    nodefile = tmp_path / "nodes"
    nodefile.write_text("x3001\nx3001\nx3002\nx3003\n")
    monkeypatch.setenv("PBS_NODEFILE", str(nodefile))
    cfg = sites.site_config("in-job", run_dir=str(tmp_path / "run"), gpus_per_node=4)
    assert _labels(cfg) == {"decode", "stitch"}
    provider = cfg.executors[0].provider
    assert provider.nodes_per_block == 3
    assert "mpiexec" in provider.launcher("cmd", 1, 3)


def test_in_job_slurm(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_NODELIST", "nid[001-003],nid010")
    cfg = sites.site_config("in-job", run_dir=str(tmp_path / "run"))
    provider = cfg.executors[0].provider
    assert provider.nodes_per_block == 4
    assert "srun" in provider.launcher("cmd", 1, 4)
    module = sites.load_site("in-job")
    assert module.expand_nodelist("nid[001-003],nid010") == ["nid001", "nid002", "nid003", "nid010"]
    assert module.expand_nodelist("a,b") == ["a", "b"]


def test_in_job_outside_a_job(tmp_path):
    with pytest.raises(ValueError, match="PBS_NODEFILE.*SLURM_JOB_NODELIST"):
        sites.site_config("in-job", run_dir=str(tmp_path))


def test_sites_lists_five():
    r = CliRunner().invoke(main, ["sites"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    for name in ("local", "threads", "polaris", "slurm", "in-job"):
        assert sum(line.split()[0] == name for line in lines if line.strip()) == 1, r.stdout


def test_sites_show():
    r = CliRunner().invoke(main, ["sites", "show", "polaris"])
    assert r.exit_code == 0, r.output
    assert "LAUEFLOW_POLARIS_ACCOUNT" in r.stdout and "(required)" in r.stdout
    assert "walltime = '01:00:00'" in r.stdout
