"""The Spots panel's logic without a viewer: names, sizes, requests in flight, answers, saved tables, exports."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from napari_genemap.data.protocols import Protocol
from napari_genemap.errors import GenemapInputError
from napari_genemap.explore.rois import ellipse_corners, fill_names, fold_changes, polygon_area, renamed, top_genes
from napari_genemap.explore.roiset import RoiSet, RoiState
from napari_genemap.infer.aggregate import GeneMapSource, aggregate_shapes
from napari_genemap.io import counts_table, slide_mpp
from napari_genemap.io.rois import SavedExpression, write_csv

GENES = ("KRT8", "CD74", "FN1")
PIXEL = 4.0  # slide pixels per map pixel
CIRCLE = ellipse_corners(600, 500, 40)  # (row, column) corners of a circle at x 600, y 500, r 40 px
SQUARE = np.array([[100.0, 200.0], [100.0, 300.0], [200.0, 300.0], [200.0, 200.0]])  # 100 x 100 px


@pytest.fixture(scope="module")
def densities(sample_slide) -> np.ndarray:
    """The sample's mean measured counts per spot of three real genes, as a density per map pixel."""
    counts = counts_table(sample_slide)[:, list(GENES)].X
    return np.asarray(counts.mean(0)).ravel().astype(np.float32)


@pytest.fixture(scope="module")
def source(sample_slide, densities) -> GeneMapSource:
    """A 512 x 512 map of those constant densities: any ROI integrates to density x area (map pixels)."""
    level = densities[:, None, None] * np.ones((3, 512, 512), np.float32)
    return GeneMapSource(
        read=lambda i0, i1, j0, j1, genes: level[genes, i0:i1, j0:j1],
        shape=(512, 512),
        genes=list(GENES),
        pixel_size=PIXEL,
        protocol=Protocol("test", GENES, target_sum=1e4, log="ln"),
        slide_mpp=slide_mpp(sample_slide),
        provenance={},
    )


def drawn(*shapes) -> RoiState:
    """(vertices, napari shape type, name) triples as the layer holds them."""
    return RoiState.of([s[0] for s in shapes], [s[1] for s in shapes], [s[2] for s in shapes])


def answered(roiset: RoiSet, source: GeneMapSource, model: str = "pixnet-her2st") -> RoiSet:
    request = roiset.request(can_compute=True)
    assert roiset.answer(request.number, aggregate_shapes(source, request.rois), model)
    return roiset


def test_names_fill_in_after_the_largest_roi_number_and_renames_are_checked():
    assert fill_names(["", "ROI 3", None, "ROI 3", "tumour", "tumour", float("nan")]) == [
        "ROI 4",
        "ROI 3",
        "ROI 5",
        "ROI 6",
        "tumour",
        "ROI 7",
        "ROI 8",
    ]
    assert fill_names(["ROI 1", "stroma"]) == ["ROI 1", "stroma"]  # nothing to fill
    assert renamed(["ROI 1", "ROI 2"], 1, "  stroma ") == ["ROI 1", "stroma"]
    assert renamed(["ROI 1", "ROI 2"], 1, "ROI 2") == ["ROI 1", "ROI 2"]  # its own name is not taken
    with pytest.raises(GenemapInputError, match="needs a name"):
        renamed(["ROI 1"], 0, "   ")
    with pytest.raises(GenemapInputError, match="'ROI 1' is taken"):
        renamed(["ROI 1", "ROI 2"], 1, "ROI 1")


def test_sizes_in_micrometres(sample_slide):
    mpp = slide_mpp(sample_slide)
    assert polygon_area(SQUARE) == 100 * 100
    assert polygon_area(SQUARE[:2]) == 0  # two vertices enclose nothing
    roiset = RoiSet()
    line = np.array([[0.0, 0.0], [10.0, 10.0]])
    roiset.update(drawn((CIRCLE, "ellipse", "a"), (SQUARE, "rectangle", "b"), (line, "line", "c")))
    table = roiset.table(mpp)
    assert list(table["kind"]) == ["circle", "polygon", "line"]
    assert list(table["size"]) == [f"r {40 * mpp:.1f} µm", f"{100 * 100 * mpp**2:,.0f} µm²", "no area"]
    assert [roi.name for roi in roiset.waiting()] == ["a", "b"]  # a line has no area to aggregate


