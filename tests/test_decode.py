"""The decoder: accuracy on simulated scans of every preset and both geometries, and its behaviour on
background-only, saturated, constant and unusable data."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

from laueflow import config as C
from laueflow import decode as D
from laueflow import evaluate as E
from laueflow import forward as F
from laueflow import geometry as G
from laueflow.io.scan import open_scan
from laueflow.io.truth import load_truth
from laueflow.simulate import default_config_dict, simulate

REGION = 48


def decode_point(scan_dir, point: int = 0):
    """Decode every tile of one point in-process; returns rows, cols, profiles, Decoded parts."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", C.ConfigWarning)
        cfg = C.load(scan_dir / "config.yaml")
    setup = F.Setup.from_config(cfg)
    scan = open_scan(cfg)
    parts = []
    for tile in scan.tiles(cfg.recon.tile_pixels):
        b = scan.read_block(point, tile)
        parts.append(D.decode(b.traces, b.rows, b.cols, b.frames, setup, cfg, b.selected))
    cat = {k: np.concatenate([getattr(p, k) for p in parts]) for k in ("rows", "cols", "profiles", "quality")}
    return cfg, cat


def _simulate_and_decode(tmp_path_factory, preset: str, geometry: str, seed: int, region: int):
    d = tmp_path_factory.mktemp(f"{preset}-{geometry}-{seed}")
    simulate(d, preset=preset, seed=seed, region=region, geometry=geometry)
    _, r = decode_point(d)
    return load_truth(d / "truth.h5").for_point(0), r


def _pooled(parts) -> E.Scores:
    """One score over several scans: their truths and results concatenated (pixel indices made
    distinct by offsetting rows per scan)."""
    truths, rows, cols, profiles = [], [], [], []
    for i, (t, r) in enumerate(parts):
        off = 10000 * i
        gid = sum(len(tt.grain_top) for tt, _ in parts[:i])
        truths.append((t, off, gid))
        rows.append(r["rows"] + off)
        cols.append(r["cols"])
        profiles.append(r["profiles"])
    t0 = truths[0][0]
    cat = E.Truth(
        pixels=np.concatenate([t.pixels + [off, 0] for t, off, _ in truths]),
        depth=t0.depth,
        profiles=np.concatenate([t.profiles for t, _, _ in truths]),
        grain=np.concatenate([t.grain + g for t, _, g in truths]),
        second_grain=np.concatenate(
            [np.where(t.second_grain >= 0, t.second_grain + g, -1) for t, _, g in truths]
        ),
        energy=np.concatenate([t.energy for t, _, _ in truths]),
        point=np.zeros(sum(len(t.pixels) for t, _, _ in truths), int),
        grain_top=np.concatenate([t.grain_top for t, _, _ in truths]),
        grain_thickness=np.concatenate([t.grain_thickness for t, _, _ in truths]),
        grain_decay=np.concatenate([t.grain_decay for t, _, _ in truths]),
    )
    return E.score(cat, np.concatenate(rows), np.concatenate(cols), np.concatenate(profiles))


def assert_targets(preset: str, s: E.Scores) -> None:
    """The reconstruction issue's figures for a preset."""
    assert s.finite
    assert s.covered >= 0.99, s.summary()
    if preset == "thin":
        assert s.centroid_median <= 0.3, s.summary()
        assert s.within_2um >= 0.99, s.summary()
        assert s.correlation_mean >= 0.9, s.summary()
        assert s.phantom < 0.01, s.summary()
    elif preset == "extended":
        assert s.centroid_median <= 2.0, s.summary()
        assert s.correlation_mean >= 0.9, s.summary()
    elif preset == "overlap":
        assert s.both_peaks >= 0.9, s.summary()


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    """Accuracy of a preset on a geometry, pooled over scans of the given seeds, computed once."""
    cache = {}

    def get(preset: str, geometry: str, seeds=(11,), region: int = REGION) -> E.Scores:
        key = (preset, geometry, tuple(seeds), region)
        if key not in cache:
            cache[key] = _pooled(
                [_simulate_and_decode(tmp_path_factory, preset, geometry, s, region) for s in seeds]
            )
        return cache[key]

    return get


@pytest.mark.parametrize("geometry", ["tilted", "flat"])
def test_thin_grains(scores, geometry):
    assert_targets("thin", scores("thin", geometry))


@pytest.mark.parametrize("geometry", ["tilted", "flat"])
def test_extended_grains(scores, geometry):
    assert_targets("extended", scores("extended", geometry))


@pytest.mark.slow  # 2 min; the fast suite keeps thin and extended grains, make test-slow pools overlaps
@pytest.mark.parametrize("geometry", ["tilted", "flat"])
def test_two_grain_pixels(scores, geometry):
    # per scan this figure ranges 86-96 % with the arrangement of spots; the target is on the pool
    s = scores("overlap", geometry, seeds=(11, 12, 13), region=64)
    assert s.two_grain_pixels > 20
    assert_targets("overlap", s)


# ---------------------------------------------------------------------------------------------
# behaviour on small synthetic blocks


