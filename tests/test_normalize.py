"""Normalization: window, scale, mask; empty masks and bad windows are refused."""

import numpy as np
import pytest

from femursr.normalize import NormalizationError, normalize
from femursr.volume import Volume


def _vol(a):
    return Volume(np.asarray(a, np.float32), (0.5, 0.5, 0.5), (0, 0, 0))


def test_window_scale_and_mask():
    v = _vol(np.array([[[-1000, -200, 800], [1800, 3000, 500]]]))
    m = _vol(np.array([[[1, 1, 1], [1, 1, 0]]]))
    out = normalize(v, (-200, 1800), m).array
    np.testing.assert_allclose(out, [[[0.0, 0.0, 0.5], [1.0, 1.0, 0.0]]])
    assert out.dtype == np.float32


def test_empty_mask_and_bad_window_are_refused():
    v = _vol(np.ones((2, 2, 2)))
    with pytest.raises(NormalizationError, match="S01: the femur mask is empty"):
        normalize(v, (0, 1), _vol(np.zeros((2, 2, 2))), label="S01")
    with pytest.raises(NormalizationError, match="window"):
        normalize(v, (100, 100))
    other = Volume(np.ones((2, 2, 2)), (1, 1, 1), (0, 0, 0))
    with pytest.raises(NormalizationError, match="grid"):
        normalize(v, (0, 1), other)
