"""Histology features per grid cell: box means against a direct average, windowed maps against one pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from napari_genemap.errors import GenemapInputError
from napari_genemap.models.cell_features import box_means, cell_features, feature_map


def test_box_means_equal_the_direct_average_and_clip_at_the_edge():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(3, 20, 30)).astype(np.float32)
    centres = np.array([[10.0, 8.0], [0.2, 0.3], [29.5, 19.5]])
    means = box_means(features, centres, side=6)
    np.testing.assert_allclose(means[0], features[:, 5:11, 7:13].mean((1, 2)), rtol=1e-5)
    np.testing.assert_allclose(means[1], features[:, 0:3, 0:3].mean((1, 2)), rtol=1e-5)  # clipped corner
    np.testing.assert_allclose(means[2], features[:, 17:20, 27:30].mean((1, 2)), rtol=1e-5)
    grid = box_means(features, centres.reshape(1, 3, 2), side=6)
    assert grid.shape == (1, 3, 3)


def test_cell_features_stack_the_cell_and_the_tissue_scale():
    features = np.zeros((2, 40, 40), np.float32)
    features[:, 18:22, 18:22] = 1.0  # a bright patch the size of one cell box
    centres = np.array([[[80.0, 80.0], [20.0, 20.0]]])  # model pixels; the map has stride 4
    out = cell_features(features, 4, centres, diameter=16.0, tissue=4.0)
    assert out.shape == (4, 1, 2)
    np.testing.assert_allclose(out[:2, 0, 0], 1.0)  # the cell box is the patch
    np.testing.assert_allclose(out[2:, 0, 0], 16 / 256)  # 16 x 16 tissue box holds its 16 pixels
    np.testing.assert_allclose(out[:, 0, 1], 0.0)
    with pytest.raises(GenemapInputError, match="diameter"):
        cell_features(features, 4, centres, diameter=0.0)


class LocalFeatures(nn.Module):
    """A model whose features at a pixel depend only on its own 4 x 4 block: windowing must not change them."""

    stride = 4
    input_multiple = 32

    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d(4)
        self.mix = nn.Conv2d(3, 5, 1)

    def features(self, image: torch.Tensor, margin: int = 0) -> torch.Tensor:
        x = self.mix(self.pool(image))
        return x[..., margin : x.shape[-2] - margin, margin : x.shape[-1] - margin] if margin else x


def test_windowed_feature_map_equals_one_pass_over_the_image():
    torch.manual_seed(0)
    model = LocalFeatures()
    image = np.random.default_rng(1).integers(0, 255, size=(200, 330, 3), dtype=np.uint8)
    windowed = feature_map(model, image, window=128, halo=32)
    padded = np.pad(image, ((0, 8), (0, 22), (0, 0)))
    with torch.no_grad():
        whole = model.features(torch.from_numpy(padded).permute(2, 0, 1)[None].float() / 255)[0].numpy()
    assert windowed.shape == (5, 50, 83)
    np.testing.assert_allclose(windowed[:, :, :82], whole[:, :50, :82], atol=1e-5)  # the last column is partial
    with pytest.raises(GenemapInputError, match="multiples of 32"):
        feature_map(model, image, window=100, halo=32)
