"""The decoder's solvers: the fits over the whole code grid and over each pixel's support reach the
optimum of the estimator (checked against an independent bound-constrained solver in float64), and
decoding holds BLAS to one thread only while it runs."""

from __future__ import annotations

import numpy as np
import pytest
import threadpoolctl
from scipy.optimize import minimize

from laueflow import config as C
from laueflow import decode as D
from laueflow import evaluate as E
from laueflow import forward as F
from laueflow import geometry as G
from laueflow.decode import passes
from laueflow.decode.block import Block
from laueflow.decode.dictionary import rebin, unbin
from laueflow.decode.energy import nearest_level
from laueflow.decode.neighbourhood import components, grow, runs
from laueflow.decode.settings import DecodeSettings
from laueflow.decode.solvers import Level, fit_supports
from laueflow.decode.support import component_energy, select_support
from laueflow.mask import mu_thickness
from laueflow.simulate import default_config_dict


@pytest.fixture(scope="module")
def cfg():
    d = default_config_dict("tilted", frames=261, region=16)
    d["geo"]["mask"]["path"] = None
    return C.from_dict(d, check_files=False)


def _level(cfg, seed: int = 0, n: int = 200, k: int = 64) -> Level:
    """A centred dictionary like a block's: shifted copies of one random code of 8-column bits, blurred
    (neighbouring columns nearly alike, as on the code-coordinate grid)."""
    rng = np.random.default_rng(seed)
    bits = np.repeat((rng.random((n + k) // 8 + 1) < 0.5).astype(float), 8)
    code = np.convolve(bits, np.ones(3) / 3, mode="same")
    gold = np.stack([code[j : j + n] for j in range(k)], axis=1)
    mu = 1.2
    return Level(np.exp(-mu * gold), mu, DecodeSettings.from_config(cfg))


def _traces(level: Level, seed: int = 1) -> np.ndarray:
    """Two noise-normalised traces: a thin grain, and an extended one with a gap."""
    rng = np.random.default_rng(seed)
    k = level.a.shape[1]
    h = np.zeros((2, k))
    h[0, 20:24] = [2.0, 6.0, 5.0, 1.0]
    h[1, 30:50] = np.linspace(3.0, 1.0, 20)
    h[1, 38:41] = 0.0
    return h @ level.a.T + rng.normal(size=(2, level.a.shape[0]))


def _optimum(a, d, l1: float, smooth: float, allowed: np.ndarray) -> np.ndarray:
    """min 1/2 |d - A h|^2 + l1 sum h + smooth/2 sum (h_i+1 - h_i)^2 over neighbouring allowed columns,
    h >= 0 and h = 0 elsewhere, in float64 with L-BFGS-B."""
    cols = np.flatnonzero(allowed)
    sub = a[:, cols]
    pairs = np.flatnonzero(np.diff(cols) == 1)
    diff = np.zeros((pairs.size, cols.size))
    diff[np.arange(pairs.size), pairs] = -1.0
    diff[np.arange(pairs.size), pairs + 1] = 1.0
    q = sub.T @ sub + smooth * diff.T @ diff
    b = sub.T @ d - l1

    def objective(x):
        return 0.5 * x @ q @ x - b @ x, q @ x - b

    res = minimize(objective, np.zeros(cols.size), jac=True, method="L-BFGS-B",
                   bounds=[(0, None)] * cols.size, options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 20000})
    out = np.zeros(a.shape[1])
    out[cols] = res.x
    return out


def test_full_fit_reaches_the_optimum(cfg):
    level = _level(cfg)
    d = _traces(level)
    sparsity = cfg.recon.sparsity
    h = level.full(d, sparsity)
    everywhere = np.ones(level.a.shape[1], bool)
    for row in range(2):
        best = _optimum(level.a, d[row], sparsity * level.unit, cfg.recon.smoothness, everywhere)
        assert np.linalg.norm(h[row] - best) <= 2e-4 * np.linalg.norm(best), row


def test_support_fit_reaches_the_optimum_on_each_support(cfg):
    """Each row is fitted on its own columns, smoothed only between neighbouring ones (the gap splits
    the second support in two), warm-started from anything; the misfit is |d - A h|^2 of the result."""
    level = _level(cfg)
    d = _traces(level)
    k = level.a.shape[1]
    allowed = np.zeros((2, k), bool)
    allowed[0, 16:28] = True
    allowed[1, 28:38] = allowed[1, 41:52] = True
    weak = cfg.recon.sparsity * cfg.recon.refit_sparsity
    start = np.random.default_rng(2).random((2, k))
    h, misfit = fit_supports([level], np.zeros(2, int), np.arange(2), d, allowed, start, weak)
    assert (h[~allowed] == 0).all()
    for row in range(2):
        best = _optimum(level.a, d[row], weak * level.unit, cfg.recon.smoothness, allowed[row])
        assert np.linalg.norm(h[row] - best) <= 2e-5 * np.linalg.norm(best), row
        assert misfit[row] == pytest.approx(np.sum((d[row] - level.a @ h[row]) ** 2), rel=1e-4)


def test_rows_without_support_are_left_at_zero(cfg):
    level = _level(cfg)
    d = _traces(level)
    h, misfit = fit_supports([level], np.zeros(2, int), np.arange(2), d,
                                np.zeros((2, level.a.shape[1]), bool), np.ones((2, level.a.shape[1])), 0.1)
    assert (h == 0).all()
    assert misfit == pytest.approx((d**2).sum(axis=1))


def _blas_threads() -> list[int]:
    """Threads of each BLAS library loaded in this process."""
    return [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]


def test_decoding_holds_blas_to_one_thread_and_restores_it(cfg, monkeypatch):
    setup = F.Setup.from_config(cfg)
    rows, cols = (x.ravel() for x in np.mgrid[1000:1008, 1000:1008])
    z = cfg.geo.source.depths * 1e3
    profiles = np.zeros((rows.size, z.size))
    profiles[::2, (z >= 20) & (z < 28)] = 300.0
    frames = np.arange(cfg.file.n_frames)
    traces = F.traces(setup, G.pixel_centres(setup.geo, rows, cols), profiles, cfg.geo.source.depths, frames,
                      20.0, 50.0)
    traces = np.random.default_rng(0).poisson(traces).astype(float)
    inside = []
    original = passes._decode

    def watched(*args, **kwargs):
        inside.append(_blas_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(passes, "_decode", watched)
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        r = D.decode(traces, rows, cols, frames, setup, cfg)
        after = _blas_threads()
    assert r.profiles[::2].sum(axis=1).min() > 0
    assert inside and inside[0] and set(inside[0]) == {1}
    assert after == before and max(before) == 2


# ---------------------------------------------------------------------------------------------
# support selection


@pytest.fixture(scope="module")
def grain_block(cfg):
    """A real 8 x 8 pixel block in which every other pixel sees an extended grain (20-60 um deep, an
    exponentially decaying profile) and the rest see only background; the pass-1 fit of its lit pixels
    and the code coordinates each lit pixel's grain spans."""
    setup = F.Setup.from_config(cfg)
    rows, cols = (x.ravel() for x in np.mgrid[1000:1008, 1000:1008])
    z = cfg.geo.source.depths * 1e3
    grain = (z >= 20) & (z < 60)
    profiles = np.zeros((rows.size, z.size))
    profiles[::2] = np.where(grain, 40.0 * np.exp(-(z - 20) / 30), 0.0)
    frames = np.arange(cfg.file.n_frames)
    traces = F.traces(setup, G.pixel_centres(setup.geo, rows, cols), profiles, cfg.geo.source.depths, frames,
                      20.0, 50.0)
    traces = np.random.default_rng(5).poisson(traces).astype(float)
    settings = DecodeSettings.from_config(cfg)
    dct = D.build_dictionary(setup, settings, rows, cols, frames)
    blk = Block(settings, traces, rows, cols, np.arange(rows.size), dct)
    mu = float(mu_thickness(20.0, setup.geo.thickness)[0]) * float(np.mean(dct.path_factor))
    level1 = np.full(rows.size, nearest_level(mu))
    lit = np.zeros(rows.size, bool)
    lit[::2] = True
    level = blk.level(level1[0])
    h = np.zeros((rows.size, dct.w.size))
    h[lit] = level.full(blk.d[lit], blk.sparsity)
    labels = components(h)
    gain = np.zeros((rows.size, labels.max() + 1))
    gain[lit] = component_energy(h[lit], labels[lit], level.gram, blk.band)
    gain[:, 0] = 0.0
    edges = np.concatenate([dct.u_lo[:, grain][:, :1], dct.u_hi[:, grain][:, -1:]], axis=1)
    lo, hi = edges.min(axis=1, keepdims=True), edges.max(axis=1, keepdims=True)
    inside = (dct.w[None, :] >= lo) & (dct.w[None, :] <= hi)
    return blk, level1, lit, h, labels, gain, inside


def test_support_covers_the_grain_and_nothing_else(grain_block):
    blk, level1, lit, h, labels, gain, inside = grain_block
    own = select_support(blk, level1, h, labels, gain)
    assert not own[~lit].any()
    covered = (own & inside).sum(axis=1)[lit] / inside.sum(axis=1)[lit]
    assert covered.min() >= 0.9, covered
    near = grow(inside, blk.band // 2)
    assert not (own & ~near)[lit].any()


def test_a_component_that_explains_nothing_is_left_out(grain_block):
    """A pass-1 component with a large energy is not kept when the refits show it adds nothing: here a
    decoy far from the grain, where pass 1 put no intensity."""
    blk, level1, lit, h, labels, gain, inside = grain_block
    k = h.shape[1]
    decoy = np.zeros(k, bool)
    far = np.flatnonzero(~grow(inside, 3 * blk.band).any(axis=0))
    decoy[far[: blk.band]] = True
    labels = labels.copy()
    labels[:, decoy] = labels.max() + 1
    gain = np.concatenate([gain, np.where(lit, 1e4, 0.0)[:, None]], axis=1)
    own = select_support(blk, level1, h, labels, gain)
    assert not own[:, decoy].any()
    assert ((own & inside).sum(axis=1)[lit] >= 0.9 * inside.sum(axis=1)[lit]).all()


def test_a_tail_pass_one_missed_is_added_beside_the_grain(grain_block):
    """When pass 1 found only the front of the grain, the support grows over the band beside it to
    hold the rest (the smooth tail of an extended grain modulates little)."""
    blk, level1, lit, h, labels, gain, inside = grain_block
    labels = labels.copy()
    front = np.zeros_like(inside)
    for p in np.flatnonzero(lit):
        cols = np.flatnonzero(inside[p])
        front[p, cols[: cols.size // 2]] = True  # one half of the grain's code range
    labels[inside & ~front] = 0
    own = select_support(blk, level1, h, labels, gain)
    covered = (own & inside).sum(axis=1)[lit] / inside.sum(axis=1)[lit]
    assert np.median(covered) >= 0.9, covered


def test_runs_lists_each_run_of_each_row():
    mask = np.array(
        [[1, 1, 0, 0, 1, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 0, 0, 0, 1]], bool
    )
    rows, each = runs(mask)
    assert rows.tolist() == [0, 0, 0, 2, 2]
    assert [np.flatnonzero(r).tolist() for r in each] == [[0, 1], [4], [6, 7, 8], [1, 2, 3, 4], [8]]
    rows, each = runs(mask, min_size=3)
    assert rows.tolist() == [0, 2] and each.sum(axis=1).tolist() == [3, 4]


# ---------------------------------------------------------------------------------------------
# faint pixels of a spot


def test_unbin_is_the_inverse_of_rebin(grain_block):
    """A depth profile spread onto a pixel's code grid keeps its mass, and a smooth one binned back is
    itself (to the code grid's resolution)."""
    dct = grain_block[0].dct
    z = np.arange(dct.u_lo.shape[1])
    depth = np.exp(-0.5 * ((z[None, :] - np.array([[80], [150], [200], [260]])) / 15.0) ** 2)
    code = unbin(depth, dct.w, dct.u_lo[:4], dct.u_hi[:4])
    assert np.allclose(code.sum(axis=1), depth.sum(axis=1))
    back = rebin(code, dct.w, dct.u_lo[:4], dct.u_hi[:4])
    assert np.abs(back - depth).max() <= 0.01


@pytest.fixture(scope="module")
def spot_block(cfg):
    """A real 10 x 10 pixel block with a spot of 6 x 6 pixels that all see one extended grain (20-60 um,
    exponentially decaying), bright at its centre and faint (a few tens of counts per frame) at its
    edge, except pixel (2, 2), which sees a thin grain at 80 um instead; the rest is background.
    Returns the setup, the block's traces, rows and cols, the true profiles and the spot's mask."""
    setup = F.Setup.from_config(cfg)
    rows, cols = (x.ravel() for x in np.mgrid[0:10, 0:10])
    rows, cols = rows + 1000, cols + 1000
    z = cfg.geo.source.depths * 1e3
    shape = np.where((z >= 20) & (z < 60), np.exp(-(z - 20) / 30), 0.0)
    shape /= shape.sum()
    r, c = rows - 1000, cols - 1000
    spot = (r < 6) & (c < 6)
    total = np.where(spot, 3000.0 * np.exp(-((r - 2.5) ** 2 + (c - 2.5) ** 2) / 3.0), 0.0)
    profiles = total[:, None] * shape[None, :]
    other = np.flatnonzero((r == 2) & (c == 2))[0]
    profiles[other] = 0.0
    profiles[other, np.argmin(np.abs(z - 80))] = 0.3 * total[other]
    frames = np.arange(cfg.file.n_frames)
    traces = F.traces(setup, G.pixel_centres(setup.geo, rows, cols), profiles, cfg.geo.source.depths, frames,
                      20.0, 50.0)
    traces = np.random.default_rng(7).poisson(traces).astype(float)
    return setup, traces, rows, cols, profiles, spot, other


def _decode_spot(cfg, spot_block):
    setup, traces, rows, cols, profiles, spot, other = spot_block
    res = D.decode(traces, rows, cols, np.arange(cfg.file.n_frames), setup, cfg)
    return E.correlations(res.profiles.astype(float), profiles), res.profiles


def test_faint_pixels_of_a_spot_take_its_shape(cfg, spot_block, monkeypatch):
    """The faint pixels at the spot's edge get the grain's profile shape from their brighter
    neighbours: much closer to the truth than from their own traces alone."""
    _, _, _, _, profiles, spot, other = spot_block
    faint = spot & (profiles.sum(axis=1) < 300)
    faint[other] = False
    corr, _ = _decode_spot(cfg, spot_block)
    monkeypatch.setattr(passes, "_spot_shapes", lambda *args: None)
    alone, _ = _decode_spot(cfg, spot_block)
    assert faint.sum() >= 10
    assert corr[faint].mean() >= 0.9
    assert corr[faint].mean() >= alone[faint].mean() + 0.05


def test_a_pixel_seeing_another_grain_keeps_its_own_profile(cfg, spot_block):
    """The neighbourhood's shape is taken only where the trace allows it: the pixel inside the spot
    that sees a thin grain at 80 um keeps that grain."""
    _, _, _, _, profiles, spot, other = spot_block
    _, decoded = _decode_spot(cfg, spot_block)
    z = cfg.geo.source.depths * 1e3
    assert decoded[other][np.abs(z - 80) <= 3].sum() >= 0.8 * decoded[other].sum()
