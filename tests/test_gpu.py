"""The decoder on an accelerator against the same pixels on the CPU (`make test-gpu` on a GPU node).

The GPU cases need a JAX with a GPU backend (``pip install -e '.[gpu]'``) and skip elsewhere; the same
comparison between two CPU placements runs in the fast suite, so that what the GPU cases check
(placement by ``jax.default_device``, one compiled function per device and block shape, results
that leave the device as NumPy arrays) stays exercised without a GPU.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest
from test_decode import assert_targets

from laueflow import config as C
from laueflow import decode as D
from laueflow import evaluate as E
from laueflow import forward as F
from laueflow.io.scan import open_scan
from laueflow.io.truth import load_truth
from laueflow.simulate import simulate

# the reconstruction issue's bound on GPU-vs-CPU profile differences in float32
REL_TOL = 1e-3


def _devices(kind: str) -> list:
    try:
        return jax.devices(kind)
    except RuntimeError:
        return []


@pytest.fixture(scope="module")
def blocks(tmp_path_factory):
    """A small thin-grain scan (tilted geometry) read into blocks, with its truth."""
    folder = tmp_path_factory.mktemp("gpu") / "scan"
    simulate(folder, preset="thin", region=32, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", C.ConfigWarning)
        cfg = C.load(folder / "config.yaml")
    scan = open_scan(cfg)
    read = [scan.read_block(0, t) for t in scan.tiles(256)]
    return cfg, F.Setup.from_config(cfg), read, load_truth(folder / "truth.h5").for_point(0)


def decode_on(device, cfg, setup, read) -> dict[str, np.ndarray]:
    """Every block decoded with ``device`` as JAX's default device; results as NumPy arrays."""
    parts = []
    with jax.default_device(device):
        for b in read:
            parts.append(D.decode(b.traces, b.rows, b.cols, b.frames, setup, cfg, b.selected))
    out = {k: np.concatenate([getattr(p, k) for p in parts])
           for k in ("rows", "cols", "profiles", "background", "quality")}
    assert all(isinstance(v, np.ndarray) for v in out.values())  # nothing stays on the device
    return out


def compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    """Relative differences of two decodings of the same pixels: over all profiles, and per lit pixel."""
    np.testing.assert_array_equal(a["rows"], b["rows"])
    np.testing.assert_array_equal(a["cols"], b["cols"])
    pa, pb = a["profiles"].astype(np.float64), b["profiles"].astype(np.float64)
    total = float(np.abs(pa - pb).sum() / max(np.abs(pb).sum(), 1e-30))
    lit = np.abs(pb).sum(axis=1) > 0
    per_pixel = np.abs(pa - pb)[lit].sum(axis=1) / np.abs(pb)[lit].sum(axis=1)
    return {"total": total, "p99": float(np.quantile(per_pixel, 0.99)) if lit.any() else 0.0,
            "lit_agree": float(np.mean((np.abs(pa).sum(axis=1) > 0) == lit))}


def test_cpu_placements_agree(blocks):
    """The comparison on the CPU: decoding under an explicit default device gives the same results."""
    cfg, setup, read, truth = blocks
    cpu = _devices("cpu")[0]
    a = decode_on(cpu, cfg, setup, read)
    b = decode_on(cpu, cfg, setup, read)
    d = compare(a, b)
    assert d["total"] <= REL_TOL and d["lit_agree"] == 1.0, d
    assert_targets("thin", E.score(truth, a["rows"], a["cols"], a["profiles"]))


@pytest.mark.gpu
def test_gpu_matches_cpu(blocks):
    """On a GPU: the same pixels decoded on the GPU and the CPU agree to 1e-3 (relative, float32), and
    the GPU's profiles meet the thin-grain accuracy targets."""
    gpus = _devices("gpu")
    if not gpus:
        pytest.skip("no GPU backend in this JAX (on a GPU node: pip install -e '.[gpu]')")
    cfg, setup, read, truth = blocks
    on_cpu = decode_on(_devices("cpu")[0], cfg, setup, read)
    on_gpu = decode_on(gpus[0], cfg, setup, read)
    d = compare(on_gpu, on_cpu)
    print(f"GPU vs CPU ({gpus[0].device_kind}): relative difference {d['total']:.2e} over all profiles, "
          f"99th percentile per pixel {d['p99']:.2e}, lit pixels agreeing {d['lit_agree']:.2%}")
    assert d["total"] <= REL_TOL, d
    assert d["lit_agree"] >= 0.99, d
    assert_targets("thin", E.score(truth, on_gpu["rows"], on_gpu["cols"], on_gpu["profiles"]))
