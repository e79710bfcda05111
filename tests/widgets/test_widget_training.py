"""The Training panel: its Qt-free parts (stages, configs, JSON-line progress) and the widget running real
`genemap train` subprocesses in a napari viewer (under Xvfb)."""

from __future__ import annotations

import json
import math
import shutil
import time

import numpy as np
import pytest

from napari_genemap.errors import GenemapInputError
from napari_genemap.sample import SECTION, sample_root
from napari_genemap.train.stages import PIXNET, STAGES, TrainingHistory, check_output, stage_named


def test_history_reads_json_lines_in_any_pieces():
    history = TrainingHistory()
    step = {"event": "step", "total": 9, "step": 4, "loss": 1.25, "validation": {"A": 0.2, "B": math.nan}}
    text = json.dumps(step) + "\nnot json\n" + json.dumps({**step, "step": 5, "loss": 1.0, "saved": True}) + "\n"
    cut = len(text) // 2 + 3  # through the middle of a line
    assert [e["step"] for e in history.feed(text[:cut])] == [4]
    assert [e["step"] for e in history.feed(text[cut:])] == [5]
    assert history.steps == [4, 5] and history.losses == [1.25, 1.0] and history.total == 9
    assert history.validation_steps == [4, 5] and history.validation == [0.2, 0.2]  # NaN slides omitted
    assert history.saved_steps == [5] and history.other == ["not json"]
    assert history.feed('{"event": "done", "checkpoint": "/x", "cancelled": true}') == []  # no newline yet
    assert history.done is None
    [done] = history.finish()
    assert history.done == done == {"event": "done", "checkpoint": "/x", "cancelled": True}


def test_the_pixnet_stage_builds_a_config_the_trainer_reads(tmp_path, her2st):
    from napari_genemap.train.config import TrainConfig

    assert stage_named("pixnet") is PIXNET and STAGES[0] is PIXNET
    slides = [{"path": str(sample_root()), "section": SECTION}, {"path": str(her2st), "section": "C2"}]
    config = PIXNET.config(slides, ["C2"], {"steps": 7, "lr": "0.002", "weights": "random"}, str(tmp_path / "o"))
    parsed = TrainConfig.from_dict(config)
    assert parsed.steps == 7 and parsed.lr == 0.002 and parsed.weights == "random" and parsed.window == 256
    assert parsed.validation == ["C2"] and parsed.out == str(tmp_path / "o") and parsed.slides == slides
    argv = PIXNET.command_line(tmp_path / "c.json", resume=tmp_path / "o")
    assert argv[1:] == [
        "-m", "napari_genemap.cli", "train", "pixnet", "--config", str(tmp_path / "c.json"), "--jsonl",
        "--resume", str(tmp_path / "o"),
    ]  # fmt: skip
    bad = [
        ({"window": 100}, "window 100: expected a multiple of 32"),
        ({"lr": "fast"}, "learning rate: 'fast' is not a float"),
        ({"steps": 0}, "steps: 0; expected at least 1"),
        ({"weights": "mine"}, "encoder start: 'mine'; expected one of imagenet, random"),
    ]
    for settings, message in bad:
        with pytest.raises(GenemapInputError, match=message):
            PIXNET.config(slides, [], settings, str(tmp_path / "o"))
    with pytest.raises(GenemapInputError, match="every slide is a validation slide"):
        PIXNET.config(slides[:1], [SECTION], {}, str(tmp_path / "o"))
    with pytest.raises(GenemapInputError, match="HER2ST folder needs a section .*C2.*got 'Z9'"):
        PIXNET.config([{"path": str(her2st), "section": "Z9"}], [], {}, str(tmp_path / "o"))
    with pytest.raises(GenemapInputError, match="slide 'B4_crop' is listed twice"):
        PIXNET.config(slides[:1] * 2, [], {}, str(tmp_path / "o"))
    with pytest.raises(GenemapInputError, match="choose an output folder"):
        PIXNET.config(slides, [], {}, " ")


def test_output_folder_rules(tmp_path):
    from napari_genemap.data.protocols import hist2st
    from napari_genemap.models.checkpoint import save_checkpoint
    from napari_genemap.models.encoders import EncoderConfig
    from napari_genemap.models.pixnet import PixNet, PixNetConfig

    assert check_output(tmp_path / "new", 10) == 0
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(GenemapInputError, match="full: exists and is not empty"):
        check_output(tmp_path / "full", 10)
    with pytest.raises(GenemapInputError, match="no such checkpoint"):
        check_output(tmp_path / "new", 10, resume=True)
    model = PixNet(PixNetConfig(n_genes=785, encoder=EncoderConfig(weights="random"), stride=8))
    save_checkpoint(tmp_path / "ck", model, protocol=hist2st(), mpp=4.0, window=64, metrics={"step": 6})
    with pytest.raises(GenemapInputError, match="holds a checkpoint already; resume it"):
        check_output(tmp_path / "ck", 10)
    assert check_output(tmp_path / "ck", 10, resume=True) == 6
    with pytest.raises(GenemapInputError, match="at step 6 of 6; raise 'steps'"):
        check_output(tmp_path / "ck", 6, resume=True)


