"""Geometry (model.md section 2): rotations, detector pixels, mask pose per frame, code coordinates,
per-pixel optics.  Hand-computed cases, properties, and a comparison with the independent ray tracer."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import raytrace as R

from laueflow import geometry as G
from laueflow import mask as M

E1, E2, E3 = np.eye(3)
RNG_SEED = 20240611


def geometry(name: str = "oblique", **geo) -> G.Geometry:
    cfg = R.make_config(name, **geo)
    return G.from_config(cfg, M.from_config(cfg).length)


# ----------------------------------------------------------------------------------------------
# Rotations


def test_rodrigues_identity_at_zero() -> None:
    assert np.array_equal(G.rodrigues([0.0, 0.0, 0.0]), np.eye(3))
    np.testing.assert_allclose(G.rodrigues([1e-17, 0.0, 0.0]), np.eye(3), atol=1e-15)


@pytest.mark.parametrize(
    ("axis", "before", "after"),
    [(E3, E1, E2), (E3, E2, -E1), (E1, E2, E3), (E1, E3, -E2), (E2, E3, E1), (E2, E1, -E3)],
)
def test_rodrigues_quarter_turns(axis: np.ndarray, before: np.ndarray, after: np.ndarray) -> None:
    """A right-handed 90-degree turn about e_k: e_i -> e_j with (i, j, k) cyclic."""
    np.testing.assert_allclose(G.rodrigues(np.pi / 2 * axis) @ before, after, atol=1e-15)


def test_rodrigues_half_turn_and_angle() -> None:
    np.testing.assert_allclose(G.rodrigues([0, 0, np.pi]), np.diag([-1.0, -1.0, 1.0]), atol=1e-15)
    v = np.array([0.3, -0.4, 1.2])
    assert np.trace(G.rodrigues(v)) == pytest.approx(1 + 2 * np.cos(np.linalg.norm(v)))


def test_rodrigues_properties() -> None:
    rng = np.random.default_rng(RNG_SEED)
    for v in rng.normal(scale=2.0, size=(20, 3)):
        r = G.rodrigues(v)
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-14)
        assert np.linalg.det(r) == pytest.approx(1.0, abs=1e-14)
        np.testing.assert_allclose(r @ v, v, atol=1e-14)  # the axis is fixed
        np.testing.assert_allclose(G.rodrigues(-v), r.T, atol=1e-14)
        np.testing.assert_allclose(r, R.axis_angle(v), atol=1e-14)  # quaternion construction


@pytest.mark.parametrize(("fn", "i"), [(G.rot_x, 0), (G.rot_y, 1), (G.rot_z, 2)])
def test_lab_axis_rotations_are_right_handed(fn, i: int) -> None:
    for deg in (90.0, -30.0, 44.0, 123.4):
        np.testing.assert_allclose(fn(deg), R.about_lab_axis(i, deg), atol=1e-14)
    e = np.eye(3)
    np.testing.assert_allclose(fn(90.0) @ e[(i + 1) % 3], e[(i + 2) % 3], atol=1e-15)


def test_mask_rotation_order_y_z_x() -> None:
    ax, ay, az = 10.0, 20.0, 30.0
    rm = G.mask_rotation(ax, ay, az)
    want = R.about_lab_axis(1, ay) @ R.about_lab_axis(2, az) @ R.about_lab_axis(0, ax)
    np.testing.assert_allclose(rm, want, atol=1e-14)
    other = R.about_lab_axis(0, ax) @ R.about_lab_axis(1, ay) @ R.about_lab_axis(2, az)
    assert not np.allclose(rm, other, atol=1e-3)
    # hand-computed: R_z(90) R_x(90) sends e1 -> e2, e2 -> e3, e3 -> e1
    np.testing.assert_allclose(G.mask_rotation(90.0, 0.0, 90.0), np.column_stack([E2, E3, E1]), atol=1e-15)


def test_mask_rotation_columns() -> None:
    """m_x along the code, m_y the plane normal, m_z along the bars."""
    a = np.radians(44.0)
    rm = G.mask_rotation(0.0, 0.0, 44.0)
    np.testing.assert_allclose(rm[:, 0], [np.cos(a), np.sin(a), 0.0], atol=1e-15)
    np.testing.assert_allclose(rm[:, 1], [-np.sin(a), np.cos(a), 0.0], atol=1e-15)
    np.testing.assert_allclose(rm[:, 2], E3, atol=1e-15)
    np.testing.assert_allclose(G.mask_rotation(90.0, 0.0, 0.0), np.column_stack([E1, E3, -E2]), atol=1e-15)
    np.testing.assert_allclose(G.mask_rotation(0.0, 90.0, 0.0), np.column_stack([-E3, E2, E1]), atol=1e-15)
    geo = geometry("oblique")
    np.testing.assert_allclose(geo.m_x, rm[:, 0])
    np.testing.assert_allclose(geo.m_y, rm[:, 1])


# ----------------------------------------------------------------------------------------------
# Detector pixels


def test_pixel_centre_identity_detector_by_hand() -> None:
    geo = dataclasses.replace(geometry(), det_rot=np.eye(3), det_pos=np.array([1.0, 2.0, 3.0]),
                              det_shape=(4, 6), det_size=(0.8, 1.8))
    # col 2: x = (2 - 1.5) * 0.2 + 1 = 1.1;  row 1: y = (1 - 2.5) * 0.3 + 2 = 1.55;  z = 3
    np.testing.assert_allclose(G.pixel_centres(geo, 1, 2), [3.0, 1.55, -1.1], atol=1e-15)
    # a quarter turn about the detector's z: q = (-y, x, z), p = (q2, q1, -q0) = (z, x, y)
    geo = dataclasses.replace(geo, det_rot=G.rodrigues([0, 0, np.pi / 2]))
    np.testing.assert_allclose(G.pixel_centres(geo, 1, 2), [3.0, 1.1, 1.55], atol=1e-14)


def test_pixel_centres_typical_calibration() -> None:
    geo = geometry()
    centre = G.pixel_centres(geo, 1023.5, 1023.5)
    np.testing.assert_allclose(centre, [31.0, 513.0, -2.5], atol=2.0)
    assert np.linalg.norm(centre) == pytest.approx(np.linalg.norm([28.8, 2.7, 513.0]), rel=1e-12)
    a, b, c = G.pixel_centres(geo, [500, 500, 501], [700, 701, 700])
    assert np.linalg.norm(b - a) == pytest.approx(0.2, rel=1e-12)  # 409.6 mm / 2048 pixels
    assert np.linalg.norm(c - a) == pytest.approx(0.2, rel=1e-12)
    assert abs((b - a) @ (c - a)) < 1e-12  # rows and columns are perpendicular
    assert G.pixel_centres(geo, np.arange(3)[:, None], np.arange(4)[None, :]).shape == (3, 4, 3)


def test_pixel_centres_match_raytracer() -> None:
    cfg = R.make_config()
    geo = G.from_config(cfg, 1.0)
    rng = np.random.default_rng(RNG_SEED)
    rows, cols = rng.uniform(0, 2047, 10), rng.uniform(0, 2047, 10)
    got = G.pixel_centres(geo, rows, cols)
    want = np.array([R.pixel_centre(cfg, r, c) for r, c in zip(rows, cols, strict=True)])
    np.testing.assert_allclose(got, want, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# Mask pose, source points


def test_mask_centres_by_hand() -> None:
    geo = geometry("flat", mask__focus__cenx=0.1, mask__focus__cenz=-0.2, mask__shift=0.05,
                   scanner__rot=[0.0, 0.0, np.pi / 2])  # d = R(rot) e1 = e2
    np.testing.assert_allclose(geo.scan_dir, E2, atol=1e-15)
    c = G.mask_centres(geo, [0, 3, 100])
    np.testing.assert_allclose(c[0], [0.1, 1.05, -0.2], atol=1e-14)
    np.testing.assert_allclose(c[1], [0.1, 1.0 + 0.05 + 3 * 0.5e-3, -0.2], atol=1e-14)
    np.testing.assert_allclose(c[2] - c[0], 100 * 0.5e-3 * E2, atol=1e-14)


def test_mask_centres_oblique_scan_direction() -> None:
    geo = geometry("oblique")
    np.testing.assert_allclose(geo.scan_dir, [0.707, 0.707, 0.0])
    c = G.mask_centres(geo, np.arange(5))
    np.testing.assert_allclose(np.diff(c, axis=0), np.tile([0.707e-3, 0.707e-3, 0.0], (4, 1)), atol=1e-15)
    np.testing.assert_allclose(c[0], [0.0, 1.0, 0.0])


def test_source_points() -> None:
    z = np.array([-0.1, 0.0, 0.2])
    s = G.source_points(geometry(), z)
    np.testing.assert_allclose(s, np.column_stack([z, 0.00342 * z, 0 * z]), atol=1e-16)
    s_off = G.source_points(geometry(source__offset=0.03), z)
    np.testing.assert_allclose(s_off - s, np.tile(0.03 * E1, (3, 1)), atol=1e-15)


def test_subsample_depths_spread_each_bin_evenly_over_its_slab() -> None:
    """Each bin's points lie inside its slab, symmetric about its centre and evenly spaced, bin by bin in
    order, and share the bin's value equally (the sum is kept)."""
    depths, step = np.array([0.010, 0.011, 0.030]), 0.001
    values = np.array([2.0, 0.0, 5.0])
    z, w = G.subsample_depths(depths, step, values)
    n = G.SUBSAMPLE_OFFSETS.size
    assert n > 1 and z.shape == w.shape == (depths.size * n,)
    per_bin = z.reshape(depths.size, n)
    np.testing.assert_allclose(per_bin.mean(1), depths, rtol=0, atol=1e-15)
    assert (np.abs(per_bin - depths[:, None]) < step / 2).all()
    np.testing.assert_allclose(np.diff(per_bin, axis=1), step / n, rtol=1e-9)
    np.testing.assert_array_equal(w.reshape(depths.size, n), np.repeat(values[:, None] / n, n, axis=1))
    assert w.sum() == values.sum()
    z0, w0 = G.subsample_depths(np.zeros(0), step, np.zeros(0))
    assert z0.shape == w0.shape == (0,)


