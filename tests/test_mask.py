"""The coded mask (model.md sections 2-3): de Bruijn code, production codes, bar layout, thick-bar gold
fraction against brute force, gold attenuation."""

from __future__ import annotations

import itertools
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import raytrace as R

from laueflow import mask as M

PRODUCTION = sorted(R.MASKS.glob("*.npy"))
needs_production = pytest.mark.skipif(not PRODUCTION, reason="production masks not available")


def windows(code: np.ndarray, n: int, cyclic: bool) -> list[tuple[int, ...]]:
    seq = np.concatenate([code, code[: n - 1]]) if cyclic else code
    return [tuple(int(b) for b in seq[i : i + n]) for i in range(len(seq) - n + 1)]


# ----------------------------------------------------------------------------------------------
# Codes


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_debruijn_every_word_once_cyclically(n: int) -> None:
    code = M.debruijn(n)
    assert code.shape == (2**n,)
    assert set(np.unique(code)) <= {0, 1}
    words = windows(code, n, cyclic=True)
    assert len(words) == 2**n
    assert sorted(words) == sorted(itertools.product((0, 1), repeat=n))


def test_debruijn_8_is_the_default_code() -> None:
    code = M.debruijn(8)
    assert len(code) == 256 and code.sum() == 128
    mask = M.from_config(R.make_config())
    np.testing.assert_array_equal(mask.code, code)


@needs_production
@pytest.mark.parametrize("path", PRODUCTION, ids=lambda p: p.name)
def test_production_codes_load_as_binary(path: Path) -> None:
    code = M.load_code(path)
    raw = np.load(path)
    assert code.ndim == 1 and code.size == raw.size
    assert set(np.unique(code)) == {0, 1}
    np.testing.assert_array_equal(code, raw)
    words = windows(code, 8, cyclic=False)
    assert len(set(words)) == len(words)  # every 8-bit window locates the mask uniquely


@needs_production
def test_production_code_000_is_debruijn() -> None:
    code = M.load_code(R.MASKS / "code-debruijn-2-8-000.npy")
    assert sorted(windows(code, 8, cyclic=True)) == sorted(itertools.product((0, 1), repeat=8))
    mask = M.from_config(R.make_config(mask_path=R.MASKS / "code-debruijn-2-8-000.npy"))
    np.testing.assert_array_equal(mask.code, code)


def test_load_code_rejects_bad_files(tmp_path: Path) -> None:
    np.save(tmp_path / "two.npy", np.array([0, 1, 2]))
    np.save(tmp_path / "empty.npy", np.array([], dtype=int))
    (tmp_path / "text.npy").write_text("not a numpy file")
    for name in ("two.npy", "empty.npy", "text.npy", "missing.npy"):
        with pytest.raises(ValueError, match=name):
            M.load_code(tmp_path / name)
    np.save(tmp_path / "float.npy", np.array([0.0, 1.0, 1.0]))
    np.testing.assert_array_equal(M.load_code(tmp_path / "float.npy"), [0, 1, 1])


# ----------------------------------------------------------------------------------------------
# Layout


def test_layout_by_hand() -> None:
    """Code 0 1 1 0 1: widths 15, 7.5, 7.5, 15, 7.5 after a 150 um pad."""
    m = M.layout(np.array([0, 1, 1, 0, 1]), (15.0, 7.5), pad=150.0)
    assert m.length == pytest.approx(52.5 + 300.0)
    np.testing.assert_allclose(m.bars, [[165.0, 180.0], [195.0, 202.5]])  # a run of 1s is one bar
    assert m.open_fraction() == pytest.approx(1 - 22.5 / 352.5)
    x, c = m.breakpoints
    assert np.all(np.diff(x) >= 0) and np.all(np.diff(c) >= 0)
    assert c[-1] == pytest.approx(22.5) and x[-1] == pytest.approx(m.length)


def test_layout_widening_pad_stretch() -> None:
    code = np.array([0, 1, 1, 0, 1])
    w = M.layout(code, (15.0, 7.5), widening=2.0, pad=150.0)
    np.testing.assert_allclose(w.bars, [[164.0, 181.0], [194.0, 203.5]])  # half per side
    assert w.length == pytest.approx(352.5)  # widening does not change L
    p = M.layout(code, (15.0, 7.5), pad=20.0)
    np.testing.assert_allclose(p.bars, [[35.0, 50.0], [65.0, 72.5]])
    assert p.length == pytest.approx(92.5)
    # stretch scales the bits (not the pad; model.md calls it a scale fudge)
    s = M.layout(code, (15.0, 7.5), pad=150.0, stretch=2.0)
    np.testing.assert_allclose(s.bars, [[180.0, 210.0], [240.0, 255.0]])
    assert s.length == pytest.approx(105.0 + 300.0)
    # widened bars that meet merge into one
    merged = M.layout(np.array([1, 0, 1]), (1.0, 7.5), widening=2.0, pad=10.0)
    np.testing.assert_allclose(merged.bars, [[9.0, 27.0]])
    # with no pad, bars are clipped to the code [0, L]
    clipped = M.layout(np.array([1, 0, 1]), (15.0, 7.5), widening=2.0, pad=0.0)
    np.testing.assert_allclose(clipped.bars, [[0.0, 8.5], [21.5, 30.0]])


