"""The same input gives the same bytes: a block decoded again in one process, in another process, and
whatever other rows share its solver calls (every support decision rests on sums that must not depend
on which pixels were batched together); a run on worker processes against one on threads."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np

from laueflow import decode as D
from laueflow import sites
from laueflow.config import load
from laueflow.decode import block, dictionary, energy, solvers, support
from laueflow.forward import Setup
from laueflow.io.scan import open_scan
from laueflow.workflow import run

FIELDS = ("rows", "cols", "profiles", "background", "residual", "quality", "energy", "energy_sigma")

# run as a script (python tests/test_determinism.py SCAN POINT TILE): print the digest of one decode
_SCRIPT = Path(__file__).resolve()


def _digest(decoded: D.Decoded) -> str:
    h = hashlib.sha256()
    for name in FIELDS:
        h.update(np.ascontiguousarray(getattr(decoded, name)).tobytes())
    return h.hexdigest()


def _decode_tile(scan_dir: Path, point: int, tile: int, block_pixels: int = 64) -> D.Decoded:
    cfg = load(scan_dir / "config.yaml")
    scan = open_scan(cfg, scan_dir, check=False)
    b = scan.read_block(point, scan.tiles(block_pixels)[tile])
    return D.decode(b.traces, b.rows, b.cols, b.frames, Setup.from_config(cfg), cfg, selected=b.selected)


def test_one_block_decoded_eight_times_in_other_threads_and_another_process(multipoint_scan):
    """Bit-identical results (profiles and every per-pixel field) for one block: 8 decodes here, one in
    another thread of this process (whose BLAS may run another number of threads than this one's),
    and one in a fresh interpreter held to one CPU (XLA's thread pool of another size)."""
    digests = {_digest(_decode_tile(multipoint_scan, 1, 1)) for _ in range(8)}
    assert len(digests) == 1
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(lambda: _digest(_decode_tile(multipoint_scan, 1, 1))).result() in digests
    one_cpu = min(os.sched_getaffinity(0))
    out = subprocess.run([sys.executable, str(_SCRIPT), str(multipoint_scan), "1", "1"], capture_output=True,
                         text=True, timeout=300, check=True,
                         preexec_fn=lambda: os.sched_setaffinity(0, {one_cpu}))
    assert out.stdout.split()[-1] == digests.pop()


def test_support_fits_do_not_depend_on_their_batch(multipoint_scan, monkeypatch):
    """Every support refit of a real block, redone with other rows around it (half of them, a few,
    reversed order): each row's solution and misfit are the same bits."""
    calls = []
    fit = solvers.fit_supports

    def spy(*args):
        calls.append((args, fit(*args)))
        return calls[-1][1]

    monkeypatch.setattr(support, "fit_supports", spy)
    _decode_tile(multipoint_scan, 1, 0, block_pixels=256)  # the whole 16 x 16 region
    assert calls
    compared = 0
    for (levels, level, pixel, data, allowed, init, sparsity), (h, chi) in calls:
        n = len(level)
        for rows in (np.arange(0, n, 2), np.arange(min(n, 5)), np.arange(n)[::-1]):
            h2, chi2 = fit(levels, level[rows], pixel[rows], data, allowed, init, sparsity)
            np.testing.assert_array_equal(h2, h[rows])
            np.testing.assert_array_equal(chi2, chi[rows])
            compared += rows.size
    assert compared > 100


def test_full_fit_rows_do_not_depend_on_their_batch(multipoint_scan):
    """Pass 1's fit over the whole grid: a row alone gives the same bits as within a full batch."""
    cfg = load(multipoint_scan / "config.yaml")
    scan = open_scan(cfg, multipoint_scan, check=False)
    b = scan.read_block(1, scan.tiles(256)[0])
    settings = D.DecodeSettings.from_config(cfg)
    setup = Setup.from_config(cfg)
    dct = dictionary.build_dictionary(setup, settings, b.rows, b.cols, b.frames)
    blk = block.Block(settings, b.traces.astype(np.float64), b.rows, b.cols, np.arange(b.rows.size), dct)
    lev = blk.level(energy.MU_LEVELS.size // 2)
    d = blk.d[:70]
    whole = lev.full(d, settings.sparsity)
    for rows in (np.arange(3), np.arange(65, 70), np.arange(70)[::-3]):
        np.testing.assert_array_equal(lev.full(d[rows], settings.sparsity), whole[rows])


def _datasets(path: Path) -> dict[str, bytes]:
    """Every dataset of a point file but its provenance (which records times and hosts), as bytes."""
    out: dict[str, bytes] = {}

    def take(name: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset) and not name.startswith("entry/provenance"):
            value = np.asarray(obj[()])
            out[name] = repr(value.tolist()).encode() if value.dtype.hasobject else value.tobytes()

    with h5py.File(path, "r") as f:
        f.visititems(take)
    return out


def test_a_run_on_worker_processes_gives_the_same_bytes(multipoint_scan, multipoint_run, tmp_path):
    """The local site (worker processes of a real HighThroughputExecutor, one worker, frames read by each
    block task, one block of all four tiles per point) against the shared run (threads, two workers,
    staged frames, a block per tile): identical volumes and per-pixel fields."""
    out = tmp_path / "recon"
    result = run(multipoint_scan, load(multipoint_scan / "config.yaml"), out, block_pixels=256, staging=False,
                 site_config=sites.site_config("local", workers=1, run_dir=str(out / ".runinfo")))
    assert result.exit_code == 0, [p.line() for p in result.points]
    for k in range(3):
        name = f"point_{k:05d}.h5"
        got, want = _datasets(out / name), _datasets(multipoint_run / name)
        assert got.keys() == want.keys() and "entry/reconstruction/volume" in got
        assert [n for n in got if got[n] != want[n]] == []


if __name__ == "__main__" and len(sys.argv) == 4:
    print(_digest(_decode_tile(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))))
