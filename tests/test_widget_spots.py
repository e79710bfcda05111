"""The Spots (ROIs) dock widget in a real viewer (Xvfb): drawing, the engine's numbers, the plot, exports."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import shapely
from qtpy.QtCore import QPoint, Qt

from napari_genemap.errors import GenemapInputError
from napari_genemap.infer import rois as R
from napari_genemap.io import read_slide, slide_mpp, spot_geometry
from napari_genemap.sample import SECTION, read_sample, sample_root
from napari_genemap.widgets.session import session_for
from napari_genemap.widgets.spots import SpotsWidget

WAIT_MS = 60_000  # the service's start and the sample's one tile take ~15 s on 2 CPU cores


def engine_expression(cache_root, circle_xy, radius, polygon):
    """The same ROIs aggregated in this process by a TileEngine reading the service's cache."""
    from napari_genemap.checkpoints import shipped_checkpoint
    from napari_genemap.infer.aggregate import GeneMapSource, aggregate_circles, aggregate_polygons
    from napari_genemap.infer.engine import TileEngine
    from napari_genemap.train.checkpoint import load_checkpoint

    sample = read_sample()
    engine = TileEngine(load_checkpoint(shipped_checkpoint()), sample, cache_root)
    try:
        source = GeneMapSource.from_engine(engine, slide_mpp(sample))
        circle = aggregate_circles(source, np.array([circle_xy]), np.array([radius]), names=["c"])
        polygon = aggregate_polygons(source, [polygon], names=["p"])
        return circle, polygon
    finally:
        engine.close()


def bars(widget) -> pd.Series:
    """The plot's bars as gene -> length."""
    axes = widget.figure.axes[0]
    labels = [label.get_text() for label in axes.get_yticklabels()]
    return pd.Series([patch.get_width() for patch in axes.patches], index=labels)


