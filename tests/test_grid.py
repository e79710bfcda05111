"""Tile-grid index maths: edges, partial tiles, odd strides and sizes, levels."""

from __future__ import annotations

import pytest

from napari_genemap.errors import GenemapInputError
from napari_genemap.infer.grid import TileGrid


def test_a_slide_that_is_not_a_multiple_of_the_tile():
    grid = TileGrid(height=1000, width=1300, stride=4, tile=512, halo=64)
    assert (grid.rows, grid.columns) == (2, 3)
    assert grid.tile_box(1, 2) == (512, 1000, 1024, 1300)  # cut by the slide's edge
    assert grid.window_box(0, 0) == (-64, 576, -64, 576)  # the halo reaches past the slide
    assert grid.window_box(1, 2) == (448, 1088, 960, 1600)
    assert grid.map_shape() == (250, 325)
    assert grid.map_box(1, 2) == (128, 250, 256, 325)
    assert grid.valid_in_output() == (16, 144)
    with pytest.raises(IndexError):
        grid.tile_box(2, 0)


def test_partial_map_pixels_at_the_edge_are_kept():
    grid = TileGrid(height=1001, width=33, stride=8, tile=64, halo=0)
    assert grid.map_shape() == (126, 5)  # ceil(1001 / 8), ceil(33 / 8)
    assert grid.map_box(15, 0) == (120, 126, 0, 5)
    assert grid.map_shape(1) == (63, 3) and grid.map_shape(2) == (32, 2)


def test_odd_stride_and_levels():
    grid = TileGrid(height=4096, width=2048, stride=16, tile=256, halo=96)
    assert grid.map_shape(0) == (256, 128)
    assert grid.levels(smallest=64) == 3  # 256 -> 128 -> 64
    assert grid.levels(smallest=1000) == 1
    with pytest.raises(GenemapInputError, match="tile 100"):
        TileGrid(height=10, width=10, stride=4, tile=100)
    with pytest.raises(GenemapInputError, match="halo 40"):
        TileGrid(height=10, width=10, stride=4, halo=40)


def test_tiles_for_a_region_of_a_coarser_level():
    grid = TileGrid(height=2000, width=2000, stride=4, tile=512, halo=0)  # 128 map px per tile, 500 x 500 map
    assert grid.tiles_for_map_region(0, 0, 1, 0, 1) == [(0, 0)]
    assert grid.tiles_for_map_region(0, 127, 129, 0, 1) == [(0, 0), (1, 0)]
    # level 2 pixel (31, 31) covers level-0 pixels 124..127: tile (0, 0) only; (32, 32) starts tile (1, 1)
    assert grid.tiles_for_map_region(2, 31, 33, 31, 33) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert grid.tiles_for_map_region(2, 200, 300, 0, 1) == []  # past the map
    assert len(grid.tiles_for_map_region(3, 0, 63, 0, 63)) == 16  # the whole map


def test_slide_model_and_map_frames():
    grid = TileGrid.for_slide(9923, 9272, slide_mpp=0.6875, model_mpp=2.0, stride=4)
    assert (grid.height, grid.width) == (3411, 3187)
    assert grid.map_pixel_size(0) == pytest.approx(2.0 / 0.6875 * 4)
    assert grid.map_pixel_size(2) == pytest.approx(4 * grid.map_pixel_size(0))
    assert grid.slide_to_map(grid.map_pixel_size(1) * 10, level=1) == pytest.approx(10)
