"""The Training dock widget: train a model on slides with measured spots, in a subprocess.

The run is a ``genemap train STAGE --config FILE --jsonl`` process started with `QProcess`, so training
never shares napari's process (torch stays out of it: importing triton after Mesa's GL context
segfaults) and the GUI never waits on it: its
JSON lines arrive as Qt signals. Cancel sends SIGTERM; the run stops after its current step and keeps its
last good checkpoint, which Resume continues. A finished run offers its checkpoint to the Slide & model
widget (`Session.checkpoint_offered`). The stages come from `napari_genemap.train.stages.STAGES`: the
stage box, the settings form and the command line are all built from it.
"""

from __future__ import annotations

import collections
import shutil
import tempfile
from pathlib import Path

from qtpy.QtCore import QProcess, Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..errors import GenemapInputError
from ..train.config import slide_name
from ..train.stages import (
    STAGES,
    Setting,
    TrainingHistory,
    TrainingStage,
    check_output,
    check_slides,
    checkpoint_step,
    her2st_sections,
    write_config,
)
from ._qt import scrolled_layout
from .session import session_for

NO_VALIDATION = "(none: keep the latest)"


class TrainingWidget(QWidget):
    """Choose slides, a stage and its settings; start, cancel and resume a run; watch its curves."""

    run_finished = Signal(object)  # the run's "done" event (dict), or None when it ended without one

    def __init__(self, napari_viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.slides: list[dict] = []  # {"path", "section"}, in the order shown
        self.history = TrainingHistory()
        self.process: QProcess | None = None
        self.last_checkpoint: Path | None = None  # the latest run's checkpoint folder
        self._stderr: collections.deque[str] = collections.deque(maxlen=50)
        self._config_dir: Path | None = None
        self._cancelled = False
        self._setting_widgets: dict[str, QComboBox | QSpinBox | QLineEdit] = {}

        layout = scrolled_layout(self)
        self.stage_box = QComboBox()
        for stage in STAGES:
            self.stage_box.addItem(stage.label, stage.command)
        row = QHBoxLayout()
        row.addWidget(QLabel("model"))
        row.addWidget(self.stage_box, 1)
        layout.addLayout(row)
        layout.addWidget(self._slides_group())
        self.settings_group = QGroupBox("settings")
        self.settings_form = QFormLayout(self.settings_group)
        layout.addWidget(self.settings_group)

        self.out_edit = QLineEdit()
        self.out_edit.setPlaceholderText("folder for the checkpoint (new or empty)")
        browse = QPushButton("…")
        browse.setToolTip("choose the output folder")
        browse.clicked.connect(self._browse_out)
        row = QHBoxLayout()
        row.addWidget(QLabel("output"))
        row.addWidget(self.out_edit, 1)
        row.addWidget(browse)
        layout.addLayout(row)

        self.start_button = QPushButton("Start")
        self.cancel_button = QPushButton("Cancel")
        self.resume_button = QPushButton("Resume")
        self.resume_button.setToolTip("continue the checkpoint in the output folder up to 'steps'")
        row = QHBoxLayout()
        for button in (self.start_button, self.cancel_button, self.resume_button):
            row.addWidget(button)
        layout.addLayout(row)
        self.progress_bar = QProgressBar()
        self.progress_bar.setFormat("step %v / %m")
        layout.addWidget(self.progress_bar)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        self._build_plot(layout)

        self.start_button.clicked.connect(lambda: self.start())
        self.cancel_button.clicked.connect(self.cancel)
        self.resume_button.clicked.connect(lambda: self.resume())
        self.stage_box.currentIndexChanged.connect(lambda _: self._stage_changed())
        self.out_edit.textChanged.connect(lambda _: self._update_buttons())
        self._redraw_timer = QTimer(self)  # curves redraw at most 4 times a second, however fast steps come
        self._redraw_timer.setSingleShot(True)
        self._redraw_timer.setInterval(250)
        self._redraw_timer.timeout.connect(self._redraw)
        self._build_settings()
        self._update_buttons()

    # --- building ----------------------------------------------------------------------------------------
    def _slides_group(self) -> QGroupBox:
        group = QGroupBox("training slides (with measured spots)")
        layout = QVBoxLayout(group)
        self.path_edit = QLineEdit()
        self.path_edit.setPlaceholderText("slide file or folder")
        self.path_edit.editingFinished.connect(self._fill_sections)
        browse_folder = QPushButton("folder…")
        browse_folder.clicked.connect(lambda: self._browse_slide(folder=True))
        browse_file = QPushButton("file…")
        browse_file.clicked.connect(lambda: self._browse_slide(folder=False))
        row = QHBoxLayout()
        row.addWidget(self.path_edit, 1)
        row.addWidget(browse_folder)
        row.addWidget(browse_file)
        layout.addLayout(row)
        self.section_box = QComboBox()
        self.section_box.setEditable(True)
        self.section_box.setToolTip("section, for a HER2ST folder")
        add = QPushButton("Add")
        add.clicked.connect(lambda: self.add_slide(self.path_edit.text(), self.section_box.currentText() or None))
        sample = QPushButton("Add sample")
        sample.setToolTip("the bundled HER2ST B4 crop (49 spots)")
        sample.clicked.connect(self.add_sample)
        row = QHBoxLayout()
        row.addWidget(QLabel("section"))
        row.addWidget(self.section_box, 1)
        row.addWidget(add)
        row.addWidget(sample)
        layout.addLayout(row)
        self.slide_list = QListWidget()
        self.slide_list.setMaximumHeight(90)
        layout.addWidget(self.slide_list)
        remove = QPushButton("Remove")
        remove.clicked.connect(lambda: self.remove_slide(self.slide_list.currentRow()))
        self.validation_box = QComboBox()
        self.validation_box.setToolTip("held out: never trained on, picks the best checkpoint")
        row = QHBoxLayout()
        row.addWidget(QLabel("validation"))
        row.addWidget(self.validation_box, 1)
        row.addWidget(remove)
        layout.addLayout(row)
        self._update_validation()
        return group

    def _build_plot(self, layout: QVBoxLayout) -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, 2.4), layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(180)
        axes = self.figure.add_subplot()
        axes.set_xlabel("step", fontsize=8)
        axes.set_ylabel("loss", fontsize=8, color="tab:blue")
        axes.tick_params(labelsize=7)
        other = axes.twinx()
        other.set_ylabel("validation PCC", fontsize=8, color="tab:orange")
        other.tick_params(labelsize=7)
        (self.loss_line,) = axes.plot([], [], color="tab:blue", linewidth=1)
        (self.validation_line,) = other.plot([], [], "o-", color="tab:orange", markersize=3)
        self._axes = (axes, other)
        layout.addWidget(self.canvas, 1)
        self.preview = QLabel()  # the latest image a run wrote (stage 1: tiles generated for a spot's profile)
        self.preview.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.preview.setVisible(False)
        layout.addWidget(self.preview)

    def _stage_changed(self) -> None:
        self._build_settings()
        self._update_buttons()  # Resume: the output folder may hold this stage's checkpoint, not the last one's

    def _build_settings(self) -> None:
        self._axes[1].set_ylabel(self.stage.validation_label, fontsize=8, color="tab:orange")
        self.canvas.draw_idle()
        while self.settings_form.rowCount():
            self.settings_form.removeRow(0)
        self._setting_widgets = {}
        for setting in self.stage.settings:
            widget = _setting_widget(setting)
            widget.setToolTip(setting.tip)
            self._setting_widgets[setting.name] = widget
            self.settings_form.addRow(setting.label, widget)
        self.settings_group.setToolTip(self.stage.description)

    # --- choices -----------------------------------------------------------------------------------------
    @property
    def stage(self) -> TrainingStage:
        return STAGES[max(self.stage_box.currentIndex(), 0)]

    def add_slide(self, path: str, section: str | None = None) -> bool:
        """Add a training slide; a one-line error in the status (and False) if it cannot train."""
        path = str(path).strip()
        if not path:
            return self.show_error("type or choose a slide first")
        folder = Path(path).expanduser()
        if section is None and folder.is_dir() and (folder / "images").is_dir():
            sections = her2st_sections(folder)
            section = sections[0] if len(sections) == 1 else None
        spec = {"path": str(folder.resolve()), "section": section or None}
        try:
            check_slides([*self.slides, spec], [])
        except GenemapInputError as error:
            return self.show_error(str(error))
        self.slides.append(spec)
        self.slide_list.addItem(f"{slide_name(spec)}  ({spec['path']})")
        self._update_validation()
        self.show_message(f"{len(self.slides)} slide(s)")
        return True

    def add_sample(self) -> bool:
        from ..sample import SECTION, sample_root

        return self.add_slide(str(sample_root()), SECTION)

    def remove_slide(self, index: int) -> None:
        if 0 <= index < len(self.slides):
            del self.slides[index]
            self.slide_list.takeItem(index)
            self._update_validation()

    def set_validation(self, name: str | None) -> None:
        """Hold out the named slide (None: no validation; the latest checkpoint is kept)."""
        index = self.validation_box.findText(name or NO_VALIDATION)
        if index < 0:
            raise GenemapInputError(f"validation slide {name!r} is not among the slides")
        self.validation_box.setCurrentIndex(index)

    @property
    def validation(self) -> list[str]:
        name = self.validation_box.currentText()
        return [] if name in ("", NO_VALIDATION) else [name]

    def settings(self) -> dict:
        """The stage's settings as the form holds them (checked when a run starts)."""
        values: dict[str, int | str] = {}
        for name, widget in self._setting_widgets.items():
            if isinstance(widget, QSpinBox):
                values[name] = widget.value()
            elif isinstance(widget, QComboBox):
                values[name] = widget.currentText()
            else:
                values[name] = widget.text().strip()
        return values

    def set_setting(self, name: str, value) -> None:
        widget = self._setting_widgets[name]
        if isinstance(widget, QSpinBox):
            widget.setValue(int(value))
        elif isinstance(widget, QComboBox):
            widget.setCurrentText(str(value))
        else:
            widget.setText(str(value))

    # --- running -----------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.process is not None

    def start(self, resume: bool = False) -> bool:
        """Start a run (or continue the checkpoint in the output folder); False with a one-line error when
        a choice is bad, and then no process starts."""
        if self.running:
            return self.show_error("a run is going; cancel it first")
        stage = self.stage
        try:
            config = stage.config(self.slides, self.validation, self.settings(), self.out_edit.text())
            first = check_output(config["out"], config["steps"], resume=resume, read=stage.read_checkpoint)
        except GenemapInputError as error:
            return self.show_error(str(error))
        self._config_dir = Path(tempfile.mkdtemp(prefix="genemap-train-"))
        argv = stage.command_line(write_config(config, self._config_dir), config["out"] if resume else None)
        self.history = TrainingHistory(total=config["steps"])
        self.preview.clear()
        self.preview.setToolTip("")
        self.preview.setVisible(False)
        self._stderr.clear()
        self._cancelled = False
        self.progress_bar.setRange(0, config["steps"])
        self.progress_bar.setValue(first)
        self._redraw()
        process = QProcess(self)
        process.setProgram(argv[0])
        process.setArguments(argv[1:])
        process.readyReadStandardOutput.connect(self._read_stdout)
        process.readyReadStandardError.connect(self._read_stderr)
        process.finished.connect(self._finished)
        process.errorOccurred.connect(self._process_error)
        self.process = process
        verb = f"resuming {stage.label} from step {first}" if resume else f"starting {stage.label}"
        self.show_message(f"{verb}: reading slides…")
        process.start()
        self._update_buttons()
        return True

    def resume(self) -> bool:
        """Continue the checkpoint in the output folder (the last run's, unless changed) up to 'steps'."""
        return self.start(resume=True)

    def cancel(self) -> None:
        """Stop after the current step, keeping the last good checkpoint; a second call kills the run."""
        if self.process is None:
            return
        if self._cancelled:
            self.process.kill()
            return
        self._cancelled = True
        self.process.terminate()  # SIGTERM: `genemap train` stops after its step and keeps its checkpoint
        self.cancel_button.setText("Kill")
        self.show_message("cancelling after the current step…")

    def _read_stdout(self) -> None:
        if self.process is None:
            return
        # QByteArray converts with bytes() at runtime; the Qt stubs do not declare __bytes__
        text = bytes(self.process.readAllStandardOutput()).decode("utf-8", errors="replace")  # type: ignore[call-overload]
        self._show_events(self.history.feed(text))

    def _read_stderr(self) -> None:
        if self.process is None:
            return
        text = bytes(self.process.readAllStandardError()).decode("utf-8", errors="replace")  # type: ignore[call-overload]
        self._stderr.extend(line.rstrip() for line in text.splitlines() if line.strip())

    def _show_events(self, events: list[dict]) -> None:
        steps = [e for e in events if e.get("event") == "step"]
        if not steps:
            return
        history = self.history
        self.progress_bar.setMaximum(history.total)
        self.progress_bar.setValue(history.step)
        if not self._cancelled:
            what = self.stage.validation_label.split(" (")[0]
            validation = f"; {what} {history.validation[-1]:.3f}" if history.validation else ""
            saved = f"; checkpoint at step {history.saved_steps[-1]}" if history.saved_steps else ""
            self.show_message(
                f"step {history.step} / {history.total}: loss {history.losses[-1]:.4f}{validation}{saved}"
            )
        if history.previews and history.previews[-1] != self.preview.toolTip():
            self._show_preview(history.previews[-1])
        if not self._redraw_timer.isActive():
            self._redraw_timer.start()

    def _show_preview(self, path: str) -> None:
        """Show a run's latest preview image, as wide as the panel allows (nothing if it cannot be read)."""
        from qtpy.QtGui import QPixmap

        image = QPixmap(path)
        if image.isNull():
            return
        width = max(200, self.canvas.width())
        self.preview.setPixmap(image.scaledToWidth(width, Qt.TransformationMode.SmoothTransformation))
        self.preview.setToolTip(path)
        self.preview.setVisible(True)

    def _redraw(self) -> None:
        history = self.history
        self.loss_line.set_data(history.steps, history.losses)
        self.validation_line.set_data(history.validation_steps, history.validation)
        for axes in self._axes:
            axes.relim()
            axes.autoscale_view()
        self.canvas.draw_idle()

    def _finished(self, exit_code: int, exit_status) -> None:
        self._read_stdout()
        self._read_stderr()
        self._show_events(self.history.finish())
        self._redraw()
        process, self.process = self.process, None
        if process is not None:
            process.deleteLater()
        self._remove_config()
        done = self.history.done
        checkpoint = done.get("checkpoint") if done else None
        if checkpoint:
            assert done is not None  # the checkpoint came from it
            self.last_checkpoint = Path(checkpoint)
            step = self.history.saved_steps[-1] if self.history.saved_steps else "?"
            verb = "cancelled" if done.get("cancelled") else "finished"
            self.show_message(f"{verb} at step {self.history.step}; checkpoint (step {step}): {checkpoint}")
            if self.stage.offers(checkpoint):  # not stage 1's or a pooled stage 2's: they predict no maps
                session_for(self.viewer).checkpoint_offered.emit(str(checkpoint))
        elif self._cancelled:
            self.show_message("cancelled before the first checkpoint was saved")
        else:
            last = self._stderr[-1] if self._stderr else f"training stopped (exit code {exit_code})"
            self.show_error(last)
        self._update_buttons()
        self.run_finished.emit(done)

    def _process_error(self, error) -> None:
        if error == QProcess.ProcessError.FailedToStart and self.process is not None:
            self.process.deleteLater()
            self.process = None
            self._remove_config()
            self.show_error(f"could not start {self.stage.label} training: {error}")
            self._update_buttons()
            self.run_finished.emit(None)

    def _remove_config(self) -> None:
        if self._config_dir is not None:
            shutil.rmtree(self._config_dir, ignore_errors=True)
            self._config_dir = None

    # --- feedback ----------------------------------------------------------------------------------------
    def show_error(self, message: str) -> bool:
        """One line in the status, in the error colour; returns False so callers can return it."""
        self.status.setStyleSheet("color: #e05d5d")
        self.status.setText(" ".join(message.split()))
        return False

    def show_message(self, message: str) -> None:
        self.status.setStyleSheet("")
        self.status.setText(message)

    def _update_buttons(self) -> None:
        running = self.running
        self.start_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        if not running:
            self.cancel_button.setText("Cancel")
        out = self.out_edit.text().strip()
        resumable = bool(out) and checkpoint_step(Path(out).expanduser(), self.stage.read_checkpoint) is not None
        self.resume_button.setEnabled(not running and resumable)

    def _update_validation(self) -> None:
        current = self.validation_box.currentText()
        self.validation_box.clear()
        self.validation_box.addItems([NO_VALIDATION, *(slide_name(s) for s in self.slides)])
        index = self.validation_box.findText(current)
        self.validation_box.setCurrentIndex(max(index, 0))

    def _fill_sections(self) -> None:
        folder = Path(self.path_edit.text().strip()).expanduser()
        self.section_box.clear()
        if folder.is_dir() and (folder / "images").is_dir():
            self.section_box.addItems(her2st_sections(folder))

    def _browse_slide(self, folder: bool) -> None:
        if folder:
            path = QFileDialog.getExistingDirectory(self, "Slide folder (Visium, HER2ST, .zarr)")
        else:
            path, _ = QFileDialog.getOpenFileName(self, "Slide file")
        if path:
            self.path_edit.setText(path)
            self._fill_sections()

    def _browse_out(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Output folder for the checkpoint")
        if path:
            self.out_edit.setText(path)


def _setting_widget(setting: Setting) -> QComboBox | QSpinBox | QLineEdit:
    if setting.choices:
        box = QComboBox()
        box.addItems(setting.choices)
        box.setCurrentText(str(setting.default))
        return box
    if isinstance(setting.default, int):
        spin = QSpinBox()
        low = -(2**31) if setting.minimum is None else int(setting.minimum)
        high = 2**31 - 1 if setting.maximum is None else int(min(setting.maximum, 2**31 - 1))
        spin.setRange(low, high)
        spin.setValue(setting.default)
        return spin
    edit = QLineEdit(f"{setting.default:g}" if isinstance(setting.default, float) else str(setting.default))
    return edit
