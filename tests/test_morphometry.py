"""Hildebrand morphometry on structures whose answer is known from first principles."""

import edt
import numpy as np
import pytest
from scipy import ndimage as ndi

from femursr.morphometry import local_thickness, morphometry


def plates(thickness, gap, n_periods=4, lateral=48):
    period = thickness + gap
    a = np.zeros((period * n_periods, lateral, lateral), bool)
    for s in range(0, a.shape[0], period):
        a[s : s + thickness] = True
    return a


def brute_force_thickness(mask, spacing_zyx, black_border=False):
    """Every phase voxel's ball painted, no ridge: the definition, for small arrays."""
    d2 = edt.edtsq(mask, anisotropy=spacing_zyx, black_border=black_border).astype(np.float64)
    idx = np.argwhere(mask)
    out = np.zeros(mask.shape)
    sz, sy, sx = spacing_zyx
    for c in idx:
        g = np.ogrid[: mask.shape[0], : mask.shape[1], : mask.shape[2]]
        dist2 = (((g[0] - c[0]) * sz) ** 2 + ((g[1] - c[1]) * sy) ** 2) + ((g[2] - c[2]) * sx) ** 2
        q = d2[tuple(c)]
        np.maximum(out, np.where(dist2 < q, 2 * np.sqrt(q), 0), out=out)
    return out


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.5, 0.5, 0.5), (1.0, 0.6, 0.75)])
def test_ridge_and_runs_equal_painting_every_ball(spacing):
    rng = np.random.default_rng(3)
    a = ndi.gaussian_filter(rng.standard_normal((18, 20, 22)), 1.5) > 0.05
    for phase in (a, ~a):
        fast = local_thickness(phase, spacing)
        ref = brute_force_thickness(phase, spacing)
        np.testing.assert_allclose(fast, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "spacing, black_border", [((1.0, 1.0, 1.0), True), ((0.3, 0.3, 0.3), False), ((1.0, 0.7, 0.5), True)]
)
def test_skipped_balls_and_sections_leave_the_map_of_every_ball_bit_for_bit(spacing, black_border):
    # larger balls than above, so that most planes of most balls are skipped
    rng = np.random.default_rng(5)
    a = ndi.gaussian_filter(rng.standard_normal((20, 22, 18)), 2.5) > 0.1
    for phase in (a, ~a):
        ref = brute_force_thickness(phase, spacing, black_border).astype(np.float32)
        np.testing.assert_array_equal(local_thickness(phase, spacing, black_border), ref)


def test_containment_is_exact_at_a_spacing_that_rounds():
    # 0.3 mm voxels: a ball whose farthest point from a neighbour lies exactly on the
    # neighbour's sphere (|x|^2 = d2 = 4.5 mm^2, not inside the open ball) must stay. A table
    # summing the offsets in mm (x s + o s, one unit in the last place off (x + o) s) once
    # dropped it: 3.60 instead of 3.65 at voxel (1, 7, 4).
    marrow = [(0, 7, 0), (0, 7, 1), (0, 7, 2), (0, 7, 3), (1, 7, 0), (1, 7, 1), (1, 7, 2), (2, 7, 0), (2, 7, 1),
              (3, 6, 0), (3, 7, 0), (3, 7, 1), (4, 6, 0), (4, 7, 0), (4, 7, 1), (5, 3, 0), (5, 4, 0), (5, 5, 0),
              (5, 6, 0), (5, 7, 0)]  # fmt: skip
    bone = np.ones((6, 8, 5), bool)
    bone[tuple(np.array(marrow).T)] = False
    th = local_thickness(bone, (0.3, 0.3, 0.3))
    np.testing.assert_array_equal(th, brute_force_thickness(bone, (0.3, 0.3, 0.3)).astype(np.float32))
    assert th[1, 7, 4] == pytest.approx(2 * np.sqrt(3.33), rel=1e-6)


