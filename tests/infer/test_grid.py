"""Tile-grid index maths: edges, partial tiles, odd strides and sizes, levels."""

from __future__ import annotations

import numpy as np
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


def test_level_0_tiles_for_a_region_of_a_coarser_level():
    grid = TileGrid(height=2000, width=2000, stride=4, tile=512, halo=0)  # 128 map px per tile, 500 x 500 map

    def level0_tiles(level, i0, i1, j0, j1):  # level-L pixels -> the level-0 pixels they are made of
        return grid.tiles(0, tuple(v * 2**level for v in (i0, i1, j0, j1)))

    assert level0_tiles(0, 0, 1, 0, 1) == [(0, 0)]
    assert level0_tiles(0, 127, 129, 0, 1) == [(0, 0), (1, 0)]
    # level 2 pixel (31, 31) covers level-0 pixels 124..127: tile (0, 0) only; (32, 32) starts tile (1, 1)
    assert level0_tiles(2, 31, 33, 31, 33) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert level0_tiles(2, 200, 300, 0, 1) == []  # past the map
    assert len(level0_tiles(3, 0, 63, 0, 63)) == 16  # the whole map


#: odd sizes: partial tiles and odd map sides at every level, a single tile column, one-pixel tiles' edges
ODD_GRIDS = [
    TileGrid(height=1000, width=1300, stride=4, tile=128, halo=0),
    TileGrid(height=1001, width=33, stride=8, tile=64, halo=0),
    TileGrid(height=95, width=97, stride=32, tile=32, halo=32),
    TileGrid(height=3000, width=2050, stride=16, tile=256, halo=96),
]


def _owner(grid: TileGrid, level: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: for every map pixel of ``level``, the (row, column) of the tile holding it."""
    height, width = grid.map_shape(level)
    rows, columns = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return rows // grid.tile_map, columns // grid.tile_map


def _tiles_of(rows: np.ndarray, columns: np.ndarray) -> list[tuple[int, int]]:
    return sorted({(int(r), int(c)) for r, c in zip(rows.ravel(), columns.ravel(), strict=True)})


def _levels(grid: TileGrid) -> range:
    return range(grid.levels(smallest=2))


@pytest.mark.parametrize("grid", ODD_GRIDS)
def test_tile_counts_and_shapes_match_brute_force(grid):
    for level in _levels(grid):
        rows, columns = _owner(grid, level)
        tiles = _tiles_of(rows, columns)
        count_r, count_c = grid.tile_counts(level)
        assert tiles == [(r, c) for r in range(count_r) for c in range(count_c)]
        for row, column in tiles:
            held = (rows == row) & (columns == column)
            i0, i1, j0, j1 = grid.map_box(row, column, level)
            assert grid.tile_shape(level, row, column) == (i1 - i0, j1 - j0)
            box = np.zeros_like(held)
            box[i0:i1, j0:j1] = True
            assert np.array_equal(held, box)
        with pytest.raises(IndexError):
            grid.map_box(count_r, 0, level)
    assert grid.tile_counts(0) == (grid.rows, grid.columns)


@pytest.mark.parametrize("grid", ODD_GRIDS)
def test_tiles_in_a_box_match_brute_force(grid):
    side = grid.tile_map
    for level in _levels(grid):
        rows, columns = _owner(grid, level)
        height, width = rows.shape
        i = np.arange(height)[:, None] + np.zeros((1, width))
        j = np.arange(width)[None, :] + np.zeros((height, 1))
        edges = sorted(
            {-side - 0.5, -3, 0, 0.5, 1, side - 1, side, side + 0.25, height - 1, height, height + 2, 2.5 * side}
        )
        spans = [(0, 1), (-5, width + 5), (side - 0.5, side + 0.25), (width - 1, width), (width, width + 9), (3, 3)]
        for i0 in edges:
            for i1 in edges:
                for j0, j1 in spans:
                    # a pixel [i, i + 1) x [j, j + 1) is in the box when the two overlap
                    inside = (i + 1 > i0) & (i < i1) & (j + 1 > j0) & (j < j1)
                    expected = _tiles_of(rows[inside], columns[inside])
                    assert grid.tiles(level, (i0, i1, j0, j1)) == expected, (level, i0, i1, j0, j1)


@pytest.mark.parametrize("grid", ODD_GRIDS)
def test_children_and_leaves_match_brute_force(grid):
    level0_rows, level0_columns = _owner(grid, 0)
    for level in _levels(grid):
        rows, columns = _owner(grid, level)
        finer_rows, finer_columns = _owner(grid, max(0, level - 1))
        height, width = finer_rows.shape
        for row, column in _tiles_of(rows, columns):
            held = (rows == row) & (columns == column)
            # the 2 x 2 means: a finer pixel (i, j) feeds coarser pixel (i // 2, j // 2)
            if level > 0:
                feeds = held[np.arange(height)[:, None] // 2, np.arange(width)[None, :] // 2]
                assert grid.children(level, row, column) == _tiles_of(finer_rows[feeds], finer_columns[feeds])
            scale = 2**level
            under = held[
                np.arange(level0_rows.shape[0])[:, None] // scale, np.arange(level0_rows.shape[1])[None, :] // scale
            ]
            assert grid.leaves(level, row, column) == _tiles_of(level0_rows[under], level0_columns[under])
    with pytest.raises(ValueError):
        grid.children(0, 0, 0)


def test_slide_model_and_map_frames():
    grid = TileGrid.for_slide(9923, 9272, slide_mpp=0.6875, model_mpp=2.0, stride=4)
    assert (grid.height, grid.width) == (3411, 3187)
    assert grid.map_pixel_size(0) == pytest.approx(2.0 / 0.6875 * 4)
    assert grid.map_pixel_size(2) == pytest.approx(4 * grid.map_pixel_size(0))
    assert grid.slide_to_map(grid.map_pixel_size(1) * 10, level=1) == pytest.approx(10)
