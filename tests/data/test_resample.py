"""Model-frame windows from the lazy pyramid agree with one whole-image resample."""

from __future__ import annotations

import numpy as np
import pytest

from napari_genemap.data.resample import ModelFrameReader
from napari_genemap.data.windows import crop


@pytest.fixture(scope="module")
def reader_and_whole(sample_slide):
    from PIL import Image

    reader = ModelFrameReader.from_sdata(sample_slide, model_mpp=2.0)
    level = np.moveaxis(np.asarray(reader.level), 0, -1)
    whole = np.asarray(Image.fromarray(level).resize((reader.width, reader.height), Image.Resampling.LANCZOS))
    return reader, whole


def test_the_model_frame_size_and_level(reader_and_whole, sample_slide):
    reader, whole = reader_and_whole
    assert reader.shape == (702, 702)  # 2048 px at 0.6854 µm/px -> 2.0 µm/px
    assert reader.level_index == 1  # level 1 (2 slide px per px) is the coarsest still finer than 2.92


@pytest.mark.parametrize("box", [(0, 702, 0, 702), (100, 228, 37, 165), (300, 702, 500, 702), (1, 2, 3, 4)])
def test_windows_inside_match_the_whole_resample(reader_and_whole, box):
    reader, whole = reader_and_whole
    y0, y1, x0, x1 = box
    window = reader.read(y0, y1, x0, x1).astype(int)
    assert window.shape == (y1 - y0, x1 - x0, 3)
    assert np.abs(window - whole[y0:y1, x0:x1]).max() <= 1  # PIL's float box: rounding, at most 1 level


def test_windows_past_the_edge_are_mirrored(reader_and_whole):
    reader, whole = reader_and_whole
    window = reader.read(-64, 64, 650, 778).astype(int)
    expected = crop(whole, 650, -64, 128).astype(int)
    assert np.abs(window - expected).max() <= 1