@pytest.fixture(scope="module")
def setup_cfg():
    cfg = C.from_dict(
        default_config_dict("tilted", frames=261, region=16)
        | {
            "geo": {
                **default_config_dict()["geo"],
                "mask": {**default_config_dict()["geo"]["mask"], "path": None},
            }
        },
        check_files=False,
    )
    return cfg, F.Setup.from_config(cfg)


def _block(cfg, setup, profiles_fn, background=50.0, energy=20.0, seed=0):
    rows, cols = np.mgrid[1000:1016, 1000:1016]
    rows, cols = rows.ravel(), cols.ravel()
    depth_um = cfg.geo.source.depths * 1e3
    prof = profiles_fn(depth_um, rows.size)
    frames = np.arange(cfg.file.n_frames)
    tr = F.traces(
        setup, G.pixel_centres(setup.geo, rows, cols), prof, cfg.geo.source.depths, frames, energy, background
    )
    tr = np.random.default_rng(seed).poisson(tr).astype(np.float64)
    return rows, cols, frames, prof, tr


def test_background_only_block_gives_zero_profiles(setup_cfg):
    cfg, setup = setup_cfg
    rows, cols, frames, _, tr = _block(cfg, setup, lambda z, n: np.zeros((n, z.size)))
    r = D.decode(tr, rows, cols, frames, setup, cfg)
    assert np.isfinite(r.profiles).all()
    assert (r.profiles == 0).all()
    assert (r.quality & D.NO_SIGNAL).all()
    assert np.allclose(r.background, 50.0, rtol=0.05)


def test_counts_and_depth_independent_of_energy(setup_cfg):
    """Half the pixels see a grain, half see nothing: the background is measured in the others and the
    profile comes out in counts whatever the (unknown) energy."""
    cfg, setup = setup_cfg

    def prof(z, n):
        p = np.zeros((n, z.size))
        p[::2, (z >= 20) & (z < 28)] = 50.0
        return p

    for energy in (10.0, 14.2, 25.0):
        rows, cols, frames, truth, tr = _block(cfg, setup, prof, energy=energy, seed=int(energy))
        r = D.decode(tr, rows, cols, frames, setup, cfg)
        lit = r.profiles.sum(axis=1) > 0
        assert lit[::2].all() and not lit[1::2].any()
        depth_um = cfg.geo.source.depths * 1e3
        err = E.centroids(r.profiles[::2], depth_um) - E.centroids(truth[::2], depth_um)
        assert np.median(np.abs(err)) < 0.3, energy
        expected = truth[::2].sum(axis=1)  # counts per frame, whatever the energy
        assert np.median(r.profiles[::2].sum(axis=1) / expected) == pytest.approx(1.0, rel=0.05), energy


def test_saturated_and_constant_pixels_are_left_out(setup_cfg):
    cfg, setup = setup_cfg
    rows, cols, frames, _, tr = _block(cfg, setup, lambda z, n: np.zeros((n, z.size)))
    tr[3, 10] = 65535.0
    tr[7] = 80.0
    r = D.decode(tr, rows, cols, frames, setup, cfg)
    kept = set(zip(r.rows.tolist(), r.cols.tolist(), strict=True))
    assert (rows[3], cols[3]) not in kept and (rows[7], cols[7]) not in kept
    assert len(kept) == rows.size - 2


def test_unusable_blocks_raise(setup_cfg):
    cfg, setup = setup_cfg
    rows, cols, frames, _, tr = _block(cfg, setup, lambda z, n: np.zeros((n, z.size)))
    with pytest.raises(D.DecodeError, match="all traces are zero"):
        D.decode(np.zeros_like(tr), rows, cols, frames, setup, cfg)
    bad = tr.copy()
    bad[0, 0] = np.nan
    with pytest.raises(D.DecodeError, match="NaN"):
        D.decode(bad, rows, cols, frames, setup, cfg)
    with pytest.raises(D.DecodeError, match="too few"):
        D.decode(tr[:, :5], rows, cols, frames[:5], setup, cfg)


def test_check_reach(setup_cfg):
    cfg, setup = setup_cfg
    assert G.check_reach(setup, cfg, [1000, 1015], [1000, 1015]) is None
    far = C.from_dict(
        cfg.to_dict() | {"geo": {**cfg.to_dict()["geo"], "source": {"grid": [5.0, 5.3, 0.001]}}},
        check_files=False,
    )
    msg = G.check_reach(F.Setup.from_config(far), far, [1000, 1015], [1000, 1015])
    assert msg is not None and "never crosses" in msg
    part = C.from_dict(
        cfg.to_dict() | {"geo": {**cfg.to_dict()["geo"], "source": {"grid": [-0.1, 2.5, 0.001]}}},
        check_files=False,
    )
    msg = G.check_reach(F.Setup.from_config(part), part, [1000, 1015], [1000, 1015])
    assert msg is not None and "resolves only depths" in msg


