"""Calibration to measured blocks: sums match the measurement, shares follow the histology prediction."""

from __future__ import annotations

import numpy as np
import pytest

from napari_genemap.errors import GenemapInputError
from napari_genemap.models.calibration import calibrate_to_blocks


def test_each_block_sums_to_its_measurement_shared_as_the_prediction_says():
    predicted = np.array([[[1.0, 3.0, 0.0, 0.0], [0.0, 4.0, 0.0, 0.0]]])  # one gene, a 2 x 4 grid
    mask = np.array([[True, True, True, False], [False, True, True, True]])
    lr = np.array([[[16.0, 9.0]]])  # block 1 (left 2 x 2) measured 16, block 2 measured 9
    out = calibrate_to_blocks(predicted, mask, lr, 2)
    np.testing.assert_allclose(out[0, :, :2], [[2.0, 6.0], [0.0, 8.0]])  # 1 : 3 : 4 of 16 (unmeasured cell: 0)
    np.testing.assert_allclose(out[0, :, 2:], [[3.0, 0.0], [3.0, 3.0]])  # predicted nothing: shared evenly
    np.testing.assert_allclose(out.reshape(1, 1, 2, 2, 2).sum((2, 4)), lr)


def test_a_grid_that_does_not_fit_the_blocks_is_refused():
    with pytest.raises(GenemapInputError, match="do not fit blocks of 2"):
        calibrate_to_blocks(np.ones((1, 3, 4)), np.ones((3, 4), bool), np.ones((1, 1, 2)), 2)
