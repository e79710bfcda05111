"""Index maths between slide pixels, model pixels, gene-map pixels and µm, at every pyramid level.

Frames (x = column, y = row everywhere; intervals are half-open):
- slide: full-resolution H&E pixels, ``slide_mpp`` µm each (the canonical SpatialData "global" frame);
- model: the slide resampled to the model's µm/px; model pixel u covers slide [u * f, (u + 1) * f) with
  ``f = model_mpp / slide_mpp``;
- map level L: gene-map pixel i covers model pixels [i * s * 2^L, (i + 1) * s * 2^L) with s the stride.

Tiles partition the model frame into ``tile`` x ``tile`` squares (the last row and column may be cut by
the slide's edge); each is predicted from a window ``halo`` pixels wider on every side. Tile and halo are
multiples of 32 so every window starts on the encoder's stride-32 lattice, which is what makes tiles
agree with one large window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import GenemapInputError

ALIGNMENT = 32  # PixNet's deepest stride
#: Defaults for trained PixNet checkpoints: `benchmarks/seams.py` (shipped model, real H&E) finds tiles
#: differ from one large window by 35% of the maximum with a 128 px halo, 7% with 256 and 0.16% with 384
#: (no better with 512): the trained network uses ~750 µm of context. 1024 px tiles keep that halo's
#: cost at 3x the tile's pixels.
DEFAULT_TILE = 1024
DEFAULT_HALO = 384


@dataclass(frozen=True)
class TileGrid:
    """Tiles over a slide in the model frame, and the gene-map pyramid they fill."""

    height: int  # model-frame size, model pixels
    width: int
    stride: int  # model pixels per level-0 map pixel
    tile: int = DEFAULT_TILE  # tile side, model pixels
    halo: int = DEFAULT_HALO  # extra context on each side, model pixels
    factor: float = 1.0  # slide pixels per model pixel (model_mpp / slide_mpp)
    alignment: int = ALIGNMENT  # the model's input multiple: tiles and halos keep windows on its lattice

    def __post_init__(self):
        if self.height < 1 or self.width < 1:
            raise GenemapInputError(f"tile grid: slide of {self.height} x {self.width} model pixels is empty")
        if self.tile < self.alignment or self.tile % self.alignment or self.tile % self.stride:
            raise GenemapInputError(
                f"tile {self.tile}: expected a positive multiple of {self.alignment} and of the stride"
            )
        if self.halo < 0 or self.halo % self.alignment:
            raise GenemapInputError(f"halo {self.halo}: expected a non-negative multiple of {self.alignment}")

    @classmethod
    def for_slide(
        cls, slide_height: int, slide_width: int, slide_mpp: float, model_mpp: float, stride: int, **kwargs
    ) -> TileGrid:
        """The grid of a slide of ``slide_height`` x ``slide_width`` slide pixels."""
        factor = model_mpp / slide_mpp
        height, width = max(1, round(slide_height / factor)), max(1, round(slide_width / factor))
        return cls(height, width, stride, factor=factor, **kwargs)

    # --- sizes -------------------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return math.ceil(self.height / self.tile)

    @property
    def columns(self) -> int:
        return math.ceil(self.width / self.tile)

    @property
    def tile_map(self) -> int:
        """Tile side in level-0 map pixels."""
        return self.tile // self.stride

    def map_shape(self, level: int = 0) -> tuple[int, int]:
        """(rows, columns) of map level ``level``: level 0 covers every model pixel, partial ones included."""
        height, width = math.ceil(self.height / self.stride), math.ceil(self.width / self.stride)
        for _ in range(level):
            height, width = math.ceil(height / 2), math.ceil(width / 2)
        return height, width

    def levels(self, smallest: int = 256) -> int:
        """How many map levels until the larger side is at most ``smallest`` pixels (at least one)."""
        count = 1
        while max(self.map_shape(count - 1)) > smallest:
            count += 1
        return count

    # --- one tile ----------------------------------------------------------------------------------------
    def tile_box(self, row: int, column: int) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) of the tile in model pixels, cut at the slide's edge."""
        self._check(row, column)
        y0, x0 = row * self.tile, column * self.tile
        return y0, min(y0 + self.tile, self.height), x0, min(x0 + self.tile, self.width)

    def window_box(self, row: int, column: int) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) of the model input for a tile: the full tile plus the halo, which may reach
        past the slide (the reader mirrors there). Always (tile + 2 halo) square."""
        self._check(row, column)
        y0, x0 = row * self.tile - self.halo, column * self.tile - self.halo
        side = self.tile + 2 * self.halo
        return y0, y0 + side, x0, x0 + side

    def map_box(self, row: int, column: int, level: int = 0) -> tuple[int, int, int, int]:
        """(i0, i1, j0, j1) of the tile's pixels in map level ``level``, cut at the map's edge."""
        self._check(row, column, level)
        height, width = self.tile_shape(level, row, column)
        i0, j0 = row * self.tile_map, column * self.tile_map
        return i0, i0 + height, j0, j0 + width

    def tile_shape(self, level: int, row: int, column: int) -> tuple[int, int]:
        """(rows, columns) of a tile's map pixels at ``level``: the side, less where the map's edge cuts it."""
        height, width = self.map_shape(level)
        side = self.tile_map
        return min(side, height - row * side), min(side, width - column * side)

    def valid_in_output(self) -> tuple[int, int]:
        """(start, stop) of the tile's own pixels inside the model output of its window (map pixels)."""
        start = self.halo // self.stride
        return start, start + self.tile_map

    # --- tiles of a level ------------------------------------------------------------------------------
    def tile_counts(self, level: int = 0) -> tuple[int, int]:
        """(rows, columns) of tiles in map level ``level`` (every level's tiles are ``tile_map`` map pixels
        wide, so a coarser level has about half as many per side)."""
        height, width = self.map_shape(level)
        side = self.tile_map
        return -(-height // side), -(-width // side)

    def tiles(self, level: int, box) -> list[tuple[int, int]]:
        """Tiles of ``level`` (row-major) holding a map pixel of ``box`` = (i0, i1, j0, j1) in that level's
        map pixels (half-open, may be fractional or reach past the map: clipped to it)."""
        i0, i1, j0, j1 = box
        height, width = self.map_shape(level)
        top, bottom = max(0, math.floor(i0)), min(height, math.ceil(i1))
        left, right = max(0, math.floor(j0)), min(width, math.ceil(j1))
        if bottom <= top or right <= left:
            return []
        side = self.tile_map
        rows = range(top // side, (bottom - 1) // side + 1)
        columns = range(left // side, (right - 1) // side + 1)
        return [(r, c) for r in rows for c in columns]

    def children(self, level: int, row: int, column: int) -> list[tuple[int, int]]:
        """The tiles of level ``level - 1`` whose 2 x 2 means make a tile of ``level`` (row-major; fewer
        than four at the map's edge)."""
        if level < 1:
            raise ValueError(f"level {level} has no finer level")
        rows, columns = self.tile_counts(level - 1)
        return [
            (r, c)
            for r in range(2 * row, min(rows, 2 * row + 2))
            for c in range(2 * column, min(columns, 2 * column + 2))
        ]

    def leaves(self, level: int, row: int, column: int) -> list[tuple[int, int]]:
        """The level-0 tiles (row-major) under a tile of ``level``: what the model must predict for it."""
        rows, columns = self.tile_counts(0)
        span = 2**level
        return [
            (r, c)
            for r in range(row * span, min(rows, (row + 1) * span))
            for c in range(column * span, min(columns, (column + 1) * span))
        ]

    def map_pixel_size(self, level: int = 0) -> float:
        """Side of one map-level pixel in slide pixels (times the slide's µm/px for µm)."""
        return self.factor * self.stride * 2**level

    def slide_to_map(self, value, level: int = 0):
        """Slide-pixel coordinates or lengths in map-level pixels (pixel i covers [i, i + 1))."""
        return value / self.map_pixel_size(level)

    def _check(self, row: int, column: int, level: int = 0) -> None:
        rows, columns = self.tile_counts(level)
        if not (0 <= row < rows and 0 <= column < columns):
            raise IndexError(f"tile ({row}, {column}) outside level {level}'s {rows} x {columns} grid")
