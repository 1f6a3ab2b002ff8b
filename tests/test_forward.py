"""Forward model (model.md section 3): linearity, shapes, single rays, chunking, and the key check
against the independent plain-NumPy ray tracer in raytrace.py."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import raytrace as R

from laueflow import forward as F
from laueflow import geometry as G
from laueflow import mask as M

FRAMES = np.arange(261)
PRODUCTION_000 = R.MASKS / "code-debruijn-2-8-000.npy"
PRODUCTION_004 = R.MASKS / "code-debruijn-2-8-004.npy"
needs_production = pytest.mark.skipif(not PRODUCTION_000.is_file(), reason="production masks not available")


@functools.cache
def setup(name: str = "oblique", mask_path: Path | None = None) -> tuple[F.Setup, np.ndarray]:
    """The laueflow set-up of one model.md geometry, and its depth grid (mm)."""
    cfg = R.make_config(name, mask_path)
    return F.Setup.from_config(cfg), R.depth_grid(cfg.geo.source.grid)


def thin_profile(z: np.ndarray, centre: float = 0.02, sigma: float = 0.003) -> np.ndarray:
    """A thin grain: a Gaussian of ``sigma`` mm, exactly zero beyond 4 sigma."""
    f = np.exp(-0.5 * ((z - centre) / sigma) ** 2)
    return np.where(np.abs(z - centre) <= 4 * sigma, f, 0.0)


def extended_profile(z: np.ndarray) -> np.ndarray:
    """An extended grain: 60 um, decaying with depth, with a sharp top."""
    return np.where((z >= -0.04) & (z < 0.02), np.exp(-(z + 0.04) / 0.04), 0.0)


def pixels(s: F.Setup, rc: list[tuple[int, int]]) -> np.ndarray:
    rows, cols = np.array(rc, dtype=float).T
    return G.pixel_centres(s.geo, rows, cols)


# ----------------------------------------------------------------------------------------------
# Properties of laueflow.forward


def test_shapes_and_design_matrix() -> None:
    s, z = setup()
    p = pixels(s, [(1024, 1024), (400, 1500), (1600, 700)])
    f = np.stack([thin_profile(z), extended_profile(z), thin_profile(z, -0.05)])
    frames = FRAMES[:50]
    g = F.design_matrices(s, p, z, frames)
    assert g.shape == (3, 50, z.size)
    assert np.all((g > 0) & (g <= 1))
    t = F.traces(s, p, f, z, frames, background=2.0)
    assert t.shape == (3, 50)
    np.testing.assert_allclose(t, 2.0 + np.einsum("pnj,pj->pn", g, f), rtol=2e-6)


def test_traces_linear_in_profile_and_background() -> None:
    s, z = setup("flat")
    p = pixels(s, [(1024, 1024), (300, 300)])
    rng = np.random.default_rng(3)
    f1, f2 = rng.uniform(0, 1, (2, z.size)), rng.uniform(0, 1, (2, z.size))
    t1, t2 = F.traces(s, p, f1, z, FRAMES), F.traces(s, p, f2, z, FRAMES)
    np.testing.assert_allclose(F.traces(s, p, 2 * f1 + 3 * f2, z, FRAMES), 2 * t1 + 3 * t2, rtol=1e-5)
    np.testing.assert_allclose(F.traces(s, p, 0 * f1, z, FRAMES), 0.0, atol=0)
    # background: scalar, per pixel (P,), per frame (N,), per pixel and frame (P, N)
    b_pixel = np.array([5.0, 7.0])
    b_frame = np.linspace(0, 3, FRAMES.size)
    np.testing.assert_allclose(F.traces(s, p, f1, z, FRAMES, background=4.0), t1 + 4.0, rtol=1e-6)
    np.testing.assert_allclose(F.traces(s, p, f1, z, FRAMES, background=b_pixel), t1 + b_pixel[:, None],
                               rtol=1e-6)
    np.testing.assert_allclose(F.traces(s, p, f1, z, FRAMES, background=b_frame), t1 + b_frame, rtol=1e-6)
    b_both = rng.uniform(0, 9, (2, FRAMES.size))
    np.testing.assert_allclose(F.traces(s, p, f1, z, FRAMES, background=b_both), t1 + b_both, rtol=1e-6)


@pytest.mark.parametrize("name", ["oblique", "flat"])
def test_delta_profile_is_the_single_ray_transmission(name: str) -> None:
    s, z = setup(name)
    cfg = R.make_config(name)
    j = 170
    f = np.zeros(z.size)
    f[j] = 1.0
    for row, col in [(1024, 1024), (500, 1400)]:
        got = F.traces(s, pixels(s, [(row, col)]), f[None], z, FRAMES, energy_kev=15.0)[0]
        want, ray = R.trace_pixel(cfg, row, col, z, f, FRAMES, energy_kev=15.0, n_sub=4000)
        assert np.ptp(want) > 0.3  # the ray does cross bars and gaps
        np.testing.assert_allclose(got, want, atol=1e-3)
        # the open and full-gold levels
        np.testing.assert_allclose(got.max(), 1.0, atol=1e-5)
        np.testing.assert_allclose(got.min(), np.exp(-ray.mu_path), atol=1e-4)


def test_energy_per_pixel() -> None:
    s, z = setup()
    p = pixels(s, [(1024, 1024), (400, 1500)])
    f = np.stack([thin_profile(z)] * 2)
    both = F.traces(s, p, f, z, FRAMES, energy_kev=[12.0, 25.0])
    np.testing.assert_allclose(both[0], F.traces(s, p[:1], f[:1], z, FRAMES, energy_kev=12.0)[0], rtol=1e-6)
    np.testing.assert_allclose(both[1], F.traces(s, p[1:], f[1:], z, FRAMES, energy_kev=25.0)[0], rtol=1e-6)


def test_chunking_gives_identical_results() -> None:
    """Identical up to float32 rounding (each chunk size is its own compiled program)."""
    s, z = setup()
    rng = np.random.default_rng(5)
    p = pixels(s, [(int(r), int(c)) for r, c in rng.integers(0, 2048, (7, 2))])
    f = rng.uniform(0, 1, (7, z.size))
    b = rng.uniform(0, 3, 7)
    e = rng.uniform(10, 30, 7)
    whole = F.traces(s, p, f, z, FRAMES, energy_kev=e, background=b)
    for chunk in (1, 3, 7):
        np.testing.assert_allclose(F.traces(s, p, f, z, FRAMES, energy_kev=e, background=b, chunk=chunk),
                                   whole, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# The key check: laueflow.forward against the independent ray tracer

CENTRE_PIXELS = [(1024, 1024), (400, 1500), (1600, 700)]
KEY_CASES = [
    # geometry, mask, energy (keV), pixels
    pytest.param("oblique", None, 20.0, [*CENTRE_PIXELS, (1024, 1900)], id="oblique-generated"),
    pytest.param("flat", None, 12.0, [*CENTRE_PIXELS, (1024, 1900)], id="flat-generated"),
    pytest.param("oblique", PRODUCTION_000, 15.0, [*CENTRE_PIXELS, (150, 200)], id="oblique-000",
                 marks=needs_production),
    pytest.param("flat", PRODUCTION_000, 25.0, [*CENTRE_PIXELS, (150, 200)], id="flat-000",
                 marks=needs_production),
    pytest.param("oblique", PRODUCTION_004, 20.0, CENTRE_PIXELS, id="oblique-004", marks=needs_production),
    pytest.param("flat", PRODUCTION_004, 20.0, CENTRE_PIXELS, id="flat-004", marks=needs_production),
]


@pytest.mark.parametrize("profile", ["thin", "extended"])
@pytest.mark.parametrize(("name", "mask_path", "energy", "rc"), KEY_CASES)
def test_forward_matches_raytracer(name: str, mask_path: Path | None, energy: float,
                                   rc: list[tuple[int, int]], profile: str) -> None:
    """a * trace_laueflow + b fits the ray-traced trace to better than 1e-3 relative, with a ~ 1, b ~ 0."""
    s, z = setup(name, mask_path)
    cfg = R.make_config(name, mask_path)
    f = thin_profile(z) if profile == "thin" else extended_profile(z)
    got = F.traces(s, pixels(s, rc), np.tile(f, (len(rc), 1)), z, FRAMES, energy_kev=energy)
    for (row, col), lf in zip(rc, got, strict=True):
        blur = R.thickness_blur(cfg, row, col)
        n_sub = max(200, int(np.ceil(blur / 0.005)))  # sub-samples 5 nm apart at most
        want, ray = R.trace_pixel(cfg, row, col, z, f, FRAMES, energy_kev=energy, n_sub=n_sub)
        u = ray.u[:, f > 0]
        assert np.all((u > 0) & (u < s.mask.length)), "the rays must cross the code"
        assert np.std(want) > 0.02 * np.mean(want), "the trace must carry the code"
        err, a, b = R.affine_fit_error(want, lf)
        assert err < 1e-3, f"pixel {(row, col)}: relative error {err:.2e}"
        assert abs(a - 1) < 1e-3 and abs(b) < 1e-3 * np.mean(want), f"pixel {(row, col)}: a={a}, b={b}"
        direct = np.linalg.norm(want - lf) / np.linalg.norm(want - want.mean())
        assert direct < 1e-3, f"pixel {(row, col)}: relative error without the fit {direct:.2e}"


def test_forward_matches_raytracer_at_zero_blur() -> None:
    """flat geometry: near column 918 the rays cross the mask at normal incidence (blur ~ 0)."""
    s, z = setup("flat")
    cfg = R.make_config("flat")
    cols = np.arange(900.0, 940.0)
    row = 1024.0
    col = float(cols[np.argmin([R.thickness_blur(cfg, row, c) for c in cols])])
    assert R.thickness_blur(cfg, row, col) < 1e-3
    f = extended_profile(z)
    want, _ = R.trace_pixel(cfg, row, col, z, f, FRAMES, energy_kev=20.0)
    got = F.traces(s, G.pixel_centres(s.geo, row, col)[None], f[None], z, FRAMES, energy_kev=20.0)[0]
    np.testing.assert_allclose(got, want, rtol=1e-3)


def test_raytracer_gold_layout_is_independent_of_laueflow() -> None:
    """The tracer's bars and gold indicator agree with laueflow's layout of the same code."""
    cfg = R.make_config()
    bars, mask = R.bars_from_config(cfg), M.from_config(cfg)
    u = np.linspace(-10, mask.length + 10, 20001)
    np.testing.assert_array_equal(bars.gold(u), np.searchsorted(mask.bars.ravel(), u, side="right") % 2)
