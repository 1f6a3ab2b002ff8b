"""Fixtures shared by the test files: one small simulated scan made once per session, and a run of it.

The scan is shared read-only: a test that changes frames copies it first (``shutil.copytree``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from laueflow import sites
from laueflow.config import load
from laueflow.simulate import simulate
from laueflow.workflow import run

MULTIPOINT_REGION = 16  # pixels a side
MULTIPOINT_POINTS = 3
MULTIPOINT_BLOCK = 64  # pixels per block: 4 tiles per point


# the longest test files (runs of worker processes, subprocesses, a Slurm cluster) first: with the suite
# on two workers, one file each at a time (`make test`), they then overlap instead of ending it alone
LONG_FILES = ("test_watch.py", "test_interrupt.py", "test_faults.py", "test_notebooks.py", "test_slurm.py",
              "test_calibrate.py", "test_workflow.py", "test_decode.py", "test_determinism.py",
              "test_runs.py",
              "test_resume.py", "test_simulate.py", "test_staging.py", "test_globus_compute.py",
              "test_transfer_run.py", "test_cli.py")


def pytest_collection_modifyitems(config, items) -> None:
    """Run the long test files first (a stable sort: the order within a file is kept)."""
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))


def use_tiles(scan: Path, tile_pixels: int) -> None:
    """Set the decoder's tile (``recon.tile_pixels``) in a simulated scan's config.yaml: the small test
    scans are cut into several tiles, so that a point is several block tasks."""
    path = scan / "config.yaml"
    data = yaml.safe_load(path.read_text())
    data.setdefault("recon", {})["tile_pixels"] = tile_pixels
    path.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture(scope="session")
def multipoint_scan(tmp_path_factory) -> Path:
    """A 3-point scan of 16 x 16 pixels (preset multipoint, seed 5), frame files and truth."""
    folder = tmp_path_factory.mktemp("shared") / "scan"
    simulate(folder, preset="multipoint", points=MULTIPOINT_POINTS, region=MULTIPOINT_REGION, seed=5)
    use_tiles(folder, MULTIPOINT_BLOCK)
    return folder


@pytest.fixture(scope="session")
def multipoint_run(multipoint_scan: Path, tmp_path_factory) -> Path:
    """An uninterrupted run of the whole shared scan on the threads site (2 workers, 64-pixel blocks)."""
    out = tmp_path_factory.mktemp("shared_run") / "recon"
    result = run(multipoint_scan, load(multipoint_scan / "config.yaml"), out, block_pixels=MULTIPOINT_BLOCK,
                 site_config=sites.site_config("threads", workers=2, run_dir=str(out / ".runinfo")))
    assert result.exit_code == 0, [p.line() for p in result.points]
    return out