# ----------------------------------------------------------------------------------------------
# Code coordinate


def test_code_coordinate_by_hand() -> None:
    """Ray (0,0,0) -> (10,100,0) crosses the plane y = 1 at X = (0.1, 1, 0)."""
    def u(c, m_x=E1, m_y=E2) -> float:
        return float(G.code_coordinate(np.array([10.0, 100.0, 0.0]), np.zeros(3), np.asarray(c),
                                       m_x, m_y, 3000.0))

    assert u([0.0, 1.0, 0.0]) == pytest.approx(1500.0 - 100.0, abs=1e-3)
    assert u([0.05, 1.0, 0.0]) == pytest.approx(1500.0 - 50.0, abs=1e-3)
    assert u([0.0, 1.0, 0.3]) == pytest.approx(1400.0, abs=1e-3)  # moving along the bars changes nothing
    # a plane tilted by 45 deg about e3 through (0, 1, 0): X = s t with t (p.m_y) = c.m_y
    rm = G.mask_rotation(0.0, 0.0, 45.0)
    t = (E2 @ rm[:, 1]) / (np.array([10.0, 100.0, 0.0]) @ rm[:, 1])
    x = t * np.array([10.0, 100.0, 0.0])
    assert u(E2, rm[:, 0], rm[:, 1]) == pytest.approx(1500.0 - 1000 * (x - E2) @ rm[:, 0], abs=1e-3)


