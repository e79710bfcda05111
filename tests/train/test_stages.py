"""A training stage and model class registered from outside the package (as DiffBulk's will be) show up in
``genemap train``, in the Training panel and in `load_checkpoint`, with no edit to any of them."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from napari_genemap.data.protocols import Protocol
from napari_genemap.errors import GenemapInputError
from napari_genemap.models import registry
from napari_genemap.models.checkpoint import load_checkpoint, read_checkpoint_config, save_checkpoint
from napari_genemap.train import stages
from napari_genemap.train.stages import Setting, TrainingStage, register_stage


@dataclass(frozen=True)
class TinyArchitecture:
    """What a checkpoint records to rebuild a `TinyNet`."""

    n_genes: int
    stride: int = 4

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TinyArchitecture:
        return cls(**data)


class TinyNet(nn.Module):
    """A real, minimal gene-map model: one strided convolution to a non-negative density."""

    config_class = TinyArchitecture

    def __init__(self, config: TinyArchitecture):
        super().__init__()
        self.config = config
        self.head = nn.Conv2d(3, config.n_genes, config.stride, stride=config.stride)

    @classmethod
    def from_config(cls, config: TinyArchitecture) -> TinyNet:
        return cls(config)

    @property
    def stride(self) -> int:
        return self.config.stride

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.head(image))


@dataclass
class TinyTrainConfig:
    out: str
    steps: int = 3
    genes: int = 2

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TinyTrainConfig:
        return cls(**json.loads(Path(path).read_text()))


def _protocol(n: int) -> Protocol:
    return Protocol("tiny", tuple(f"g{i}" for i in range(n)), target_sum=1e4, log="ln")


def train_tiny(config: TinyTrainConfig, *, progress=None, on_metrics=None, cancel=None) -> dict:
    """A stand-in run: reports its steps, then saves an untrained `TinyNet`."""
    for step in range(1, config.steps + 1):
        on_metrics({"step": step, "loss": 1.0 / step})
    save_checkpoint(
        config.out, TinyNet(TinyArchitecture(config.genes)), protocol=_protocol(config.genes), mpp=4.0, window=64
    )
    return {
        "checkpoint": config.out,
        "best_validation": None,
        "steps": config.steps,
        "cancelled": False,
        "seconds": 0.0,
    }


def _tiny_config(slides, validation, settings, out):
    return {"out": out, **settings}


TINY = TrainingStage(
    command="tiny",
    label="Tiny",
    description="a test-only stage",
    settings=(Setting("steps", "steps", 3, minimum=1), Setting("genes", "genes", 2, minimum=1)),
    build=_tiny_config,
    run=f"{__name__}:train_tiny",
    config_class=f"{__name__}:TinyTrainConfig",
    model_class="TinyNet",
)


@pytest.fixture
def tiny_registered(monkeypatch):
    """TinyNet and the Tiny stage registered for one test, and gone after it."""
    monkeypatch.setitem(registry.MODELS, "TinyNet", f"{TinyNet.__module__}:{TinyNet.__qualname__}")
    before = list(stages.STAGES)
    register_stage(TINY)
    yield TINY
    stages.STAGES[:] = before


def test_a_registered_stage_is_a_genemap_train_choice_and_runs(tiny_registered, tmp_path, capsys):
    from napari_genemap.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    assert "{pixnet,diffbulk-stage1,diffbulk-stage2,diffst,tiny}" in capsys.readouterr().out
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"out": str(tmp_path / "ckpt"), "steps": 2, "genes": 3}))
    assert main(["train", "tiny", "--config", str(config), "--jsonl"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in events] == ["step", "step", "done"] and events[0]["total"] == 2
    assert read_checkpoint_config(tmp_path / "ckpt")["model_class"] == "TinyNet"
    assert isinstance(load_checkpoint(tmp_path / "ckpt").model, TinyNet)


def test_load_checkpoint_builds_the_registered_class_it_names(tiny_registered, tmp_path):
    model = TinyNet(TinyArchitecture(n_genes=3, stride=2))
    torch.nn.init.uniform_(model.head.weight)
    path = save_checkpoint(tmp_path / "ckpt", model, protocol=_protocol(3), mpp=4.0, window=64)
    assert read_checkpoint_config(path)["model_class"] == "TinyNet"
    loaded = load_checkpoint(path)
    assert type(loaded.model) is TinyNet and loaded.model.config == model.config and loaded.stride == 2
    image = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(image), model(image))


def test_checkpoints_without_a_model_class_are_pixnet_and_unknown_classes_fail(tiny_registered, tmp_path):
    from napari_genemap.checkpoints import shipped_checkpoint
    from napari_genemap.errors import GenemapInputError

    assert "model_class" not in read_checkpoint_config(shipped_checkpoint())  # read as PixNet
    path = save_checkpoint(tmp_path / "ckpt", TinyNet(TinyArchitecture(2)), protocol=_protocol(2), mpp=4.0, window=64)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_class": "Nope"}))
    with pytest.raises(GenemapInputError, match="model class 'Nope' is not registered"):
        load_checkpoint(path)


def test_stage_settings_take_their_defaults_from_the_train_config():
    from dataclasses import fields

    from napari_genemap.train.config import TrainConfig

    defaults = {f.name: f.default for f in fields(TrainConfig)}
    assert {s.name: s.default for s in stages.PIXNET.settings} == {
        s.name: defaults[s.name] for s in stages.PIXNET.settings
    }


@pytest.mark.gui
def test_a_registered_stage_is_offered_in_the_training_panel(tiny_registered, make_napari_viewer, qtbot):
    from napari_genemap.sample import SECTION, sample_root
    from napari_genemap.widgets.training import TrainingWidget

    viewer = make_napari_viewer()
    widget = TrainingWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Training")
    labels = [widget.stage_box.itemText(i) for i in range(widget.stage_box.count())]
    assert labels == [
        "PixNet",
        "DiffBulk stage 1 (diffusion)",
        "DiffBulk stage 2 (fusion)",
        "Diff-ST (super-resolution)",
        "Tiny",
    ]
    widget.stage_box.setCurrentIndex(labels.index("Tiny"))
    assert widget.stage is TINY and widget.settings() == {"steps": 3, "genes": 2}
    slides = [{"path": str(sample_root()), "section": SECTION}]
    assert widget.stage.config(slides, [], widget.settings(), "/tmp/x") == {"out": "/tmp/x", "steps": 3, "genes": 2}


def test_each_stage_reads_its_own_checkpoints_to_resume(tmp_path):
    """A stage-1 run keeps its checkpoint in ``out/checkpoint`` in its own format; the panel finds its step
    (torch-free) to resume it, and never offers it to Slide & model as a gene-map model."""
    from napari_genemap.models.diffbulk_format import CHECKPOINT_DIR, FORMAT

    stage1 = stages.stage_named("diffbulk-stage1")
    assert stages.PIXNET.makes_gene_maps and not stage1.makes_gene_maps
    run = tmp_path / "run"
    (run / CHECKPOINT_DIR).mkdir(parents=True)
    (run / CHECKPOINT_DIR / "model.safetensors").write_bytes(b"")
    config = {"format": FORMAT, "format_version": 1, "gene_encoder": {}, "edm": {}, "latent": {}}
    (run / CHECKPOINT_DIR / "config.json").write_text(json.dumps({**config, "metrics": {"step": 40}}))
    assert stages.check_output(run, 100, resume=True, read=stage1.read_checkpoint) == 40
    with pytest.raises(GenemapInputError, match="holds a checkpoint already"):
        stages.check_output(run, 100, read=stage1.read_checkpoint)
    with pytest.raises(GenemapInputError, match="field 'format'"):  # PixNet's reader refuses it in one line
        stages.check_output(run / CHECKPOINT_DIR, 100, resume=True)
