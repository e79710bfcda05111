"""Real low/high-resolution pairs for super-resolution (Diff-ST), and training patches from them.

No sub-spot H&E data exists offline, so pairs are made from what is measured: the high-resolution (HR) map
is a slide's spots on their array grid, the low-resolution (LR) map their sums over ``factor x factor``
blocks (`spot_grid.block_sums`: the way coarser bins are made from finer ones). Every HR value is a real
measurement; cells without a spot are masked (``hr_mask``) and add nothing to their block. Molecule tables
(Xenium) give the paper's own setting: fine bins as HR, blocks of them as LR (`bin_pair`).

Values are a named protocol's (`napari_genemap.data.protocols`), applied to the HR spots' counts and to the
LR blocks' summed counts alike, so an LR cell reads like a measurement of a spot ``factor`` times larger.
Raw counts stay beside them (``hr_counts``, ``lr_counts``) for baselines that work on the count scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import GenemapInputError
from .protocols import Protocol
from .spot_grid import SpotGrid, block_sums, cell_centres, rasterise, spot_grid

if TYPE_CHECKING:
    import pandas as pd

#: The dihedral group of the square, as (quarter turns, then a left-right flip): 8 views that keep a
#: square grid a grid (and its blocks blocks, when a patch is block-aligned).
DIHEDRAL = tuple((turns, flip) for flip in (False, True) for turns in range(4))


@dataclass(frozen=True)
class SuperResPair:
    """One section's HR grid and its LR blocks; arrays are (genes, rows, cols) unless said."""

    name: str
    genes: tuple[str, ...]
    factor: int
    hr: np.ndarray  # protocol values of the spots, 0 where hr_mask is False
    hr_mask: np.ndarray  # (H, W) bool: a measured spot
    lr: np.ndarray  # protocol values of the blocks' summed counts, 0 where lr_spots is 0
    lr_spots: np.ndarray  # (H / factor, W / factor) int: spots in each block
    hr_counts: np.ndarray  # raw counts, float32
    lr_counts: np.ndarray
    centres: np.ndarray  # (H, W, 2) every cell's centre (x, y) in slide pixels (or µm for bins)
    kind: str = "square"
    histology: np.ndarray | None = None  # (channels, H, W) per-cell histology features, when attached

    @property
    def shape(self) -> tuple[int, int]:
        """The HR grid's (rows, cols), a multiple of ``factor``."""
        return self.hr_mask.shape


def section_pair(sdata, protocol: Protocol, factor: int = 2, name: str | None = None) -> SuperResPair:
    """The pair of a canonical slide with measured spots (`napari_genemap.io.read_slide`)."""
    from ..io.canonical import counts_table, spot_geometry

    table = counts_table(sdata)
    source = name or str(sdata.attrs.get("genemap", {}).get("section") or "slide")
    grid = spot_grid(table, source)
    centres, _ = spot_geometry(sdata)
    return _pair(source, protocol, grid, protocol.counts(table), centres, factor)


def bin_pair(
    molecules: pd.DataFrame,
    protocol: Protocol,
    bin_um: float = 8.0,
    factor: int = 4,
    *,
    columns: tuple[str, str, str] = ("x", "y", "gene"),
) -> SuperResPair:
    """The pair of a molecule table in µm (e.g. `pseudobulk.read_transcripts` of a Xenium run): HR bins of
    ``bin_um``, LR bins ``factor`` times larger; bins without a molecule are masked. Centres in µm."""
    from .pseudobulk import molecule_tiles

    bins = molecule_tiles(molecules, bin_um, unit="um", genes=list(protocol.genes), columns=columns)
    origin = bins.obs[["x0", "y0"]].to_numpy().min(0)
    cells = np.round((bins.obs[["y0", "x0"]].to_numpy() - origin[::-1]) / bin_um).astype(np.int64)
    counts = protocol.counts(bins)
    kept = counts.sum(1) > 0
    grid = SpotGrid(cells[kept, 0], cells[kept, 1], (int(cells[:, 0].max()) + 1, int(cells[:, 1].max()) + 1))
    centres = bins.obs[["x0", "y0"]].to_numpy()[kept] + bin_um / 2
    source = str(molecules.attrs.get("source", "molecule table"))
    return _pair(source, protocol, grid, counts[kept], centres, factor)


def _pair(
    name: str, protocol: Protocol, grid: SpotGrid, counts: np.ndarray, centres: np.ndarray, factor: int
) -> SuperResPair:
    mask = grid.mask
    hr_counts = rasterise(counts.astype(np.float32), grid)
    lr_counts, lr_spots = block_sums(hr_counts, mask, factor)
    rows, cols = lr_spots.shape[0] * factor, lr_spots.shape[1] * factor
    pad = ((0, rows - grid.shape[0]), (0, cols - grid.shape[1]))
    hr_counts = np.pad(hr_counts, ((0, 0), *pad))
    mask = np.pad(mask, pad)
    padded = SpotGrid(grid.row, grid.col, (rows, cols), grid.kind)
    return SuperResPair(
        name=name,
        genes=protocol.genes,
        factor=factor,
        hr=_normalised(protocol, hr_counts, mask),
        hr_mask=mask,
        lr=_normalised(protocol, lr_counts, lr_spots > 0),
        lr_spots=lr_spots,
        hr_counts=hr_counts,
        lr_counts=lr_counts.astype(np.float32),
        centres=cell_centres(padded, centres),
        kind=grid.kind,
    )