def test_layout_reversed_is_a_mirror_image() -> None:
    code = M.debruijn(8)
    fwd = M.layout(code, (15.0, 7.5), widening=1.0, pad=200.0)
    rev = M.layout(code, (15.0, 7.5), widening=1.0, pad=200.0, reversed_=True)
    assert rev.length == pytest.approx(fwd.length)
    np.testing.assert_allclose(rev.bars, fwd.length - fwd.bars[::-1, ::-1], atol=1e-9)
    np.testing.assert_array_equal(rev.code, code[::-1])


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"mask__widening": 2.5, "mask__pad": 300.0},
        {"mask__stretch": 1.02, "mask__bitsizes": [14.0, 8.0]},
        {"mask__reversed": True, "mask__widening": 1.0},
    ],
)
@pytest.mark.parametrize("path", [None, *PRODUCTION[::3]], ids=lambda p: getattr(p, "name", "generated"))
def test_layout_matches_raytracer_bars(path: Path | None, params: dict) -> None:
    cfg = R.make_config(mask_path=path, **params)
    mask = M.from_config(cfg)
    bars = R.bars_from_config(cfg)
    assert mask.length == pytest.approx(bars.length, abs=1e-9)
    np.testing.assert_allclose(mask.bars[:, 0], bars.starts, atol=1e-9)
    np.testing.assert_allclose(mask.bars[:, 1], bars.ends, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# Gold fraction


def indicator(mask: M.Mask, u: np.ndarray) -> np.ndarray:
    """The gold indicator at u, straight from the (sorted, disjoint) bar list: inside [start, end)."""
    return (np.searchsorted(mask.bars.ravel(), u, side="right") % 2).astype(np.float64)


def brute_force_fraction(mask: M.Mask, u: np.ndarray, blur: float, n: int = 20000) -> np.ndarray:
    """Mean of the indicator over n midpoint samples of [u - blur/2, u + blur/2]."""
    grid = blur * ((np.arange(n) + 0.5) / n - 0.5)
    return indicator(mask, u[:, None] + grid).mean(axis=1)


@pytest.fixture(scope="module")
def wide_mask() -> M.Mask:
    return M.layout(M.debruijn(8), (15.0, 7.5), widening=1.0, pad=150.0)


@pytest.mark.parametrize("blur", [1e-3, 0.3, 4.0, 9.5, 25.0, 80.0])
def test_gold_fraction_exact_against_brute_force(wide_mask: M.Mask, blur: float) -> None:
    """Exact for any blur: well under a bar, about one bar, wider than bars and gaps."""
    rng = np.random.default_rng(7)
    edges = wide_mask.bars.ravel()
    u = np.concatenate([rng.uniform(-100, wide_mask.length + 100, 120),
                        rng.choice(edges, 40) + rng.uniform(-1.2, 1.2, 40) * blur / 2])
    want = brute_force_fraction(wide_mask, u, blur)
    tol = 4 / 20000 * (1 + blur / 7.5)  # midpoint-rule error: half a sample per edge in the window
    np.testing.assert_allclose(M.gold_fraction_np(u, blur, wide_mask), want, atol=tol)
    bars32, gold32 = jnp.asarray(wide_mask.bars, jnp.float32), jnp.asarray(M.gold_before(wide_mask.bars))
    got32 = np.asarray(M.gold_fraction(jnp.asarray(u, jnp.float32), jnp.float32(blur), bars32, gold32))
    # float32 rounds u itself by up to 1.2e-4 um: that shifts the window, moving up to 2 edges
    np.testing.assert_allclose(got32, want, atol=tol + 2.5e-4 / blur)
    # the cumulative gold summed in float32 inside gold_fraction is as good
    np.testing.assert_allclose(M.gold_fraction(jnp.asarray(u, jnp.float32), blur, bars32), got32, atol=1e-5)


def test_gold_fraction_zero_blur_is_the_indicator(wide_mask: M.Mask) -> None:
    edges = wide_mask.bars.ravel()
    u = np.linspace(-20, wide_mask.length + 20, 4001)
    u = u[np.min(np.abs(u[:, None] - edges[None, :]), axis=1) > 1e-3]
    np.testing.assert_allclose(M.gold_fraction_np(u, 0.0, wide_mask), indicator(wide_mask, u), atol=1e-7)
    long_bar = np.argmax(np.diff(wide_mask.bars, axis=1))  # 8 ones + widening: 61 um of gold
    inside = wide_mask.bars[long_bar].mean()
    assert M.gold_fraction_np(np.array([inside]), 30.0, wide_mask)[0] == pytest.approx(1.0)
    assert M.gold_fraction_np(np.array([-50.0, wide_mask.length + 50]), 20.0, wide_mask) == pytest.approx(0.0)


@pytest.mark.parametrize("blur", [0.0, 1e-30, 1e-6, 1e-3, 0.05])
def test_gold_fraction_float32_small_blur(wide_mask: M.Mask, blur: float) -> None:
    """In float32, inside a wide bar the gold fraction is 1 and in a gap 0 for any blur narrower than
    them, even where u +- blur/2 rounds back to u (u ~ 1600-3200 um: ulp 1.2e-4 to 2.4e-4 um)."""
    bars32, gold32 = jnp.asarray(wide_mask.bars, jnp.float32), jnp.asarray(M.gold_before(wide_mask.bars))
    bar = wide_mask.bars[np.argmax(np.diff(wide_mask.bars, axis=1))]
    gap = wide_mask.bars[1:, 0] - wide_mask.bars[:-1, 1]
    i = np.argmax(gap)
    for lo, hi, want in [(bar[0], bar[1], 1.0), (wide_mask.bars[i, 1], wide_mask.bars[i + 1, 0], 0.0)]:
        u = np.linspace(lo + 1.0, hi - 1.0, 50)
        got = np.asarray(M.gold_fraction(jnp.asarray(u, jnp.float32), jnp.float32(blur), bars32, gold32))
        np.testing.assert_array_equal(got, want)
    # straddling an edge: half gold, to the float32 rounding of u over the window
    edges = np.float32(wide_mask.bars.ravel()[200:240])
    got = np.asarray(M.gold_fraction(jnp.asarray(edges), jnp.float32(blur), bars32, gold32))
    if blur >= 1e-3:
        np.testing.assert_allclose(got, 0.5, atol=2e-4 / blur)
    else:
        assert np.all((got >= 0) & (got <= 1))
    # away from the edges, the NumPy twin in float64 gives the same 0 or 1
    u = np.linspace(bar[0] - 5.0, bar[1] + 5.0, 1001)
    u = u[np.min(np.abs(u[:, None] - wide_mask.bars.ravel()), axis=1) > blur + 1e-3]
    want = M.gold_fraction_np(u, blur, wide_mask)
    assert set(np.unique(want)) == {0.0, 1.0}
    got = np.asarray(M.gold_fraction(jnp.asarray(u, jnp.float32), jnp.float32(blur), bars32, gold32))
    np.testing.assert_array_equal(got, want)


def test_gold_fraction_shapes_and_edge_cases(wide_mask: M.Mask) -> None:
    """Broadcasting of u against blur, blur per element, windows beyond the code, an all-open code."""
    rng = np.random.default_rng(11)
    u = rng.uniform(-50, wide_mask.length + 50, (7, 9))
    blur = rng.uniform(0, 60, (7, 1))
    want = np.stack([brute_force_fraction(wide_mask, row, float(b[0]))
                     for row, b in zip(u, blur, strict=True)])
    np.testing.assert_allclose(M.gold_fraction_np(u, blur, wide_mask), want, atol=1e-3)
    got = M.gold_fraction(jnp.asarray(u, jnp.float32), jnp.asarray(blur, jnp.float32), wide_mask.bars,
                          M.gold_before(wide_mask.bars))
    assert got.shape == (7, 9)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-3)
    # a window covering the whole code holds all the gold
    whole = M.gold_fraction_np(np.array([wide_mask.length / 2]), 2 * wide_mask.length, wide_mask)[0]
    assert whole == pytest.approx((1 - wide_mask.open_fraction()) / 2)
    empty = M.layout(np.zeros(8, np.int8))
    assert empty.bars.shape == (0, 2)
    np.testing.assert_array_equal(M.gold_fraction_np(np.array([0.0, 200.0]), 5.0, empty), 0.0)
    np.testing.assert_array_equal(M.gold_fraction(jnp.ones(3), 5.0, empty.bars), 0.0)


