"""Super-resolution scores on maps whose answers are known."""

from __future__ import annotations

import numpy as np

from napari_genemap.evaluate.superres import spread_calibration, superres_scores


def test_a_perfect_map_scores_one_and_scale_or_offset_changes_nothing():
    rng = np.random.default_rng(0)
    truth = rng.gamma(2.0, size=(3, 12, 12))
    mask = rng.random((12, 12)) > 0.2
    perfect = superres_scores(truth, truth, mask)
    assert np.isclose(perfect["pcc_mean"], 1.0)
    assert np.isclose(perfect["ssim"], 1.0) and perfect["rmse"] == 0.0
    affine = superres_scores(2 * truth + 5, truth, mask)  # min-max scaling removes scale and offset
    assert np.isclose(affine["pcc_mean"], 1.0) and np.isclose(affine["rmse"], 0.0, atol=1e-12)
    noisy = superres_scores(truth + rng.normal(scale=2.0, size=truth.shape), truth, mask)
    assert noisy["pcc_mean"] < 0.9 and noisy["ssim"] < 0.9 and noisy["rmse"] > 0.05
    flat = truth.copy()
    flat[1] = 1.0
    assert superres_scores(flat, truth, mask)["pcc_undefined"] == 1


def test_a_gaussian_spread_of_the_right_size_covers_68_and_95_percent():
    rng = np.random.default_rng(1)
    mean = np.zeros((4, 100, 100))
    spread = rng.uniform(0.5, 2.0, size=mean.shape)
    truth = rng.normal(scale=spread)
    mask = np.ones((100, 100), bool)
    scores = spread_calibration(mean, spread, truth, mask)
    assert abs(scores["inside_1sd"] - 0.683) < 0.01 and abs(scores["inside_2sd"] - 0.954) < 0.01
    assert scores["spearman_spread_error"] > 0.2  # larger spread, larger error
    assert spread_calibration(mean, spread / 3, truth, mask)["inside_1sd"] < 0.4  # overconfident
