"""Super-resolution pairs: the spot-grid rasteriser and the LR/HR builder against hand-made grids, a real
HER2ST crop and real Xenium molecules (hand counts)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from napari_genemap.data.protocols import Protocol
from napari_genemap.data.spot_grid import SpotGrid, block_sums, cell_centres, rasterise, spot_grid
from napari_genemap.data.superres import (
    DIHEDRAL,
    bin_pair,
    cut_patches,
    dihedral,
    patch_origins,
    section_pair,
    undo_dihedral,
)
from napari_genemap.errors import GenemapInputError


def _table(names, obs=None) -> ad.AnnData:
    return ad.AnnData(np.ones((len(names), 1), dtype=np.float32), obs=pd.DataFrame(obs, index=names))


def test_legacy_names_and_visium_columns_place_spots_on_their_grid():
    square = spot_grid(_table(["10x14", "11x14", "10x16"]))
    assert square.kind == "square" and square.shape == (3, 2)
    assert square.row.tolist() == [0, 0, 2] and square.col.tolist() == [0, 1, 0]
    columns = spot_grid(_table(["a", "b"], {"array_x": [3.0, 5.0], "array_y": [7.0, 7.0]}))
    assert columns.shape == (1, 3) and columns.col.tolist() == [0, 2]
    # Visium: array_col steps by 2, odd rows offset by one; stored as offset rows
    hexagonal = spot_grid(_table(list("abcd"), {"array_row": [4, 4, 5, 5], "array_col": [10, 12, 11, 13]}))
    assert hexagonal.kind == "hex" and hexagonal.shape == (2, 2)
    assert hexagonal.row.tolist() == [0, 0, 1, 1] and hexagonal.col.tolist() == [0, 1, 0, 1]


@pytest.mark.parametrize(
    ("names", "obs", "message"),
    [
        (["10x14", "10x14b"], None, "no array positions"),
        (["a", "b"], {"array_x": [1, 1], "array_y": [2, 2]}, "share a grid position"),
        (["a", "b"], {"array_x": [1.5, 2], "array_y": [2, 2]}, "'array_x' must hold whole grid positions"),
    ],
)
def test_bad_positions_get_one_line_errors(names, obs, message):
    with pytest.raises(GenemapInputError, match=message):
        spot_grid(_table(names, obs))


def test_block_sums_of_a_hand_made_grid_are_exact_and_masked():
    # 3 x 3 grid, spot (1, 1) missing; 2 genes; factor 2 pads to 4 x 4
    grid = SpotGrid(np.array([0, 0, 0, 1, 1, 2, 2, 2]), np.array([0, 1, 2, 0, 2, 0, 1, 2]), (3, 3))
    values = np.arange(16, dtype=np.float64).reshape(8, 2) + 1
    image = rasterise(values, grid)
    assert image.shape == (2, 3, 3) and image[:, 1, 1].tolist() == [0, 0]
    assert image[:, 2, 1].tolist() == values[6].tolist()
    sums, spots = block_sums(image + 100 * ~grid.mask, grid.mask, 2)  # junk under the mask must not count
    assert spots.tolist() == [[3, 2], [2, 1]]
    gene0 = values[:, 0]
    assert sums[0].tolist() == [[gene0[0] + gene0[1] + gene0[3], gene0[2] + gene0[4]], [gene0[5] + gene0[6], gene0[7]]]
    assert sums.sum() == values.sum()


def test_cell_centres_fill_empty_cells_from_the_grid_fit():
    rows, cols = np.mgrid[:4, :5]
    angle = np.deg2rad(3.0)  # a slightly rotated slide
    affine = 290.0 * np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
    truth = np.stack([cols, rows], -1) @ affine + [100.0, 50.0]
    kept = np.ones((4, 5), dtype=bool)
    kept[1, 2] = kept[3, 4] = False
    grid = SpotGrid(rows[kept], cols[kept], (4, 5))
    placed = cell_centres(grid, truth[kept])
    np.testing.assert_allclose(placed, truth, atol=1e-6)


@pytest.fixture(scope="module")
def panel() -> Protocol:
    return Protocol("panel", ("KRT8", "MUCL1", "KRT86"), target_sum=None, log="ln")


def test_a_real_section_pair_keeps_every_count(sample_slide, panel):
    from napari_genemap.io.canonical import counts_table

    pair = section_pair(sample_slide, panel, factor=2)
    counts = panel.counts(counts_table(sample_slide))
    assert pair.hr_mask.sum() == len(counts) == 49
    assert pair.shape[0] % 2 == 0 and pair.shape[1] % 2 == 0
    assert pair.hr_counts.sum() == pytest.approx(counts.sum()) == pytest.approx(pair.lr_counts.sum())
    assert pair.lr_spots.sum() == 49
    # protocol values: log1p of the spot's counts at its cell, of the block's summed counts on the LR grid
    np.testing.assert_allclose(pair.hr, np.log1p(pair.hr_counts), rtol=1e-6)
    np.testing.assert_allclose(pair.lr, np.log1p(pair.lr_counts), rtol=1e-6)
    # the grid's cell centres sit 200 µm apart (0.6875 µm/px)
    step = np.linalg.norm(np.diff(pair.centres, axis=1), axis=-1).mean() * 0.6875
    assert step == pytest.approx(200.0, rel=0.02)


def test_patches_in_every_dihedral_view_keep_blocks_as_blocks(sample_slide, panel):
    pair = section_pair(sample_slide, panel, factor=2)
    origins = patch_origins(pair, 4)
    assert len(origins) and np.all(origins % 2 == 0)
    for view in range(len(DIHEDRAL)):
        patches = cut_patches(pair, origins, 4, np.full(len(origins), view))
        sums, spots = block_sums(np.expm1(patches.hr[0]), patches.hr_mask[0], 2)
        np.testing.assert_array_equal(spots, patches.lr_spots[0])
        np.testing.assert_allclose(np.log1p(sums), patches.lr[0], rtol=1e-5)
        back = undo_dihedral(patches.hr, view)
        np.testing.assert_array_equal(back, cut_patches(pair, origins, 4).hr)
    assert dihedral(np.arange(4).reshape(2, 2), 1).tolist() == [[1, 3], [0, 2]]
    with pytest.raises(GenemapInputError, match="multiple of the block factor 2"):
        patch_origins(pair, 5)


def test_xenium_bin_pair_matches_a_hand_count(shared_data):
    from napari_genemap.data.pseudobulk import read_transcripts

    molecules = read_transcripts(shared_data / "xenium_lung_tx_crop" / "transcripts.parquet")
    genes = tuple(molecules["gene"].value_counts().index[:5])
    panel = Protocol("xenium", genes, target_sum=None, log="ln")
    pair = bin_pair(molecules, panel, bin_um=8.0, factor=4)
    in_panel = molecules[molecules["gene"].isin(genes)]
    assert pair.hr_counts.sum() == len(in_panel) == pair.lr_counts.sum()
    x0, y0 = molecules.attrs["extent"][:2]
    x0, y0 = np.floor(x0), np.floor(y0)
    for (row, col), gene in (((0, 0), genes[0]), ((2, 3), genes[1])):  # 32 µm LR bins, hand-counted
        box = in_panel[
            (in_panel.x >= x0 + 32 * col)
            & (in_panel.x < x0 + 32 * (col + 1))
            & (in_panel.y >= y0 + 32 * row)
            & (in_panel.y < y0 + 32 * (row + 1))
        ]
        assert pair.lr_counts[genes.index(gene), row, col] == (box["gene"] == gene).sum()
    assert pair.hr_mask.mean() > 0.5  # most 8 µm bins of lung tissue hold a panel molecule
    np.testing.assert_allclose(pair.centres[0, 0], [x0 + 4, y0 + 4])