def test_code_coordinates_identity_rotations_by_hand() -> None:
    """anglez = 0: mask plane y = 1 + shift, m_x = e1; frame 0, depth z, pixel p."""
    geo = geometry("flat", mask__focus__anglez=0.0)
    p = G.pixel_centres(geo, [1024.0, 300.0], [1024.0, 1800.0])
    z = np.array([-0.1, 0.0, 0.15])
    u = np.asarray(G.code_coordinates(geo, p, z, [0]), dtype=np.float64)[:, 0, :]
    beta = 0.00342
    t = (1.0 - beta * z[None, :]) / (p[:, 1:2] - beta * z[None, :])
    x = z[None, :] + t * (p[:, 0:1] - z[None, :])
    np.testing.assert_allclose(u, geo.code_length / 2 - 1000 * x, atol=2e-3)
    # depth 0 and the centre pixel: u = L/2 - 1000 p1 / p2
    assert u[0, 1] == pytest.approx(geo.code_length / 2 - 1000 * p[0, 0] / p[0, 1], abs=2e-3)


@pytest.mark.parametrize("name", ["oblique", "flat"])
def test_code_coordinates_match_raytracer(name: str) -> None:
    cfg = R.make_config(name)
    mask = M.from_config(cfg)
    geo = G.from_config(cfg, mask.length)
    z = R.depth_grid(cfg.geo.source.grid)
    frames = np.arange(0, 261, 13)
    for row, col in [(1024, 1024), (200, 1900), (1800, 150)]:
        _, ray = R.trace_pixel(cfg, row, col, z, np.ones_like(z), frames)
        u = np.asarray(G.code_coordinates(geo, G.pixel_centres(geo, row, col)[None], z, frames))[0]
        np.testing.assert_allclose(u, ray.u, atol=2e-3)  # um, float32 at u ~ 1600


