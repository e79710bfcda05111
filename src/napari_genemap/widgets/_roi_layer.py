"""The viewer's ROI shapes layer as the Spots panel uses it: found or made, named, kept on top, rewritten on undo.

napari owns the layer. The link adopts one the reader made from a store's saved ROIs (found by its
`layers.ROIS` metadata) or makes one on the open slide, gives new shapes the next free "ROI n", keeps the
ROI layers above the layers added after them (gene maps would hide them), and tells the panel by signals
when the layer arrives, is edited or goes. Layers are compared with ``==``, never ``is``: napari hands
plugins proxies of its layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from qtpy.QtCore import QObject, QTimer, Signal

from ..errors import GenemapInputError
from ..explore.rois import ellipse_corners, fill_names
from ..explore.roiset import RoiState
from ..layers import ROIS, find_layers, roi_layer_meta
from ._napari_hooks import weak_call

NO_SLIDE = "open a slide first (File > Open, or the sample)"


class RoiLayerLink(QObject):
    """The panel's ROI layer (``layer``; None while there is none) and what napari does to it."""

    attached = Signal()  # a layer was adopted or made: the panel starts over from its shapes
    edited = Signal()  # shapes were added, changed or removed (not by `restore`)
    detached = Signal()  # the layer left the viewer

    def __init__(self, viewer, slide: Callable[[], object], undo_key: Callable, parent: QObject):
        """``slide``: the open slide (or None), which a new layer is made on; ``undo_key``: what Ctrl+Z on the
        canvas calls while the ROIs are the active layer (napari passes the layer)."""
        super().__init__(parent)
        self.viewer = viewer
        self.layer: Any = None  # napari's Shapes layer (a proxy of it when napari docked the panel)
        self._slide = slide
        self._undo_key = undo_key
        self._restoring = False  # `restore` is rewriting the layer: its events are not edits
        self._raising = False  # moving the ROI layers up (re-entrancy guard)
        # after the insertion has finished (napari's own handlers still expect the new layer's index)
        self._tidy_timer = QTimer(self)
        self._tidy_timer.setSingleShot(True)
        self._tidy_timer.timeout.connect(self.tidy)
        self.viewer_events = [  # for `_napari_hooks.cleanup`
            (viewer.layers.events.removed, weak_call(self, "_on_layer_removed")),
            (viewer.layers.events.inserted, weak_call(self, "_on_layer_inserted")),
        ]
        for emitter, callback in self.viewer_events:
            emitter.connect(callback)

    @property
    def alive(self) -> bool:
        """Whether there is a layer and it is still in the viewer."""
        return self.layer is not None and self.layer in self.viewer.layers

    def names(self) -> list[str]:
        if self.layer is None or "name" not in self.layer.features:
            return []
        return [str(name) for name in self.layer.features["name"]]

    def state(self) -> RoiState:
        """The shapes as the layer holds them now (none without a layer)."""
        if self.layer is None:
            return RoiState.of([], [], [])
        return RoiState.of(self.layer.data, self.layer.shape_type, self.names())

    # --- finding or making the layer -----------------------------------------------------------------------
    def adopt(self, create: bool = True) -> None:
        """Use the viewer's ROI shapes layer, or (``create``) make one when a slide is open."""
        existing = self._roi_layers()
        if existing:
            self._attach(existing[0])
        elif create and self._slide() is not None:
            self.ensure()

    def ensure(self):
        """The layer, made on the open slide when there is none; `GenemapInputError` without a slide."""
        if self.alive:
            return self.layer
        slide = self._slide()
        if slide is None:
            raise GenemapInputError(NO_SLIDE)
        active = self.viewer.layers.selection.active
        layer = self.viewer.add_shapes(**roi_layer_meta(slide))
        if active is not None:  # adding a layer selects it; keep what the user had
            self.viewer.layers.selection.active = active
        self._attach(layer)
        return layer

    def _roi_layers(self) -> list:
        """The viewer's shapes layers of ROIs: this panel's, and any the reader made from a store's saved ROIs."""
        from napari.layers import Shapes

        return [layer for layer in find_layers(self.viewer.layers, ROIS) if isinstance(layer, Shapes)]

    def _attach(self, layer) -> None:
        if layer == self.layer:
            return
        if "name" not in layer.features:
            features = layer.features.copy()
            features["name"] = ""
            layer.features = features
        _unnamed_by_default(layer)
        self.layer = layer
        layer.events.data.connect(weak_call(self, "_on_data"))
        # on the layer, not the viewer: Ctrl+Z on the canvas while the ROIs are the active layer
        layer.bind_key("Control-Z", self._undo_key, overwrite=True)
        self._name_shapes()
        self.attached.emit()

    def _on_layer_removed(self, event) -> None:
        if event.value == self.layer:
            self.layer = None
            self.detached.emit()

    def _on_layer_inserted(self, _event) -> None:
        if not self._raising:
            self._tidy_timer.start()

    def tidy(self) -> None:
        """Adopt an ROI layer when there is none (a store's saved ROIs just opened), and keep the ROI layers
        above all others."""
        layers = self.viewer.layers
        if not self.alive:
            self.adopt(create=False)
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

    # --- the shapes ----------------------------------------------------------------------------------------
    def _on_data(self, event) -> None:
        if str(event.action) not in ("added", "changed", "removed") or self._restoring:
            return
        if str(event.action) == "added":
            self._name_shapes()
        self.edited.emit()

    def add_circle(self, world_position, radius_um: float) -> None:
        """A circle centred at ``world_position`` (the viewer's coordinates, µm) of ``radius_um``."""
        layer = self.ensure()
        row, column = np.asarray(layer.world_to_data(world_position))[-2:]
        layer.add(ellipse_corners(column, row, radius_um / layer.scale[-1]), shape_type="ellipse")

    def add_polygon(self, world_vertices: np.ndarray) -> None:
        """A polygon of (row, column) vertices in the viewer's coordinates (µm)."""
        layer = self.ensure()
        layer.add(np.array([layer.world_to_data(v)[-2:] for v in world_vertices]), shape_type="polygon")

    def restore(self, state: RoiState) -> None:
        """Make the layer hold ``state`` (one undo step); not reported as an edit."""
        layer = self.layer
        self._restoring = True
        try:
            if len(layer.data):
                layer.remove(list(range(len(layer.data))))
            if state.data:
                layer.add([np.array(vertices) for vertices in state.data], shape_type=list(state.types))
            self.set_names(list(state.names))
        finally:
            self._restoring = False

    def _name_shapes(self) -> None:
        """Give shapes without a name (or with a taken one) the next free "ROI n"."""
        names = list(self.layer.features["name"])
        filled = fill_names(names)
        if filled != names:
            self.set_names(filled)

    def set_names(self, names: list[str]) -> None:
        features = self.layer.features.copy()
        features["name"] = pd.Series(names, dtype=object, index=features.index)
        self.layer.features = features
        _unnamed_by_default(self.layer)  # setting features made the last name the default
        self.layer.refresh_text()

    def rescale(self, mpp: float) -> None:
        """The slide is now at ``mpp`` µm per pixel (the shapes stay in slide pixels)."""
        self.layer.scale = (mpp, mpp)

    def select(self, rows: set[int]) -> None:
        """Select these shapes on the canvas (the table's selection)."""
        if self.layer is not None and rows != set(self.layer.selected_data):
            self.layer.selected_data = rows

    # --- napari's tools ------------------------------------------------------------------------------------
    def draw(self, mode: str) -> None:
        """Hand the canvas to napari's shape tool ``mode`` ("add_ellipse", "add_polygon") on this layer."""
        layer = self.ensure()
        self.viewer.layers.selection.active = layer
        layer.mode = mode

    def pan_zoom(self) -> None:
        """Leave napari's shape tools, so that clicks reach the panel."""
        layer = self.ensure()
        if layer.mode != "pan_zoom":
            layer.mode = "pan_zoom"

    def editing(self) -> bool:
        """Whether the user is drawing or editing shapes with napari's own tools."""
        layer = self.layer
        return layer is not None and self.viewer.layers.selection.active == layer and layer.mode != "pan_zoom"


def _unnamed_by_default(layer) -> None:
    """New shapes get an empty name, which `RoiLayerLink._name_shapes` replaces with the next "ROI n"."""
    defaults = layer.feature_defaults.copy()
    defaults["name"] = ""
    layer.feature_defaults = defaults
