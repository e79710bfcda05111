"""What a viewer shows of a gene-map cache, and which tiles to ask for next.

`CachedLevel` is the array a napari layer holds for one gene at one level: slicing it reads only what is
in the cache (one inner chunk per tile for that gene) and gives NaN where a tile is not predicted yet and
where the cache's tissue mask says glass, so the H&E shows through (napari draws NaN transparent) and
slicing never waits for the model. `view_plan` orders the tiles a view needs:
the tiles in view at the shown level, nearest the view's centre first, then a ring around the view,
then the same area at each coarser level; `progress_text` says how far the service is through them.
"""

from __future__ import annotations

import numpy as np

from .cache import GeneMapCache

TileKey = tuple[int, int, int]  # (level, row, column)


class MapLevel:
    """A 2-D level of a gene map that napari can hold (shape, dtype, ndim, slicing with positive steps);
    a subclass sets ``shape`` and says how to `read` a box of map pixels."""

    dtype = np.dtype("float32")
    ndim = 2
    shape: tuple[int, ...]

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (2 - len(key))
        if len(key) != 2:
            raise IndexError(f"a gene map level is 2-D; got {len(key)} indices")
        bounds, steps, squeeze = [], [], []
        for axis, (item, size) in enumerate(zip(key, self.shape, strict=True)):
            if isinstance(item, slice):
                start, stop, step = item.indices(size)
                if step < 1:
                    raise IndexError("gene map levels are sliced with positive steps")
                bounds.append((start, max(start, stop)))
                steps.append(step)
            else:
                index = int(item) + (size if int(item) < 0 else 0)
                if not 0 <= index < size:
                    raise IndexError(f"index {item} out of range for axis {axis} of size {size}")
                bounds.append((index, index + 1))
                steps.append(1)
                squeeze.append(axis)
        (i0, i1), (j0, j1) = bounds
        values = self.read(i0, i1, j0, j1)[:: steps[0], :: steps[1]]
        return values.squeeze(tuple(squeeze)) if squeeze else values

    def read(self, i0: int, i1: int, j0: int, j1: int) -> np.ndarray:
        raise NotImplementedError

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        values = self[:, :]
        return values if dtype is None else values.astype(dtype)


class CachedLevel(MapLevel):
    """One gene's map at one level, read from the cache; NaN where the tile is missing or on glass.
    Array-like (what napari needs: shape, dtype, ndim, slicing)."""

    def __init__(self, cache: GeneMapCache, level: int, gene: int):
        self.cache, self.level, self.gene = cache, level, gene
        self.shape = tuple(int(s) for s in cache.grid.map_shape(level))

    def read(self, i0: int, i1: int, j0: int, j1: int) -> np.ndarray:
        """Map pixels [i0, i1) x [j0, j1); NaN where not predicted, on glass, or past the map's edge."""
        out = np.full((i1 - i0, j1 - j0), np.nan, np.float32)
        if i1 <= i0 or j1 <= j0:
            return out
        grid = self.cache.grid
        for row, column in grid.tiles(self.level, (i0, i1, j0, j1)):
            if not self.cache.has(self.level, row, column):
                continue
            tile_top, tile_bottom, tile_left, tile_right = grid.map_box(row, column, self.level)
            top, bottom = max(i0, tile_top), min(i1, tile_bottom)
            left, right = max(j0, tile_left), min(j1, tile_right)
            out[top - i0 : bottom - i0, left - j0 : right - j0] = self.cache.read(
                self.level, top, bottom, left, right, self.gene
            )
        tissue = self.cache.tissue(self.level)
        if tissue is not None:  # a box may reach past the map (a view at its edge): there it stays NaN
            inside = tissue[max(i0, 0) : i1, max(j0, 0) : j1]
            rows, cols = inside.shape
            out[max(-i0, 0) : max(-i0, 0) + rows, max(-j0, 0) : max(-j0, 0) + cols][~inside] = np.nan
        return out


def gene_levels(cache: GeneMapCache, gene: str) -> list[CachedLevel]:
    """Every level of one gene, finest first (a napari multiscale layer's data)."""
    index = cache.genes.index(gene)
    return [CachedLevel(cache, level, index) for level in range(cache.n_levels)]


def tiles_in_box(cache: GeneMapCache, level: int, box) -> list[tuple[int, int]]:
    """Tiles of ``level`` touching ``box`` = (i0, i1, j0, j1) in that level's map pixels (clipped)."""
    return cache.grid.tiles(level, box)


def view_plan(cache: GeneMapCache, level: int, box, ring: int = 1) -> list[TileKey]:
    """Tiles to predict for a view of ``box`` = (i0, i1, j0, j1) (map pixels of ``level``), in order:
    in view (nearest the centre first), a ``ring`` of tiles around them, then coarser levels."""
    side = cache.grid.tile_map
    i0, i1, j0, j1 = box
    centre = ((i0 + i1) / 2, (j0 + j1) / 2)

    def by_distance(tiles, scale=1.0):
        return sorted(
            tiles,
            key=lambda t: (
                ((t[0] + 0.5) * side - centre[0] * scale) ** 2 + ((t[1] + 0.5) * side - centre[1] * scale) ** 2
            ),
        )

    in_view = tiles_in_box(cache, level, box)
    margin = ring * side
    around = [
        t for t in tiles_in_box(cache, level, (i0 - margin, i1 + margin, j0 - margin, j1 + margin)) if t not in in_view
    ]
    plan = [(level, *t) for t in by_distance(in_view)] + [(level, *t) for t in by_distance(around)]
    for coarser in range(level + 1, cache.n_levels):
        scale = 2.0 ** (level - coarser)
        tiles = tiles_in_box(cache, coarser, tuple(v * scale for v in box))
        plan += [(coarser, *t) for t in by_distance(tiles, scale)]
    return plan


def progress_text(queued: int, paused: bool, total: int | None, eta_s: float | None) -> str:
    """The service's progress on a view in a reader's words: how much is left and about how long it takes."""
    if not queued:
        return "view predicted"
    count = f"{total - queued} / {total} tiles of this view done" if total else f"{queued} tiles to go"
    if paused:
        return f"paused: {count}"
    if eta_s is None:
        return f"predicting: {count}"
    eta = f"about {eta_s:.0f} s" if eta_s < 90 else f"about {eta_s / 60:.0f} min"
    return f"predicting: {count}, {eta} left"