def _tiny(widget, out, steps=200):
    """Settings that make steps quick on 2 CPU cores (and a long schedule, so a run is still going)."""
    for name, value in {
        "steps": steps, "batch": 2, "window": 64, "mpp": 4.0, "lr": 1e-3, "eval_every": 2, "weights": "random",
        "device": "cpu",
    }.items():  # fmt: skip
        widget.set_setting(name, value)
    widget.out_edit.setText(str(out))


class _Ticks:
    """A 50 ms Qt timer's tick times: a long gap means the GUI thread was blocked."""

    def __init__(self):
        from qtpy.QtCore import QTimer

        self.times = [time.perf_counter()]
        self.timer = QTimer()
        self.timer.timeout.connect(lambda: self.times.append(time.perf_counter()))
        self.timer.start(50)

    def longest_gap(self) -> float:
        self.timer.stop()
        return float(np.diff(self.times).max())


def _renamed_section(folder, name):
    """The sample's files under another section name: a second, small slide (here only for the plumbing of
    validation; a real run validates on another section, e.g. ../shared/data/her2st C2)."""
    for old in folder.rglob(f"{SECTION}*"):
        old.rename(old.with_name(old.name.replace(SECTION, name)))
    return folder


@pytest.mark.slow
@pytest.mark.gui
def test_starting_cancelling_and_resuming_a_short_training_run(make_napari_viewer, qtbot, tmp_path, sample_copy):
    from napari_genemap.models.checkpoint import load_checkpoint
    from napari_genemap.widgets.session import session_for
    from napari_genemap.widgets.training import TrainingWidget

    viewer = make_napari_viewer(show=True)
    widget = TrainingWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Training")
    offered = []
    session_for(viewer).checkpoint_offered.connect(offered.append)
    assert widget.stage_box.count() == len(STAGES) and widget.stage_box.currentText() == "PixNet"
    assert widget.add_sample() and widget.add_slide(str(_renamed_section(sample_copy, "V1")), "V1")
    widget.set_validation("V1")
    out = tmp_path / "run"
    _tiny(widget, out)
    assert not widget.resume_button.isEnabled()  # nothing to resume yet

    ticks = _Ticks()
    assert widget.start() and widget.running and not widget.start_button.isEnabled()
    qtbot.waitUntil(lambda: len(widget.history.validation) >= 1, timeout=120_000)
    history = widget.history
    assert history.total == 200 and history.steps == list(range(1, len(history.steps) + 1))
    assert np.isfinite(history.losses).all() and min(history.losses) > 0
    assert -1 <= history.validation[0] <= 1 and history.validation_steps[0] == 2 and history.saved_steps[0] == 2
    qtbot.waitUntil(lambda: widget.progress_bar.value() == widget.history.step, timeout=5_000)
    assert widget.progress_bar.maximum() == 200 and widget.progress_bar.value() >= 2
    qtbot.waitUntil(lambda: len(widget.loss_line.get_xdata()) >= 2, timeout=5_000)  # the plot redraws
    np.testing.assert_allclose(widget.validation_line.get_ydata()[:1], history.validation[:1])

    with qtbot.waitSignal(widget.run_finished, timeout=60_000) as finished:
        widget.cancel()
    assert ticks.longest_gap() < 2.0  # the GUI kept running through the whole run
    done = finished.args[0]
    assert done["cancelled"] and done["checkpoint"] == str(out) and 2 <= done["steps"] < 200
    assert not widget.running and widget.start_button.isEnabled() and widget.resume_button.isEnabled()
    saved = widget.history.saved_steps[-1]
    loaded = load_checkpoint(out)
    assert loaded.metrics["step"] == saved and list(loaded.metrics["validation_pcc_mean"]) == ["V1"]
    assert loaded.genes and loaded.mpp == 4.0 and loaded.window == 64
    assert offered == [str(out)]
    assert "cancelled" in widget.status.text() and str(out) in widget.status.text()

    # Start again into the same folder is refused (it would replace the checkpoint); Resume continues it
    assert not widget.start() and "holds a checkpoint already" in widget.status.text() and not widget.running
    assert widget.resume()
    qtbot.waitUntil(lambda: len(widget.history.steps) >= 1, timeout=120_000)
    assert widget.history.steps[0] == saved + 1
    with qtbot.waitSignal(widget.run_finished, timeout=60_000) as finished:
        widget.cancel()
    assert finished.args[0]["cancelled"] and finished.args[0]["checkpoint"] == str(out)
    assert load_checkpoint(out).metrics["step"] >= saved and offered == [str(out), str(out)]


