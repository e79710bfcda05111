"""The Spots (ROIs) dock widget: draw circles and polygons, see their predicted expression, export them.

A view over `roiset.RoiSet`: ROIs are the shapes of a "ROIs" shapes layer in slide pixels (scaled to µm on
the H&E). The panel hands the set the layer's shapes after each change, sends its requests to the session's
tile service (never computed in the GUI thread; debounced), shows the table and plot, and writes the files
with `io.rois`. The ROI layer stays above the layers added after it (gene maps would hide it), and Ctrl+Z
or "Undo" steps back through its adds, deletes, moves and renames.

The napari side of the layer is `_roi_layer.RoiLayerLink`, the table `_roi_table`, the plot `_roi_plot`,
the file and store choosers `_roi_export`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QAction, QKeySequence
from qtpy.QtWidgets import QDoubleSpinBox, QFormLayout, QHBoxLayout, QPushButton, QVBoxLayout, QWidget

from ..errors import GenemapInputError
from ..explore.roiset import RoiSet
from ..io import rois as files
from ..io.store import is_zarr_store
from ..layers import HE, find_layers
from ._napari_hooks import cleanup, click_adder, layer_undo
from ._qt import connect_session, wrapped_label
from ._roi_export import StoreMenu, export_path
from ._roi_layer import NO_SLIDE, RoiLayerLink
from ._roi_plot import draw_roi_plot
from ._roi_table import RoiTable, RoiTableModel

DEBOUNCE_MS = 300  # wait this long after the last edit before asking for aggregation


class SpotsWidget(QWidget):
    """Draw ROIs on the slide, list their aggregated expression, compare two, export them."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.session = connect_session(napari_viewer)
        self.roiset = RoiSet()
        self.rois_layer = RoiLayerLink(napari_viewer, self._slide, layer_undo(self), parent=self)
        self._timer = QTimer(self, singleShot=True, interval=DEBOUNCE_MS)
        self._timer.timeout.connect(self._aggregate)

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
        self.table = RoiTable(self.model)
        self.table.selectionModel().selectionChanged.connect(self._on_selection)

        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, 3.2), layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(220)

        self.store_menu = StoreMenu(self._slide_store, self.export_spatialdata, self._say, parent=self)
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
        for signal, slot in self._slots():
            signal.connect(slot)
        self.destroyed.connect(cleanup(self.viewer, self._click_callback, self.rois_layer.viewer_events, self._slots()))
        self.rois_layer.attached.connect(self._on_attached)
        self.rois_layer.edited.connect(self._on_edited)
        self.rois_layer.detached.connect(self._on_detached)
        self.rois_layer.adopt()
        self._refresh()
        self.rois_layer.tidy()

    # --- public API ----------------------------------------------------------------------------------------
    def add_circle(self, x_um: float, y_um: float, radius_um: float) -> str:
        """Add a circle at (x, y) in µm (the viewer's world coordinates) with a radius in µm; its name."""
        self.rois_layer.ensure()
        if not np.isfinite([x_um, y_um, radius_um]).all() or radius_um <= 0:
            raise GenemapInputError(
                f"circle at ({x_um}, {y_um}) µm with radius {radius_um} µm: expected a positive radius"
            )
        self.rois_layer.add_circle([y_um, x_um], radius_um)
        return self.names()[-1]

    def add_polygon(self, vertices_um: np.ndarray) -> str:
        """Add a polygon from (x, y) vertices in µm; its name."""
        self.rois_layer.ensure()
        xy = np.asarray(vertices_um, dtype=np.float64)
        if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) < 3:
            raise GenemapInputError(f"a polygon needs at least 3 (x, y) vertices; got shape {xy.shape}")
        self.rois_layer.add_polygon(xy[:, ::-1])
        return self.names()[-1]

    def names(self) -> list[str]:
        return self.rois_layer.names()

    def table_frame(self) -> pd.DataFrame:
        """What the table shows: name, kind, size (as text), then the genes' values (NaN while pending)."""
        return self.model.frame.copy()

    def select(self, names: list[str]) -> None:
        """Select the rows of these ROIs (the plot follows)."""
        self.table.select(names)

    def selected(self) -> list[str]:
        return self.table.selected()

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
        state = self.roiset.undo() if self.rois_layer.alive else None
        if state is not None:
            self.rois_layer.restore(state)
            self._refresh()
            self._timer.start()
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
            path = export_path(self, path, filter_, suffix)
            if path is None:
                return None
            written = write(gdf, table, path)
        except GenemapInputError as error:
            self._say(str(error))
            return None
        self._say(f"wrote {len(gdf)} ROIs to {written}")
        return Path(written)

    def _slide_store(self) -> Path | None:
        source = self.session.slide_source
        candidates = [source.path if source else None, getattr(self._slide(), "path", None)]
        return next((Path(c) for c in candidates if c is not None and is_zarr_store(c)), None)

    # --- the layer -----------------------------------------------------------------------------------------
    @property
    def layer(self):
        """The viewer's ROI shapes layer this panel lists, or None."""
        return self.rois_layer.layer

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
            raise GenemapInputError(NO_SLIDE)
        return slide_mpp(slide)

    def _on_attached(self) -> None:
        """A new ROI layer: undo starts from its shapes, and the expression saved with them in their store
        shows until recomputed."""
        self._sync()
        self.roiset.restart_history()
        sdata = self.layer.metadata.get("sdata")
        saved = self.roiset.load_saved(files.saved_expression(sdata) if sdata is not None else None)
        self._refresh()
        if saved:
            self._say(self.roiset.saved.note())

    def _on_detached(self) -> None:
        self.roiset.drop_saved()
        self._refresh()

    def _on_edited(self) -> None:
        self._record()
        self._timer.start()

    def _record(self) -> None:
        """Remember the shapes as they are now for undo, and show them."""
        self._sync()
        self.roiset.record()
        self._refresh()

    def _sync(self) -> None:
        """Hand the set the layer's shapes as they are now."""
        self.roiset.update(self.rois_layer.state())

    def _rename(self, row: int, name: str) -> bool:
        self._sync()
        try:
            self.rois_layer.set_names(self.roiset.rename(row, name))
        except GenemapInputError as error:
            self._say(str(error))
            return False
        self._record()
        self._say("")
        return True

    def _draw(self, mode: str) -> None:
        try:
            self.rois_layer.draw(mode)
        except GenemapInputError as error:
            self._say(str(error))
            return
        self.click_mode.setChecked(False)

    def _on_click_mode(self, on: bool) -> None:
        if not on:
            return
        try:
            self.rois_layer.pan_zoom()
        except GenemapInputError as error:
            self._say(str(error))
            self.click_mode.setChecked(False)

    def _wants_click(self, event) -> bool:
        on = self.click_mode.isChecked() and event.button == 1 and not event.modifiers
        return on and not self.rois_layer.editing()

    def _add_circle_at(self, world_position) -> None:
        try:
            self.rois_layer.add_circle(world_position, self.radius.value())
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

    def _on_slide_changed(self, sdata) -> None:
        self.roiset.change_slide(getattr(sdata, "path", None))
        self._refresh()
        if self.rois_layer.alive:
            from ..io import slide_mpp

            self.rois_layer.rescale(slide_mpp(sdata))
        else:
            self.rois_layer.adopt()
        self._timer.start()  # after the session has restarted its service

    def _on_model_changed(self, _checkpoint) -> None:
        self.roiset.forget()
        self._refresh()
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
        self.table.show_frame(self.roiset.table(mpp))
        self._update_plot()

    def _on_selection(self, *_) -> None:
        names = self.selected()
        self.rois_layer.select({self.model.names().index(name) for name in names})
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
