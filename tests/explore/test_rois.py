"""ROIs without Qt: napari shapes -> GeoDataFrame, fold changes, and the CSV / h5ad / SpatialData round trips."""

from __future__ import annotations

import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import shapely
import spatialdata as sd

from napari_genemap.data.protocols import Protocol
from napari_genemap.errors import GenemapInputError
from napari_genemap.explore import rois as R
from napari_genemap.explore import roiset
from napari_genemap.infer.aggregate import GeneMapSource, aggregate_shapes
from napari_genemap.io import read_slide, slide_mpp, write_store
from napari_genemap.io import rois as roi_io
from napari_genemap.plugin import read_layers

GENES = ["A", "B", "C"]
PIXEL = 4.0  # slide pixels per map pixel
LEVELS = np.array([1.0, 2.0, 0.0], np.float32)  # a constant density per gene (per map pixel)


def constant_source(mpp: float) -> GeneMapSource:
    """A 512 x 512 map (2048 slide px) of constant densities: any ROI integrates to density x area."""
    level = LEVELS[:, None, None] * np.ones((3, 512, 512), np.float32)
    return GeneMapSource(
        read=lambda i0, i1, j0, j1, genes: level[genes, i0:i1, j0:j1],
        shape=(512, 512),
        genes=GENES,
        pixel_size=PIXEL,
        protocol=Protocol("test", tuple(GENES), target_sum=1e4, log="log10"),
        slide_mpp=mpp,
        provenance={},
    )


RECTANGLE = np.array([[100.0, 200.0], [100.0, 400.0], [150.0, 400.0], [150.0, 200.0]])  # (row, column)
TRIANGLE = np.array([[1000.0, 1000.0], [1000.0, 1300.0], [1200.0, 1000.0]])


def drawn():
    """Three ROIs as napari gives them: a circle (x 600, y 500, r 40), a rectangle, a triangle."""
    data = [R.ellipse_corners(600, 500, 40), RECTANGLE, TRIANGLE]
    return data, ["ellipse", "rectangle", "polygon"], ["tumour", "stroma", "edge"]


@pytest.fixture
def rois_and_table(sample_slide):
    rois = R.rois_from_shapes(*drawn())
    mpp = slide_mpp(sample_slide)
    return rois, R.roi_table(rois, aggregate_shapes(constant_source(mpp), rois), mpp)


# --- conversion --------------------------------------------------------------------------------------------
def test_shapes_become_circles_and_polygons_in_slide_pixels():
    rois = R.rois_from_shapes(*drawn())
    assert list(rois.index) == ["tumour", "stroma", "edge"]
    assert list(rois["kind"]) == ["circle", "polygon", "polygon"]
    circle = rois.geometry.iloc[0]
    assert (circle.x, circle.y, rois["radius"].iloc[0]) == (600.0, 500.0, 40.0)  # x = column, y = row
    assert rois.geometry.iloc[1].area == 200 * 50
    assert rois.geometry.iloc[1].bounds == (200.0, 100.0, 400.0, 150.0)
    assert np.isnan(rois["radius"].iloc[1])


