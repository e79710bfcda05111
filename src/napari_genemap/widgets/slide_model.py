"""Slide & model dock widget: which slide the model runs on, which checkpoint, which device; the model card.

Slides come in through napari (File > Open, drag and drop, the sample: the plugin's reader) or the Open
button here; every H&E layer the reader made is offered, and a newly opened one becomes the active slide.
Only the active slide's layers are shown (slides open at the same place; the others' layers are hidden,
never removed). Choosing a slide or a model (re)starts the session's tile service, which loads the
checkpoint in its own process.
"""

from __future__ import annotations

from pathlib import Path

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QTextBrowser,
    QWidget,
)

from ..device import DEVICES
from ..errors import GenemapInputError
from ..layers import HE, show_only
from ..models.registry import DEFAULT_MODEL, describe
from ._qt import connect_session, scrolled_layout, wrapped_label


def he_layers(viewer) -> list:
    """The viewer's H&E layers that napari-genemap read (they carry their slide)."""
    return [
        layer
        for layer in viewer.layers
        if layer.metadata.get("genemap", {}).get("element") == HE and "sdata" in layer.metadata
    ]


def model_card_text(card: dict, folder: Path) -> str:
    """A short, plain summary of a checkpoint's config (and its README, when it ships one)."""
    protocol = card.get("protocol", {})
    training = card.get("provenance", {}).get("training", [])
    slides = ", ".join(str(s.get("section") or Path(s.get("path", "?")).name) for s in training) or "not recorded"
    metrics = {k: v for k, v in card.get("metrics", {}).items() if v is not None}
    lines = [
        f"Model: {folder.name} ({describe(card.get('model_class', DEFAULT_MODEL), card['architecture'])})",
        f"Genes: {len(card['genes'])} ({', '.join(card['genes'][:8])}, ...)",
        f"Protocol: {protocol.get('name', '?')} (what the profiles in tables mean)",
        f"Works at {card['mpp']} µm/px; trained on windows of {card['window']} px",
        f"Training data: {slides}",
        f"Metrics: {metrics or 'none recorded'}",
    ]
    readme = folder / "README.md"
    if readme.is_file():
        lines += ["", readme.read_text()]
    return "\n".join(lines)


