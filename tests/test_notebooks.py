"""Every notebook in notebooks/ runs top to bottom, unattended, against a small simulated run: once while
`laueflow run` is in progress (some points finished, others not) and once when it has finished.

The kernel is this interpreter (the project's virtual environment) with ipykernel, registered in a
temporary Jupyter path, so the test needs no kernel installed beforehand.  The in-progress case pauses
the run (SIGSTOP) once status.json shows a point done but not all, so the notebook reads a genuinely
partial run folder, then lets it go on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
from conftest import use_tiles
from nbclient import NotebookClient

from laueflow.runs import FILE_STATES, open_run
from laueflow.simulate import simulate

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
KERNEL = "laueflow-test"
POINTS = 3


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> Path:
    """A Jupyter data folder holding a kernel spec for this interpreter."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "laueflow (tests)", "language": "python"}))
    return root


def execute(path: Path, run_dir: Path, kernel_dir: Path,
            monkeypatch: pytest.MonkeyPatch) -> nbformat.NotebookNode:
    """Run a notebook top to bottom with LAUEFLOW_RUN set; raises on the first failing cell."""
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))
    monkeypatch.setenv("LAUEFLOW_RUN", str(run_dir))
    monkeypatch.delenv("LAUEFLOW_POINT", raising=False)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, kernel_name=KERNEL, timeout=300, startup_timeout=120,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb


def _text(nb: nbformat.NotebookNode) -> str:
    return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for out in cell.outputs if out.output_type == "stream")


def _images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
               for out in cell.outputs)


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("nb") / "scan"
    simulate(folder, preset="multipoint", points=POINTS, region=16, seed=7)
    use_tiles(folder, 64)
    return folder


@pytest.fixture(scope="module")
def live_run(scan) -> SimpleNamespace:
    """`laueflow run` started in a subprocess on the scan (threads site: one process to pause)."""
    out = scan.parent / "recon"
    cmd = [sys.executable, "-m", "laueflow.cli", "run", str(scan), "--out", str(out), "--site", "threads",
           "--block-pixels", "64", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield SimpleNamespace(out=out, proc=proc)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
    proc.communicate()


def test_notebooks_are_stored_without_outputs():
    assert NOTEBOOKS, "no notebooks found"
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has outputs"


def _finished(run) -> list[int]:
    return [k for k, p in run.points.items() if p.state in FILE_STATES]


def _pause_when_partial(out: Path, proc: subprocess.Popen) -> SimpleNamespace | None:
    """Wait until status.json shows some points with a result and some without, then SIGSTOP the run."""
    deadline = time.monotonic() + 540
    while proc.poll() is None and time.monotonic() < deadline:
        if (out / "status.json").is_file():
            run = open_run(out)
            if run.state == "running" and 0 < len(_finished(run)) < POINTS:
                os.kill(proc.pid, signal.SIGSTOP)
                return open_run(out)  # what the notebooks will see: nothing moves while paused
        time.sleep(0.1)
    return None


def test_notebooks_run_on_a_partial_then_a_finished_run(live_run, kernel_dir, monkeypatch):
    out, proc = live_run.out, live_run.proc
    partial = _pause_when_partial(out, proc)
    if partial is None:
        output = proc.communicate()[0] if proc.poll() is not None else "(still running)"
        pytest.fail(f"no partial state seen before the run ended: {output}")
    done = _finished(partial)
    assert set(done) <= set(partial.ready)
    assert all(p.state in ("pending", "running") for k, p in partial.points.items() if k not in done)
    try:
        during = {path.name: execute(path, out, kernel_dir, monkeypatch) for path in NOTEBOOKS}
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    output = proc.communicate(timeout=540)[0]
    assert proc.returncode == 0, output
    after = {path.name: execute(path, out, kernel_dir, monkeypatch) for path in NOTEBOOKS}

    for name in during:
        assert _images(during[name]) >= 1 and _images(after[name]) >= 1, name
    explore_during, explore_after = _text(during["explore_run.ipynb"]), _text(after["explore_run.ipynb"])
    assert f"running: {len(done)} of {POINTS} points finished" in explore_during
    assert f"finished: {POINTS} of {POINTS} points finished" in explore_after
    assert "truth:" in explore_after and "covered" in explore_after  # the simulated truth was compared
    assert _images(during["explore_run.ipynb"]) == _images(after["explore_run.ipynb"]) >= 8