def test_an_oval_or_rotated_ellipse_counts_as_a_circle_of_its_mean_half_axis():
    oval = np.array([[90.0, 170.0], [90.0, 230.0], [110.0, 230.0], [110.0, 170.0]])  # 30 x 10 half-axes
    assert R.circle_from_ellipse(oval) == (200.0, 100.0, 20.0)
    angle = np.deg2rad(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    turned = (oval - (100, 200)) @ rotation.T + (100, 200)
    assert R.circle_from_ellipse(turned) == pytest.approx((200.0, 100.0, 20.0))


def test_a_self_crossing_polygon_keeps_both_lobes():
    bowtie = np.array([[0.0, 0.0], [10.0, 10.0], [0.0, 10.0], [10.0, 0.0]])  # (row, column)
    rois = R.rois_from_shapes([bowtie], ["polygon"], ["bow"])
    assert rois.geometry.iloc[0].is_valid
    assert rois.geometry.iloc[0].area == pytest.approx(50.0)  # two triangles of 25


def test_bad_shapes_and_names_get_one_line_errors():
    with pytest.raises(GenemapInputError, match="'cut' is a line"):
        R.rois_from_shapes([np.array([[0.0, 0.0], [5.0, 5.0]])], ["line"], ["cut"])
    with pytest.raises(GenemapInputError, match="encloses no area"):
        R.rois_from_shapes([np.array([[0.0, 0.0], [5.0, 5.0], [10.0, 10.0]])], ["polygon"], ["flat"])
    with pytest.raises(GenemapInputError, match="'a' is used more than once"):
        R.rois_from_shapes([R.ellipse_corners(5, 5, 2)] * 2, ["ellipse"] * 2, ["a", "a"])
    with pytest.raises(GenemapInputError, match="needs a name"):
        R.rois_from_shapes([R.ellipse_corners(5, 5, 2)], ["ellipse"], [" "])


def test_rois_turn_back_into_the_same_napari_shapes():
    data, types, names = drawn()
    back, back_types, back_names = R.shapes_from_rois(R.rois_from_shapes(data, types, names))
    assert back_names == names and back_types == ["ellipse", "polygon", "polygon"]
    np.testing.assert_allclose(back[0], data[0])
    # polygons come back as the same ring (shapely may start it elsewhere or turn it round)
    for original, returned in zip(data[1:], back[1:]):
        assert shapely.Polygon(returned[:, ::-1]).equals(shapely.Polygon(original[:, ::-1]))


# --- comparisons -------------------------------------------------------------------------------------------
def test_log2_fold_change_is_the_pseudocounted_ratio_on_the_protocol_scale():
    # v = 99 and 9 counts per 1e4: log2(100 / 10)
    a, b = np.log10([100.0, 1.0]), np.log10([10.0, 1.0])
    np.testing.assert_allclose(R.log2_fold_change(a, b, "log10"), [math.log2(10), 0.0])
    np.testing.assert_allclose(R.log2_fold_change(np.log([8.0]), np.log([2.0]), "ln"), [2.0])
    with pytest.raises(GenemapInputError, match="log 'log2'"):
        R.log2_fold_change(a, b, "log2")


def test_fold_changes_and_top_genes_rank_by_hand_values():
    table = ad.AnnData(
        X=np.log10(np.array([[1 + 99, 1 + 0, 1 + 15, 1 + 3], [1 + 9, 1 + 7, 1 + 15, 1 + 63]], dtype=np.float32)),
        obs=pd.DataFrame(index=["r1", "r2"]),
        var=pd.DataFrame(index=["G1", "G2", "G3", "G4"]),
    )
    table.uns["genemap"] = {"protocol": {"log": "log10"}}
    changes = R.fold_changes(table, "r1", "r2", n=3)
    assert list(changes.index) == ["G4", "G1", "G2"]  # log2 4/64, log2 100/10, log2 1/8; G3 is unchanged
    np.testing.assert_allclose(changes.to_numpy(), [-4.0, math.log2(10), -3.0], rtol=1e-6)
    top = R.top_genes(table, "r2", n=2)
    assert list(top.index) == ["G4", "G3"]
    with pytest.raises(GenemapInputError, match="no expression for ROI 'r3'"):
        R.top_genes(table, "r3")


# --- exports -----------------------------------------------------------------------------------------------
def test_roi_table_has_the_disk_and_polygon_integrals_and_geometry(rois_and_table, sample_slide):
    rois, table = rois_and_table
    mpp = slide_mpp(sample_slide)
    assert list(table.obs_names) == ["tumour", "stroma", "edge"]
    areas = np.array([math.pi * 40**2, 200 * 50, 300 * 200 / 2])  # slide px²
    np.testing.assert_allclose(table.layers["integral"], np.outer(areas / PIXEL**2, LEVELS), rtol=1e-5)
    # hist2st-like protocol: counts per 1e4 over all genes, log10(1 + x): the same profile for any size
    expected = np.log10(1 + 1e4 * LEVELS / LEVELS.sum())
    np.testing.assert_allclose(table.X, np.tile(expected, (3, 1)), rtol=1e-5)
    np.testing.assert_allclose(table.obs["area_px2"], areas, rtol=1e-9)
    np.testing.assert_allclose(table.obs["area_um2"], areas * mpp**2, rtol=1e-9)
    assert table.obs["radius_px"].iloc[0] == 40 and table.obs["radius_um"].iloc[0] == pytest.approx(40 * mpp)
    assert table.obs[["radius_px", "radius_um"]].iloc[1:].isna().all().all()
    assert list(table.obs["kind"]) == ["circle", "polygon", "polygon"]
    np.testing.assert_allclose(table.obs[["x_px", "y_px"]].iloc[:2], [[600, 500], [300, 125]])
    np.testing.assert_allclose(table.obs[["x_um", "y_um"]].iloc[:2], np.array([[600, 500], [300, 125]]) * mpp)
    np.testing.assert_allclose(table.obsm["spatial"][:2], [[600, 500], [300, 125]])  # slide pixels
    assert shapely.from_wkt(table.obs["geometry_wkt_px"].iloc[2]).equals(rois.geometry.iloc[2])


def test_csv_round_trip_says_its_units(rois_and_table, sample_slide, tmp_path):
    _, table = rois_and_table
    mpp = slide_mpp(sample_slide)
    path = roi_io.write_csv(table, tmp_path / "rois.csv")
    frame = pd.read_csv(path)
    assert list(frame.columns) == [
        "name",
        "kind",
        *("x_um", "y_um", "radius_um", "area_um2"),
        *("x_px", "y_px", "radius_px", "area_px2"),
        *GENES,
    ]
    assert list(frame["name"]) == ["tumour", "stroma", "edge"]
    assert frame["radius_px"].iloc[0] == 40 and frame["radius_px"].iloc[1:].isna().all()
    # the circle at (600, 500) px, r 40 px; the rectangle's centroid (300, 125) px, 200 x 50 px
    expected_um = [600 * mpp, 500 * mpp, 40 * mpp]
    assert frame.loc[0, ["x_um", "y_um", "radius_um"]].tolist() == pytest.approx(expected_um, rel=1e-5)  # 6 digits
    assert frame.loc[1, ["x_px", "y_px", "area_px2"]].tolist() == pytest.approx([300, 125, 10_000], rel=1e-5)
    assert frame.loc[1, "area_um2"] == pytest.approx(10_000 * mpp**2, rel=1e-5)
    np.testing.assert_allclose(frame[GENES], table.X, rtol=1e-5)
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_h5ad_round_trip(rois_and_table, tmp_path):
    _, table = rois_and_table
    back = ad.read_h5ad(roi_io.write_h5ad(table, tmp_path / "rois.h5ad"))
    assert list(back.obs_names) == list(table.obs_names)
    assert {"x_um", "radius_um", "area_um2", "x_px", "radius_px", "area_px2", "geometry_wkt_px"} <= set(back.obs)
    np.testing.assert_array_equal(back.X, table.X)
    np.testing.assert_array_equal(back.layers["integral"], table.layers["integral"])
    assert back.uns["genemap"]["protocol"]["log"] == "log10"
    with pytest.raises(GenemapInputError, match=r"must end in \.h5ad"):
        roi_io.write_h5ad(table, tmp_path / "rois.csv")


def test_new_spatialdata_store_keeps_the_slide_and_the_rois_in_place(rois_and_table, sample_slide, tmp_path):
    rois, table = rois_and_table
    path = roi_io.write_spatialdata(rois, table, sample_slide, tmp_path / "with_rois.zarr")
    back = read_slide(path)
    assert {"he", "spots", roi_io.ROI_CIRCLES_KEY, roi_io.ROI_POLYGONS_KEY} <= set(back.images) | set(back.shapes)
    circles = back.shapes[roi_io.ROI_CIRCLES_KEY]
    assert list(circles["name"]) == ["tumour"]
    assert (circles.geometry.x.iloc[0], circles.geometry.y.iloc[0], circles["radius"].iloc[0]) == (600, 500, 40)
    expression = back.tables[roi_io.ROI_TABLE_KEY]
    assert expression.uns["spatialdata_attrs"]["region"] == [roi_io.ROI_CIRCLES_KEY, roi_io.ROI_POLYGONS_KEY]
    assert list(expression.obs["roi_id"]) == [0, 1, 2]
    # read back in the original order, with the same values
    rois_back, table_back = roi_io.read_rois(back)
    assert list(rois_back.index) == ["tumour", "stroma", "edge"]
    assert rois_back.geometry.iloc[2].equals(rois.geometry.iloc[2])
    np.testing.assert_array_equal(table_back.X, table.X)
    # the plugin's reader shows them again as a shapes layer over the H&E, in slide pixels scaled to µm
    layers = read_layers(str(path))
    assert [kind for _, _, kind in layers] == ["image", "points", "shapes"]
    data, meta, _ = layers[2]
    assert meta["name"] == "ROIs" and meta["shape_type"] == ["ellipse", "polygon", "polygon"]
    assert meta["scale"] == layers[0][1]["scale"]
    assert list(meta["features"]["name"]) == ["tumour", "stroma", "edge"]
    np.testing.assert_allclose(data[0], R.ellipse_corners(600, 500, 40))
    with pytest.raises(GenemapInputError, match="exists and is not a SpatialData store"):
        (tmp_path / "taken.zarr").mkdir()
        roi_io.write_spatialdata(rois, table, sample_slide, tmp_path / "taken.zarr")


def test_rois_written_into_an_existing_store_replace_the_old_ones(rois_and_table, sample_slide, tmp_path):
    rois, table = rois_and_table
    store = write_store(sample_slide, tmp_path / "slide.zarr")
    opened = read_slide(store)
    roi_io.write_spatialdata(rois, table, opened, store)
    assert set(sd.read_zarr(store).shapes) == {"spots", roi_io.ROI_CIRCLES_KEY, roi_io.ROI_POLYGONS_KEY}
    assert roi_io.ROI_POLYGONS_KEY in opened.shapes  # the open slide follows its store
    # again, with the circle alone and moved: the polygons go, nothing is left half-written beside the store
    moved = R.rois_from_shapes([R.ellipse_corners(700, 800, 25)], ["ellipse"], ["tumour"])
    one = R.roi_table(moved, aggregate_shapes(constant_source(slide_mpp(opened)), moved), slide_mpp(opened))
    roi_io.write_spatialdata(moved, one, opened, store)
    back = sd.read_zarr(store)
    assert set(back.shapes) == {"spots", roi_io.ROI_CIRCLES_KEY}
    assert set(back.tables) == {"counts", roi_io.ROI_TABLE_KEY} and back.tables[roi_io.ROI_TABLE_KEY].n_obs == 1
    circle = back.shapes[roi_io.ROI_CIRCLES_KEY]
    assert (circle.geometry.x.iloc[0], circle.geometry.y.iloc[0], circle["radius"].iloc[0]) == (700, 800, 25)
    assert back.tables["counts"].n_obs == 49 and "he" in back.images
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slide.zarr"]
    assert roi_io.ROI_POLYGONS_KEY not in opened.shapes


def test_exports_refuse_rois_without_expression(rois_and_table):
    rois, table = rois_and_table
    extra = R.rois_from_shapes([R.ellipse_corners(50, 50, 5)], ["ellipse"], ["new"])
    with pytest.raises(GenemapInputError, match="no expression for ROI 'new'"):
        R.roi_table(pd.concat([rois, extra]), table, 0.5)


def test_a_stores_saved_expression_is_found_by_roi_name(rois_and_table, sample_slide, tmp_path):
    rois, table = rois_and_table
    table.uns["genemap"]["model"] = "her2st-model"
    back = read_slide(roi_io.write_spatialdata(rois, table, sample_slide, tmp_path / "with_rois.zarr"))
    saved = roi_io.saved_expression(back)
    assert saved.genes == GENES and list(saved.rows) == ["tumour", "stroma", "edge"]
    np.testing.assert_array_equal(saved.rows["stroma"][0], table.X[1])
    np.testing.assert_array_equal(saved.rows["edge"][1], table.layers["integral"][2])
    assert saved.note() == (
        "showing the saved expression from with_rois.zarr (model her2st-model); a running model recomputes it"
    )
    assert roi_io.saved_expression(sample_slide) is None  # no ROIs saved


def test_history_steps_back_through_distinct_states():
    circle = R.ellipse_corners(600, 500, 40)
    empty = roiset.RoiState.of([], [], [])
    one = roiset.RoiState.of([circle], ["ellipse"], ["ROI 1"])
    two = roiset.RoiState.of([circle, TRIANGLE], ["ellipse", "polygon"], ["ROI 1", "ROI 2"])
    renamed = roiset.RoiState.of([circle, TRIANGLE], ["ellipse", "polygon"], ["ROI 1", "edge"])
    history = roiset.RoiHistory()
    for state in (empty, one, one, two, renamed):
        history.record(state)
    assert len(history) == 4  # the repeated state is kept once
    assert history.undo(renamed).same(two)
    assert history.undo(two).same(one)
    # a change that was never recorded (the present) is what the next undo takes back
    moved = roiset.RoiState.of([circle + 5], ["ellipse"], ["ROI 1"])
    assert history.undo(moved).same(one)
    assert history.undo(one).same(empty)
    assert history.undo(empty) is None
    short = roiset.RoiHistory(limit=2)
    for state in (empty, one, two):
        short.record(state)
    assert short.undo(two).same(one) and short.undo(one) is None