@pytest.mark.gui
def test_drawn_rois_show_the_engines_expression_compare_and_export(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    cache_root = tmp_path / "cache"
    monkeypatch.setenv("GENEMAP_CACHE_DIR", str(cache_root))
    viewer = make_napari_viewer(show=True)
    image, _ = viewer.open_sample("napari-genemap", "her2st_b4_crop")
    session = session_for(viewer)
    widget = SpotsWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Spots")
    session.set_slide(read_sample(), sample_root(), section=SECTION)
    try:
        mpp = slide_mpp(read_sample())
        centers, _ = spot_geometry(read_sample())
        x, y = centers[10]
        # a circle at a measured spot's centre, 50 µm radius, and a triangle over another spot
        assert widget.add_circle(x * mpp, y * mpp, 50.0) == "ROI 1"
        px, py = centers[30]
        triangle_px = np.array([[px - 80, py - 60], [px + 90, py - 40], [px, py + 100]])
        assert widget.add_polygon(triangle_px * mpp) == "ROI 2"
        layer = widget.layer
        assert layer.name == "ROIs" and tuple(layer.scale) == pytest.approx((mpp, mpp))
        assert list(layer.shape_type) == ["ellipse", "polygon"]

        def filled():
            frame = widget.table_frame()
            return len(frame) == 2 and frame.shape[1] > 3 and not frame.iloc[:, 3:].isna().any().any()

        qtbot.waitUntil(filled, timeout=WAIT_MS)
        frame = widget.table_frame()
        assert list(frame["name"]) == ["ROI 1", "ROI 2"] and list(frame["kind"]) == ["circle", "polygon"]
        assert frame["size"].iloc[0] == "r 50.0 µm"
        area_um2 = shapely.Polygon(triangle_px).area * mpp**2
        assert frame["size"].iloc[1] == f"{area_um2:,.0f} µm²"
        genes = list(frame.columns[3:])
        assert len(genes) == 785

        circle, polygon = engine_expression(cache_root, (x, y), 50.0 / mpp, shapely.Polygon(triangle_px))
        assert list(circle.var_names) == genes
        np.testing.assert_allclose(frame.iloc[0, 3:].to_numpy(float), circle.X[0], rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(frame.iloc[1, 3:].to_numpy(float), polygon.X[0], rtol=1e-3, atol=1e-6)
        assert circle.X[0].std() > 0.05  # a real profile, not a constant
        assert model_text(widget, 0, 3) == f"{circle.X[0, 0]:.3f}"

        # one selected ROI: its top genes; two: the genes that differ most
        widget.select(["ROI 1"])
        top = bars(widget)
        expected_top = pd.Series(circle.X[0], index=genes).sort_values(ascending=False)[: len(top)]
        assert len(top) == 15 and set(top.index) == set(expected_top.index)
        np.testing.assert_allclose(top[expected_top.index], expected_top, rtol=1e-3)
        assert layer.selected_data == {0}
        widget.select(["ROI 1", "ROI 2"])
        assert "log2 fold change ROI 1 / ROI 2" in widget.figure.axes[0].get_title()
        changes = pd.Series(R.log2_fold_change(circle.X[0], polygon.X[0], "log10"), index=genes)
        plotted = bars(widget)
        assert len(plotted) == 15
        np.testing.assert_allclose(plotted, changes[plotted.index], rtol=1e-3, atol=1e-4)
        assert plotted.abs().min() >= changes.abs().sort_values().iloc[-15] - 1e-4  # the 15 largest changes
        assert (plotted > 0).any() or (plotted < 0).any()

        # exports, re-read: same rows, same values, circles of the right radius in the right place
        frame_csv = pd.read_csv(widget.export_csv(tmp_path / "rois.csv"))
        assert list(frame_csv["name"]) == ["ROI 1", "ROI 2"]
        assert frame_csv[["x", "y", "radius"]].iloc[0].to_numpy() == pytest.approx([x, y, 50 / mpp], rel=1e-5)
        np.testing.assert_allclose(frame_csv[genes].to_numpy(), frame[genes].to_numpy(float), rtol=1e-5)
        table = ad.read_h5ad(widget.export_h5ad(tmp_path / "rois.h5ad"))
        np.testing.assert_allclose(table.X, frame[genes].to_numpy(float), rtol=1e-6)
        assert table.obs["radius_um"].iloc[0] == pytest.approx(50.0)

        store = widget.export_spatialdata(tmp_path / "rois.zarr")
        rois, expression = R.read_rois(read_slide(store))
        assert list(rois.index) == ["ROI 1", "ROI 2"]
        circle_back = rois.geometry.iloc[0]
        assert (circle_back.x, circle_back.y, rois["radius"].iloc[0]) == pytest.approx((x, y, 50 / mpp))
        # napari keeps vertices in float32: within 1e-3 slide px
        assert shapely.hausdorff_distance(rois.geometry.iloc[1], shapely.Polygon(triangle_px)) < 1e-3
        np.testing.assert_allclose(expression.X, frame[genes].to_numpy(float), rtol=1e-6)

        # reopened in napari, the ROIs sit where they were drawn
        reopened = viewer.open(str(store), plugin="napari-genemap")
        shapes = [layer for layer in reopened if layer.name.startswith("ROIs")]
        assert len(shapes) == 1 and list(shapes[0].features["name"]) == ["ROI 1", "ROI 2"]
        np.testing.assert_allclose(shapes[0].data[0] * shapes[0].scale, layer.data[0] * layer.scale, atol=1e-6)
        np.testing.assert_allclose(shapes[0].extent.world, layer.extent.world, atol=1e-6)

        # renamed in the table and saved again into the same store: replaced, not added
        assert widget.model.setData(widget.model.index(1, 0), "stroma")
        assert widget.export_spatialdata(store) == store
        rois, expression = R.read_rois(read_slide(store))
        assert list(rois.index) == ["ROI 1", "stroma"] and list(expression.obs_names) == ["ROI 1", "stroma"]
    finally:
        session.close()


def model_text(widget, row: int, column: int) -> str:
    return widget.model.data(widget.model.index(row, column))


@pytest.mark.gui
def test_click_adds_a_circle_and_bad_input_gets_one_line(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("GENEMAP_CACHE_DIR", str(tmp_path / "cache"))
    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-genemap", "her2st_b4_crop")
    session = session_for(viewer)
    widget = SpotsWidget(viewer)  # no model running: ROIs can be drawn, not aggregated
    viewer.window.add_dock_widget(widget, name="Spots")
    try:
        mpp = slide_mpp(read_sample())
        widget.radius.setValue(30.0)
        widget.click_mode.setChecked(True)
        viewer.reset_view()
        canvas = viewer.window._qt_viewer.canvas.native
        centre = QPoint(canvas.width() // 2, canvas.height() // 2)
        qtbot.mouseClick(canvas, Qt.MouseButton.LeftButton, pos=centre)
        layer = widget.layer
        qtbot.waitUntil(lambda: len(layer.data) == 1, timeout=5000)
        x, y, radius = R.circle_from_ellipse(layer.data[0])
        world_per_screen_pixel = 1 / viewer.camera.zoom
        assert radius * mpp == pytest.approx(30.0)
        assert np.array([y, x]) * mpp == pytest.approx(
            np.asarray(viewer.camera.center[-2:]), abs=2 * world_per_screen_pixel
        )
        # a drag pans the view instead of adding a circle
        qtbot.mousePress(canvas, Qt.MouseButton.LeftButton, pos=centre)
        qtbot.mouseMove(canvas, centre + QPoint(40, 30))
        qtbot.mouseRelease(canvas, Qt.MouseButton.LeftButton, pos=centre + QPoint(40, 30))
        assert len(layer.data) == 1
        widget.click_mode.setChecked(False)
        qtbot.mouseClick(canvas, Qt.MouseButton.LeftButton, pos=centre)
        assert len(layer.data) == 1

        frame = widget.table_frame()
        assert list(frame.columns) == ["name", "kind", "size"] and frame.iloc[0].tolist() == [
            "ROI 1",
            "circle",
            "r 30.0 µm",
        ]
        qtbot.waitUntil(lambda: "Slide & model" in widget.message.text(), timeout=5000)
        assert "\n" not in widget.message.text()

        # names: a free "ROI n" for each new shape, editable, unique
        layer.add(np.array([[100.0, 100.0], [300.0, 400.0]]), shape_type="line")
        assert widget.names() == ["ROI 1", "ROI 2"]
        assert widget.table_frame().iloc[1][["kind", "size"]].tolist() == ["line", "no area"]
        assert widget.model.setData(widget.model.index(0, 0), "tumour")
        assert widget.names() == ["tumour", "ROI 2"] and list(layer.features["name"]) == ["tumour", "ROI 2"]
        assert not widget.model.setData(widget.model.index(1, 0), "tumour")
        assert widget.message.text() == "the name 'tumour' is taken; choose another"
        widget.add_circle(100.0, 100.0, 20.0)
        assert widget.names() == ["tumour", "ROI 2", "ROI 3"]
        assert model_text(widget, 2, 1) == "circle"

        # exporting before the expression is known: a message, no file
        assert widget.export_csv(tmp_path / "rois.csv") is None
        assert "still being computed" in widget.message.text()
        assert not (tmp_path / "rois.csv").exists()
        # the layer deleted: an empty table, and the next circle makes a new layer
        viewer.layers.remove(layer)
        assert widget.layer is None and widget.table_frame().empty
        assert widget.add_circle(100.0, 100.0, 20.0) == "ROI 1" and widget.layer is not layer
        with pytest.raises(GenemapInputError, match="expected a positive radius"):
            widget.add_circle(10.0, 10.0, -5.0)
    finally:
        session.close()
