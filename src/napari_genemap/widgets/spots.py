"""The Spots (ROIs) dock widget: draw circles and polygons, see their predicted expression, export them.

A view over `roiset.RoiSet`: ROIs are the shapes of a "ROIs" shapes layer in slide pixels (scaled to µm on
the H&E). The panel hands the set the layer's shapes after each change, sends its requests to the session's
tile service (never computed in the GUI thread; debounced), shows the table and plot, and writes the files
with `io.rois`. The ROI layer stays above the layers added after it (gene maps would hide it), and Ctrl+Z
or "Undo" steps back through its adds, deletes, moves and renames.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from qtpy.QtCore import QItemSelection, QItemSelectionModel, Qt, QTimer
from qtpy.QtGui import QAction, QKeySequence
from qtpy.QtWidgets import (
    QAbstractItemView,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QMenu,
    QPushButton,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from ..errors import GenemapInputError
from ..explore.rois import ellipse_corners, fill_names
from ..explore.roiset import RoiSet, RoiState
from ..io import rois as files
from ..io.store import is_zarr_store
from ..layers import HE, ROIS, find_layers, roi_layer_meta
from ._napari_hooks import cleanup, click_adder, layer_undo, weak_call
from ._qt import connect_session, wrapped_label
from ._roi_plot import draw_roi_plot
from ._roi_table import RoiTableModel

DEBOUNCE_MS = 300  # wait this long after the last edit before asking for aggregation


class SpotsWidget(QWidget):
    """Draw ROIs on the slide, list their aggregated expression, compare two, export them."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.session = connect_session(napari_viewer)
        self.layer = None
        self.roiset = RoiSet()
        self._restoring = False  # an undo is rewriting the layer: its events are not new history
        self._raising = False  # moving the ROI layers up (re-entrancy guard)
        self._selected_names: list[str] = []
        self._timer = _timer(self, DEBOUNCE_MS, self._aggregate)
        # after the insertion has finished (napari's own handlers still expect the new layer's index)
        self._tidy_timer = _timer(self, 0, self._tidy_layers)

        self.radius = QDoubleSpinBox()
        self.radius.setRange(1.0, 10_000.0)
        self.radius.setDecimals(1)
        self.radius.setValue(50.0)
        self.radius.setSuffix(" µm")
        self.click_mode = QPushButton("Add circles by clicking")
        self.click_mode.setCheckable(True)
        self.click_mode.setToolTip("Each click on the slide adds a circle of the radius set here")
        self.click_mode.toggled.connect(self._on_click_mode)
        ellipse = _button("Draw circle", lambda: self._draw("add_ellipse"))
        ellipse.setToolTip("napari's ellipse tool: an ellipse counts as a circle of its mean half-axis")
        self.undo_action = QAction("Undo", self)
        self.undo_action.setShortcut(QKeySequence(QKeySequence.StandardKey.Undo))
        self.undo_action.setShortcutContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
        self.undo_action.setToolTip("Undo the last ROI add, delete, move or rename (Ctrl+Z)")
        self.undo_action.triggered.connect(lambda _=False: self.undo())
        self.addAction(self.undo_action)  # Ctrl+Z while the panel has the focus
        undo = _button("Undo", self.undo_action.trigger)
        undo.setToolTip(self.undo_action.toolTip())

        self.model = RoiTableModel(self._rename)
        self.table = QTableView()
        self.table.setModel(self.model)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.table.setEditTriggers(
            QAbstractItemView.EditTrigger.DoubleClicked | QAbstractItemView.EditTrigger.EditKeyPressed
        )
        self.table.selectionModel().selectionChanged.connect(self._on_selection)
        self.model.modelReset.connect(self._restore_selection)

        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, 3.2), layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(220)

        # a store is a folder: a file dialog would open an existing one instead of choosing it
        self.store_menu = QMenu(self)
        self.into_slide_store = self.store_menu.addAction("Into the slide's store")
        self.into_slide_store.triggered.connect(lambda _=False: self.export_spatialdata(self._slide_store()))
        self.store_menu.addAction("Into another existing store…").triggered.connect(
            lambda _=False: self._export_into_existing_store()
        )
        self.store_menu.addAction("New store…").triggered.connect(lambda _=False: self._export_new_store())
        self.store_menu.aboutToShow.connect(self._update_store_menu)
        spatialdata = QPushButton("SpatialData…")
        spatialdata.setToolTip("Save the ROIs and their table into a SpatialData store (slide pixels)")
        spatialdata.setMenu(self.store_menu)
        self.message = wrapped_label()

        form = QFormLayout()
        form.addRow("Circle radius", self.radius)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        polygon = _button("Draw polygon", lambda: self._draw("add_polygon"))
        layout.addLayout(_row(self.click_mode, ellipse, polygon, undo))
        layout.addWidget(self.table, stretch=2)
        layout.addWidget(self.canvas, stretch=1)
        csv, h5ad = _button("CSV…", self.export_csv), _button("AnnData…", self.export_h5ad)
        layout.addLayout(_row(csv, h5ad, spatialdata))
        layout.addWidget(self.message)

        self._click_callback = click_adder(self)
        self.viewer.mouse_drag_callbacks.append(self._click_callback)
        layer_events = [
            (self.viewer.layers.events.removed, weak_call(self, "_on_layer_removed")),
            (self.viewer.layers.events.inserted, weak_call(self, "_on_layer_inserted")),
        ]
        for emitter, callback in layer_events:
            emitter.connect(callback)
        for signal, slot in self._slots():
            signal.connect(slot)
        self.destroyed.connect(cleanup(self.viewer, self._click_callback, layer_events, self._slots()))
        self._adopt_layer()
        self._refresh()
        self._tidy_layers()

    # --- public API ----------------------------------------------------------------------------------------
    def add_circle(self, x_um: float, y_um: float, radius_um: float) -> str:
        """Add a circle at (x, y) in µm (the viewer's world coordinates) with a radius in µm; its name."""
        self._ensure_layer()
        if not np.isfinite([x_um, y_um, radius_um]).all() or radius_um <= 0:
            raise GenemapInputError(
                f"circle at ({x_um}, {y_um}) µm with radius {radius_um} µm: expected a positive radius"
            )
        self._add_circle([y_um, x_um], radius_um)
        return self.names()[-1]

    def add_polygon(self, vertices_um: np.ndarray) -> str:
        """Add a polygon from (x, y) vertices in µm; its name."""
        layer = self._ensure_layer()
        xy = np.asarray(vertices_um, dtype=np.float64)
        if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) < 3:
            raise GenemapInputError(f"a polygon needs at least 3 (x, y) vertices; got shape {xy.shape}")
        layer.add(np.array([layer.world_to_data(v)[-2:] for v in xy[:, ::-1]]), shape_type="polygon")
        return self.names()[-1]

    def names(self) -> list[str]:
        if self.layer is None or "name" not in self.layer.features:
            return []
        return [str(name) for name in self.layer.features["name"]]

    def table_frame(self) -> pd.DataFrame:
        """What the table shows: name, kind, size (as text), then the genes' values (NaN while pending)."""
        return self.model.frame.copy()

    def select(self, names: list[str]) -> None:
        """Select the rows of these ROIs (the plot follows)."""
        selection = QItemSelection()
        for row in [self.model.names().index(name) for name in names]:
            selection.select(self.model.index(row, 0), self.model.index(row, self.model.columnCount() - 1))
        self.table.selectionModel().select(selection, QItemSelectionModel.SelectionFlag.ClearAndSelect)

    def selected(self) -> list[str]:
        rows = sorted(index.row() for index in self.table.selectionModel().selectedRows())
        return [self.model.names()[row] for row in rows]

    def rois(self) -> tuple:
        """(ROIs as a GeoDataFrame in slide pixels, their `rois.roi_table`), ready to export."""
        self._sync()
        return self.roiset.export(self._mpp())

    def expression(self, names: list[str] | None = None):
        """The aggregated ROIs (all with a result, or ``names``) as an AnnData named by ROI."""
        self._sync()
        return self.roiset.expression(names)

    def undo(self) -> bool:
        """Put the ROIs back as they were before the last add, delete, move or rename; False when none."""
        state = self.roiset.undo() if self.layer is not None and self.layer in self.viewer.layers else None
        if state is not None:
            self._restore(state)
        self._say("" if state is not None else "nothing to undo")
        return state is not None

    def export_csv(self, path: str | Path | None = None) -> Path | None:
        """CSV of name, kind, centre, radius and area in µm and in slide pixels (units in the column names),
        then the genes; a file dialog when no path is given."""
        return self._export(lambda _rois, table, target: files.write_csv(table, target), path, "CSV (*.csv)", ".csv")

    def export_h5ad(self, path: str | Path | None = None) -> Path | None:
        write = lambda _rois, table, target: files.write_h5ad(table, target)  # noqa: E731
        return self._export(write, path, "AnnData (*.h5ad)", ".h5ad")

    def export_spatialdata(self, path: str | Path | None = None) -> Path | None:
        """Into the store at ``path`` (an existing one gets the ROI elements, a new one the slide too); without
        a path, into the slide's own store when it was opened from one, else a new store chosen in a dialog."""
        path = self._slide_store() if path is None else path
        write = lambda rois, table, target: files.write_spatialdata(rois, table, self._slide(), target)  # noqa: E731
        return self._export(write, path, "SpatialData (*.zarr)", ".zarr")

    # --- exports -------------------------------------------------------------------------------------------
    def _export(self, write, path, filter_: str, suffix: str) -> Path | None:
        try:
            gdf, table = self.rois()
            if path is None:
                path, _ = QFileDialog.getSaveFileName(self, "Export ROIs", f"rois{suffix}", filter_)
                if not path:
                    return None
            path = Path(path)
            if path.suffix != suffix and not (suffix == ".zarr" and is_zarr_store(path)):
                raise GenemapInputError(f"{path}: expected a name ending in {suffix}")
            written = write(gdf, table, path)
        except GenemapInputError as error:
            self._say(str(error))
            return None
        self._say(f"wrote {len(gdf)} ROIs to {written}")
        return Path(written)

    def _update_store_menu(self) -> None:
        store = self._slide_store()
        self.into_slide_store.setEnabled(store is not None)
        self.into_slide_store.setText(f"Into the slide's store ({store.name if store is not None else 'none'})")

    def _export_into_existing_store(self) -> Path | None:
        """A folder chooser: a store is a folder, which a save dialog would open instead of choosing."""
        start = self._slide_store()
        folder = QFileDialog.getExistingDirectory(
            self, "Save the ROIs into an existing SpatialData store", str(start.parent) if start else ""
        )
        if not folder:
            return None
        if not is_zarr_store(folder):
            self._say(f"{folder}: not a SpatialData store; choose a .zarr store folder, or New store…")
            return None
        return self.export_spatialdata(folder)

    def _export_new_store(self) -> Path | None:
        path, _ = QFileDialog.getSaveFileName(self, "Save the ROIs in a new SpatialData store", "rois.zarr")
        if not path:
            return None
        path = Path(path)
        return self.export_spatialdata(path if path.suffix == ".zarr" else path.with_name(f"{path.name}.zarr"))

    def _slide_store(self) -> Path | None:
        source = self.session.slide_source
        candidates = [source.path if source else None, getattr(self._slide(), "path", None)]
        return next((Path(c) for c in candidates if c is not None and is_zarr_store(c)), None)

    # --- the layer -----------------------------------------------------------------------------------------
    def _slide(self):
        """The session's slide, else the one behind the first napari-genemap image layer."""
        if self.session.slide is not None:
            return self.session.slide
        images = [layer for layer in find_layers(self.viewer.layers, HE) if "sdata" in layer.metadata]
        return images[0].metadata["sdata"] if images else None

    def _mpp(self) -> float:
        if self.layer is not None:
            return float(self.layer.scale[-1])
        from ..io import slide_mpp

        slide = self._slide()
        if slide is None:
            raise GenemapInputError("open a slide first (File > Open, or the sample)")
        return slide_mpp(slide)

    def _roi_layers(self) -> list:
        """The viewer's shapes layers of ROIs: this panel's, and any the reader made from a store's saved ROIs."""
        from napari.layers import Shapes

        return [layer for layer in find_layers(self.viewer.layers, ROIS) if isinstance(layer, Shapes)]

    def _adopt_layer(self, create: bool = True) -> None:
        """Use the viewer's ROI shapes layer, or (``create``) make one when a slide is open."""
        existing = self._roi_layers()
        if existing:
            self._attach(existing[0])
        elif create and self._slide() is not None:
            self._ensure_layer()

    def _ensure_layer(self):
        if self.layer is not None and self.layer in self.viewer.layers:
            return self.layer
        slide = self._slide()
        if slide is None:
            raise GenemapInputError("open a slide first (File > Open, or the sample)")
        active = self.viewer.layers.selection.active
        layer = self.viewer.add_shapes(**roi_layer_meta(slide))
        if active is not None:  # adding a layer selects it; keep what the user had
            self.viewer.layers.selection.active = active
        self._attach(layer)
        return layer

    def _attach(self, layer) -> None:
        if layer == self.layer:  # ==, not `is`: napari hands plugins proxies of its layers
            return
        if "name" not in layer.features:
            features = layer.features.copy()
            features["name"] = ""
            layer.features = features
        _unnamed_by_default(layer)
        self.layer = layer
        layer.events.data.connect(weak_call(self, "_on_data"))
        # on the layer, not the viewer: Ctrl+Z on the canvas while the ROIs are the active layer
        layer.bind_key("Control-Z", layer_undo(self), overwrite=True)
        self._name_shapes()
        self._sync()
        self.roiset.restart_history()
        # the expression saved with the layer's ROIs in its store, shown until recomputed
        sdata = layer.metadata.get("sdata")
        if self.roiset.load_saved(files.saved_expression(sdata) if sdata is not None else None):
            self._refresh()
            self._say(self.roiset.saved.note())

    def _on_layer_removed(self, event) -> None:
        if event.value == self.layer:
            self.layer = None
            self.roiset.drop_saved()
            self._refresh()

    def _on_layer_inserted(self, _event) -> None:
        if not self._raising:
            self._tidy_timer.start()

    def _tidy_layers(self) -> None:
        """Adopt an ROI layer when there is none, and keep the ROI layers above all others."""
        layers = self.viewer.layers
        if self.layer is None or self.layer not in layers:
            self._adopt_layer(create=False)  # a store's saved ROIs just opened
            self._refresh()
        rois = [layer for layer in layers if layer == self.layer or layer in self._roi_layers()]
        top = list(range(len(layers) - len(rois), len(layers)))
        if not rois or [layers.index(layer) for layer in rois] == top or self._raising:
            return
        self._raising = True
        active = layers.selection.active
        try:
            for layer in rois:  # each to the top, in their order
                layers.move(layers.index(layer), len(layers))
        finally:
            self._raising = False
        if active is not None and active in layers:
            layers.selection.active = active

    def _on_data(self, event) -> None:
        if str(event.action) not in ("added", "changed", "removed") or self._restoring:
            return
        if str(event.action) == "added":
            self._name_shapes()
        self._sync()
        self.roiset.record()
        self._refresh()
        self._timer.start()

    def _sync(self) -> None:
        """Hand the set the layer's shapes as they are now."""
        layer = self.layer
        shapes = (layer.data, layer.shape_type, self.names()) if layer is not None else ([], [], [])
        self.roiset.update(RoiState.of(*shapes))

    def _restore(self, state: RoiState) -> None:
        """Make the layer hold ``state`` (one undo step); its events are not recorded as new history."""
        layer = self.layer
        self._restoring = True
        try:
            if len(layer.data):
                layer.remove(list(range(len(layer.data))))
            if state.data:
                layer.add([np.array(vertices) for vertices in state.data], shape_type=list(state.types))
            self._set_names(list(state.names))
        finally:
            self._restoring = False
        self._refresh()
        self._timer.start()

    def _name_shapes(self) -> None:
        """Give shapes without a name (or with a taken one) the next free "ROI n"."""
        names = list(self.layer.features["name"])
        filled = fill_names(names)
        if filled != names:
            self._set_names(filled)

    def _set_names(self, names: list[str]) -> None:
        features = self.layer.features.copy()
        features["name"] = pd.Series(names, dtype=object, index=features.index)
        self.layer.features = features
        _unnamed_by_default(self.layer)  # setting features made the last name the default
        self.layer.refresh_text()

    def _rename(self, row: int, name: str) -> bool:
        self._sync()
        try:
            self._set_names(self.roiset.rename(row, name))
        except GenemapInputError as error:
            self._say(str(error))
            return False
        self._sync()
        self.roiset.record()
        self._refresh()
        self._say("")
        return True

    def _draw(self, mode: str) -> None:
        try:
            layer = self._ensure_layer()
        except GenemapInputError as error:
            self._say(str(error))
            return
        self.click_mode.setChecked(False)
        self.viewer.layers.selection.active = layer
        layer.mode = mode

    def _on_click_mode(self, on: bool) -> None:
        if not on:
            return
        try:
            layer = self._ensure_layer()
        except GenemapInputError as error:
            self._say(str(error))
            self.click_mode.setChecked(False)
            return
        if layer.mode != "pan_zoom":
            layer.mode = "pan_zoom"

    def _wants_click(self, event) -> bool:
        if not self.click_mode.isChecked() or event.button != 1 or event.modifiers:
            return False
        layer = self.layer
        # the user is drawing or editing shapes with napari's own tools
        return not (layer is not None and self.viewer.layers.selection.active == layer and layer.mode != "pan_zoom")

    def _add_circle(self, world_position, radius_um: float) -> None:
        layer = self._ensure_layer()
        row, column = np.asarray(layer.world_to_data(world_position))[-2:]
        layer.add(ellipse_corners(column, row, radius_um / layer.scale[-1]), shape_type="ellipse")

    def _add_circle_at(self, world_position) -> None:
        try:
            self._add_circle(world_position, self.radius.value())
        except GenemapInputError as error:
            self._say(str(error))

    # --- aggregation ---------------------------------------------------------------------------------------
    def _aggregate(self) -> None:
        """Send the ROIs without a profile to the tile service (one request at a time)."""
        self._sync()
        request = self.roiset.request(can_compute=self.session.service is not None)
        if request is None:
            return
        self._say(request.message)
        if request.rois is not None:
            number = request.number
            self.session.aggregate(request.rois, lambda table, error: self._on_aggregated(number, table, error))

    def _on_aggregated(self, number: int, table, error: str | None) -> None:
        self._sync()
        if not self.roiset.answer(number, None if error else table, Path(self.session.checkpoint).name):
            return
        if error or table is not None:
            self._say(error or "")
        self._refresh()
        if self.roiset.take_again():
            self._aggregate()

    def _forget(self) -> None:
        self.roiset.forget()
        self._refresh()

    def _on_slide_changed(self, sdata) -> None:
        saved = self.roiset.saved
        if saved is not None and not _same_store(sdata, saved.source):
            self.roiset.drop_saved()  # values of another slide
        self._forget()
        if self.layer is not None and self.layer in self.viewer.layers:
            from ..io import slide_mpp

            mpp = slide_mpp(sdata)
            self.layer.scale = (mpp, mpp)
        else:
            self._adopt_layer()
        self._timer.start()  # after the session has restarted its service

    def _on_model_changed(self, _checkpoint) -> None:
        self._forget()
        self._timer.start()

    def _on_ready(self, _cache) -> None:
        self._timer.start()

    def _on_error(self, message: str) -> None:
        self._say(message)
        service = self.session.service
        if service is None or not service.alive:
            self.roiset.abandon()

    # --- table and plot ------------------------------------------------------------------------------------
    def _refresh(self) -> None:
        self._sync()
        mpp = self._mpp() if self.layer is not None else 1.0
        self._selected_names = self.selected() or self._selected_names
        self.model.update(self.roiset.table(mpp))
        self._update_plot()

    def _restore_selection(self) -> None:
        names = [name for name in self._selected_names if name in self.model.names()]
        if names:
            self.select(names)

    def _on_selection(self, *_) -> None:
        names = self.selected()
        self._selected_names = names
        if self.layer is not None:
            rows = {self.model.names().index(name) for name in names}
            if rows != set(self.layer.selected_data):
                self.layer.selected_data = rows
        self._update_plot()

    def _update_plot(self) -> None:
        draw_roi_plot(self.figure, self.roiset, self.selected())
        self.canvas.draw_idle()

    def _say(self, text: str) -> None:
        self.message.setText(text)

    def _slots(self) -> list:
        return [
            (self.session.slide_changed, self._on_slide_changed),
            (self.session.model_changed, self._on_model_changed),
            (self.session.ready, self._on_ready),
            (self.session.error, self._on_error),
        ]


def _button(text: str, slot) -> QPushButton:
    button = QPushButton(text)
    button.clicked.connect(lambda _=False: slot())
    return button


def _row(*widgets) -> QHBoxLayout:
    row = QHBoxLayout()
    for widget in widgets:
        row.addWidget(widget)
    return row


def _timer(parent, interval_ms: int, slot) -> QTimer:
    timer = QTimer(parent)
    timer.setSingleShot(True)
    timer.setInterval(interval_ms)
    timer.timeout.connect(slot)
    return timer


def _same_store(sdata, source: str) -> bool:
    path = getattr(sdata, "path", None)
    return path is not None and Path(path).resolve() == Path(source).resolve()


def _unnamed_by_default(layer) -> None:
    """New shapes get an empty name, which `SpotsWidget._name_shapes` replaces with the next "ROI n"."""
    defaults = layer.feature_defaults.copy()
    defaults["name"] = ""
    layer.feature_defaults = defaults
