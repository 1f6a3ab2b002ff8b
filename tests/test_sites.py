"""The sites: the cluster sites (polaris, slurm, in-job) built offline (no scheduler is contacted), the
user site example in configs/, and the named sites and endpoint template of an installed wheel."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from click.testing import CliRunner

from laueflow import sites
from laueflow.cli import main

SITE_ENV = ("PBS_NODEFILE", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
REPO = Path(__file__).resolve().parent.parent
NAMED = ("globus-compute", "in-job", "local", "polaris", "slurm", "threads")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No site option or allocation leaks in from the environment running the tests."""
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


def test_threads_options_resolve_like_every_site(tmp_path, monkeypatch):
    assert sites.site_config("threads", run_dir=str(tmp_path)).executors[1].max_threads == 2
    monkeypatch.setenv("LAUEFLOW_THREADS_STITCH_THREADS", "3")
    assert sites.site_config("threads", run_dir=str(tmp_path)).executors[1].max_threads == 3
    with pytest.raises(sites.SiteError, match=r"unknown options \['nodes'\]"):
        sites.site_config("threads", run_dir=str(tmp_path), nodes=2)


def test_base_is_not_a_site():
    assert [name for name, _ in sites.list_sites()] == list(NAMED)
    with pytest.raises(sites.SiteError, match="unknown site"):
        sites.find_site("base")


def test_example_user_site(tmp_path):
    """configs/example_site.py, the starting point for a user's own site, loads by path."""
    example = REPO / "configs" / "example_site.py"
    cfg = sites.site_config(example, run_dir=str(tmp_path), gpus=2, workers_per_gpu=2)
    assert _labels(cfg) == {"decode", "stitch"}
    assert cfg.executors[0].available_accelerators == ["0", "0", "1", "1"]
    r = CliRunner().invoke(main, ["sites", "show", str(example)])
    assert r.exit_code == 0 and "LAUEFLOW_EXAMPLE_WORKERS_PER_GPU" in r.stdout, r.output


# setuptools builds wheels itself from 70.1 on; older ones need the wheel package (in the dev extra)
CAN_BUILD_WHEELS = (importlib.util.find_spec("wheel") is not None
                    or importlib.util.find_spec("setuptools.command.bdist_wheel") is not None)

INSTALLED_CHECK = """
import sys
from pathlib import Path

import laueflow
from laueflow import sites

site, repo = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
assert Path(laueflow.__file__).resolve().is_relative_to(site), laueflow.__file__
assert all(Path(p or ".").resolve() != repo for p in sys.path), sys.path
names = [name for name, _ in sites.list_sites()]
assert names == sys.argv[3].split(","), names
for name in names:
    module = sites.load_site(name)
    assert Path(module.__file__).resolve().is_relative_to(site), module.__file__
    assert callable(module.config) and module.OPTIONS
template = sites.ENDPOINT_TEMPLATES / "polaris"
assert template.resolve().is_relative_to(site), template
for name in ("config.yaml", "user_config_schema.json", "user_config_template.yaml.j2"):
    assert (template / name).is_file(), name
print("installed ok")
"""


@pytest.mark.skipif(not CAN_BUILD_WHEELS, reason="building a wheel offline needs the wheel package "
                    "or setuptools>=70.1 (pip install -e '.[dev]')")
def test_installed_wheel_has_every_site(tmp_path):
    """A wheel of the project, installed away from the source tree, lists and loads every named site and
    has the endpoint template (``pip install .`` once gave no sites: they lay beside the package).
    Offline: no build isolation, no index; the dependencies come from this environment."""
    source, wheels, site, elsewhere = (tmp_path / d for d in ("source", "wheels", "site", "elsewhere"))
    source.mkdir()
    elsewhere.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    # a copy, so that the build writes its build/ and egg-info there, not in the working tree
    shutil.copytree(REPO / "laueflow", source / "laueflow", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("LAUEFLOW_SITES", None)

    def run(*args: str | Path, **extra: str) -> subprocess.CompletedProcess:
        done = subprocess.run([str(a) for a in args], cwd=elsewhere, env={**env, **extra},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
        return done

    pip = (sys.executable, "-m", "pip")
    run(*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, source)
    (wheel,) = wheels.glob("laueflow-*.whl")
    run(*pip, "install", "--no-deps", "--target", site, wheel)

    only_site = {"PYTHONPATH": str(site)}
    done = run(sys.executable, "-c", INSTALLED_CHECK, site, REPO, ",".join(NAMED), **only_site)
    assert "installed ok" in done.stdout
    listed = run(sys.executable, site / "bin" / "laueflow", "sites", **only_site).stdout
    assert [line.split()[0] for line in listed.splitlines()[:-1]] == list(NAMED), listed
    assert str(site.resolve()) in listed.splitlines()[-1], listed