def test_a_request_in_flight_holds_the_next_and_its_answer_lands_by_geometry(source, densities, sample_slide):
    mpp = slide_mpp(sample_slide)
    roiset = RoiSet()
    roiset.update(drawn((CIRCLE, "ellipse", "ROI 1"), (SQUARE, "rectangle", "ROI 2")))
    nothing = roiset.request(can_compute=False)
    assert nothing.rois is None and "choose a slide and model" in nothing.message and not roiset.in_flight

    request = roiset.request(can_compute=True)
    assert request.message == "computing the expression of 2 ROIs…" and roiset.in_flight
    assert list(request.rois.index) == ["0", "1"] and list(request.rois["kind"]) == ["circle", "polygon"]
    assert roiset.request(can_compute=True) is None  # one at a time: the next waits for the answer
    table = aggregate_shapes(source, request.rois)
    assert not roiset.answer(request.number - 1, table, "old")  # an older request's answer is ignored
    assert roiset.answer(request.number, table, "pixnet-her2st") and not roiset.in_flight
    assert roiset.take_again() and not roiset.take_again()  # asked once, then cleared

    frame = roiset.table(mpp)
    expected = np.log(1 + 1e4 * densities / densities.sum())  # constant map: the same profile everywhere
    np.testing.assert_allclose(frame[list(GENES)].to_numpy(float), [expected, expected], rtol=1e-5)
    expression = roiset.expression()
    areas = np.array([np.pi * 40**2, 100 * 100]) / PIXEL**2  # in map pixels
    np.testing.assert_allclose(expression.layers["integral"], areas[:, None] * densities, rtol=1e-3)
    assert expression.uns["genemap"]["model"] == "pixnet-her2st"

    # renamed, the square keeps its profile; moved, the circle waits for a new one
    roiset.update(drawn((CIRCLE + 10, "ellipse", "ROI 1"), (SQUARE, "rectangle", "tumour")))
    assert [roi.name for roi in roiset.waiting()] == ["ROI 1"]
    assert list(roiset.expression().obs_names) == ["tumour"]
    with pytest.raises(GenemapInputError, match="no expression for ROI 'ROI 1' yet"):
        roiset.expression(["ROI 1", "tumour"])
    with pytest.raises(GenemapInputError, match="still being computed"):
        roiset.export(mpp)


def test_forgotten_and_abandoned_requests_keep_nothing(source, sample_slide):
    roiset = RoiSet()
    roiset.update(drawn((CIRCLE, "ellipse", "ROI 1")))
    answered(roiset, source)
    roiset.forget()  # another slide or model
    assert roiset.expression().n_obs == 0 and [roi.name for roi in roiset.waiting()] == ["ROI 1"]
    request = roiset.request(can_compute=True)
    roiset.forget()
    assert not roiset.answer(request.number, aggregate_shapes(source, request.rois), "m") and not roiset.in_flight
    assert np.isnan(roiset.table(slide_mpp(sample_slide))[list(GENES)].to_numpy(float)).all()
    request = roiset.request(can_compute=True)
    roiset.abandon()  # the service died
    assert not roiset.in_flight and not roiset.answer(request.number, None, "m")
    assert roiset.request(can_compute=True) is not None  # asked again


def test_invalid_shapes_are_named_and_the_rest_still_computed():
    roiset = RoiSet()
    roiset.update(drawn((CIRCLE, "ellipse", "ROI 1"), (SQUARE[:2], "polygon", "sliver")))
    request = roiset.request(can_compute=True)
    assert list(request.rois["kind"]) == ["circle"] and request.message == "computing the expression of 1 ROIs…"
    alone = RoiSet()
    alone.update(drawn((SQUARE[:2], "polygon", "sliver")))
    refused = alone.request(can_compute=True)
    assert refused.rois is None and refused.message == "ROI 'sliver': a polygon needs at least 3 vertices"
    assert not alone.in_flight


