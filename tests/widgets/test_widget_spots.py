"""The Spots (ROIs) dock widget in a real viewer (Xvfb): drawing, the engine's numbers, the plot, exports,
the ROI layer kept above gene maps, undo, and a store's saved expression shown without a model."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import shapely
from qtpy.QtCore import QPoint, Qt
from qtpy.QtWidgets import QApplication

from napari_genemap.errors import GenemapInputError
from napari_genemap.explore import rois as R
from napari_genemap.io import SlideSource, read_slide, slide_mpp, spot_geometry, write_store
from napari_genemap.io import rois as roi_io
from napari_genemap.sample import SECTION, read_sample, sample_root
from napari_genemap.widgets.gene_maps import GeneMapsWidget
from napari_genemap.widgets.session import session_for
from napari_genemap.widgets.spots import SpotsWidget

WAIT_MS = 60_000  # the service's start and the sample's one tile take ~15 s on 2 CPU cores


def engine_expression(cache_root, circle_xy, radius, polygon):
    """The same ROIs aggregated in this process by a TileEngine reading the service's cache."""
    from napari_genemap.checkpoints import shipped_checkpoint
    from napari_genemap.infer.aggregate import GeneMapSource, aggregate_circles, aggregate_polygons
    from napari_genemap.infer.engine import TileEngine
    from napari_genemap.models.checkpoint import load_checkpoint

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