def test_one_frame_step_in_plane_scan() -> None:
    """A mask scanned along m_x moves every ray's u by step * (d . m_x) per frame."""
    a = np.radians(44.0)
    axis = [np.cos(a), np.sin(a), 0.0]
    geo = geometry("oblique", scanner__axis=axis, scanner__step=1.0)
    assert geo.code_shift_per_frame == pytest.approx(1.0, rel=1e-12)
    p = G.pixel_centres(geo, [1024, 100, 1900], [1024, 1900, 300])
    u = np.asarray(G.code_coordinates(geo, p, np.linspace(-0.15, 0.2, 8), np.arange(0, 300, 7)), np.float64)
    np.testing.assert_allclose(np.diff(u, axis=1), 7 * 1.0, atol=2e-3)
    geo = geometry("flat", scanner__step=0.5)
    np.testing.assert_allclose(geo.code_shift_per_frame, 0.5 * np.cos(np.radians(1.3)), rtol=1e-12)


@pytest.mark.parametrize("name", ["oblique", "flat"])
def test_frame_step_out_of_plane_scan(name: str) -> None:
    """The beamline axes are slightly out of the mask plane: u_n is still linear in n, with slope
    Delta = step (d.m_x - (d.m_y)(r.m_x)/(r.m_y)) per ray r = p - S, close to step (d.m_x)."""
    geo = geometry(name)
    p = G.pixel_centres(geo, [1024, 300], [1024, 1700])
    z = np.array([-0.1, 0.05, 0.18])
    frames = np.arange(0, 261, 20)
    u = np.asarray(G.code_coordinates(geo, p, z, frames), dtype=np.float64)  # (P, N, J)
    step_um = geo.step_mm * 1e3
    r = p[:, None, :] - G.source_points(geo, z)[None, :, :]
    delta = step_um * (geo.scan_dir @ geo.m_x - (geo.scan_dir @ geo.m_y) * (r @ geo.m_x) / (r @ geo.m_y))
    np.testing.assert_allclose(u - u[:, :1, :], frames[None, :, None] * delta[:, None, :], atol=3e-3)
    # anglez = 44 with d = [0.707, 0.707, 0]: d.m_y = 0.017, off by up to ~3.5% across the detector
    np.testing.assert_allclose(delta, geo.code_shift_per_frame, rtol=0.05)


