"""Hildebrand morphometry on structures whose answer is known from first principles."""

import numpy as np
import pytest

from femursr.morphometry import local_thickness, morphometry


def plates(thickness, gap, n_periods=4, lateral=48):
    period = thickness + gap
    a = np.zeros((period * n_periods, lateral, lateral), bool)
    for s in range(0, a.shape[0], period):
        a[s : s + thickness] = True
    return a


def test_plates_of_even_thickness_give_thickness_and_gap():
    a = plates(4, 12)
    th = local_thickness(a)
    assert np.all(th[a] == 4.0)
    # the marrow between plates, away from the array's lateral border
    sp = local_thickness(~a)
    inner = np.zeros_like(a)
    inner[4:12, 12:-12, 12:-12] = True
    assert np.all(sp[inner] == 12.0)


def test_spacing_is_in_millimetres_and_anisotropy_is_honoured():
    a = plates(4, 12)
    # 0.1 mm along z (across the plates): plates are 0.4 mm thick whatever the in-plane spacing
    th = local_thickness(a, spacing_zyx=(0.1, 0.3, 0.3))
    assert np.allclose(th[a], 0.4, atol=1e-6)
    # plates standing along x with 0.25 mm across them
    b = np.ascontiguousarray(np.moveaxis(a, 0, 2))
    th_b = local_thickness(b, spacing_zyx=(0.5, 0.5, 0.25))
    assert np.allclose(th_b[b], 1.0, atol=1e-6)


def test_sphere_thickness_close_to_its_diameter():
    n = 44
    g = np.mgrid[:n, :n, :n] - 21.5  # centre on a voxel corner
    s = (g**2).sum(0) < 20**2
    mean = local_thickness(s)[s].mean()
    assert mean == pytest.approx(38.38, rel=0.01)  # the exact voxel value (not 40)


def test_bvtv_and_tbn_of_plates():
    a = plates(4, 12)
    m = morphometry(a, np.ones_like(a))["all"]
    assert m.bv_tv == pytest.approx(4 / 16)
    assert m.tb_th_mm == pytest.approx(4.0)
    assert m.tb_n_per_mm == pytest.approx(1 / (m.tb_th_mm + m.tb_sp_mm))
    assert m.tb_sp_mm < 12.0  # lateral borders shrink the outermost marrow balls


def test_empty_phase_gives_zero_map_and_nan_metrics():
    z = np.zeros((8, 8, 8), bool)
    assert local_thickness(z).max() == 0
    m = morphometry(z, np.ones_like(z))["all"]
    assert m.bv_tv == 0 and np.isnan(m.tb_th_mm)
