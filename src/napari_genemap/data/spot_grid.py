"""Spots on their array grid, and coarser grids made from finer ones by summing blocks.

Super-resolution (Diff-ST) works on images whose pixels are spots: a legacy ST slide's square grid (200 µm
pitch; the counts index ``"10x14"`` or ``obs`` columns ``array_x, array_y`` give each spot's place) or
Visium's hexagonal grid (``obs`` columns ``array_row, array_col``, with ``array_col`` stepping by 2 and odd
rows offset by one: stored here as offset rows, column ``array_col // 2``). Regular bins of molecules
(`napari_genemap.data.pseudobulk`) are a square grid too.

A low-resolution grid is the high-resolution one summed over ``factor x factor`` blocks, the way coarser bins
are made from finer ones; cells without a spot (off tissue) add nothing and are masked. Blocks start at the
grid's first row and column.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from ..errors import GenemapInputError

if TYPE_CHECKING:
    import anndata as ad

GridKind = Literal["square", "hex"]
_NAME = re.compile(r"^(\d+)x(\d+)$")  # legacy ST spot names: "<array x>x<array y>"


@dataclass(frozen=True)
class SpotGrid:
    """Each spot's cell (``row``, ``col``, 0-based, in table order) on a grid of ``shape`` cells."""

    row: np.ndarray
    col: np.ndarray
    shape: tuple[int, int]
    kind: GridKind = "square"

    def __post_init__(self):
        cells = self.row.astype(np.int64) * self.shape[1] + self.col
        if len(np.unique(cells)) != len(cells):
            raise GenemapInputError("spot grid: two spots share a grid position; expected one spot per position")

    @property
    def mask(self) -> np.ndarray:
        """(H, W) True where a spot is."""
        mask = np.zeros(self.shape, dtype=bool)
        mask[self.row, self.col] = True
        return mask


def spot_grid(table: ad.AnnData, source: str = "counts table") -> SpotGrid:
    """The array grid of a slide's spots, from ``obs`` (``array_row``/``array_col`` for Visium's hexagonal
    grid, ``array_x``/``array_y`` for legacy ST) or, failing those, legacy ST spot names like ``"10x14"``."""
    obs = table.obs
    if {"array_row", "array_col"} <= set(obs.columns):
        row = _integers(obs["array_row"], source, "array_row")
        col = _integers(obs["array_col"], source, "array_col")
        parity = (row + col) % 2
        if len(parity) and np.all(parity == parity[0]):  # Visium: a hexagonal grid in doubled columns
            return _from_cells(row, col // 2, "hex")
        return _from_cells(row, col, "square")
    if {"array_x", "array_y"} <= set(obs.columns):
        return _from_cells(_integers(obs["array_y"], source, "array_y"), _integers(obs["array_x"], source, "array_x"))
    matches = [_NAME.match(str(name)) for name in table.obs_names]
    if matches and all(matches):
        x = np.array([int(m.group(1)) for m in matches if m])
        y = np.array([int(m.group(2)) for m in matches if m])
        return _from_cells(y, x)
    raise GenemapInputError(
        f"{source}: no array positions for the spots; expected obs columns array_row/array_col (Visium) or "
        f"array_x/array_y, or spot names like '10x14' (legacy ST)"
    )


def rasterise(values: np.ndarray, grid: SpotGrid) -> np.ndarray:
    """Spot values (spots, genes) -> an image (genes, H, W) with 0 where no spot is (see ``grid.mask``)."""
    values = np.asarray(values)
    if values.ndim != 2 or len(values) != len(grid.row):
        raise GenemapInputError(f"spot values of shape {values.shape}; expected ({len(grid.row)}, genes)")
    image = np.zeros((values.shape[1], *grid.shape), dtype=values.dtype)
    image[:, grid.row, grid.col] = values.T
    return image


def block_sums(image: np.ndarray, mask: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Sums over ``factor x factor`` blocks of an image (channels, H, W), masked cells left out, and the
    number of spots in each block; the grid is padded with empty cells to a multiple of ``factor``."""
    if factor < 1:
        raise GenemapInputError(f"block factor {factor}; expected a whole number >= 1")
    channels, height, width = image.shape
    pad = (-height % factor, -width % factor)
    kept = np.where(mask, image, 0)
    kept = np.pad(kept, ((0, 0), (0, pad[0]), (0, pad[1])))
    counts = np.pad(mask.astype(np.int64), ((0, pad[0]), (0, pad[1])))
    rows, cols = (height + pad[0]) // factor, (width + pad[1]) // factor
    sums = kept.reshape(channels, rows, factor, cols, factor).sum(axis=(2, 4))
    return sums, counts.reshape(rows, factor, cols, factor).sum(axis=(1, 3))


def cell_centres(grid: SpotGrid, centres: np.ndarray) -> np.ndarray:
    """Every grid cell's centre (H, W, 2) in the spots' coordinates, filled in for cells without a spot by a
    least-squares affine fit of the spots' centres on their grid positions (rotation and shear included)."""
    centres = np.asarray(centres, dtype=np.float64)
    if len(centres) < 3:
        raise GenemapInputError(f"{len(centres)} spots; at least 3 are needed to place the grid")
    shift = np.where(grid.kind == "hex", 0.5 * (grid.row % 2), 0.0)  # odd hexagonal rows sit half a cell right
    design = np.column_stack([grid.col + shift, grid.row, np.ones(len(grid.row))])
    affine, *_ = np.linalg.lstsq(design, centres, rcond=None)
    rows, cols = np.mgrid[: grid.shape[0], : grid.shape[1]]
    all_shift = 0.5 * (rows % 2) if grid.kind == "hex" else 0.0
    placed = np.stack([cols + all_shift, rows, np.ones_like(rows)], axis=-1) @ affine
    placed[grid.row, grid.col] = centres  # measured centres where there are spots
    return placed


def _from_cells(row: np.ndarray, col: np.ndarray, kind: GridKind = "square") -> SpotGrid:
    if len(row) == 0:
        raise GenemapInputError("spot grid: no spots")
    row, col = row - row.min(), col - col.min()
    return SpotGrid(row, col, (int(row.max()) + 1, int(col.max()) + 1), kind)


def _integers(column, source: str, name: str) -> np.ndarray:
    values = np.asarray(column, dtype=np.float64)
    rounded = np.round(values)
    if not np.all(np.isfinite(values)) or np.abs(values - rounded).max(initial=0) > 1e-6:
        raise GenemapInputError(f"{source}: obs column {name!r} must hold whole grid positions")
    return rounded.astype(np.int64)
