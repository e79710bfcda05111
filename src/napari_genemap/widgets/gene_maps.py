"""Gene maps dock widget: pick genes, show their predicted maps as layers; prediction follows the view.

Displays and forwards: the layers come from `layers` (`gene_map_layer`, `measured_on_map_layer`), the gene
list from `explore.genes`, the contrast from `_contrast.MapContrast`, the Pearson line from
`_pearson_line.PearsonLine`, the tiles to ask for from `infer.view`, and the model runs in the session's tile
service. After every camera move (throttled) the panel asks for the view's tiles and re-reads contrast and
Pearson; once the model is ready, before any gene is chosen, it asks for the H&E's view.

A gene layer belongs to one slide and one model (its name says the model, its metadata the slide, model
and cache). When the model changes, the active slide's layers are rebuilt from the new model's cache; when
the slide changes, the other slides' layers are hidden (never removed).
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QCheckBox, QHBoxLayout, QLineEdit, QListWidget, QPushButton, QWidget

from ..errors import GenemapInputError
from ..explore.calibration import field_for, measured_circles
from ..explore.genes import gene_order, model_ready_note, no_match_note, search_genes
from ..infer.view import progress_text, view_plan
from ..io import slide_info
from ..layers import (
    GENE_MAP,
    HE,
    MEASURED_ON_MAP,
    calibrated_map,
    find_layers,
    gene_map_layer,
    map_legend,
    measured_on_map_layer,
    show_only_slide,
    view_corners,
)
from ._contrast import MapContrast
from ._pearson_line import PearsonLine
from ._qt import connect_session, scrolled_layout, wrapped_label

VIEW_DEBOUNCE_MS = 120


class GeneMapsWidget(QWidget):
    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.session = connect_session(napari_viewer)
        self.tiles_done, self.queued = 0, 0
        self._all_genes: list[str] = []
        self.pearson = PearsonLine(
            self.session, self.active_gene_layer, lambda gene: self.measured_layers(gene, self.session.slide_key)
        )
        self.pcc_label = self.pearson.label
        self.contrast = MapContrast()
        self._overlay_text = ""  # what this panel last wrote in the viewer's text overlay

        self.search = QLineEdit(placeholderText="search genes (Enter adds the top hit)")
        self.search_note = wrapped_label()
        self.genes = QListWidget()
        self.genes.setMinimumHeight(120)  # a few genes stay visible when the panel shares the dock
        self.add_button, self.remove_button = QPushButton("Add gene map"), QPushButton("Remove")
        self.pause_box = QCheckBox("Pause prediction")
        self.smooth_box = QCheckBox("Smooth map (linear interpolation)")
        self.calibrate_box = QCheckBox("Calibrate to measured spots")
        self.calibrate_box.setToolTip(
            "Rescale each map by a smooth factor so that it integrates to the measured counts on every measured "
            "spot: the histology gives the pattern, the measurement the amount (slides with measured spots)"
        )
        self.calibrate_box.setEnabled(False)
        self._fields: dict[tuple[str, str, str], object] = {}  # (cache, slide, gene) -> correction field
        self.status = wrapped_label("open a slide: the Slide & model panel starts the model")
        self.legend = wrapped_label()
        buttons = QHBoxLayout()
        buttons.addWidget(self.add_button)
        buttons.addWidget(self.remove_button)
        layout = scrolled_layout(self)  # a short dock scrolls the panel; squeezed, Qt overlapped its rows
        for widget in (self.search, self.search_note, self.genes):
            layout.addWidget(widget)
        layout.addLayout(buttons)
        for widget in (self.pause_box, self.smooth_box, self.calibrate_box, self.status, self.pcc_label, self.legend):
            layout.addWidget(widget)

        self._view_timer = QTimer(self, singleShot=True, interval=VIEW_DEBOUNCE_MS)
        self._view_timer.timeout.connect(self.request_view)
        self.search.textChanged.connect(self._filter)
        self.search.returnPressed.connect(self._add_top_hit)
        self.genes.itemDoubleClicked.connect(lambda item: self.add_gene(item.text()))
        self.add_button.clicked.connect(self._add_selected)
        self.remove_button.clicked.connect(self._remove_selected)
        self.pause_box.toggled.connect(self._pause)
        self.smooth_box.toggled.connect(self._set_interpolation)
        self.calibrate_box.toggled.connect(self._calibrate)
        self.session.ready.connect(self._on_ready)
        self.session.progress.connect(self._on_progress)
        self.session.error.connect(lambda message: self.status.setText(f"error: {message}"))
        self.session.slide_changed.connect(self._on_slide_changed)
        self.session.model_changed.connect(self._on_model_changed)
        for event in (self.viewer.scene.camera.events.center, self.viewer.scene.camera.events.zoom):
            event.connect(self._view_changed)
        self.viewer.layers.events.inserted.connect(self._view_changed)
        self.viewer.layers.events.removed.connect(self._view_changed)
        self.viewer.layers.selection.events.active.connect(self._on_active_changed)
        self.viewer.canvas.overlays.scale_bar.visible = True
        if self.session.cache is not None:
            self._on_ready(self.session.cache)

    @property
    def pcc(self) -> float | None:
        """The Pearson of the active gene over the measured spots in view, as the panel shows it."""
        return self.pearson.r

    # --- genes -------------------------------------------------------------------------------------------
    def _filter(self, text: str) -> None:
        """The list holds only the matches, so no hidden item can be selected and acted on."""
        shown = search_genes(self._all_genes, text)
        self.genes.clear()
        self.genes.addItems(shown)
        if shown:
            self.genes.setCurrentRow(0)
        counts = self.session.counts()
        measured = counts.var_names.astype(str) if counts is not None else ()
        self.search_note.setText("" if shown else no_match_note(text, len(self._all_genes), measured))

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
            self.search_note.setText(no_match_note(gene, len(cache.genes)))
            return None
        for layer in self.gene_layers(gene, self.session.slide_key):
            if layer.metadata["genemap"]["cache"] == str(cache.path):
                layer.visible = True
                self.viewer.layers.selection.active = layer
                return layer
        layer = self._add_map(gene, cache)
        taken = [layer.name for layer in self.viewer.layers]
        measured = measured_on_map_layer(self.session.slide, gene, self.session.slide_key, taken)
        if measured is not None and not self.measured_layers(gene, self.session.slide_key):
            self.viewer.add_points(measured[0], **measured[1])
        self.viewer.layers.selection.active = layer
        self._follow_view(layer)
        self._view_changed()
        if self.calibrate_box.isChecked():
            self._request_field(layer)
        return layer

    def _add_map(self, gene: str, cache):
        data, meta, _ = gene_map_layer(
            cache,
            gene,
            self.session.slide,
            slide=self.session.slide_key,
            model=self.session.model_name,
            checkpoint=self.session.checkpoint,
            smooth=self.smooth_box.isChecked(),
            taken=[layer.name for layer in self.viewer.layers],
        )
        layer = self.viewer.add_image(data, **meta)
        self.contrast.watch(layer)
        return layer

    def gene_layers(self, gene: str | None = None, slide: str | None = None) -> list:
        return find_layers(self.viewer.layers, GENE_MAP, gene, slide)

    def measured_layers(self, gene: str | None = None, slide: str | None = None) -> list:
        return find_layers(self.viewer.layers, MEASURED_ON_MAP, gene, slide)

    def active_gene_layer(self):
        """The gene layer the panel speaks of: the selected one, else the topmost visible one of the slide."""
        shown = [layer for layer in self.gene_layers(slide=self.session.slide_key) if layer.visible]
        active = self.viewer.layers.selection.active
        return active if active is not None and active in shown else (shown[-1] if shown else None)

    # --- slide and model changes -------------------------------------------------------------------------
    def _on_ready(self, cache) -> None:
        self.pearson.restart()
        self._all_genes = gene_order(self.session.model_card(), self.session.counts())
        self._filter(self.search.text())
        rebuilt, dropped = self._rebuild_layers(cache)
        self.status.setText(model_ready_note(self.session.model_name, len(cache.genes), rebuilt, dropped))
        self.calibrate_box.setEnabled(self.session.counts() is not None)
        if self.calibrate_box.isChecked():
            self._calibrate(True)
        self._update_legend()
        self.request_view()  # at once, not throttled: the model is idle until it is asked

    def _rebuild_layers(self, cache) -> tuple[list[str], list[str]]:
        """Re-make, in place, the active slide's gene layers another model (another cache) drew; drop those
        of genes the new model lacks."""
        rebuilt, dropped = [], []
        for old in self.gene_layers(slide=self.session.slide_key):
            if old.metadata["genemap"]["cache"] == str(cache.path):
                continue
            gene, index, visible = old.metadata["genemap"]["gene"], self.viewer.layers.index(old), old.visible
            self.viewer.layers.remove(old)
            if gene not in cache.genes:
                dropped.append(gene)
                continue
            layer = self._add_map(gene, cache)
            self.viewer.layers.move(self.viewer.layers.index(layer), index)
            layer.visible = visible
            self._follow_view(layer)
            rebuilt.append(gene)
        return rebuilt, dropped

    def _on_model_changed(self, _checkpoint) -> None:
        self.pearson.forget()
        if self.session.slide is not None:
            self.status.setText(f"loading the model {self.session.model_name}…")

    def _on_slide_changed(self, _sdata) -> None:
        """Hide the other slides' layers (remembering which were shown) and show this slide's again."""
        self.pearson.forget()
        self.tiles_done, self.queued, self._all_genes = 0, 0, []
        self.genes.clear()
        show_only_slide(self.gene_layers() + self.measured_layers(), self.session.slide_key)
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

    def slide_view_plan(self, cache) -> list:
        """The level-0 tiles (then coarser) of the active slide's H&E in view, nearest its centre first."""
        images = [
            layer for layer in find_layers(self.viewer.layers, HE) if layer.metadata.get("sdata") is self.session.slide
        ]
        if not images or not images[0].visible:
            return []
        (y0, x0), (y1, x1) = cache.grid.slide_to_map(view_corners(images[0]) / slide_info(self.session.slide)["mpp"])
        box = (int(np.floor(y0)), int(np.ceil(y1)), int(np.floor(x0)), int(np.ceil(x1)))
        return view_plan(cache, 0, box, ring=0)

    def request_view(self) -> None:
        """Ask the service for the tiles of the current view (replacing what it was asked before)."""
        cache = self.session.cache
        if cache is None:
            return
        if not self.gene_layers(slide=self.session.slide_key):
            # no gene chosen yet on this slide: predict the H&E's view anyway (one model call makes every
            # gene), so the first gene chosen shows at once; the tiles are the ones its layer will ask for
            self.session.want(self.slide_view_plan(cache))
            return
        layer = self.active_gene_layer()
        if layer is None or layer.metadata["genemap"]["cache"] != str(cache.path):
            self.session.want([])
            return
        self.session.want(view_plan(cache, *self.view_box(layer)))
        for shown in self.gene_layers(slide=self.session.slide_key):
            self._follow_view(shown)
        self.pearson.update()

    def _on_progress(self, report: dict) -> None:
        self.tiles_done += len(report["done"])
        self.queued = report["queued"]
        self.status.setText(progress_text(self.queued, report["paused"], report.get("total"), report.get("eta_s")))
        if report["done"]:
            for layer in self.gene_layers(slide=self.session.slide_key):
                _forget_thumbnail_level(layer)
                layer.refresh()
                self._follow_view(layer)
            self.pearson.update()

    def _pause(self, paused: bool) -> None:
        self.session.pause(paused)
        self.status.setText(
            "paused: the tile being predicted finishes, then nothing more until you resume"
            if paused
            else "resuming prediction…"
        )

    # --- calibration to the measured spots -------------------------------------------------------------
    def _calibrate(self, on: bool) -> None:
        """Show the active slide's maps calibrated (asking the service for what is not known yet), or not."""
        for layer in self.gene_layers(slide=self.session.slide_key):
            if on:
                self._request_field(layer)
            elif layer.metadata["genemap"].get("calibrated"):
                self._show(layer, None)

    def _request_field(self, layer) -> None:
        info = layer.metadata["genemap"]
        gene, counts = info["gene"], self.session.counts()
        if counts is None or gene not in counts.var_names:
            self.status.setText(f"{gene}: not measured on this slide, so its map cannot be calibrated")
            return
        key = (info["cache"], info["slide"], gene)
        if key in self._fields:
            self._show(layer, self._fields[key])
            return
        slide = self.session.slide
        self.status.setText(
            f"calibrating {gene}: integrating its map over the {counts.n_obs} measured spots (their tiles are "
            "predicted first)…"
        )
        self.session.aggregate(
            measured_circles(slide), lambda table, error: self._on_integrals(key, slide, table, error)
        )

    def _on_integrals(self, key: tuple[str, str, str], slide, table, error: str | None) -> None:
        cache_path, slide_key, gene = key
        if error is not None or table is None:
            self.status.setText(f"{gene}: calibration failed: {error or 'no spot was integrated'}")
            return
        try:
            field = field_for(slide, gene, table)
        except GenemapInputError as problem:
            self.status.setText(f"{gene}: {problem}")
            return
        self._fields[key] = field
        if not self.calibrate_box.isChecked():
            return
        for layer in self.gene_layers(gene, slide_key):
            if layer.metadata["genemap"]["cache"] == cache_path:
                self._show(layer, field)
        left_out = f"; {field.left_out} left out (the map gives them nothing)" if field.left_out else ""
        self.status.setText(f"{gene}: calibrated to {field.spots} measured spots{left_out}")

    def _show(self, layer, field) -> None:
        """Swap a gene layer's data for its calibrated map (``field``) or its map (None)."""
        cache = self.session.cache
        info = layer.metadata["genemap"]
        if cache is None or info["cache"] != str(cache.path):
            return
        data, units = calibrated_map(cache, info["gene"], self.session.slide, field)
        layer.data = data
        info["units"], info["calibrated"] = units, field is not None
        self._on_active_changed()  # the canvas's units; the contrast follows once napari has re-sliced

    def _set_interpolation(self, smooth: bool) -> None:
        for layer in self.gene_layers():
            layer.interpolation2d = "linear" if smooth else "nearest"

    def _follow_view(self, layer) -> None:
        self.contrast.follow_view(layer, *self.view_box(layer))

    # --- what the canvas says ----------------------------------------------------------------------------
    def _on_active_changed(self, *_) -> None:
        active = self.active_gene_layer()
        for layer in self.gene_layers():
            # one colour bar (several would overlap); ==, not `is`: napari hands plugins proxies of its layers
            layer.colorbar.visible = layer == active
        overlay = self.viewer.canvas.overlays.text
        if active is not None:
            info = active.metadata["genemap"]
            # two short lines: one long line was clipped on a 1400 px window's canvas
            overlay.text = self._overlay_text = f"{info['gene']} ({info['model']})\ncolour bar: {info['units']}"
            overlay.visible = True
        elif overlay.text == self._overlay_text:  # ours, and nothing left to explain
            overlay.visible = False
        self._update_legend()
        self._view_changed()

    def _update_legend(self) -> None:
        ready = self.session.cache is not None and self.session.slide is not None
        active = self.active_gene_layer()
        calibrated = active is not None and active.metadata["genemap"].get("calibrated", False)
        self.legend.setText(map_legend(self.session.cache, self.session.slide, calibrated) if ready else "")


def _forget_thumbnail_level(layer) -> None:
    """napari (0.9) keeps the coarsest level of a 2-D pyramid in memory once read; ours fills in as tiles
    arrive, so the kept copy must go (no public API does only this; setting ``data`` would reset more)."""
    materializer = getattr(layer, "_level_materializer", None)
    if materializer is not None and hasattr(materializer, "cache_clear"):
        materializer.cache_clear()