class SlideModelWidget(QWidget):
    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.session = connect_session(napari_viewer)

        self.slides = QComboBox()
        self.open_button = QPushButton("Open slide…")
        self.slide_info = wrapped_label("no slide open")
        self.reading = QProgressBar()  # busy (no total): decoding a whole JPEG takes seconds
        self.reading.setRange(0, 0)
        self.reading.setVisible(False)
        self._reader = None
        self.checkpoint = QLineEdit(str(self.session.checkpoint))
        self.browse_button = QPushButton("…")
        self.use_button = QPushButton("Use model")
        self.device = QComboBox()
        self.device.addItems(DEVICES)
        self.tta = QCheckBox("Average 8 flips and rotations (8x slower)")
        self.tta.setToolTip("test-time augmentation: each window's map is the mean of its 8 dihedral views")
        self.status = wrapped_label("")
        self.active = wrapped_label("")
        self.offer = QPushButton("")
        self.offer.setVisible(False)
        self.card_button = QPushButton("Model card…")
        self.card_button.setCheckable(True)
        self.card = QTextBrowser()
        self.card.setVisible(False)
        self._known_slides: set[int] = set()  # H&E layers seen, to tell a newly opened slide

        checkpoint_row = QHBoxLayout()
        checkpoint_row.addWidget(self.checkpoint)
        checkpoint_row.addWidget(self.browse_button)
        form = QFormLayout()
        form.addRow("Slide", self.slides)
        form.addRow("", self.open_button)
        form.addRow("", self.slide_info)
        form.addRow("", self.reading)
        form.addRow("Checkpoint", checkpoint_row)
        form.addRow("Device", self.device)
        form.addRow("", self.tta)
        layout = scrolled_layout(self)  # as the Gene maps panel: a short dock scrolls rather than overlap
        layout.addLayout(form)
        for widget in (self.use_button, self.offer, self.active, self.status, self.card_button, self.card):
            layout.addWidget(widget)

        self.open_button.clicked.connect(self._open_dialog)
        self.browse_button.clicked.connect(self._browse_checkpoint)
        self.use_button.clicked.connect(self.apply_model)
        self.slides.currentIndexChanged.connect(self._slide_chosen)
        self.offer.clicked.connect(self._use_offered)
        self.card_button.toggled.connect(self.card.setVisible)
        self.viewer.layers.events.inserted.connect(self._refresh_slides)
        self.viewer.layers.events.removed.connect(self._refresh_slides)
        self.session.ready.connect(self._on_ready)
        self.session.error.connect(lambda message: self.status.setText(f"error: {message}"))
        self.session.checkpoint_offered.connect(self._offered)
        self._show_card()
        self._refresh_slides()

    # --- slides ------------------------------------------------------------------------------------------
    def _refresh_slides(self, *_) -> None:
        layers = he_layers(self.viewer)
        names = [layer.name for layer in layers]
        current = self.slides.currentText()
        self.slides.blockSignals(True)
        self.slides.clear()
        self.slides.addItems(names)
        self.slides.blockSignals(False)
        if not names:
            self.slide_info.setText("no slide open: File > Open, drag a slide here, or Open slide…")
            return
        # by the slide object: napari hands plugins a new proxy of a layer at every access
        new = [i for i, layer in enumerate(layers) if id(layer.metadata["sdata"]) not in self._known_slides]
        self._known_slides = {id(layer.metadata["sdata"]) for layer in layers}
        if new:  # the user just opened it: that is the slide they want to look at
            self.slides.setCurrentIndex(new[-1])
        else:
            self.slides.setCurrentIndex(names.index(current) if current in names else len(names) - 1)
        layer = layers[self.slides.currentIndex()]
        if self.session.slide is not layer.metadata["sdata"]:
            self.use_slide(layer)

    def _slide_chosen(self, index: int) -> None:
        layers = he_layers(self.viewer)
        if 0 <= index < len(layers) and self.session.slide is not layers[index].metadata["sdata"]:
            self.use_slide(layers[index])

    def use_slide(self, layer) -> None:
        """Run the model on the slide behind an H&E layer."""
        from ..io import image_levels, slide_mpp

        info = layer.metadata["genemap"]
        source = info["open"]
        sdata = layer.metadata["sdata"]
        levels, _ = image_levels(sdata)
        height, width = levels[0].shape[1:]
        mpp = slide_mpp(sdata)
        self.slide_info.setText(
            f"{width} x {height} px, {mpp:.4f} µm/px ({width * mpp / 1000:.2f} x {height * mpp / 1000:.2f} mm)"
        )
        self._show_only(sdata)
        self.active.setText(f"The model runs on: {layer.name}" + self._others_note())
        self.status.setText("starting the model…")
        self.session.set_slide(sdata, source)

    def _show_only(self, sdata) -> None:
        """Show the active slide's H&E and spots; hide the other slides' (they open at the same place)."""
        slide_layers = [layer for layer in self.viewer.layers if {"sdata", "genemap"} <= set(layer.metadata)]
        show_only(slide_layers, lambda layer: layer.metadata["sdata"] is sdata)

    def _others_note(self) -> str:
        others = len(he_layers(self.viewer)) - 1
        if not others:
            return ""
        return f" ({others} other slide{'s' if others > 1 else ''} open, hidden; choose above to switch)"

    def _open_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open a slide")
        if path:
            self.open_slide(path)

    def open_slide(self, path: str | Path) -> None:
        """Read a slide in a worker thread (a HER2ST JPEG takes ~12 s to decode) with a busy bar, then add
        its layers; the viewer stays responsive meanwhile. A bad file is reported in one line."""
        from napari.layers import Layer
        from napari.qt.threading import create_worker

        from ..plugin import read_layers

        def read() -> tuple[list[tuple] | None, str | None]:
            # errors come back as values: a worker's exception would reach the user as a traceback
            try:
                return read_layers(str(path)), None
            except GenemapInputError as error:
                return None, str(error)
            except Exception as error:
                return None, f"{Path(path).name}: {type(error).__name__}: {error}"

        def done(result: tuple[list[tuple] | None, str | None]) -> None:
            layer_data, error = result
            if error is not None:
                self.slide_info.setText(f"error: {error}")
                return
            assert layer_data is not None  # read() returns layers whenever it returns no error
            for data, meta, kind in layer_data:
                self.viewer.add_layer(Layer.create(data, meta, kind))

        self.reading.setVisible(True)
        self.slide_info.setText(f"reading {Path(path).name}…")
        self._reader = create_worker(read)
        self._reader.returned.connect(done)
        self._reader.finished.connect(lambda: self.reading.setVisible(False))
        self._reader.start()

    # --- model -------------------------------------------------------------------------------------------
    def _browse_checkpoint(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Checkpoint folder (model.safetensors + config.json)")
        if folder:
            self.checkpoint.setText(folder)
            self.apply_model()

    def apply_model(self) -> None:
        """Use the checkpoint and device shown; a bad checkpoint is reported in one line."""
        try:
            self.session.set_model(self.checkpoint.text().strip(), self.device.currentText(), self.tta.isChecked())
        except GenemapInputError as error:
            self.status.setText(f"error: {error}")
            return
        self.status.setText("starting the model…" if self.session.slide is not None else "model chosen")
        self._show_card()

    def _show_card(self) -> None:
        try:
            self.card.setPlainText(model_card_text(self.session.model_card(), Path(self.session.checkpoint)))
        except GenemapInputError as error:
            self.card.setPlainText(str(error))

    def _on_ready(self, cache) -> None:
        grid = cache.grid
        self.status.setText(
            f"model ready: {self.session.model_name}, {len(cache.genes)} genes ({self.session.backend})"
        )
        self.status.setToolTip(
            f"{grid.rows} x {grid.columns} tiles of {grid.tile} model px (+{grid.halo} px context); cache {cache.path}"
        )

    def _offered(self, path: str) -> None:
        self.offer.setText(f"Use the new checkpoint {Path(path).name}")
        self.offer.setToolTip(path)
        self.offer.setVisible(True)

    def _use_offered(self) -> None:
        self.checkpoint.setText(self.offer.toolTip())
        self.offer.setVisible(False)
        self.apply_model()
