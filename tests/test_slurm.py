"""The ``slurm`` site end to end on a real Slurm cluster started on this machine.

The module's fixture (tests/slurm_cluster.py) installs Debian's slurmctld, slurmd and slurm-client with
apt-get when they are missing, and starts a one-node cluster (this host, its real CPUs and memory) from
a slurm.conf in a temporary folder: ``auth/none``, free ports on 127.0.0.1, no cgroups, state and logs in
that folder.  A two-point simulated scan is then reconstructed by ``laueflow run --site slurm`` in a
subprocess: Parsl's SlurmProvider submits an sbatch job, srun starts the workers in it, and they reach the
driver on 127.0.0.1.  The tests check the point files, that the work ran in that Slurm job (submit
script, the job's own output, the job's accounting record, no job left behind) and the accuracy against
the truth.  Afterwards every job is cancelled and the daemons are stopped, also when a test fails.

The tests are skipped, with the reason, only where Slurm is missing and apt-get cannot install it (not
root, no network).  Run only these tests with ``.venv/bin/pytest -m slurm``; they take one to two
minutes on two cores once the packages are installed (installing them adds some 15 to 60 s).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import pytest
import slurm_cluster
from conftest import use_tiles
from test_workflow import check_point_file

from laueflow.config import Config, load
from laueflow.evaluate import score
from laueflow.io import layout
from laueflow.io.pointfile import read_profiles
from laueflow.io.truth import load_truth
from laueflow.simulate import simulate

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(1200)]  # the first apt-get install may be slow

POINTS = 2
REGION = 24
BLOCK = 288  # 2 blocks per point
RUN_TIMEOUT = 600  # s for `laueflow run`; about 30 to 60 s on two idle cores
MARK = "laueflow-slurm-test"  # echoed by the workers' batch script, with the Slurm job id and host


@dataclass
class SlurmRun:
    cluster: slurm_cluster.SlurmCluster
    scan: Path
    out: Path
    cfg: Config
    done: subprocess.CompletedProcess
    jobs_left: list[str]  # jobs still queued some seconds after the driver exited


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[slurm_cluster.SlurmCluster]:
    try:
        slurm_cluster.install()
    except slurm_cluster.SlurmUnavailable as exc:
        pytest.skip(f"no Slurm cluster can be set up here: {exc}")
    with slurm_cluster.slurm_cluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _files(out: Path, pattern: str) -> list[Path]:
    return sorted((out / ".runinfo").glob(pattern))


def diagnosis(cluster: slurm_cluster.SlurmCluster, out: Path, stdout: str = "", stderr: str = "") -> str:
    """What to read when a run on the test cluster fails: the driver's output, Parsl's log, the batch
    jobs' output, the queue and the Slurm daemons' logs."""
    parts = [f"--- laueflow run stdout ---\n{_tail(stdout)}", f"--- laueflow run stderr ---\n{_tail(stderr)}"]
    for path in (*_files(out, "*/parsl.log"), *_files(out, "*/decode/interchange.log"),
                 *_files(out, "*/submit_scripts/*.stdout"), *_files(out, "*/submit_scripts/*.stderr")):
        parts.append(f"--- {path} ---\n{_tail(path.read_text(errors='replace'))}")
    parts.append("--- squeue ---\n" + cluster.command("squeue", check=False))
    parts.append("--- sinfo ---\n" + cluster.command("sinfo", "-N", "-l", check=False))
    parts.append(cluster.logs())
    return "\n".join(parts)


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slurm_scan") / "scan"
    simulate(folder, preset="thin", points=POINTS, region=REGION, seed=5)
    use_tiles(folder, BLOCK)
    return folder


def laueflow_run(cluster: slurm_cluster.SlurmCluster, scan: Path, out: Path, *args: str,
                 timeout: float = RUN_TIMEOUT, **options: str) -> subprocess.CompletedProcess:
    """``laueflow run SCAN --out OUT --site slurm ARGS`` on this cluster, with the site options that fit it
    (given as LAUEFLOW_SLURM_<OPTION> variables, ``options`` overriding them); fails the test with the
    diagnosis if it does not finish in time."""
    env = {k: v for k, v in cluster.env.items() if not k.startswith("LAUEFLOW_SLURM_")}
    settings = {
        "address": "127.0.0.1",  # the workers run on this host
        "partition": slurm_cluster.PARTITION,
        "walltime": "00:20:00",  # Slurm ends the job even if nothing else does
        "worker_init": f'echo "{MARK} job=$SLURM_JOB_ID host=$(hostname)"',
        **options,
    }
    env.update({f"LAUEFLOW_SLURM_{k.upper()}": v for k, v in settings.items()})
    cmd = [str(Path(sys.executable).parent / "laueflow"), "run", str(scan), "--out", str(out),
           "--site", "slurm", *args]
    try:
        return subprocess.run(slurm_cluster.die_with_parent(cmd), env=env, cwd=out.parent, text=True,
                              capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode(errors="replace"), (exc.stderr or b"").decode(errors="replace")
        pytest.fail(f"`laueflow run --site slurm` did not finish within {timeout:.0f} s\n"
                    + diagnosis(cluster, out, *text))


def wait_for_empty_queue(cluster: slurm_cluster.SlurmCluster, timeout: float = 60) -> list[str]:
    """The jobs still queued after up to ``timeout`` s (the driver cancels its blocks when it shuts down)."""
    deadline = time.monotonic() + timeout
    while (left := cluster.jobs()) and time.monotonic() < deadline:
        time.sleep(1)
    return left


@pytest.fixture(scope="module")
def slurm_run(cluster, scan, tmp_path_factory) -> SlurmRun:
    """``laueflow run --site slurm`` on the two-point scan, through this cluster."""
    out = tmp_path_factory.mktemp("slurm_run") / "recon"
    done = laueflow_run(cluster, scan, out, "--block-pixels", str(BLOCK))
    if done.returncode != 0:
        pytest.fail(f"`laueflow run --site slurm` exited with {done.returncode}\n"
                    + diagnosis(cluster, out, done.stdout, done.stderr))
    return SlurmRun(cluster, scan, out, load(scan / "config.yaml"), done, wait_for_empty_queue(cluster))


def test_both_points_written(slurm_run):
    r = slurm_run
    assert f"{POINTS} points ({POINTS} done)" in r.done.stdout, r.done.stdout
    written = sorted(p.name for p in r.out.glob("point_*.h5"))
    assert written == [layout.point_name(k) for k in range(POINTS)]
    for k in range(POINTS):
        check_point_file(r.out / layout.point_name(k), r.cfg, k)
        with h5py.File(r.out / layout.point_name(k), "r") as f:
            prov = f["entry/provenance"].attrs
            assert prov["worker_hosts"] == socket.gethostname()  # the node of the one-node cluster
            assert "--site slurm" in prov["command_line"]


def test_workers_ran_in_a_slurm_job(slurm_run):
    """The block tasks ran in a batch job that the test cluster scheduled, and no job is left behind."""
    r = slurm_run
    scripts = [p for p in _files(r.out, "*/submit_scripts/parsl.decode.block-*")
               if not p.name.endswith((".stdout", ".stderr"))]
    assert len(scripts) == 1, scripts  # one block (max_blocks 1), submitted once
    script = scripts[0].read_text()
    assert "#SBATCH --partition=test" in script and "srun" in script and MARK in script
    job_out = scripts[0].with_name(scripts[0].name + ".stdout").read_text()
    marks = [line.split() for line in job_out.splitlines() if line.startswith(MARK)]
    assert len(marks) == 1, job_out
    job_id = marks[0][1].removeprefix("job=")
    assert job_id.isdigit() and marks[0][2] == f"host={socket.gethostname()}", job_out
    assert r.jobs_left == [], f"jobs still queued after the run: {r.jobs_left}\n{diagnosis(r.cluster, r.out)}"
    records = {rec["JobId"]: rec for rec in r.cluster.completed_jobs()}
    assert job_id in records, (records, diagnosis(r.cluster, r.out))
    record = records[job_id]
    assert record["Name"] == scripts[0].name
    assert record["NodeList"] == r.cluster.node and record["Partition"] == slurm_cluster.PARTITION
    assert record["JobState"] in ("COMPLETED", "CANCELLED"), record  # Parsl cancels its idle block at exit


def test_reconstruction_matches_truth(slurm_run):
    truth = load_truth(slurm_run.scan / "truth.h5")
    for k in range(POINTS):
        s = score(truth.for_point(k), *read_profiles(slurm_run.out / layout.point_name(k)))
        assert s.finite and s.spot_pixels > 0
        assert s.covered >= 0.99, s.summary()
        assert s.centroid_median <= 0.5, s.summary()
        assert s.within_2um >= 0.95, s.summary()
        assert s.correlation_mean >= 0.9, s.summary()


def test_no_process_of_the_run_is_left(slurm_run):
    """The driver, its interchange and the workers are gone once the run returned and its job ended."""
    deadline = time.monotonic() + 30
    while (left := slurm_run.cluster.processes()) and time.monotonic() < deadline:
        time.sleep(1)
    commands = []
    for pid in left:
        with contextlib.suppress(OSError):
            commands.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
    assert left == [], commands


def test_rejected_submission_fails_fast(cluster, scan, tmp_path):
    """A job the cluster refuses (an unknown partition) fails the run quickly with sbatch's reason."""
    out = tmp_path / "recon"
    done = laueflow_run(cluster, scan, out, "--points", "0", timeout=240, partition="nosuchpartition")
    assert done.returncode == 1, diagnosis(cluster, out, done.stdout, done.stderr)
    assert "point     0: failed" in done.stdout and "invalid partition" in done.stdout.lower(), done.stdout
    assert not list(out.glob("point_*.h5"))
    assert wait_for_empty_queue(cluster) == []
