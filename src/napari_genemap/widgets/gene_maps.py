"""Gene maps dock widget: pick genes, show their predicted maps as layers; prediction follows the view.

Thin over `infer.view` (layer data read from the cache, NaN where not predicted yet, so the H&E shows
through) and the session's tile service (which runs the model in its own process). After every camera
move (debounced) the tiles of the shown level are asked for, nearest the view's centre first, then a
ring around it, then the coarser levels; the service drops what the previous view wanted.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QHBoxLayout,
    QLineEdit,
    QListWidget,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..infer.view import gene_levels, view_plan
from ._qt import connect_session, wrapped_label

VIEW_DEBOUNCE_MS = 120
GENE_MAP = "gene_map"
MEASURED = "measured_spots"


class GeneMapsWidget(QWidget):
    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.session = connect_session(napari_viewer)
        self.tiles_done = 0
        self.queued = 0
        self.pcc: float | None = None  # Pearson of the current gene over the measured spots in view
        self._pcc_request = None

        self.search = QLineEdit()
        self.search.setPlaceholderText("search genes")
        self.genes = QListWidget()
        self.add_button = QPushButton("Add gene map")
        self.remove_button = QPushButton("Remove")
        self.pause_box = QCheckBox("Pause prediction")
        self.status = wrapped_label("open a slide: the Slide & model panel starts the model")
        self.pcc_label = wrapped_label("")

        buttons = QHBoxLayout()
        buttons.addWidget(self.add_button)
        buttons.addWidget(self.remove_button)
        layout = QVBoxLayout(self)
        for widget in (self.search, self.genes):
            layout.addWidget(widget)
        layout.addLayout(buttons)
        for widget in (self.pause_box, self.status, self.pcc_label):
            layout.addWidget(widget)

        self._view_timer = QTimer(self)
        self._view_timer.setSingleShot(True)
        self._view_timer.setInterval(VIEW_DEBOUNCE_MS)
        self._view_timer.timeout.connect(self.request_view)

        self.search.textChanged.connect(self._filter)
        self.genes.itemDoubleClicked.connect(lambda item: self.add_gene(item.text()))
        self.add_button.clicked.connect(self._add_selected)
        self.remove_button.clicked.connect(self._remove_selected)
        self.pause_box.toggled.connect(self.session.pause)
        self.session.ready.connect(self._on_ready)
        self.session.tiles.connect(self._on_tiles)
        self.session.error.connect(lambda message: self.status.setText(f"error: {message}"))
        self.session.slide_changed.connect(lambda _: self._clear_layers())
        self.viewer.camera.events.center.connect(self._view_changed)
        self.viewer.camera.events.zoom.connect(self._view_changed)
        self.viewer.layers.events.inserted.connect(self._view_changed)
        self.viewer.layers.events.removed.connect(self._view_changed)
        if self.session.cache is not None:
            self._on_ready(self.session.cache)

    # --- genes -------------------------------------------------------------------------------------------
    def gene_order(self) -> list[str]:
        """The model's genes, most variable first: by the checkpoint's recorded training variance, else by
        the slide's measured spots, else as the checkpoint lists them."""
        card = self.session.model_card()
        genes = list(card["genes"])
        variance = card.get("gene_variance")
        if variance is None and self.session.slide is not None:
            from ..io import TABLE_KEY
            from ..layers import log_normalised

            if TABLE_KEY in self.session.slide.tables:
                measured = log_normalised(self.session.slide.tables[TABLE_KEY]).var(0)
                variance = [float(measured.get(gene, -1.0)) for gene in genes]
        if variance is None:
            return genes
        order = np.argsort(-np.nan_to_num(np.asarray(variance, float), nan=-1.0), kind="stable")
        return [genes[i] for i in order]

    def _on_ready(self, cache) -> None:
        self.genes.clear()
        self.genes.addItems(self.gene_order())
        self._filter(self.search.text())
        self.status.setText(f"model ready: {len(cache.genes)} genes; add a gene map")
        self._view_changed()

    def _filter(self, text: str) -> None:
        text = text.strip().upper()
        for row in range(self.genes.count()):
            item = self.genes.item(row)
            item.setHidden(bool(text) and text not in item.text().upper())

    def _add_selected(self) -> None:
        for item in self.genes.selectedItems():
            self.add_gene(item.text())

    def _remove_selected(self) -> None:
        for item in self.genes.selectedItems():
            for layer in self.gene_layers(item.text()) + self.measured_layers(item.text()):
                self.viewer.layers.remove(layer)

    def add_gene(self, gene: str):
        """Add (or show again) the predicted map of ``gene``, and its measured spots when the slide has them."""
        cache = self.session.cache
        if cache is None:
            self.status.setText("the model is not ready yet")
            return None
        existing = self.gene_layers(gene)
        if existing:
            existing[0].visible = True
            return existing[0]
        from ..io import slide_mpp

        mpp = slide_mpp(self.session.slide)
        pixel_um = cache.grid.map_pixel_size(0) * mpp
        offset = (pixel_um - mpp) / 2  # map pixel 0 covers slide pixels [0, size): centre vs pixel centre
        layer = self.viewer.add_image(
            gene_levels(cache, gene),
            multiscale=True,
            name=f"{gene} (predicted)",
            colormap="magma",
            opacity=0.75,
            scale=(pixel_um, pixel_um),
            translate=(offset, offset),
            units=("µm", "µm"),
            contrast_limits=(0.0, 1.0),
            metadata={
                "genemap": {
                    "element": GENE_MAP,
                    "gene": gene,
                    "cache": str(cache.path),
                    "model": str(self.session.checkpoint),
                    "units": "expression (raw counts scale) per map pixel",
                    "contrast_set": False,
                }
            },
        )
        self._add_measured(gene)
        self._view_changed()
        return layer

    def _add_measured(self, gene: str) -> None:
        from ..layers import spots_layer

        slide = self.session.slide
        table = slide.tables.get("counts") if slide is not None else None
        if table is None or gene not in table.var_names:
            return
        data, meta, _ = spots_layer(slide, gene)
        meta["name"] = f"{gene} (measured)"
        meta["metadata"]["genemap"]["element"] = MEASURED
        self.viewer.add_points(data, **meta)

    def gene_layers(self, gene: str | None = None) -> list:
        return self._layers(GENE_MAP, gene)

    def measured_layers(self, gene: str | None = None) -> list:
        return self._layers(MEASURED, gene)

    def _layers(self, element: str, gene: str | None) -> list:
        """This panel's layers of one kind (by the provenance in their metadata), optionally of one gene."""
        return [
            layer
            for layer in self.viewer.layers
            if layer.metadata.get("genemap", {}).get("element") == element
            and (gene is None or layer.metadata["genemap"]["gene"] == gene)
        ]

    def _clear_layers(self) -> None:
        for layer in self.gene_layers() + self.measured_layers():
            self.viewer.layers.remove(layer)
        self.genes.clear()

    # --- the view drives prediction ----------------------------------------------------------------------
    def _view_changed(self, *_) -> None:
        """Throttle, not debounce: while the camera keeps moving, the view is still sent every 120 ms."""
        if not self._view_timer.isActive():
            self._view_timer.start()

    def view_box(self, layer) -> tuple[int, tuple[int, int, int, int]]:
        """(level shown, (i0, i1, j0, j1) in that level's map pixels) of a gene layer's view."""
        (i0, j0), (i1, j1) = np.asarray(layer.corner_pixels)[:, -2:]
        return int(layer.data_level), (int(i0), int(i1) + 1, int(j0), int(j1) + 1)

    def request_view(self) -> None:
        """Ask the service for the tiles of the current view (replacing what it was asked before)."""
        cache = self.session.cache
        visible = [layer for layer in self.gene_layers() if layer.visible]
        if cache is None:
            return
        if not visible:
            self.session.want([])
            return
        level, box = self.view_box(visible[0])
        self.session.want(view_plan(cache, level, box))
        self._update_pcc()

    def _on_tiles(self, done: list, queued: int, paused: bool) -> None:
        self.tiles_done += len(done)
        self.queued = queued
        state = "paused" if paused else "predicting" if queued else "view predicted"
        self.status.setText(f"{state}: {self.tiles_done} tiles done, {queued} queued")
        if done:
            for layer in self.gene_layers():
                _forget_thumbnail_level(layer)
                layer.refresh()
                self._set_contrast(layer)
            self._update_pcc()

    def _set_contrast(self, layer) -> None:
        """Contrast from the predicted values in view, once (the user's own limits are kept after)."""
        info = layer.metadata["genemap"]
        if info["contrast_set"]:
            return
        level, (i0, i1, j0, j1) = self.view_box(layer)
        values = layer.data[level].read(max(i0, 0), i1, max(j0, 0), j1)
        values = values[np.isfinite(values)]
        if values.size and values.max() > 0:
            layer.contrast_limits = (0.0, float(np.percentile(values, 99.5)))
            info["contrast_set"] = True

    # --- prediction vs measurement in view ---------------------------------------------------------------
    def _update_pcc(self) -> None:
        """Pearson of the shown gene between predicted and measured spots in view (cached tiles only)."""
        import geopandas as gpd
        import shapely

        layers = [layer for layer in self.gene_layers() if layer.visible]
        measured = self.measured_layers(layers[0].metadata["genemap"]["gene"]) if layers else []
        if not measured or self._pcc_request is not None or self.session.cache is None:
            return
        spots = measured[0]
        (y0, x0), (y1, x1) = _view_in(layers[0], spots)
        points = np.asarray(spots.data)
        inside = (points[:, 0] >= y0) & (points[:, 0] <= y1) & (points[:, 1] >= x0) & (points[:, 1] <= x1)
        if inside.sum() < 3:
            self.pcc_label.setText("Pearson (measured vs predicted): fewer than 3 spots in view")
            return
        radius = np.asarray(spots.size)[inside] / 2
        names = spots.features["spot"].to_numpy()[inside]
        shapes = gpd.GeoDataFrame(
            {"radius": radius}, geometry=shapely.points(points[inside][:, ::-1]), index=[str(n) for n in names]
        )
        gene = layers[0].metadata["genemap"]["gene"]
        self._pcc_request = gene
        self.session.aggregate(shapes, lambda table, error: self._show_pcc(gene, table, error), only_cached=True)

    def _show_pcc(self, gene: str, table, error: str | None) -> None:
        from ..data.protocols import Protocol
        from ..io import TABLE_KEY

        self._pcc_request = None
        if error is not None or table is None or table.n_obs < 3:
            self.pcc = None
            self.pcc_label.setText("Pearson (measured vs predicted): waiting for the spots' tiles")
            return
        protocol = Protocol.from_dict(self.session.model_card()["protocol"])
        counts = self.session.slide.tables[TABLE_KEY]
        measured = protocol.transform(counts[list(table.obs_names)])[:, protocol.genes.index(gene)]
        predicted = np.asarray(table[:, gene].X).ravel()
        if np.std(measured) == 0 or np.std(predicted) == 0:
            self.pcc = None
            self.pcc_label.setText(f"{gene}: constant over the {table.n_obs} spots in view; Pearson undefined")
            return
        self.pcc = float(np.corrcoef(predicted, measured)[0, 1])
        self.pcc_label.setText(
            f"{gene}: Pearson {self.pcc:.3f} over {table.n_obs} measured spots in view "
            f"(protocol {protocol.name}, spot integrals of the map)"
        )


def _forget_thumbnail_level(layer) -> None:
    """napari (0.9) keeps the coarsest level of a 2-D pyramid in memory once read; ours fills in as tiles
    arrive, so the kept copy must go (no public API does only this; setting ``data`` would reset more)."""
    materializer = getattr(layer, "_level_materializer", None)
    if materializer is not None and hasattr(materializer, "cache_clear"):
        materializer.cache_clear()


def _view_in(gene_layer, other) -> tuple[np.ndarray, np.ndarray]:
    """The gene layer's view (its corner pixels at the shown level) in ``other``'s data coordinates."""
    level = gene_layer.data_level
    corners = (
        np.asarray(gene_layer.corner_pixels, float)[:, -2:] * np.asarray(gene_layer.downsample_factors[level])[-2:]
    )
    corners[1] += 1  # corner_pixels are inclusive
    world = corners * np.asarray(gene_layer.scale)[-2:] + np.asarray(gene_layer.translate)[-2:]
    local = (world - np.asarray(other.translate)[-2:]) / np.asarray(other.scale)[-2:]
    return local[0], local[1]
