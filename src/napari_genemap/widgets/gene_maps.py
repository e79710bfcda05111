"""Gene maps dock widget: pick genes, show their predicted maps as layers; prediction follows the view.

Thin over `infer.view` (layer data read from the cache, NaN where not predicted yet or glass, so the H&E
shows through) and the session's tile service (which runs the model in its own process). After every
camera move (throttled) the tiles of the shown level are asked for, nearest the view's centre first, then
a ring around it, then the coarser levels; the service drops what the previous view wanted.

A gene layer belongs to one slide and one model: its name says the model ("KRT8 · pixnet-her2st") and its
metadata the slide, model and cache. When the model changes, the active slide's layers are rebuilt from
the new model's cache; when the slide changes, the other slides' layers are hidden (never removed).
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
from ..layers import GENE_MAP, MEASURED_ON_MAP, find_layers
from ._qt import connect_session, wrapped_label

VIEW_DEBOUNCE_MS = 120
CONTRAST_PERCENTILE = 99.5
CONTRAST_TOLERANCE = 0.1  # follow the view's range, but ignore changes smaller than this (no flicker)


class GeneMapsWidget(QWidget):
    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.session = connect_session(napari_viewer)
        self.tiles_done = 0
        self.queued = 0
        self.pcc: float | None = None  # Pearson of the active gene over the measured spots in view
        self._pcc_request: str | None = None  # the gene whose Pearson is being aggregated
        self._pcc_stale = False  # the view or gene changed while a request was out
        self._all_genes: list[str] = []
        self._setting_contrast = False
        self._overlay_text = ""  # what this panel last wrote in the viewer's text overlay

        self.search = QLineEdit()
        self.search.setPlaceholderText("search genes (Enter adds the top hit)")
        self.search_note = wrapped_label("")
        self.genes = QListWidget()
        self.genes.setMinimumHeight(120)  # a few genes stay visible when the panel shares the dock
        self.add_button = QPushButton("Add gene map")
        self.remove_button = QPushButton("Remove")
        self.pause_box = QCheckBox("Pause prediction")
        self.smooth_box = QCheckBox("Smooth map (linear interpolation)")
        self.status = wrapped_label("open a slide: the Slide & model panel starts the model")
        self.pcc_label = wrapped_label("")
        self.legend = wrapped_label("")

        buttons = QHBoxLayout()
        buttons.addWidget(self.add_button)
        buttons.addWidget(self.remove_button)
        layout = QVBoxLayout(self)
        for widget in (self.search, self.search_note, self.genes):
            layout.addWidget(widget)
        layout.addLayout(buttons)
        for widget in (self.pause_box, self.smooth_box, self.status, self.pcc_label, self.legend):
            layout.addWidget(widget)

        self._view_timer = QTimer(self)
        self._view_timer.setSingleShot(True)
        self._view_timer.setInterval(VIEW_DEBOUNCE_MS)
        self._view_timer.timeout.connect(self.request_view)

        self.search.textChanged.connect(self._filter)
        self.search.returnPressed.connect(self._add_top_hit)
        self.genes.itemDoubleClicked.connect(lambda item: self.add_gene(item.text()))
        self.add_button.clicked.connect(self._add_selected)
        self.remove_button.clicked.connect(self._remove_selected)
        self.pause_box.toggled.connect(self._pause)
        self.smooth_box.toggled.connect(self._set_interpolation)
        self.session.ready.connect(self._on_ready)
        self.session.progress.connect(self._on_progress)
        self.session.error.connect(lambda message: self.status.setText(f"error: {message}"))
        self.session.slide_changed.connect(self._on_slide_changed)
        self.session.model_changed.connect(self._on_model_changed)
        self.viewer.scene.camera.events.center.connect(self._view_changed)
        self.viewer.scene.camera.events.zoom.connect(self._view_changed)
        self.viewer.layers.events.inserted.connect(self._view_changed)
        self.viewer.layers.events.removed.connect(self._view_changed)
        self.viewer.layers.selection.events.active.connect(self._on_active_changed)
        self.viewer.canvas.overlays.scale_bar.visible = True
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

    def _filter(self, text: str) -> None:
        """Show the genes matching ``text``: an exact match first, then prefixes, then the rest. The list
        holds only what is shown, so no hidden item can be selected and acted on."""
        query = text.strip().upper()
        if query:
            exact = [g for g in self._all_genes if g.upper() == query]
            prefix = [g for g in self._all_genes if g.upper().startswith(query) and g.upper() != query]
            inner = [g for g in self._all_genes if query in g.upper() and not g.upper().startswith(query)]
            shown = exact + prefix + inner
        else:
            shown = list(self._all_genes)
        self.genes.clear()
        self.genes.addItems(shown)
        if shown:
            self.genes.setCurrentRow(0)
        self.search_note.setText(self._no_match_note(text.strip()) if query and not shown else "")

    def _no_match_note(self, text: str) -> str:
        note = f"{text} is not among this model's {len(self._all_genes)} genes"
        slide = self.session.slide
        table = slide.tables.get("counts") if slide is not None else None
        if table is not None:
            measured = [g for g in table.var_names.astype(str) if text.upper() in g.upper()]
            if measured:
                return f"{note}; this slide measures {', '.join(measured[:5])} (not predicted by this model)"
        return note

    def _add_top_hit(self) -> None:
        if self.genes.count():
            self.add_gene(self.genes.item(0).text())

    def _add_selected(self) -> None:
        chosen = [item.text() for item in self.genes.selectedItems()]
        if not chosen and self.genes.count():
            chosen = [self.genes.item(0).text()]
        if not chosen:
            self.search_note.setText("no gene to add: the search matches none of this model's genes")
        for gene in chosen:
            self.add_gene(gene)

    def _remove_selected(self) -> None:
        slide = self.session.slide_key
        for item in self.genes.selectedItems():
            for layer in self.gene_layers(item.text(), slide) + self.measured_layers(item.text(), slide):
                self.viewer.layers.remove(layer)

    def add_gene(self, gene: str):
        """Add (or show again) the predicted map of ``gene``, and its measured spots when the slide has them."""
        cache = self.session.cache
        if cache is None:
            self.status.setText("the model is not ready yet")
            return None
        if gene not in cache.genes:
            self.search_note.setText(f"{gene} is not among this model's {len(cache.genes)} genes")
            return None
        mine = self.gene_layers(gene, self.session.slide_key)
        existing = [layer for layer in mine if _cache_of(layer) == str(cache.path)]
        if existing:
            existing[0].visible = True
            self.viewer.layers.selection.active = existing[0]
            return existing[0]
        layer = self._add_map(gene, cache)
        self._add_measured(gene)
        self.viewer.layers.selection.active = layer
        self._auto_contrast(layer)
        self._view_changed()
        return layer

    def _add_map(self, gene: str, cache):
        from ..io import slide_mpp
        from ..layers import slide_name

        mpp = slide_mpp(self.session.slide)
        pixel_um = cache.grid.map_pixel_size(0) * mpp
        name = f"{gene} · {self.session.model_name}"
        if name in self.viewer.layers:  # another slide's map of the same gene and model
            name += f" · {slide_name(self.session.slide)}"
        offset = (pixel_um - mpp) / 2  # map pixel 0 covers slide pixels [0, size): centre vs pixel centre
        layer = self.viewer.add_image(
            gene_levels(cache, gene),
            multiscale=True,
            name=name,
            colormap="magma",
            opacity=0.75,
            scale=(pixel_um, pixel_um),
            translate=(offset, offset),
            units=("µm", "µm"),
            contrast_limits=(0.0, 1.0),
            interpolation2d="linear" if self.smooth_box.isChecked() else "nearest",
            metadata={
                "genemap": {
                    "element": GENE_MAP,
                    "gene": gene,
                    "slide": self.session.slide_key,
                    "cache": str(cache.path),
                    "model": self.session.model_name,
                    "checkpoint": str(self.session.checkpoint),
                    "units": f"predicted counts per {pixel_um:.1f} µm map pixel",
                    "contrast_user": False,
                }
            },
        )
        layer.events.contrast_limits.connect(lambda _event, layer=layer: self._contrast_touched(layer))
        return layer

    def _add_measured(self, gene: str) -> None:
        from ..layers import spots_layer

        slide = self.session.slide
        table = slide.tables.get("counts") if slide is not None else None
        if table is None or gene not in table.var_names or self.measured_layers(gene, self.session.slide_key):
            return
        data, meta, _ = spots_layer(slide, gene)
        meta["name"] = f"{gene} (measured)"
        meta["metadata"]["genemap"] |= {"element": MEASURED_ON_MAP, "slide": self.session.slide_key}
        self.viewer.add_points(data, **meta)

    def gene_layers(self, gene: str | None = None, slide: str | None = None) -> list:
        return self._layers(GENE_MAP, gene, slide)

    def measured_layers(self, gene: str | None = None, slide: str | None = None) -> list:
        return self._layers(MEASURED_ON_MAP, gene, slide)

    def _layers(self, element: str, gene: str | None, slide: str | None) -> list:
        return find_layers(self.viewer.layers, element, gene, slide)

    def active_gene_layer(self):
        """The gene layer the panel speaks of: the selected one, else the topmost visible one of the slide."""
        shown = [layer for layer in self.gene_layers(slide=self.session.slide_key) if layer.visible]
        active = self.viewer.layers.selection.active
        if active is not None and active in shown:
            return active
        return shown[-1] if shown else None

    # --- slide and model changes -------------------------------------------------------------------------
    def _on_ready(self, cache) -> None:
        self._pcc_request, self._pcc_stale = None, False
        self._all_genes = self.gene_order()
        self._filter(self.search.text())
        rebuilt, dropped = self._rebuild_layers(cache)
        message = f"model ready ({self.session.model_name}, {len(cache.genes)} genes): add a gene map"
        if rebuilt:
            message = f"model ready: {', '.join(rebuilt)} now from {self.session.model_name}"
        if dropped:
            message += f"; removed {', '.join(dropped)} (not among this model's genes)"
        self.status.setText(message)
        self._update_legend()
        self._view_changed()

    def _rebuild_layers(self, cache) -> tuple[list[str], list[str]]:
        """Re-make the active slide's gene layers that another model (another cache) drew, in place."""
        rebuilt, dropped = [], []
        for old in self.gene_layers(slide=self.session.slide_key):
            if _cache_of(old) == str(cache.path):
                continue
            gene, index, visible = old.metadata["genemap"]["gene"], self.viewer.layers.index(old), old.visible
            self.viewer.layers.remove(old)
            if gene not in cache.genes:
                dropped.append(gene)
                continue
            layer = self._add_map(gene, cache)
            self.viewer.layers.move(self.viewer.layers.index(layer), index)
            layer.visible = visible
            self._auto_contrast(layer)
            rebuilt.append(gene)
        return rebuilt, dropped

    def _on_model_changed(self, checkpoint) -> None:
        self._pcc_request = None
        self.pcc = None
        self.pcc_label.setText("")
        if self.session.slide is not None:
            self.status.setText(f"loading the model {self.session.model_name}…")

    def _on_slide_changed(self, _sdata) -> None:
        """Hide the other slides' layers (remembering which were shown) and show this slide's again."""
        self._pcc_request, self.pcc = None, None
        self.pcc_label.setText("")
        self.tiles_done, self.queued = 0, 0
        self._all_genes = []
        self.genes.clear()
        key = self.session.slide_key
        for layer in self.gene_layers() + self.measured_layers():
            info = layer.metadata["genemap"]
            if info.get("slide") != key and layer.visible:
                layer.visible = False
                info["hidden_by_switch"] = True
            elif info.get("slide") == key and info.pop("hidden_by_switch", False):
                layer.visible = True
        self.status.setText("starting the model on the new slide…")

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
        if cache is None:
            return
        layer = self.active_gene_layer()
        if layer is None or _cache_of(layer) != str(cache.path):
            self.session.want([])
            return
        level, box = self.view_box(layer)
        self.session.want(view_plan(cache, level, box))
        for shown in self.gene_layers(slide=self.session.slide_key):
            if shown.visible:
                self._auto_contrast(shown)
        self._update_pcc()

    def _on_progress(self, report: dict) -> None:
        done, queued, paused = report["done"], report["queued"], report["paused"]
        self.tiles_done += len(done)
        self.queued = queued
        self.status.setText(_progress_text(queued, paused, report.get("total"), report.get("eta_s")))
        if done:
            for layer in self.gene_layers(slide=self.session.slide_key):
                _forget_thumbnail_level(layer)
                layer.refresh()
                self._auto_contrast(layer)
            self._update_pcc()

    def _pause(self, paused: bool) -> None:
        self.session.pause(paused)
        self.status.setText(
            "paused: the tile being predicted finishes, then nothing more until you resume"
            if paused
            else "resuming prediction…"
        )

    def _set_interpolation(self, smooth: bool) -> None:
        for layer in self.gene_layers():
            layer.interpolation2d = "linear" if smooth else "nearest"

    # --- contrast follows what is visible ----------------------------------------------------------------
    def _auto_contrast(self, layer) -> None:
        """Contrast 0 to the 99.5th percentile of the predicted values in view, updated when that moves by
        more than 10%; limits the user set by hand are kept."""
        info = layer.metadata["genemap"]
        if info.get("contrast_user") or not layer.visible:
            return
        level, (i0, i1, j0, j1) = self.view_box(layer)
        values = layer.data[level].read(max(i0, 0), i1, max(j0, 0), j1)
        values = values[np.isfinite(values)]
        if not values.size or values.max() <= 0:
            return
        high = float(np.percentile(values, CONTRAST_PERCENTILE)) or float(values.max())
        current = float(layer.contrast_limits[1])
        if info.get("contrast_auto") and abs(high - current) <= CONTRAST_TOLERANCE * current:
            return
        self._setting_contrast = True
        try:
            top = max(float(values.max()), high)
            if top > layer.contrast_limits_range[1]:
                layer.contrast_limits_range = (0.0, top)
            layer.contrast_limits = (0.0, high)
        finally:
            self._setting_contrast = False
        info["contrast_auto"] = True

    def _contrast_touched(self, layer) -> None:
        if not self._setting_contrast:
            layer.metadata["genemap"]["contrast_user"] = True

    # --- what the canvas says ----------------------------------------------------------------------------
    def _on_active_changed(self, *_) -> None:
        active = self.active_gene_layer()
        for layer in self.gene_layers():
            # one colour bar (several would overlap); ==, not `is`: napari hands plugins proxies of its layers
            layer.colorbar.visible = layer == active
        overlay = self.viewer.canvas.overlays.text
        if active is not None:
            info = active.metadata["genemap"]
            overlay.text = self._overlay_text = f"{info['gene']} ({info['model']}): colour bar in {info['units']}"
            overlay.visible = True
        elif overlay.text == self._overlay_text:  # ours, and nothing left to explain
            overlay.visible = False
        self._update_legend()
        self._view_changed()

    def _update_legend(self) -> None:
        cache = self.session.cache
        if cache is None or self.session.slide is None:
            self.legend.setText("")
            return
        from ..io import slide_mpp

        pixel_um = cache.grid.map_pixel_size(0) * slide_mpp(self.session.slide)
        self.legend.setText(
            f"Map (magma): predicted counts per {pixel_um:.0f} µm pixel. Measured spots (viridis): "
            "ln(1 + counts per 10,000). Different scales: compare patterns, not colours."
        )

    # --- prediction vs measurement in view ---------------------------------------------------------------
    def _update_pcc(self) -> None:
        """Pearson of the active gene between predicted and measured spots in view (cached tiles only)."""
        import geopandas as gpd
        import shapely

        layer = self.active_gene_layer()
        if layer is None or self.session.cache is None:
            return
        gene = layer.metadata["genemap"]["gene"]
        measured = self.measured_layers(gene, self.session.slide_key)
        if not measured:
            self.pcc = None
            self.pcc_label.setText(f"{gene}: not measured on this slide, so no Pearson")
            return
        if self._pcc_request is not None:
            self._pcc_stale = True
            return
        spots = measured[0]
        (y0, x0), (y1, x1) = _view_in(layer, spots)
        points = np.asarray(spots.data)
        inside = (points[:, 0] >= y0) & (points[:, 0] <= y1) & (points[:, 1] >= x0) & (points[:, 1] <= x1)
        in_view = int(inside.sum())
        if in_view < 3:
            self.pcc = None
            self.pcc_label.setText(f"{gene}: {in_view} measured spots in view; Pearson needs at least 3")
            return
        radius = np.asarray(spots.size)[inside] / 2
        names = spots.features["spot"].to_numpy()[inside]
        shapes = gpd.GeoDataFrame(
            {"radius": radius}, geometry=shapely.points(points[inside][:, ::-1]), index=[str(n) for n in names]
        )
        if not self.pcc_label.text().startswith(f"{gene}:"):  # never show another gene's number meanwhile
            self.pcc = None
            self.pcc_label.setText(f"{gene}: computing the Pearson over the {in_view} measured spots in view…")
        self._pcc_request = gene
        self.session.aggregate(
            shapes, lambda table, error: self._show_pcc(gene, in_view, table, error), only_cached=True
        )

    def _show_pcc(self, gene: str, in_view: int, table, error: str | None) -> None:
        from ..data.protocols import Protocol
        from ..io import TABLE_KEY

        self._pcc_request = None
        active = self.active_gene_layer()
        if active is None or active.metadata["genemap"]["gene"] != gene:
            self._pcc_stale = False
            self._update_pcc()
            return
        if self._pcc_stale:  # show this answer (while tiles keep arriving, every answer is a little stale),
            self._pcc_stale = False  # then ask again
            QTimer.singleShot(0, self._update_pcc)
        predicted_spots = 0 if table is None else table.n_obs
        if error is not None or predicted_spots < 3:
            self.pcc = None
            self.pcc_label.setText(
                f"{gene}: waiting for the spots' tiles ({predicted_spots} of {in_view} spots in view predicted)"
            )
            return
        protocol = Protocol.from_dict(self.session.model_card()["protocol"])
        counts = self.session.slide.tables[TABLE_KEY]
        measured = protocol.transform(counts[list(table.obs_names)])[:, protocol.genes.index(gene)]
        predicted = np.asarray(table[:, gene].X).ravel()
        if np.std(measured) == 0 or np.std(predicted) == 0:
            self.pcc = None
            self.pcc_label.setText(f"{gene}: constant over the {predicted_spots} spots; Pearson undefined")
            return
        self.pcc = float(np.corrcoef(predicted, measured)[0, 1])
        complete = "" if predicted_spots == in_view else " (the rest are not predicted yet)"
        section = self.session.training_overlap()
        seen = (
            f"This slide ({section}) was in the model's training data: this shows fit, not generalisation."
            if section
            else "This slide is not among the model's recorded training slides."
        )
        self.pcc_label.setText(
            f"{gene}: Pearson {self.pcc:.3f} over {predicted_spots} of {in_view} measured spots in view"
            f"{complete} (protocol {protocol.name}, spot integrals of the map). {seen}"
        )


def _progress_text(queued: int, paused: bool, total: int | None, eta_s: float | None) -> str:
    """The status line in a reader's words: how much of the view is left and about how long it takes."""
    if not queued:
        return "view predicted"
    count = f"{total - queued} / {total} tiles of this view done" if total else f"{queued} tiles to go"
    if paused:
        return f"paused: {count}"
    if eta_s is None:
        return f"predicting: {count}"
    minutes = eta_s / 60
    eta = f"about {eta_s:.0f} s" if eta_s < 90 else f"about {minutes:.0f} min"
    return f"predicting: {count}, {eta} left"


def _cache_of(layer) -> str:
    """The path of the cache a gene layer reads."""
    return layer.metadata["genemap"]["cache"]


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