@pytest.mark.parametrize("name", ["oblique", "flat"])
def test_source_along_beam_moves_u_monotonically(name: str) -> None:
    """Deeper sources cross the mask at smaller u, by about kappa um per um of depth.

    With u = L/2 - 1000 m_x.(X - C) (model.md section 2), du/dz = -kappa * (1 + O(beta)) for
    anglez-only masks; model.md section 3 quotes the magnitude (it writes du_0/dz ~ kappa).
    """
    geo = geometry(name)
    z = np.arange(-0.15, 0.2, 0.001)
    rows, cols = [1024, 300, 1700], [1024, 1700, 400]
    p = G.pixel_centres(geo, rows, cols)
    u = np.asarray(G.code_coordinates(geo, p, z, [0, 130]), dtype=np.float64)
    assert np.all(np.diff(u, axis=-1) < 0)
    slope = np.diff(u[:, 0, [0, -1]], axis=-1)[:, 0] / (1e3 * (z[-1] - z[0]))
    np.testing.assert_allclose(-slope, G.pixel_optics(geo, p).kappa, rtol=0.01)


# ----------------------------------------------------------------------------------------------
# Per-pixel optics


@pytest.mark.parametrize("name", ["oblique", "flat"])
def test_pixel_optics_formulas(name: str) -> None:
    geo = geometry(name)
    rng = np.random.default_rng(RNG_SEED)
    p = G.pixel_centres(geo, rng.uniform(0, 2047, 16), rng.uniform(0, 2047, 16))
    o = G.pixel_optics(geo, p)
    a = np.radians(R.GEOMETRIES[name]["anglez"])
    m_x, m_y = np.array([np.cos(a), np.sin(a), 0.0]), np.array([-np.sin(a), np.cos(a), 0.0])
    phi = np.arctan(p[:, 0] / p[:, 1])
    np.testing.assert_allclose(o.phi, phi, rtol=1e-13)
    np.testing.assert_allclose(o.blur, 3.7 * np.abs((p @ m_x) / (p @ m_y)), rtol=1e-12)
    np.testing.assert_allclose(o.path_factor, 1 / np.cos(phi + a), rtol=1e-12)
    np.testing.assert_allclose(o.kappa, np.cos(phi) / np.cos(phi + a), rtol=1e-12)
    # the blur is the shift along m_x of a ray through a 3.7 um slab: t tan(phi + alpha) in-plane
    np.testing.assert_allclose(o.blur, 3.7 * np.abs(np.tan(phi + a)), rtol=1e-12)


def test_pixel_optics_near_detector_centre() -> None:
    oblique, flat = geometry("oblique"), geometry("flat")
    po = G.pixel_optics(oblique, G.pixel_centres(oblique, 1023.5, 1023.5)[None])
    pf = G.pixel_optics(flat, G.pixel_centres(flat, 1023.5, 1023.5)[None])
    assert 1.3 < po.kappa[0] < 1.6  # "about 1.4"
    assert abs(pf.kappa[0] - 1.0) < 0.03  # "about 1"
    assert 3.5 < po.blur[0] < 4.5 and pf.blur[0] < 0.3
    # near the centre the path factor is the exact slab path |p| / |p.m_y| (p has almost no e3 part)
    p = G.pixel_centres(oblique, 1023.5, 1023.5)
    assert po.path_factor[0] == pytest.approx(np.linalg.norm(p) / abs(p @ oblique.m_y), rel=1e-4)