def test_energy_is_estimated_only_where_the_contrast_tells(setup_cfg):
    """25 keV has a contrast no other energy gives; 10 and 18 keV look alike (model.md section 4)."""
    cfg, setup = setup_cfg
    asked = C.from_dict(
        cfg.to_dict() | {"recon": {**cfg.to_dict()["recon"], "estimate_energy": True}}, check_files=False
    )

    def prof(z, n):
        p = np.zeros((n, z.size))
        p[::2, (z >= 20) & (z < 28)] = 300.0
        return p

    for energy, unique in ((25.0, True), (10.0, False)):
        rows, cols, frames, _, tr = _block(cfg, setup, prof, energy=energy, seed=3)
        r = D.decode(tr, rows, cols, frames, setup, asked)
        lit = r.profiles.sum(axis=1) > 0
        e, s = r.energy[lit], r.energy_sigma[lit]
        confident = np.isfinite(e)
        # never a confident wrong value: every reported energy is within 3 sigma of the truth
        assert (np.abs(e[confident] - energy) <= 3 * s[confident] + 0.5).all(), (energy, e, s)
        if unique:
            assert confident.mean() > 0.8
        else:
            assert (r.quality[lit] & D.ENERGY_AMBIGUOUS).mean() > 0.8


@pytest.mark.slow  # a fresh process compiling every solver again in float64
def test_float64_matches_float32():
    """float64 on request; run in a fresh process because it switches JAX to 64-bit globally."""
    code = r"""
import numpy as np, dataclasses, warnings
warnings.simplefilter("ignore")
from laueflow import config as C, decode as D, forward as F, geometry as G
from laueflow.simulate import default_config_dict
d = default_config_dict("tilted", frames=261, region=16); d["geo"]["mask"]["path"] = None
cfg = C.from_dict(d, check_files=False); setup = F.Setup.from_config(cfg)
rows, cols = np.mgrid[1000:1008, 1000:1008]; rows, cols = rows.ravel(), cols.ravel()
z = cfg.geo.source.depths * 1e3; p = np.zeros((rows.size, z.size)); p[::2, (z >= 20) & (z < 28)] = 500.0
fr = np.arange(261)
tr = F.traces(setup, G.pixel_centres(setup.geo, rows, cols), p, cfg.geo.source.depths, fr, 20.0, 50.0)
tr = np.random.default_rng(0).poisson(tr).astype(float)
a = D.decode(tr, rows, cols, fr, setup, cfg).profiles
cfg64 = dataclasses.replace(cfg, recon=dataclasses.replace(cfg.recon, dtype="float64"))
b = D.decode(tr, rows, cols, fr, setup, cfg64).profiles
assert b.dtype == np.float32 and np.isfinite(b).all()
rel = np.abs(a - b).sum() / np.abs(b).sum()
print(rel)
assert rel < 1e-2, rel
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("geometry", ["tilted", "flat"])
@pytest.mark.parametrize("preset", ["thin", "extended", "overlap"])
def test_accuracy_over_many_scans(scores, preset, geometry):
    """The issue's figures pooled over five full 64 x 64 scans (make test-slow)."""
    s = scores(preset, geometry, seeds=(21, 22, 23, 24, 25), region=64)
    print(preset, geometry, s.summary())
    assert_targets(preset, s)


def _film_errors(scan_dir, film_depth: float, **kw) -> np.ndarray:
    """Centroid error (um) of every pixel of a simulated thin film's spots, decoded with the exact pose."""
    simulate(scan_dir, preset="film", film_depth=film_depth, **kw)
    _, r = decode_point(scan_dir)
    t = load_truth(scan_dir / "truth.h5").for_point(0)
    key = {(a, b): i for i, (a, b) in enumerate(zip(r["rows"], r["cols"], strict=True))}
    idx = np.array([key.get((a, b), -1) for a, b in t.pixels])
    err = np.abs(E.centroids(r["profiles"][idx], t.depth) - film_depth)
    return np.where(idx >= 0, np.nan_to_num(err, nan=np.inf), np.inf)  # a pixel left out is an error


def test_thin_film(tmp_path):
    # bright pixels (100+ counts per frame) of a 1.5 um film once took tail pieces a few um shallower
    # that only absorbed the model's mismatch: 89 % within 2 um on a 64 x 64 scan
    err = _film_errors(tmp_path, 30.0, seed=3, region=48)
    assert np.mean(err <= 2.0) >= 0.99, np.mean(err <= 2.0)
    assert np.mean(err <= 1.0) >= 0.9, np.mean(err <= 1.0)


@pytest.mark.slow
@pytest.mark.parametrize("film_depth", [-95.5, 30.0, 137.25, 185.0])
def test_thin_film_at_depths(tmp_path, film_depth):
    """The issue's thin-film target on full 64 x 64 scans: >= 99 % of pixels within 2 um, >= 90 % within 1."""
    err = _film_errors(tmp_path, film_depth, seed=5, region=64)
    print(film_depth, np.mean(err <= 2.0), np.mean(err <= 1.0))
    assert np.mean(err <= 2.0) >= 0.99, np.mean(err <= 2.0)
    assert np.mean(err <= 1.0) >= 0.9, np.mean(err <= 1.0)