def nearest_upsampled(lr: np.ndarray, factor: int) -> np.ndarray:
    """LR maps (..., h, w) on the HR grid (..., h * factor, w * factor): each block's value on its cells."""
    return np.repeat(np.repeat(np.asarray(lr, dtype=np.float32), factor, -2), factor, -1)


def _normalised(protocol: Protocol, counts: np.ndarray, mask: np.ndarray) -> np.ndarray:
    values = protocol.normalise(counts.reshape(len(counts), -1).T.astype(np.float64))
    return np.where(mask, values.T.reshape(counts.shape), 0.0).astype(np.float32)


@dataclass(frozen=True)
class Patches:
    """A batch of aligned patches; ``hr`` (n, genes, S, S), ``lr`` (n, genes, S / f, S / f), masks alike,
    ``centres`` (n, S, S, 2), ``origin`` (n, 2) each patch's first HR (row, col), ``view`` its dihedral view."""

    hr: np.ndarray
    hr_mask: np.ndarray
    lr: np.ndarray
    lr_spots: np.ndarray
    centres: np.ndarray
    origin: np.ndarray
    view: np.ndarray
    histology: np.ndarray | None = None  # (n, channels, S, S) when the pair has histology features


def patch_origins(pair: SuperResPair, size: int, min_spots: float = 0.25) -> np.ndarray:
    """Every block-aligned ``size x size`` HR patch (origins (n, 2)) holding at least ``min_spots`` of its
    cells as measured spots; a grid smaller than ``size`` is one patch (padded by `cut_patches`)."""
    if size < pair.factor or size % pair.factor:
        raise GenemapInputError(f"patch size {size}; expected a multiple of the block factor {pair.factor}")
    rows, cols = pair.shape
    origins = np.array(
        [
            (r, c)
            for r in range(0, max(rows - size, 0) + 1, pair.factor)
            for c in range(0, max(cols - size, 0) + 1, pair.factor)
        ],
        dtype=np.int64,
    )
    fraction = np.array([pair.hr_mask[r : r + size, c : c + size].sum() / size**2 for r, c in origins])
    good = origins[fraction >= min_spots]
    return good if len(good) else origins[np.argsort(-fraction)[:1]]


def cut_patches(
    pair: SuperResPair, origins: np.ndarray, size: int, views: Sequence[int] | np.ndarray | None = None
) -> Patches:
    """The patches at ``origins``, each in its dihedral view (indices into `DIHEDRAL`; default none).
    Cells past the grid's edge are empty and masked. A hexagonal grid has no views but the identity (a turn
    would not keep its offset rows a grid)."""
    origins = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
    views = np.zeros(len(origins), dtype=np.int64) if views is None else np.asarray(views, dtype=np.int64)
    if pair.kind != "square" and np.any(views != 0):
        raise GenemapInputError(f"{pair.name}: a {pair.kind} grid has no dihedral views; expected view 0")
    f, small = pair.factor, size // pair.factor
    keys = ("hr", "hr_mask", "lr", "lr_spots", "centres") + (() if pair.histology is None else ("histology",))
    fields: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for (row, col), view in zip(origins, views, strict=True):
        hr_window = (slice(row, row + size), slice(col, col + size))
        lr_window = (slice(row // f, row // f + small), slice(col // f, col // f + small))
        pieces = {
            "hr": _padded(pair.hr[(slice(None), *hr_window)], size),
            "hr_mask": _padded(pair.hr_mask[hr_window], size),
            "lr": _padded(pair.lr[(slice(None), *lr_window)], small),
            "lr_spots": _padded(pair.lr_spots[lr_window], small),
            "centres": np.moveaxis(_padded(np.moveaxis(pair.centres[hr_window], -1, 0), size, edge=True), 0, -1),
        }
        if pair.histology is not None:
            pieces["histology"] = _padded(pair.histology[(slice(None), *hr_window)], size, edge=True)
        for key, value in pieces.items():
            spatial = (0, 1) if key == "centres" else (-2, -1)
            fields[key].append(dihedral(value, int(view), spatial))
    return Patches(**{k: np.stack(v) for k, v in fields.items()}, origin=origins, view=views)


def dihedral(array: np.ndarray, view: int, axes: tuple[int, int] = (-2, -1)) -> np.ndarray:
    """One of the 8 views of `DIHEDRAL` over two axes (rows, cols); `undo_dihedral` inverts it."""
    turns, flip = DIHEDRAL[view]
    out = np.rot90(array, turns, axes=axes)
    return np.ascontiguousarray(np.flip(out, axis=axes[1]) if flip else out)


def undo_dihedral(array: np.ndarray, view: int, axes: tuple[int, int] = (-2, -1)) -> np.ndarray:
    turns, flip = DIHEDRAL[view]
    out = np.flip(array, axis=axes[1]) if flip else array
    return np.ascontiguousarray(np.rot90(out, -turns, axes=axes))


def _padded(array: np.ndarray, size: int, edge: bool = False) -> np.ndarray:
    pad = [(0, 0)] * (array.ndim - 2) + [(0, size - array.shape[-2]), (0, size - array.shape[-1])]
    return np.pad(array, pad, mode="edge" if edge else "constant")
