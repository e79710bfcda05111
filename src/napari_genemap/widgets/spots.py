"""The Spots (ROIs) dock widget: draw circles and polygons, see their predicted expression, export them.

A thin view over `infer.rois`: ROIs are the shapes of a "ROIs" shapes layer in slide pixels (scaled to µm
on the H&E). Each ROI's profile is computed once by the session's tile service (never in the GUI thread)
and kept by its geometry, so adding one circle aggregates that circle only; moving or reshaping an ROI
computes it again. Requests are debounced and one is in flight at a time.

The ROI layer stays above the layers added after it (gene maps would hide it), Ctrl+Z or "Undo" steps
back through its adds, deletes, moves and renames, and a store reopened without a model shows the
expression saved with its ROIs until a model recomputes it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from qtpy.QtCore import QAbstractTableModel, QItemSelection, QItemSelectionModel, QModelIndex, Qt, QTimer
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
from ..infer import rois as core
from ..layers import HE
from ._qt import connect_session, wrapped_label

DEBOUNCE_MS = 300  # wait this long after the last edit before asking for aggregation
TOP_GENES = 15  # bars in the plot
PENDING = "…"  # what a value cell shows while its ROI is being aggregated


class RoiTableModel(QAbstractTableModel):
    """Rows = ROIs; columns name (editable), kind, size, then one per gene (protocol-normalised values)."""

    FIXED = ("name", "kind", "size")

    def __init__(self, rename: Callable[[int, str], bool]):
        super().__init__()
        self._rename = rename
        self.names: list[str] = []
        self.kinds: list[str] = []
        self.sizes: list[str] = []
        self.genes: list[str] = []
        self.values = np.zeros((0, 0))

    def update(self, names, kinds, sizes, genes, values) -> None:
        same_shape = len(names) == len(self.names) and list(genes) == self.genes
        self.names, self.kinds, self.sizes, self.genes = list(names), list(kinds), list(sizes), list(genes)
        self.values = values
        if same_shape:  # keeps the selection
            if self.names:
                last = self.index(len(self.names) - 1, self.columnCount() - 1)
                self.dataChanged.emit(self.index(0, 0), last)
        else:
            self.beginResetModel()
            self.endResetModel()

    def rowCount(self, parent=QModelIndex()) -> int:  # noqa: B008 - Qt's signature
        return 0 if parent.isValid() else len(self.names)

    def columnCount(self, parent=QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self.FIXED) + len(self.genes)

    def data(self, index, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid() or role not in (Qt.ItemDataRole.DisplayRole, Qt.ItemDataRole.EditRole):
            return None
        row, column = index.row(), index.column()
        if column < len(self.FIXED):
            return (self.names, self.kinds, self.sizes)[column][row]
        value = self.values[row, column - len(self.FIXED)]
        if np.isnan(value):
            return "" if self.kinds[row] not in ("circle", "polygon") else PENDING
        return f"{value:.3f}"

    def headerData(self, section, orientation, role=Qt.ItemDataRole.DisplayRole):
        if role != Qt.ItemDataRole.DisplayRole:
            return None
        if orientation == Qt.Orientation.Horizontal:
            return (*self.FIXED, *self.genes)[section]
        return str(section + 1)

    def flags(self, index):
        flags = super().flags(index)
        return flags | Qt.ItemFlag.ItemIsEditable if index.column() == 0 else flags

    def setData(self, index, value, role=Qt.ItemDataRole.EditRole) -> bool:
        if role != Qt.ItemDataRole.EditRole or index.column() != 0:
            return False
        return self._rename(index.row(), str(value))


class SpotsWidget(QWidget):
    """Draw ROIs on the slide, list their aggregated expression, compare two, export them."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.session = connect_session(napari_viewer)
        self.layer = None
        self._results: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}  # geometry key -> (X row, integral row)
        self._genes: list[str] = []
        self._uns: dict = {}
        self._in_flight: list[tuple] | None = None  # keys of the request the service is working on
        self._request = 0
        self._again = False  # shapes changed while a request was in flight
        self._saved: core.SavedExpression | None = None  # what the ROI layer's store holds
        self._saved_rows: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}  # geometry key -> saved rows
        self._history = core.RoiHistory()
        self._restoring = False  # an undo is rewriting the layer: its events are not new history
        self._raising = False  # moving the ROI layers up (re-entrancy guard)

        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(DEBOUNCE_MS)
        self._timer.timeout.connect(self._aggregate)
        # after the insertion has finished (napari's own handlers still expect the new layer's index)
        self._tidy_timer = QTimer(self)
        self._tidy_timer.setSingleShot(True)
        self._tidy_timer.setInterval(0)
        self._tidy_timer.timeout.connect(self._tidy_layers)

        self.radius = QDoubleSpinBox()
        self.radius.setRange(1.0, 10_000.0)
        self.radius.setDecimals(1)
        self.radius.setValue(50.0)
        self.radius.setSuffix(" µm")
        self.click_mode = QPushButton("Add circles by clicking")
        self.click_mode.setCheckable(True)
        self.click_mode.setToolTip("Each click on the slide adds a circle of the radius set here")
        self.click_mode.toggled.connect(self._on_click_mode)
        ellipse = QPushButton("Draw circle")
        ellipse.setToolTip("napari's ellipse tool: an ellipse counts as a circle of its mean half-axis")
        ellipse.clicked.connect(lambda: self._draw("add_ellipse"))
        polygon = QPushButton("Draw polygon")
        polygon.clicked.connect(lambda: self._draw("add_polygon"))
        self.undo_action = QAction("Undo", self)
        self.undo_action.setShortcut(QKeySequence(QKeySequence.StandardKey.Undo))
        self.undo_action.setShortcutContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
        self.undo_action.setToolTip("Undo the last ROI add, delete, move or rename (Ctrl+Z)")
        self.undo_action.triggered.connect(lambda _=False: self.undo())
        self.addAction(self.undo_action)  # Ctrl+Z while the panel has the focus
        undo = QPushButton("Undo")
        undo.setToolTip(self.undo_action.toolTip())
        undo.clicked.connect(self.undo_action.trigger)

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
        self._selected_names: list[str] = []

        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, 3.2), layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(220)

        buttons = QHBoxLayout()
        for text, slot in (("CSV…", self.export_csv), ("AnnData…", self.export_h5ad)):
            button = QPushButton(text)
            button.clicked.connect(lambda _=False, slot=slot: slot())
            buttons.addWidget(button)
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
        buttons.addWidget(spatialdata)
        self.message = wrapped_label()

        form = QFormLayout()
        form.addRow("Circle radius", self.radius)
        tools = QHBoxLayout()
        for button in (self.click_mode, ellipse, polygon, undo):
            tools.addWidget(button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(tools)
        layout.addWidget(self.table, stretch=2)
        layout.addWidget(self.canvas, stretch=1)
        layout.addLayout(buttons)
        layout.addWidget(self.message)

        self._click_callback = _click_adder(self)
        self.viewer.mouse_drag_callbacks.append(self._click_callback)
        self._layer_removed = _weak(self, "_on_layer_removed")
        self.viewer.layers.events.removed.connect(self._layer_removed)
        self._layer_inserted = _weak(self, "_on_layer_inserted")
        self.viewer.layers.events.inserted.connect(self._layer_inserted)
        self.session.slide_changed.connect(self._on_slide_changed)
        self.session.model_changed.connect(self._on_model_changed)
        self.session.ready.connect(self._on_ready)
        self.session.error.connect(self._on_error)
        layer_events = [
            (self.viewer.layers.events.removed, self._layer_removed),
            (self.viewer.layers.events.inserted, self._layer_inserted),
        ]
        self.destroyed.connect(_cleanup(self.viewer, self._click_callback, layer_events, self._slots()))
        self._adopt_layer()
        self._refresh()
        self._tidy_layers()

    # --- public API ----------------------------------------------------------------------------------------
    def add_circle(self, x_um: float, y_um: float, radius_um: float) -> str:
        """Add a circle at (x, y) in µm (the viewer's world coordinates) with a radius in µm; its name."""
        layer = self._ensure_layer()
        if not np.isfinite([x_um, y_um, radius_um]).all() or radius_um <= 0:
            raise GenemapInputError(
                f"circle at ({x_um}, {y_um}) µm with radius {radius_um} µm: expected a positive radius"
            )
        row, column = np.asarray(layer.world_to_data([y_um, x_um]))[-2:]
        layer.add(core.ellipse_corners(column, row, radius_um / layer.scale[-1]), shape_type="ellipse")
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
        if self.layer is None:
            return []
        return [str(name) for name in self.layer.features["name"]] if "name" in self.layer.features else []

    def table_frame(self) -> pd.DataFrame:
        """What the table shows: name, kind, size (as text), then the genes' values (NaN while pending)."""
        fixed = pd.DataFrame({"name": self.model.names, "kind": self.model.kinds, "size": self.model.sizes})
        values = pd.DataFrame(self.model.values, columns=self.model.genes, index=fixed.index)
        return pd.concat([fixed, values], axis=1)

    def select(self, names: list[str]) -> None:
        """Select the rows of these ROIs (the plot follows)."""
        rows = [self.model.names.index(name) for name in names]
        selection = QItemSelection()
        for row in rows:
            selection.select(self.model.index(row, 0), self.model.index(row, self.model.columnCount() - 1))
        self.table.selectionModel().select(selection, QItemSelectionModel.SelectionFlag.ClearAndSelect)

    def selected(self) -> list[str]:
        rows = sorted(index.row() for index in self.table.selectionModel().selectedRows())
        return [self.model.names[row] for row in rows]

    def rois(self) -> tuple:
        """(ROIs as a GeoDataFrame in slide pixels, their `roi_table`), ready to export."""
        entries = [entry for entry in self._entries() if entry["kind"] is not None]
        if not entries:
            raise GenemapInputError("there are no circles or polygons to export; draw some first")
        waiting = [entry["name"] for entry in entries if self._row(entry["key"]) is None]
        if waiting:
            raise GenemapInputError(f"expression of {len(waiting)} ROIs (e.g. {waiting[0]!r}) is still being computed")
        gdf = core.rois_from_shapes(
            [e["vertices"] for e in entries], [e["type"] for e in entries], [e["name"] for e in entries]
        )
        return gdf, core.roi_table(gdf, self.expression([e["name"] for e in entries]), self._mpp())

    def expression(self, names: list[str] | None = None):
        """The aggregated ROIs (all with a result, or ``names``) as an AnnData named by ROI."""
        import anndata as ad

        known = {entry["name"]: self._row(entry["key"]) for entry in self._entries()}
        entries = {name: row for name, row in known.items() if row is not None}
        names = list(entries) if names is None else names
        missing = [name for name in names if name not in entries]
        if missing:
            raise GenemapInputError(f"no expression for ROI {missing[0]!r} yet")
        rows = [entries[name] for name in names]
        genes = self._shown_genes()
        width = len(genes)
        table = ad.AnnData(
            X=np.vstack([row[0] for row in rows]) if rows else np.zeros((0, width), np.float32),
            obs=pd.DataFrame(index=pd.Index(names, name="roi", dtype=object)),
            var=pd.DataFrame(index=pd.Index(genes, name="gene")),
            layers={"integral": np.vstack([row[1] for row in rows]) if rows else np.zeros((0, width), np.float32)},
        )
        if self._genes:  # the running model's values: say which model, for whoever reopens the export
            table.uns["genemap"] = {**self._uns, "model": Path(self.session.checkpoint).name}
        else:
            table.uns["genemap"] = dict(self._saved.uns) if self._saved is not None else {}
        return table

    def undo(self) -> bool:
        """Put the ROIs back as they were before the last add, delete, move or rename; False when none."""
        if self.layer is None or self.layer not in self.viewer.layers:
            self._say("nothing to undo")
            return False
        state = self._history.undo(self._state())
        if state is None:
            self._say("nothing to undo")
            return False
        self._restore(state)
        self._say("")
        return True

    def export_csv(self, path: str | Path | None = None) -> Path | None:
        """CSV of name, kind, centre, radius and area in µm and in slide pixels (units in the column names),
        then the genes; a file dialog when no path is given."""
        return self._export(lambda _rois, table, target: core.write_csv(table, target), path, "CSV (*.csv)", ".csv")

    def export_h5ad(self, path: str | Path | None = None) -> Path | None:
        return self._export(
            lambda _rois, table, target: core.write_h5ad(table, target), path, "AnnData (*.h5ad)", ".h5ad"
        )

    def export_spatialdata(self, path: str | Path | None = None) -> Path | None:
        """Into the store at ``path`` (an existing one gets the ROI elements, a new one the slide too); without
        a path, into the slide's own store when it was opened from one, else a new store chosen in a dialog."""
        store = self._slide_store()
        if path is None and store is not None:
            path = store

        def write(rois, table, target):
            return core.write_spatialdata(rois, table, self._slide(), target)

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
            if path.suffix != suffix and not (suffix == ".zarr" and _is_store(path)):
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
        self.into_slide_store.setText(
            f"Into the slide's store ({store.name})" if store is not None else "Into the slide's store (none)"
        )

    def _export_into_existing_store(self) -> Path | None:
        """A folder chooser: a store is a folder, which a save dialog would open instead of choosing."""
        start = self._slide_store()
        folder = QFileDialog.getExistingDirectory(
            self, "Save the ROIs into an existing SpatialData store", str(start.parent) if start else ""
        )
        if not folder:
            return None
        if not _is_store(Path(folder)):
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
        from ..io.store import is_zarr_store

        source = self.session.slide_source
        candidates = [source.path if source else None, getattr(self._slide(), "path", None)]
        return next((Path(c) for c in candidates if c is not None and is_zarr_store(c)), None)

    # --- the layer -----------------------------------------------------------------------------------------
    def _slide(self):
        """The session's slide, else the one behind the first napari-genemap image layer."""
        if self.session.slide is not None:
            return self.session.slide
        for layer in self.viewer.layers:
            if "sdata" in layer.metadata and layer.metadata.get("genemap", {}).get("element") == HE:
                return layer.metadata["sdata"]
        return None

    def _mpp(self) -> float:
        if self.layer is not None:
            return float(self.layer.scale[-1])
        from ..io import slide_mpp

        slide = self._slide()
        if slide is None:
            raise GenemapInputError("open a slide first (File > Open, or the sample)")
        return slide_mpp(slide)

    def _adopt_layer(self, create: bool = True) -> None:
        """Use the viewer's ROI shapes layer, or (``create``) make one when a slide is open."""
        from napari.layers import Shapes

        existing = [layer for layer in self.viewer.layers if isinstance(layer, Shapes) and _is_roi_layer(layer)]
        if existing:
            self._attach(existing[0])
        elif create and self._slide() is not None:
            self._ensure_layer()

    def _ensure_layer(self):
        if self.layer is not None and self.layer in self.viewer.layers:
            return self.layer
        from ..io import slide_info

        slide = self._slide()
        if slide is None:
            raise GenemapInputError("open a slide first (File > Open, or the sample)")
        mpp = float(slide_info(slide)["mpp"])
        active = self.viewer.layers.selection.active
        layer = self.viewer.add_shapes(
            name=core.ROI_LAYER_NAME,
            features=pd.DataFrame({"name": pd.Series([], dtype=object)}),
            scale=(mpp, mpp),
            units=("µm", "µm"),
            metadata={"genemap": {"element": core.ROI_LAYER_NAME, **slide_info(slide)}},
            **core.roi_layer_style(slide),
        )
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
        layer.events.data.connect(_weak(self, "_on_data"))
        # on the layer, not the viewer: Ctrl+Z on the canvas while the ROIs are the active layer
        layer.bind_key("Control-Z", _layer_undo(self), overwrite=True)
        self._name_shapes()
        self._history = core.RoiHistory()
        self._history.record(self._state())
        self._load_saved(layer)

    def _load_saved(self, layer) -> None:
        """The expression saved with the layer's ROIs in its store, by geometry (shown until recomputed)."""
        sdata = layer.metadata.get("sdata")
        self._saved = core.saved_expression(sdata) if sdata is not None else None
        self._saved_rows = {}
        if self._saved is None:
            return
        for entry in self._entries():
            row = self._saved.rows.get(entry["name"])
            if row is not None and entry["kind"] is not None:
                self._saved_rows[entry["key"]] = row
        if self._saved_rows:
            self._refresh()
            self._say(self._saved.note())

    def _drop_saved(self) -> None:
        self._saved, self._saved_rows = None, {}

    def _on_layer_removed(self, event) -> None:
        if event.value == self.layer:
            self.layer = None
            self._drop_saved()
            self._refresh()

    def _on_layer_inserted(self, _event) -> None:
        if not self._raising:
            self._tidy_timer.start()

    def _tidy_layers(self) -> None:
        """Adopt an ROI layer when there is none, and keep the ROI layers above all others."""
        from napari.layers import Shapes

        layers = self.viewer.layers
        if self.layer is None or self.layer not in layers:
            self._adopt_layer(create=False)  # a store's saved ROIs just opened
            self._refresh()
        rois = [
            layer for layer in layers if layer == self.layer or (isinstance(layer, Shapes) and _is_roi_layer(layer))
        ]
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
        self._history.record(self._state())
        self._refresh()
        self._timer.start()

    def _state(self) -> core.RoiState:
        return core.RoiState.of(self.layer.data, self.layer.shape_type, self.names())

    def _restore(self, state: core.RoiState) -> None:
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
        layer = self.layer
        names = layer.features["name"].astype(object).where(layer.features["name"].notna(), "").astype(str)
        bad = (names.str.strip() == "") | names.duplicated(keep="first")
        if not bad.any():
            return
        taken = set(names[~bad])
        numbers = [int(n[4:]) for n in taken if n.startswith("ROI ") and n[4:].isdigit()]
        number = max(numbers, default=0)
        for index in np.flatnonzero(bad.to_numpy()):
            number += 1
            while f"ROI {number}" in taken:
                number += 1
            names.iloc[index] = f"ROI {number}"
        self._set_names(list(names))

    def _set_names(self, names: list[str]) -> None:
        features = self.layer.features.copy()
        features["name"] = pd.Series(names, dtype=object, index=features.index)
        self.layer.features = features
        _unnamed_by_default(self.layer)  # setting features made the last name the default
        self.layer.refresh_text()

    def _rename(self, row: int, name: str) -> bool:
        name = name.strip()
        names = self.names()
        if not name:
            self._say("an ROI needs a name")
            return False
        if name in names[:row] + names[row + 1 :]:
            self._say(f"the name {name!r} is taken; choose another")
            return False
        names[row] = name
        self._set_names(names)
        self._history.record(self._state())
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

    def _add_circle_at(self, world_position) -> None:
        try:
            layer = self._ensure_layer()
            row, column = np.asarray(layer.world_to_data(world_position))[-2:]
            layer.add(core.ellipse_corners(column, row, self.radius.value() / layer.scale[-1]), shape_type="ellipse")
        except GenemapInputError as error:
            self._say(str(error))

    # --- aggregation ---------------------------------------------------------------------------------------
    def _entries(self) -> list[dict]:
        """One dict per shape: name, type, kind (None for lines), vertices (slide px) and geometry key."""
        if self.layer is None:
            return []
        entries = []
        for vertices, shape_type, name in zip(self.layer.data, self.layer.shape_type, self.names()):
            vertices = np.asarray(vertices, dtype=np.float64)[:, -2:]
            kind = core.roi_kind(shape_type)
            if kind == "circle":
                key = ("circle", *np.round(core.circle_from_ellipse(vertices), 4))
            else:
                key = (str(kind), *np.round(vertices, 4).ravel())
            entries.append({"name": name, "type": shape_type, "kind": kind, "vertices": vertices, "key": key})
        return entries

    def _aggregate(self) -> None:
        """Send the ROIs without a profile to the tile service (one request at a time)."""
        if self._in_flight is not None:
            self._again = True
            return
        entries, seen = [], set()
        for entry in self._entries():
            if entry["kind"] is not None and entry["key"] not in self._results and entry["key"] not in seen:
                seen.add(entry["key"])
                entries.append(entry)
        if not entries:
            return
        if self.session.service is None:
            if self._saved is not None and all(entry["key"] in self._saved_rows for entry in entries):
                self._say(self._saved.note())
            else:
                self._say("choose a slide and model (Slide & model) to compute the ROIs' expression")
            return
        entries, gdf = self._valid(entries)
        if not entries:
            return
        self._request += 1
        self._in_flight = [entry["key"] for entry in entries]
        request = self._request
        self.session.aggregate(gdf, lambda table, error: self._on_aggregated(request, table, error))
        self._say(f"computing the expression of {len(entries)} ROIs…")

    def _valid(self, entries: list[dict]) -> tuple[list[dict], object]:
        """The entries that make valid ROIs (named by position) and their GeoDataFrame; a message for the rest."""

        def convert(chosen):
            return core.rois_from_shapes(
                [e["vertices"] for e in chosen], [e["type"] for e in chosen], [str(i) for i in range(len(chosen))]
            )

        try:
            return entries, convert(entries)
        except GenemapInputError:
            good, errors = [], []
            for entry in entries:
                try:
                    convert([entry])
                    good.append(entry)
                except GenemapInputError as error:
                    errors.append(str(error).replace("ROI '0'", f"ROI {entry['name']!r}"))
            self._say(errors[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
            return good, convert(good) if good else None

    def _on_aggregated(self, request: int, table, error: str | None) -> None:
        if request != self._request:
            return
        keys, self._in_flight = self._in_flight, None
        if error:
            self._say(error)
        elif table is not None:
            values = np.asarray(table.X, dtype=np.float32)
            integral = np.asarray(table.layers["integral"], dtype=np.float32)
            for position, key in enumerate(keys):
                self._results[key] = (values[position], integral[position])
            present = {entry["key"] for entry in self._entries()}
            self._results = {key: row for key, row in self._results.items() if key in present}
            self._genes = [str(g) for g in table.var_names]
            self._uns = dict(table.uns.get("genemap") or {})
            self._say("")
        self._refresh()
        if self._again:
            self._again = False
            self._aggregate()

    def _forget(self) -> None:
        """Profiles of another slide or model are no use: drop them and any answer still on its way."""
        self._results.clear()
        self._request += 1
        self._in_flight, self._again = None, False
        self._refresh()

    def _on_slide_changed(self, sdata) -> None:
        if self._saved is not None and not _same_store(sdata, self._saved.source):
            self._drop_saved()  # values of another slide
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
        if self._in_flight is not None and (service is None or not service.alive):
            self._request += 1
            self._in_flight = None

    # --- table and plot ------------------------------------------------------------------------------------
    def _refresh(self) -> None:
        entries = self._entries()
        mpp = self._mpp() if self.layer is not None else 1.0
        genes = self._shown_genes()
        values = np.full((len(entries), len(genes)), np.nan)
        sizes = []
        for row, entry in enumerate(entries):
            result = self._row(entry["key"])
            if result is not None:
                values[row] = result[0]
            sizes.append(_size_text(entry, mpp))
        kinds = [entry["kind"] or entry["type"] for entry in entries]
        self._selected_names = self.selected() or self._selected_names
        self.model.update([e["name"] for e in entries], kinds, sizes, genes, values)
        self._update_plot()

    def _shown_genes(self) -> list[str]:
        """The running model's genes once it has answered, else those of the saved table."""
        if self._genes or self._saved is None or not self._saved_rows:
            return self._genes
        return self._saved.genes

    def _row(self, key: tuple) -> tuple[np.ndarray, np.ndarray] | None:
        """An ROI's (X, integral): the running model's, else the store's saved one (for the same genes)."""
        row = self._results.get(key)
        if row is None and self._saved is not None and self._shown_genes() == self._saved.genes:
            row = self._saved_rows.get(key)
        return row

    def _restore_selection(self) -> None:
        names = [name for name in self._selected_names if name in self.model.names]
        if names:
            self.select(names)

    def _on_selection(self, *_) -> None:
        names = self.selected()
        self._selected_names = names
        if self.layer is not None:
            rows = {self.model.names.index(name) for name in names}
            if rows != set(self.layer.selected_data):
                self.layer.selected_data = rows
        self._update_plot()

    def _update_plot(self) -> None:
        """One ROI: its top genes; two: the genes of largest log2 fold change between them."""
        self.figure.clear()
        axes = self.figure.add_subplot()
        names = self.selected()
        note = None
        if not names:
            note = "select an ROI for its top genes, two to compare them"
        elif len(names) > 2:
            note = "select one ROI (top genes) or two (fold change)"
        else:
            try:
                table = self.expression(names)
            except GenemapInputError:
                note = "computing…"
        if note is not None:
            axes.text(0.5, 0.5, note, ha="center", va="center", transform=axes.transAxes, fontsize=9)
            axes.set_axis_off()
        elif len(names) == 1:
            series = core.top_genes(table, names[0], TOP_GENES)
            axes.barh(series.index[::-1], series.to_numpy()[::-1], color="tab:blue")
            axes.set_title(f"{names[0]}: top genes", fontsize=9)
            axes.set_xlabel(self._uns.get("X", "protocol-normalised expression"), fontsize=8)
        else:
            series = core.fold_changes(table, names[0], names[1], TOP_GENES)
            colours = np.where(series.to_numpy() > 0, "tab:red", "tab:blue")[::-1]
            axes.barh(series.index[::-1], series.to_numpy()[::-1], color=colours)
            axes.axvline(0, color="grey", linewidth=0.8)
            axes.set_title(f"log2 fold change {names[0]} / {names[1]}", fontsize=9)
            axes.set_xlabel("log2 fold change (pseudocount 1 on the protocol's scale)", fontsize=8)
        axes.tick_params(labelsize=7)
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


def _size_text(entry: dict, mpp: float) -> str:
    if entry["kind"] == "circle":
        return f"r {core.circle_from_ellipse(entry['vertices'])[2] * mpp:.1f} µm"
    if entry["kind"] == "polygon":
        xy = entry["vertices"]
        area = 0.5 * abs(np.dot(xy[:, 0], np.roll(xy[:, 1], 1)) - np.dot(xy[:, 1], np.roll(xy[:, 0], 1)))
        return f"{area * mpp**2:,.0f} µm²"
    return "no area"


def _is_roi_layer(layer) -> bool:
    """A shapes layer of ROIs: this panel's, or one the reader made from a store's saved ROIs."""
    return layer.name == core.ROI_LAYER_NAME or layer.metadata.get("genemap", {}).get("element") == core.ROI_LAYER_NAME


def _is_store(path: Path) -> bool:
    from ..io.store import is_zarr_store

    return is_zarr_store(path)


def _same_store(sdata, source: str) -> bool:
    path = getattr(sdata, "path", None)
    return path is not None and Path(path).resolve() == Path(source).resolve()


def _layer_undo(widget):
    """A layer key binding that undoes in ``widget`` while it lives."""
    reference = weakref.ref(widget)

    def undo(_layer):
        target = reference()
        if target is not None:
            target.undo()

    return undo


def _unnamed_by_default(layer) -> None:
    """New shapes get an empty name, which `SpotsWidget._name_shapes` replaces with the next "ROI n"."""
    defaults = layer.feature_defaults.copy()
    defaults["name"] = ""
    layer.feature_defaults = defaults


def _weak(widget, method: str):
    """A callback that calls ``widget.method`` while the widget lives (napari's events hold it strongly)."""
    reference = weakref.ref(widget)

    def call(*args):
        target = reference()
        if target is not None:
            getattr(target, method)(*args)

    return call


def _click_adder(widget):
    """A viewer mouse callback: a click (press and release without moving) adds a circle there."""
    reference = weakref.ref(widget)

    def on_mouse(viewer, event):
        target = reference()
        if target is None or not target._wants_click(event):
            return
        del target
        world, start = np.asarray(event.position), np.asarray(event.pos, dtype=float)
        yield
        moved = False
        while event.type == "mouse_move":
            moved = moved or np.linalg.norm(np.asarray(event.pos, dtype=float) - start) > 4
            yield
        target = reference()
        if target is not None and not moved:
            target._add_circle_at(world)

    return on_mouse


def _cleanup(viewer, click_callback, layer_events, slots):
    """What to undo when the widget is destroyed (holds no reference to the widget itself)."""
    slots = [(signal, weakref.WeakMethod(slot)) for signal, slot in slots]

    def undo(*_):
        if click_callback in viewer.mouse_drag_callbacks:
            viewer.mouse_drag_callbacks.remove(click_callback)
        for emitter, callback in layer_events:
            emitter.disconnect(callback)
        for signal, slot in slots:
            method = slot()
            if method is not None:
                signal.disconnect(method, missing_ok=True)

    return undo