def test_sphere_and_rods_give_the_exact_voxel_values():
    # reference values of ORMIR_XCT 1.1.0 compute_local_thickness_from_mask(oversample=False,
    # skeletonize=False), which paints every voxel's ball: the exact voxel-level definition
    n = 44
    g = np.mgrid[:n, :n, :n] - 21.5  # centre on a voxel corner
    s = (g**2).sum(0) < 20**2
    assert local_thickness(s)[s].mean() == pytest.approx(38.38033959904015, rel=1e-6)
    yy, xx = np.mgrid[:64, :64] - 31.5
    rods = np.repeat(((yy**2 + xx**2) < 16)[None], 40, 0)  # diameter 8, along z through the array
    assert local_thickness(rods)[rods].mean() == pytest.approx(7.2111025509279765, rel=1e-6)


def test_random_trabecular_structure_agrees_with_ormir_xct():
    # Gaussian-filtered noise (sigma 4) at BV/TV 0.25, 128^3; ORMIR_XCT 1.1.0 exact mode gave
    # Tb.Th 10.2645 and Tb.Sp 18.7308 voxels on this very structure
    rng = np.random.default_rng(0)
    a = ndi.gaussian_filter(rng.standard_normal((128,) * 3).astype(np.float32), 4)
    bone = a > np.quantile(a, 0.75)
    m = morphometry(bone, np.ones_like(bone))["all"]
    assert m.bv_tv == pytest.approx(0.25, abs=1e-6)
    assert m.tb_th_mm == pytest.approx(10.264501210220306, rel=0.005)
    assert m.tb_sp_mm == pytest.approx(18.73081992198047, rel=0.005)


def test_black_border_bounds_the_phase_by_the_array_edge():
    a = plates(4, 12)  # the first plate starts at the array's first slice
    assert np.all(local_thickness(a, black_border=True)[a] == 4.0)
    open_edge = local_thickness(a)
    assert np.all(open_edge[16:][a[16:]] == 4.0)
    # the edge plate continues beyond the array: clipped, not bounded, so it reads twice as thick
    assert np.all(open_edge[:4][a[:4]] == 8.0)
    with pytest.raises(ValueError, match="fills the whole array"):
        local_thickness(np.ones((4, 4, 4), bool))


def test_plates_of_even_thickness_give_thickness_and_gap():
    a = plates(4, 12)
    th = local_thickness(a, black_border=True)
    assert np.all(th[a] == 4.0)
    # the marrow between plates, away from the array's lateral border
    sp = local_thickness(~a, black_border=True)
    inner = np.zeros_like(a)
    inner[4:12, 12:-12, 12:-12] = True
    assert np.all(sp[inner] == 12.0)


def test_spacing_is_in_millimetres_and_anisotropy_is_honoured():
    a = plates(4, 12)
    # 0.1 mm along z (across the plates): plates are 0.4 mm thick whatever the in-plane spacing
    th = local_thickness(a, spacing_zyx=(0.1, 0.3, 0.3), black_border=True)
    assert np.allclose(th[a], 0.4, atol=1e-6)
    # plates standing along x with 0.25 mm across them
    b = np.ascontiguousarray(np.moveaxis(a, 0, 2))
    th_b = local_thickness(b, spacing_zyx=(0.5, 0.5, 0.25), black_border=True)
    assert np.allclose(th_b[b], 1.0, atol=1e-6)


def test_bvtv_and_tbn_of_plates():
    a = plates(4, 12)
    m = morphometry(a, np.ones_like(a), black_border=True)["all"]
    assert m.bv_tv == pytest.approx(4 / 16)
    assert m.tb_th_mm == pytest.approx(4.0)
    assert m.tb_n_per_mm == pytest.approx(1 / (m.tb_th_mm + m.tb_sp_mm))
    assert m.tb_sp_mm < 12.0  # lateral borders shrink the outermost marrow balls


def test_empty_phase_gives_zero_map_and_nan_metrics():
    z = np.zeros((8, 8, 8), bool)
    assert local_thickness(z).max() == 0
    m = morphometry(z, np.ones_like(z))["all"]
    assert m.bv_tv == 0 and np.isnan(m.tb_th_mm)