def test_export_gives_the_shared_table_in_micrometres(source, sample_slide, tmp_path):
    mpp = slide_mpp(sample_slide)
    roiset = RoiSet()
    roiset.update(drawn((CIRCLE, "ellipse", "ROI 1"), (SQUARE, "rectangle", "ROI 2")))
    rois, table = answered(roiset, source).export(mpp)
    assert list(rois.index) == ["ROI 1", "ROI 2"]
    frame = pd.read_csv(write_csv(table, tmp_path / "rois.csv"))
    assert frame.loc[0, ["x_px", "y_px", "radius_px"]].tolist() == [600, 500, 40]
    assert frame.loc[0, "radius_um"] == pytest.approx(40 * mpp, rel=1e-5)
    assert frame.loc[1, ["x_px", "y_px", "area_px2"]].tolist() == [250, 150, 10_000]
    assert frame.loc[1, "area_um2"] == pytest.approx(10_000 * mpp**2, rel=1e-5)
    np.testing.assert_allclose(frame[list(GENES)], table.X, rtol=1e-5)


def test_a_saved_table_shows_until_a_model_answers(source, sample_slide):
    roiset = RoiSet()
    roiset.update(drawn((CIRCLE, "ellipse", "ROI 1"), (SQUARE, "rectangle", "ROI 2")))
    row = (np.array([1.0, 2.0], np.float32), np.array([10.0, 20.0], np.float32))
    saved = SavedExpression(["A", "B"], {"ROI 2": row}, {"model": "old"}, "/data/slide.zarr", "model old")
    assert roiset.load_saved(saved)
    assert roiset.genes() == ["A", "B"] and list(roiset.expression().obs_names) == ["ROI 2"]
    assert roiset.expression().uns["genemap"] == {"model": "old"}
    assert "choose a slide and model" in roiset.request(can_compute=False).message  # ROI 1 has no saved row
    roiset.update(drawn((SQUARE, "rectangle", "ROI 2")))
    assert roiset.request(can_compute=False).message == saved.note()
    answered(roiset, source)  # the running model's genes replace the saved ones
    assert roiset.genes() == list(GENES) and roiset.expression().uns["genemap"]["model"] == "pixnet-her2st"
    roiset.drop_saved()
    assert roiset.saved is None


def test_another_slide_forgets_the_profiles_and_keeps_only_its_own_stores_saved_table(source, tmp_path):
    store = tmp_path / "slide.zarr"
    row = (np.array([1.0, 2.0], np.float32), np.array([10.0, 20.0], np.float32))
    saved = SavedExpression(["A", "B"], {"ROI 1": row}, {"model": "old"}, str(store), "model old")
    roiset = RoiSet()
    roiset.update(drawn((SQUARE, "rectangle", "ROI 1"), (CIRCLE, "ellipse", "ROI 2")))
    roiset.load_saved(saved)
    answered(roiset, source)
    roiset.change_slide(tmp_path / "." / "slide.zarr")  # the same store, however it is spelled
    assert roiset.saved is saved and len(roiset.waiting()) == 2  # the running model's profiles are gone
    assert roiset.request(can_compute=True).rois is not None  # nothing in flight: the next request goes out
    roiset.change_slide(tmp_path / "other.zarr")  # an answer still on its way would be for the old slide
    assert roiset.saved is None and not roiset.in_flight and len(roiset.waiting()) == 2
    roiset.load_saved(saved)
    roiset.change_slide(None)  # a slide not read from a store
    assert roiset.saved is None


def test_fold_change_and_top_genes_of_a_constructed_table():
    # X = ln(1 + v): v = 99, 9, 0 in "a" and 9, 99, 0 in "b"
    values = np.log1p(np.array([[99.0, 9.0, 0.0], [9.0, 99.0, 0.0]]))
    table = ad.AnnData(X=values, obs=pd.DataFrame(index=["a", "b"]), var=pd.DataFrame(index=list(GENES)))
    table.uns["genemap"] = {"protocol": {"log": "ln"}}
    changes = fold_changes(table, "a", "b", n=2)
    assert list(changes.index) == ["KRT8", "CD74"]  # the largest in size first, signed
    np.testing.assert_allclose(changes, [np.log2(100 / 10), np.log2(10 / 100)])
    assert list(top_genes(table, "b", n=2).index) == ["CD74", "KRT8"]


def test_undo_goes_back_to_the_shapes_before_the_last_change():
    roiset = RoiSet()
    roiset.restart_history()  # an empty layer
    for state in (drawn((CIRCLE, "ellipse", "ROI 1")), drawn((CIRCLE, "ellipse", "tumour"))):
        roiset.update(state)
        roiset.record()
    previous = roiset.undo()
    assert previous.names == ("ROI 1",)
    roiset.update(previous)
    first = roiset.undo()
    assert first.names == ()
    roiset.update(first)
    assert roiset.undo() is None