@pytest.mark.slow
@pytest.mark.gui
def test_drawn_rois_show_the_engines_expression_compare_and_export(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    cache_root = tmp_path / "cache"
    monkeypatch.setenv("GENEMAP_CACHE_DIR", str(cache_root))
    viewer = make_napari_viewer(show=True)
    image, _ = viewer.open_sample("napari-genemap", "her2st_b4_crop")
    session = session_for(viewer)
    widget = SpotsWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Spots")
    maps = GeneMapsWidget(viewer)
    viewer.window.add_dock_widget(maps, name="Gene maps")
    session.set_slide(read_sample(), SlideSource(str(sample_root()), SECTION))
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

        # a gene map added over the slide: the ROIs stay on top, their names written beside them
        qtbot.waitUntil(lambda: session.cache is not None, timeout=WAIT_MS)
        gene_map = maps.add_gene(genes[0])
        assert gene_map is not None and viewer.layers.index(gene_map) > 0
        qtbot.waitUntil(lambda: viewer.layers[-1] is layer, timeout=10_000)
        assert viewer.layers.index(gene_map) < viewer.layers.index(layer)
        assert list(layer.text.values) == ["ROI 1", "ROI 2"] and layer.text.visible and layer.text.size >= 12

        # exports, re-read: same rows, same values, circles of the right radius in the right place
        frame_csv = pd.read_csv(widget.export_csv(tmp_path / "rois.csv"))
        assert list(frame_csv["name"]) == ["ROI 1", "ROI 2"]
        assert list(frame_csv.columns[:10]) == ["name", "kind", *roi_io.UNIT_COLUMNS]
        assert list(frame_csv.columns[10:]) == genes
        # µm = slide px x µm/px, the radius as given; 6 significant digits in the file
        assert frame_csv.loc[0, ["x_px", "y_px", "radius_px"]].tolist() == pytest.approx([x, y, 50 / mpp], rel=1e-5)
        assert frame_csv.loc[0, ["x_um", "y_um", "radius_um"]].tolist() == pytest.approx(
            [x * mpp, y * mpp, 50.0], rel=1e-5
        )
        assert frame_csv.loc[0, "area_um2"] == pytest.approx(np.pi * 50.0**2, rel=1e-5)
        assert frame_csv.loc[1, "area_um2"] == pytest.approx(area_um2, rel=1e-5)
        assert frame_csv.loc[1, "area_px2"] == pytest.approx(shapely.Polygon(triangle_px).area, rel=1e-5)
        assert np.isnan(frame_csv.loc[1, "radius_um"])
        np.testing.assert_allclose(frame_csv[genes].to_numpy(), frame[genes].to_numpy(float), rtol=1e-5)
        table = ad.read_h5ad(widget.export_h5ad(tmp_path / "rois.h5ad"))
        np.testing.assert_allclose(table.X, frame[genes].to_numpy(float), rtol=1e-6)
        assert table.obs["radius_um"].iloc[0] == pytest.approx(50.0)
        assert table.obs.loc["ROI 1", ["x_um", "y_um"]].tolist() == pytest.approx([x * mpp, y * mpp])
        assert table.obs.loc["ROI 1", ["x_px", "y_px", "radius_px"]].tolist() == pytest.approx([x, y, 50 / mpp])

        store = widget.export_spatialdata(tmp_path / "rois.zarr")
        rois, expression = roi_io.read_rois(read_slide(store))
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

        assert viewer.layers[-1] is shapes[0] and viewer.layers[-2] is layer  # both ROI layers above the rest

        # renamed in the table and saved again into the same store: replaced, not added
        assert widget.model.setData(widget.model.index(1, 0), "stroma")
        assert widget.export_spatialdata(store) == store
        rois, expression = roi_io.read_rois(read_slide(store))
        assert list(rois.index) == ["ROI 1", "stroma"] and list(expression.obs_names) == ["ROI 1", "stroma"]
        assert expression.obs.loc["ROI 1", "radius_um"] == pytest.approx(50.0)
        assert expression.obs.loc["ROI 1", "x_px"] == pytest.approx(x)

        # into another existing store, by path (what the folder chooser gives): the ROIs land in place
        other = write_store(read_sample(), tmp_path / "other.zarr")
        assert widget.export_spatialdata(other) == other
        assert "wrote 2 ROIs" in widget.message.text()
        in_other = [
            layer for layer in viewer.open(str(other), plugin="napari-genemap") if layer.name.startswith("ROIs")
        ]
        assert len(in_other) == 1 and list(in_other[0].features["name"]) == ["ROI 1", "stroma"]
        for back, drawn in zip(in_other[0].data, layer.data):
            np.testing.assert_allclose(back * in_other[0].scale, drawn * layer.scale, atol=1e-6)
        assert "he" in read_slide(other).images  # the store's slide is kept
    finally:
        session.close()

    # the store reopened in a fresh viewer with no model: the saved table, marked as saved
    fresh = make_napari_viewer(show=True)
    reader = SpotsWidget(fresh)  # before the store: the panel adopts the ROI layer the reader adds
    fresh.window.add_dock_widget(reader, name="Spots")
    try:
        assert reader.layer is None and reader.table_frame().empty
        fresh.open(str(store), plugin="napari-genemap")
        qtbot.waitUntil(lambda: reader.layer is not None and len(reader.table_frame()) == 2, timeout=10_000)
        saved = reader.table_frame()
        assert list(saved["name"]) == ["ROI 1", "stroma"] and list(saved.columns[3:]) == genes
        np.testing.assert_allclose(saved[genes].to_numpy(float), frame[genes].to_numpy(float), rtol=1e-6, atol=1e-6)
        assert reader.message.text() == (
            f"showing the saved expression from rois.zarr (model {session.checkpoint.name}); "
            "a running model recomputes it"
        )
        assert session_for(fresh).service is None
        # the saved values can be exported again without a model
        again = pd.read_csv(reader.export_csv(tmp_path / "again.csv"))
        np.testing.assert_allclose(again[genes].to_numpy(), frame[genes].to_numpy(float), rtol=1e-5)

        # SpatialData… > into another existing store: a folder chooser picks the store (a save dialog opened it)
        into_existing = menu_action(reader, "Into another existing store")
        (tmp_path / "plain").mkdir()
        answer_file_dialog(qtbot, tmp_path / "plain")
        into_existing.trigger()
        assert (
            reader.message.text()
            == f"{tmp_path / 'plain'}: not a SpatialData store; choose a .zarr store folder, or New store…"
        )
        rois_before = roi_io.read_rois(read_slide(other))[0]
        reader.model.setData(reader.model.index(0, 0), "tumour")
        answer_file_dialog(qtbot, other)
        into_existing.trigger()
        assert reader.message.text() == f"wrote 2 ROIs to {other}"
        rois, expression = roi_io.read_rois(read_slide(other))
        assert list(rois.index) == ["tumour", "stroma"] and list(expression.obs_names) == ["tumour", "stroma"]
        assert rois.geometry.iloc[0].equals(rois_before.geometry.iloc[0])
        np.testing.assert_allclose(expression.X, frame[genes].to_numpy(float), rtol=1e-6)
        # > new store: a name without the suffix gets it, and the store holds the slide and the ROIs
        answer_file_dialog(qtbot, tmp_path / "new_rois")
        menu_action(reader, "New store").trigger()
        assert reader.message.text() == f"wrote 2 ROIs to {tmp_path / 'new_rois.zarr'}"
        new = read_slide(tmp_path / "new_rois.zarr")
        assert "he" in new.images and list(roi_io.read_rois(new)[0].index) == ["tumour", "stroma"]
        into_slide = menu_action(reader, "Into the slide's store")
        assert into_slide.isEnabled() and into_slide.text() == "Into the slide's store (rois.zarr)"
    finally:
        session_for(fresh).close()


def menu_action(widget, text: str):
    """The SpatialData button's menu entry starting with ``text``."""
    widget.store_menu.aboutToShow.emit()
    return next(action for action in widget.store_menu.actions() if action.text().startswith(text))


def answer_file_dialog(qtbot, path, timeout_ms: int = 10_000) -> None:
    """Answer the next (real, modal) file dialog with ``path`` as a user would; give up after the timeout."""
    from qtpy.QtCore import QMetaObject, QTimer
    from qtpy.QtWidgets import QFileDialog

    waited = [0]

    def answer():
        dialog = QApplication.activeModalWidget()
        if isinstance(dialog, QFileDialog):
            dialog.selectFile(str(path))
            QMetaObject.invokeMethod(dialog, "accept")  # a slot: the dialog was made by Qt, not Python
        elif waited[0] < timeout_ms:
            waited[0] += 50
            QTimer.singleShot(50, answer)
        elif dialog is not None:  # not the dialog expected: close it rather than block the test
            QMetaObject.invokeMethod(dialog, "reject")

    QTimer.singleShot(0, answer)


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


def activate(qtbot, viewer) -> None:
    """Make the viewer's window the active one, as a user's click would (shortcuts need an active window)."""
    window = viewer.window._qt_window
    window.activateWindow()
    qtbot.waitUntil(lambda: QApplication.activeWindow() is window, timeout=10_000)


@pytest.mark.gui
def test_undo_takes_back_adds_deletes_and_renames_and_rois_stay_on_top(
    make_napari_viewer, qtbot, tmp_path, monkeypatch
):
    monkeypatch.setenv("GENEMAP_CACHE_DIR", str(tmp_path / "cache"))
    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-genemap", "her2st_b4_crop")
    widget = SpotsWidget(viewer)  # no model: undo is about the shapes and the table
    viewer.window.add_dock_widget(widget, name="Spots")
    try:
        widget.add_circle(100.0, 100.0, 20.0)
        widget.add_circle(200.0, 150.0, 30.0)
        layer = widget.layer
        assert widget.table_frame()["name"].tolist() == ["ROI 1", "ROI 2"]

        # any layer added after the ROIs goes under them
        image = viewer.add_image(np.zeros((64, 64), np.float32), name="above", scale=layer.scale)
        qtbot.waitUntil(lambda: viewer.layers[-1] is layer, timeout=10_000)
        assert viewer.layers.index(image) == len(viewer.layers) - 2
        assert viewer.layers.selection.active is image  # the user's choice of active layer is kept

        # Ctrl+Z in the panel: the last circle goes, from the layer and the table
        activate(qtbot, viewer)
        widget.table.setFocus()
        qtbot.waitUntil(widget.table.hasFocus, timeout=10_000)
        qtbot.keyClick(widget.table, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
        assert len(layer.data) == 1 and widget.names() == ["ROI 1"]
        assert widget.table_frame()["name"].tolist() == ["ROI 1"]
        assert R.circle_from_ellipse(layer.data[0])[2] * layer.scale[-1] == pytest.approx(20.0)
        assert list(layer.text.values) == ["ROI 1"]

        # a deleted circle comes back where it was, with its name
        widget.add_circle(300.0, 250.0, 25.0)
        assert widget.names() == ["ROI 1", "ROI 2"]
        before = [np.array(vertices) for vertices in layer.data]
        layer.remove([0])
        assert widget.names() == ["ROI 2"] and len(widget.table_frame()) == 1
        widget.undo_action.trigger()  # what the Undo button does
        assert widget.names() == ["ROI 1", "ROI 2"] and list(layer.shape_type) == ["ellipse", "ellipse"]
        for back, drawn in zip(layer.data, before):
            np.testing.assert_allclose(back, drawn)
        assert widget.table_frame()["size"].tolist() == ["r 20.0 µm", "r 25.0 µm"]

        # a rename is undone; Ctrl+Z on the canvas with the ROIs active undoes too (the layer's key)
        assert widget.model.setData(widget.model.index(0, 0), "tumour")
        assert widget.undo() and widget.names() == ["ROI 1", "ROI 2"]
        undo_key = next(func for key, func in layer.keymap.items() if str(key) in ("Ctrl+Z", "Control-Z"))
        undo_key(layer)
        assert widget.names() == ["ROI 1"]  # the re-added circle
        # back to the empty layer, then nothing left to undo: one line, no change
        assert widget.undo() and widget.names() == []
        assert not widget.undo() and widget.message.text() == "nothing to undo"
        assert widget.table_frame().empty
    finally:
        session_for(viewer).close()