# ----------------------------------------------------------------------------------------------
# Attenuation


def test_mu_thickness_reference_values() -> None:
    mt = M.mu_thickness([10.0, 20.0, 30.0], 3.7)
    np.testing.assert_allclose(mt, [0.84, 0.56, 0.20], atol=0.02)
    assert M.mu_thickness(20.0, 7.4)[0] == pytest.approx(2 * mt[1])
    np.testing.assert_allclose(mt, [R.mu_thickness(e, 3.7) for e in (10.0, 20.0, 30.0)], rtol=1e-9)


@pytest.mark.parametrize("edge_kev", [11.919, 13.734, 14.353])
def test_mu_thickness_jumps_at_gold_l_edges(edge_kev: float) -> None:
    below, above = M.mu_thickness([edge_kev - 0.05, edge_kev + 0.05], 3.7)
    assert above > 1.1 * below  # absorption rises across the edge: mu*t is not monotonic in E


def test_contrast() -> None:
    e = np.array([10.0, 20.0])
    np.testing.assert_allclose(M.contrast(e, 3.7), 1 - np.exp(-M.mu_thickness(e, 3.7)))
    np.testing.assert_allclose(M.contrast(e, 3.7, 1.48), 1 - np.exp(-1.48 * M.mu_thickness(e, 3.7)))
    assert np.all(np.diff(M.contrast(np.linspace(15, 40, 30), 3.7)) < 0)  # above the L edges
