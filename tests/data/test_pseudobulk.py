"""Pseudo-bulk tiles against direct counts: real Xenium molecules (pandas masks) and a HER2ST section
(spot counts summed in a plain loop)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from napari_genemap.data.protocols import Protocol
from napari_genemap.data.pseudobulk import (
    cell_tiles,
    molecule_tiles,
    normalise_tiles,
    read_tiles,
    read_transcripts,
    spot_tiles,
    xenium_tiles,
)
from napari_genemap.errors import GenemapInputError

XENIUM_MPP = 0.2125  # Xenium morphology image pixel size, µm/px


@pytest.fixture(scope="module")
def transcripts(shared_data):
    return shared_data / "xenium_lung_tx_crop" / "transcripts.parquet"


@pytest.fixture(scope="module")
def her2st_c3(her2st):
    from napari_genemap.errors import GenemapDataWarning
    from napari_genemap.io import read_slide

    with pytest.warns(GenemapDataWarning, match="dropped 2 spots"):  # two C3 spots have no counts
        return read_slide(her2st, section="C3")


def _hand_count(frame: pd.DataFrame, gene: str, box) -> int:
    x0, y0, x1, y1 = box
    inside = (frame.x_location >= x0) & (frame.x_location < x1) & (frame.y_location >= y0) & (frame.y_location < y1)
    good = (frame.qv >= 20) & ~frame.feature_name.str.contains("BLANK|NegControl|Unassigned|Deprecated")
    return int((inside & good & (frame.feature_name == gene)).sum())


@pytest.mark.parametrize("tile_um", [112.0, 50.0])
def test_xenium_tiles_match_a_hand_count(transcripts, tile_um):
    tiles = xenium_tiles(transcripts, tile_um)
    frame = pd.read_parquet(transcripts)
    info = tiles.uns["pseudobulk"]
    assert info["unit"] == "um" and info["origin"] == [2160.0, 2110.0]
    assert tiles.n_obs == {112.0: 4, 50.0: 25}[tile_um]  # 201.7 µm square: 2 x 2 and 5 x 5 tiles
    assert sp.issparse(tiles.X)
    top = frame.feature_name.value_counts().index[:2]  # two common genes, so the counts are not all zero
    for name in ("r0_c0", "r1_c1"):
        box = tiles.obs.loc[name, ["x0", "y0", "x1", "y1"]].to_numpy(float)
        for gene in top:
            assert tiles[name, gene].X.toarray().item() == _hand_count(frame, gene, box)
    kept = (frame.qv >= 20) & ~frame.feature_name.str.contains("BLANK|NegControl|Unassigned|Deprecated")
    assert tiles.X.sum() == kept.sum() == tiles.obs["n_items"].sum()
    assert tiles.obs["complete"].tolist()[0] and not tiles.obs["complete"].all()  # edge tiles run past the crop


def test_the_grid_stays_put_when_molecules_are_filtered_and_moves_when_they_are_shifted(transcripts):
    molecules = read_transcripts(transcripts)
    one_gene = molecules[molecules.gene == molecules.gene.value_counts().index[0]]
    assert molecule_tiles(one_gene, 50.0).uns["pseudobulk"]["origin"] == [2160.0, 2110.0]
    shifted = molecules.assign(x=molecules.x - 2000.0, y=molecules.y - 2000.0)  # pandas keeps attrs
    tiles = molecule_tiles(shifted, 50.0)
    assert tiles.uns["pseudobulk"]["origin"] == [160.0, 110.0] and tiles.n_obs == 25


def test_control_probes_go_even_without_the_quality_filter(transcripts):
    molecules = read_transcripts(transcripts, min_qv=None)
    assert not molecules.gene.str.contains("BLANK|NegControl").any()
    matched = molecules.attrs["dropped"]["control or non-gene features"]
    raw = pd.read_parquet(transcripts, columns=["feature_name"]).feature_name
    assert matched == raw.str.startswith(("BLANK", "NegControl")).sum() > 0
    kept_everything = read_transcripts(transcripts, min_qv=None, drop_controls=False)
    assert len(kept_everything) == len(raw)


def test_cells_in_pixels_and_in_micrometres_give_the_same_tiles(transcripts):
    """Cells rebuilt from the molecules (centre = mean position), binned once in µm and once in slide pixels."""
    molecules = read_transcripts(transcripts)
    frame = pd.read_parquet(transcripts)
    frame = frame[(frame.cell_id != "UNASSIGNED") & (frame.qv >= 20) & frame.feature_name.isin(set(molecules.gene))]
    counts = pd.crosstab(frame.cell_id, frame.feature_name)
    centres = frame.groupby("cell_id")[["x_location", "y_location"]].mean().loc[counts.index].to_numpy(float)
    cells = ad.AnnData(X=sp.csr_matrix(counts.to_numpy(np.float32)), var=pd.DataFrame(index=counts.columns))
    cells.obs_names = counts.index
    cells.obsm["spatial"] = centres
    in_um = cell_tiles(cells, 50.0, unit="um", origin=(2160.0, 2110.0))
    in_px = cells.copy()
    in_px.obsm["spatial"] = centres / XENIUM_MPP
    pixels = cell_tiles(in_px, 50.0, unit="px", mpp=XENIUM_MPP, origin=(2160.0 / XENIUM_MPP, 2110.0 / XENIUM_MPP))
    assert pixels.uns["pseudobulk"]["unit"] == "px" and pixels.uns["pseudobulk"]["tile"] == pytest.approx(50 / 0.2125)
    assert (in_um.X != pixels.X).nnz == 0
    # one tile by hand: the cells whose centres fall in its box
    x0, y0, x1, y1 = in_um.obs.loc["r2_c1", ["x0", "y0", "x1", "y1"]].to_numpy(float)
    inside = (centres[:, 0] >= x0) & (centres[:, 0] < x1) & (centres[:, 1] >= y0) & (centres[:, 1] < y1)
    assert inside.sum() > 3
    np.testing.assert_array_equal(in_um["r2_c1"].X.toarray()[0], counts.to_numpy()[inside].sum(0))


def test_her2st_spot_tiles_hold_the_spots_whose_centres_they_contain(her2st_c3):
    from napari_genemap.io import counts_table, spot_geometry

    table = counts_table(her2st_c3)
    counts = table.X.toarray()
    tiles = spot_tiles(her2st_c3, 112.0)
    # 112 µm around a 100 µm spot on a 200 µm grid: each tile holds its own spot only
    assert tiles.uns["pseudobulk"]["unit"] == "px" and tiles.n_obs == 180
    assert (tiles.obs["n_spots"] == 1).all()
    np.testing.assert_array_equal(tiles.X.toarray(), counts)
    wide = spot_tiles(her2st_c3, 450.0)
    centres, _ = spot_geometry(her2st_c3)
    half = 450.0 / tiles.uns["pseudobulk"]["mpp"] / 2
    for i in range(0, 180, 7):  # a direct loop over spots for every seventh tile
        expected = np.zeros(counts.shape[1])
        n = 0
        for j in range(180):
            dx, dy = centres[j] - centres[i]
            if -half <= dx < half and -half <= dy < half:
                expected += counts[j]
                n += 1
        assert wide.obs["n_spots"].iloc[i] == n
        np.testing.assert_array_equal(wide.X[i].toarray()[0], expected)
    assert wide.obs["n_spots"].max() >= 5  # neighbours 200 µm away fall in a 450 µm tile


def test_protocol_values_and_tile_pixels(her2st_c3):
    tiles = spot_tiles(her2st_c3, 112.0)[:3]
    protocol = Protocol("three", ("ERBB2", "GNAS", "MUC1"), target_sum=1e4, log="ln")
    normalised = normalise_tiles(tiles, protocol)
    raw = tiles[:, list(protocol.genes)].X.toarray().astype(float)
    np.testing.assert_allclose(normalised.layers["protocol"], np.log1p(raw / raw.sum(1, keepdims=True) * 1e4), 1e-6)
    assert normalised.uns["protocol"]["name"] == "three" and list(normalised.var_names) == list(protocol.genes)
    images = read_tiles(her2st_c3, tiles, mpp=0.5)
    assert images.shape == (3, 224, 224, 3) and images.dtype == np.uint8
    assert images.std() > 10  # tissue, not a blank border


def test_clear_errors_name_the_file_and_field(tmp_path, transcripts):
    frame = pd.read_parquet(transcripts)
    no_qv = tmp_path / "no_qv.parquet"
    frame.drop(columns="qv").to_parquet(no_qv)
    with pytest.raises(GenemapInputError, match=r"no_qv\.parquet: column 'qv' missing.*min_qv=None") as error:
        read_transcripts(no_qv)
    assert "\n" not in str(error.value)
    assert len(read_transcripts(no_qv, min_qv=None)) > 0
    no_x = tmp_path / "no_x.parquet"
    frame.drop(columns="x_location").to_parquet(no_x)
    with pytest.raises(GenemapInputError, match=r"no_x\.parquet: column 'x_location' missing"):
        read_transcripts(no_x)
    molecules = read_transcripts(transcripts)
    with pytest.raises(GenemapInputError, match="position unit 'nm'"):
        molecule_tiles(molecules, 50.0, unit="nm")
    with pytest.raises(GenemapInputError, match="need the pixel size"):
        molecule_tiles(molecules, 50.0, unit="px")
    in_nm = molecules.assign(x=molecules.x * 1000, y=molecules.y * 1000)
    in_nm.attrs = {"source": "nm.parquet"}
    with pytest.raises(GenemapInputError, match=r"nm\.parquet: .* tiles; are the positions in the unit given"):
        molecule_tiles(in_nm, 16.0, unit="um")
    with pytest.raises(GenemapInputError, match="column 'gene' missing"):
        molecule_tiles(molecules.drop(columns="gene"), 50.0)
    cells = ad.AnnData(X=np.ones((2, 1), dtype=np.float32))
    with pytest.raises(GenemapInputError, match=r"obsm\['spatial'\] missing"):
        cell_tiles(cells, 50.0, unit="um")