@pytest.mark.gui
def test_bad_settings_show_one_line_and_start_no_process(make_napari_viewer, qtbot, tmp_path, sample_copy):
    from napari_genemap.widgets.training import TrainingWidget

    viewer = make_napari_viewer(show=True)
    widget = TrainingWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Training")
    missing = tmp_path / "nowhere"
    assert not widget.add_slide(str(missing), "B4")
    assert widget.status.text() == f"{missing}: no such file or folder" and widget.slides == []
    _tiny(widget, tmp_path / "run")
    assert not widget.start() and widget.status.text() == "add at least one training slide with measured spots"

    assert widget.add_slide(str(sample_copy))  # one section there: it is taken
    assert widget.slides == [{"path": str(sample_copy), "section": SECTION}]
    shutil.rmtree(sample_copy)  # gone before Start
    assert not widget.start()
    assert widget.status.text() == f"{sample_copy}: no such file or folder" and "\n" not in widget.status.text()
    widget.remove_slide(0)
    assert widget.add_sample()
    widget.set_setting("lr", "fast")
    assert not widget.start() and widget.status.text() == "learning rate: 'fast' is not a float"
    assert widget.process is None and not widget.running and widget.start_button.isEnabled()


@pytest.mark.gui
def test_a_run_that_fails_shows_its_last_error_line(make_napari_viewer, qtbot, tmp_path, shared_data):
    from napari_genemap.widgets.training import TrainingWidget

    viewer = make_napari_viewer(show=True)
    widget = TrainingWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Training")
    assert widget.add_slide(str(shared_data / "visium_mouse_brain"))  # mouse genes: not the protocol's
    _tiny(widget, tmp_path / "run", steps=4)
    with qtbot.waitSignal(widget.run_finished, timeout=60_000) as finished:
        assert widget.start()
    assert finished.args[0] is None and not widget.running
    assert widget.status.text().startswith("genemap: error: protocol 'hist2st': 785 of its 785 genes are missing")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.gui
def test_diffbulk_stages_run_from_the_panel_stage1_with_its_preview_stage2_offered(
    make_napari_viewer, qtbot, tmp_path, shared_data
):
    """Stage 1 from the panel: progress, the validation loss on the second axis, the generated grid shown;
    cancelled, then resumed from its step; its checkpoint is never offered as a gene-map model. Then stage 2
    on it: its finished dense checkpoint is offered to Slide & model."""
    from napari_genemap.widgets.session import session_for
    from napari_genemap.widgets.training import TrainingWidget

    viewer = make_napari_viewer(show=True)
    widget = TrainingWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Training")
    offered = []
    session_for(viewer).checkpoint_offered.connect(offered.append)
    widget.stage_box.setCurrentText("DiffBulk stage 1 (diffusion)")
    assert widget._axes[1].get_ylabel().startswith("validation loss")
    assert widget.add_sample()
    out = tmp_path / "stage1"
    taef2 = shared_data.parent / "weights" / "taef2"  # its latents: validation and previews in seconds
    if not (taef2 / "taef2_encoder.pth").is_file():
        pytest.skip(f"needs the TAEF2 weights in {taef2}")
    settings = {"steps": 50, "batch_size": 2, "eval_every": 2, "preview_every": 2, "taef2": str(taef2)}
    for name, value in {**settings, "device": "cpu"}.items():
        widget.set_setting(name, value)
    widget.out_edit.setText(str(out))
    assert widget.start() and widget.running
    qtbot.waitUntil(lambda: bool(widget.history.previews) and not widget.preview.isHidden(), timeout=240_000)
    history = widget.history
    assert history.validation and np.isfinite(history.validation).all() and min(history.validation) > 0
    assert not widget.preview.pixmap().isNull() and widget.preview.toolTip() == history.previews[-1]
    assert "validation loss" in widget.status.text()

    with qtbot.waitSignal(widget.run_finished, timeout=120_000) as finished:
        widget.cancel()
    done = finished.args[0]
    assert done["cancelled"] and done["checkpoint"]
    saved = history.saved_steps[-1]
    assert offered == []  # a diffusion model draws tiles; Slide & model takes gene-map models only
    assert "cancelled" in widget.status.text() and widget.resume_button.isEnabled()

    assert widget.resume()  # the panel reads stage 1's own checkpoint to find its step
    qtbot.waitUntil(lambda: len(widget.history.steps) >= 1, timeout=120_000)
    assert widget.history.steps[0] == saved + 1
    with qtbot.waitSignal(widget.run_finished, timeout=120_000):
        widget.cancel()
    assert offered == []

    # stage 2 on that stage 1 (its 112 µm tiles are 56 px at 2 µm/px: windows of 224 px), from ImageNet
    widget.stage_box.setCurrentText("DiffBulk stage 2 (fusion)")
    assert widget._axes[1].get_ylabel().startswith("validation PCC")
    dense = tmp_path / "stage2"
    settings = {"stage1": str(out), "steps": 2, "batch": 1, "window": 224, "eval_every": 2, "device": "cpu"}
    for name, value in settings.items():
        widget.set_setting(name, value)
    widget.out_edit.setText(str(dense))
    with qtbot.waitSignal(widget.run_finished, timeout=300_000) as finished:
        assert widget.start()
    assert finished.args[0]["checkpoint"] == str(dense) and widget.history.steps == [1, 2]
    assert offered == [str(dense)]  # a dense stage-2 model is a gene-map model: Slide & model may take it
