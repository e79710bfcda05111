"""The training stages, in one place: what the panel offers, what ``genemap train`` runs, and their progress.

A training run happens in a ``genemap train STAGE --config FILE --jsonl`` subprocess. `TrainingStage`
describes one stage (its settings, how they become a config file and a command line, the function that
runs it and the model class it makes); `STAGES` lists them, and both the napari panel and the CLI are built
from that list, so a new stage is one `register_stage` call. Settings take their defaults from the stage's
config dataclass (`TrainConfig` for PixNet), never restated here.
`TrainingHistory` turns the subprocess's JSON lines (whole or in pieces) into the curves the panel plots.
Nothing here imports torch: the panel stays light and the run's errors come back on the process's stderr.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..device import DEVICES
from ..errors import GenemapInputError
from ..models.registry import INPUT_MULTIPLE, import_object
from .config import RAW_TERMS, TrainConfig, slide_name


@dataclass(frozen=True)
class Setting:
    """One user-facing setting of a stage: a name in the config file, a label and a default.

    ``choices`` makes it a pick-list; otherwise the default's type (int, float, str) says what it takes.
    """

    name: str
    label: str
    default: int | float | str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    tip: str = ""


def defaults_of(config_class: type) -> dict:
    """The defaults a config dataclass declares (fields without one are left out)."""
    return {f.name: f.default for f in fields(config_class) if f.default is not MISSING}


@dataclass(frozen=True)
class TrainingStage:
    """One model a panel can train: ``genemap train <command>`` with a config built from its settings.

    ``run`` and ``config_class`` are ``"package.module:name"`` paths, imported only when the stage runs:
    ``run(config_class.from_file(path), progress=, on_metrics=, cancel=)`` returns the run's summary.
    """

    command: str  # the `genemap train` subcommand
    label: str
    settings: tuple[Setting, ...]
    build: Callable[[list[dict], list[str], dict, str], dict]  # (slides, validation, settings, out) -> config
    run: str  # the training function, e.g. "napari_genemap.train.pixnet:train_pixnet"
    config_class: str  # the config dataclass with from_file, e.g. "napari_genemap.train.config:TrainConfig"
    model_class: str  # the registered model class its checkpoints hold (`napari_genemap.models.registry`)
    description: str = ""
    #: reads a checkpoint's config (torch-free, one-line errors); its ``metrics.step`` is where a run resumes
    read_checkpoint: str = "napari_genemap.models.checkpoint:read_checkpoint_config"
    #: what the run's validation number is (the panel's second axis): higher is better for a PCC, not a loss
    validation_label: str = "validation PCC"

    @property
    def makes_gene_maps(self) -> bool:
        """Whether its checkpoints are gene-map models (offered to Slide & model; not stage 1's)."""
        from ..models.registry import MODELS

        return self.model_class in MODELS

    def offers(self, checkpoint: str | os.PathLike) -> bool:
        """Whether a finished checkpoint is offered to Slide & model: a gene-map model's (a stage-1 diffusion
        model draws tiles; a pooled stage 2 gives one vector per spot-centred tile)."""
        from ..models.checkpoint import read_checkpoint_config
        from ..models.registry import DEFAULT_MODEL, GENE_MAP_MODELS

        if not self.makes_gene_maps:
            return False
        return read_checkpoint_config(checkpoint).get("model_class", DEFAULT_MODEL) in GENE_MAP_MODELS

    def defaults(self) -> dict:
        return {s.name: s.default for s in self.settings}

    def config(self, slides: list[dict], validation: list[str], settings: dict, out: str) -> dict:
        """The config file's content; a one-line `GenemapInputError` for a bad choice (checked here,
        without torch, so a bad setting never starts a process)."""
        check_slides(slides, validation)
        if not str(out).strip():
            raise GenemapInputError("choose an output folder for the checkpoint")
        values = {**self.defaults(), **settings}
        for setting in self.settings:
            values[setting.name] = _checked(setting, values[setting.name])
        return self.build(slides, validation, values, os.path.abspath(os.path.expanduser(out)))

    def command_line(self, config_path: str | os.PathLike, resume: str | os.PathLike | None = None) -> list[str]:
        """The run's argv: this Python (so it sees the same packages) running the stage with JSON lines."""
        argv = [sys.executable, "-m", "napari_genemap.cli", "train", self.command]
        argv += ["--config", os.fspath(config_path), "--jsonl"]
        return argv + (["--resume", os.fspath(resume)] if resume else [])


def _checked(setting: Setting, value):
    if setting.choices:
        if value not in setting.choices:
            raise GenemapInputError(f"{setting.label}: {value!r}; expected one of {', '.join(setting.choices)}")
        return value
    kind = type(setting.default)
    try:
        value = kind(value)
    except (TypeError, ValueError):
        raise GenemapInputError(f"{setting.label}: {value!r} is not a {kind.__name__}") from None
    if kind is float and not math.isfinite(value):
        raise GenemapInputError(f"{setting.label}: {value!r} is not a finite number")
    if setting.minimum is not None and value < setting.minimum:
        raise GenemapInputError(f"{setting.label}: {value}; expected at least {setting.minimum:g}")
    if setting.maximum is not None and value > setting.maximum:
        raise GenemapInputError(f"{setting.label}: {value}; expected at most {setting.maximum:g}")
    return value


def check_slides(slides: list[dict], validation: list[str]) -> None:
    """Cheap checks before a run: the slides exist, are readable formats, have distinct names, and some
    remain for training; reading them (spots, counts) is the run's job."""
    from ..io import detect_format

    if not slides:
        raise GenemapInputError("add at least one training slide with measured spots")
    names = []
    for spec in slides:
        path = Path(spec["path"])
        if not path.exists():
            raise GenemapInputError(f"{path}: no such file or folder")
        fmt = detect_format(path)
        if fmt is None:
            raise GenemapInputError(f"{path}: not a slide napari-genemap reads")
        if fmt == "image":
            raise GenemapInputError(f"{path}: an image without spatial transcriptomics; training needs spots")
        if fmt == "her2st" and path.is_dir():
            sections = her2st_sections(path)
            if spec.get("section") not in sections:
                raise GenemapInputError(
                    f"{path}: HER2ST folder needs a section (one of {', '.join(sections)}), got {spec.get('section')!r}"
                )
        names.append(slide_name(spec))
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise GenemapInputError(f"slide {duplicates[0]!r} is listed twice")
    for name in validation:
        if name not in names:
            raise GenemapInputError(f"validation slide {name!r} is not among the slides {sorted(names)}")
    if set(names) <= set(validation):
        raise GenemapInputError("every slide is a validation slide; nothing is left to train on")


def her2st_sections(folder: str | os.PathLike) -> list[str]:
    """The sections of a HER2ST-layout folder that have an image (what training can use)."""
    images = Path(folder) / "images"
    return sorted(p.name.split(".")[0] for p in images.iterdir() if not p.name.startswith("."))


def _pixnet_config(slides: list[dict], validation: list[str], settings: dict, out: str) -> dict:
    if settings["window"] % INPUT_MULTIPLE:
        raise GenemapInputError(f"window {settings['window']}: expected a multiple of {INPUT_MULTIPLE}")
    return {
        "slides": [{k: v for k, v in s.items() if v is not None} for s in slides],
        "validation": list(validation),
        "out": out,
        **settings,
    }


def _pixnet_setting(name: str, label: str, **options) -> Setting:
    """A PixNet setting whose default is `TrainConfig`'s (never restated here)."""
    return Setting(name, label, defaults_of(TrainConfig)[name], **options)


PIXNET = TrainingStage(
    command="pixnet",
    label="PixNet",
    description="dense gene maps from H&E, trained on measured spots",
    settings=(
        _pixnet_setting("steps", "steps", minimum=1, maximum=10**7, tip="optimiser steps in the whole schedule"),
        _pixnet_setting("batch", "batch", minimum=1, maximum=4096, tip="windows per step"),
        _pixnet_setting(
            "window",
            "window (px)",
            minimum=INPUT_MULTIPLE,
            maximum=4096,
            tip=f"training window side, multiple of {INPUT_MULTIPLE}",
        ),
        _pixnet_setting("lr", "learning rate", minimum=0.0, maximum=1.0),
        _pixnet_setting("mpp", "µm per pixel", minimum=0.05, maximum=100.0, tip="the scale the model works at"),
        _pixnet_setting("eval_every", "validate every", minimum=1, maximum=10**7, tip="steps between checkpoints"),
        _pixnet_setting("weights", "encoder start", choices=("imagenet", "random")),
        _pixnet_setting(
            "raw_loss", "count term", choices=RAW_TERMS, tip="raw-scale loss: log1p MSE, Poisson or negative binomial"
        ),
        _pixnet_setting(
            "gene_rank",
            "gene components",
            minimum=0,
            maximum=10**4,
            tip="0: one head per gene; k: genes as a mix of k principal components of the training counts",
        ),
        _pixnet_setting("device", "device", choices=DEVICES),
        _pixnet_setting("seed", "seed", minimum=0, maximum=2**31 - 1),
    ),
    build=_pixnet_config,
    run="napari_genemap.train.pixnet:train_pixnet",
    config_class="napari_genemap.train.config:TrainConfig",
    model_class="PixNet",
)

# The stages a training panel and `genemap train` offer, in order: `register_stage` adds one (DiffBulk's).
# A list changed in place, so every module that imported it sees a stage registered later.
STAGES: list[TrainingStage] = [PIXNET]


def register_stage(stage: TrainingStage) -> TrainingStage:
    """Offer ``stage`` in the panel and the CLI (replacing a stage with the same command)."""
    for index, known in enumerate(STAGES):
        if known.command == stage.command:
            STAGES[index] = stage
            return stage
    STAGES.append(stage)
    return stage


def stage_named(command: str) -> TrainingStage:
    for stage in STAGES:
        if stage.command == command:
            return stage
    raise GenemapInputError(f"no training stage {command!r}; expected one of {[s.command for s in STAGES]}")


def stage_runner(stage: TrainingStage) -> tuple[Any, Callable[..., dict]]:
    """The stage's config class and training function, imported now (torch comes with the function)."""
    return import_object(stage.config_class), import_object(stage.run)


def write_config(config: dict, folder: str | os.PathLike, name: str = "train") -> Path:
    """Write a config where the run reads it (JSON: every value here has a JSON form)."""
    path = Path(folder) / f"{name}.json"
    path.write_text(json.dumps(config, indent=1) + "\n")
    return path


def checkpoint_step(folder: str | os.PathLike, read: str = TrainingStage.read_checkpoint) -> int | None:
    """The step a checkpoint folder was saved at (None when there is none or it says none); ``read``: the
    stage's `TrainingStage.read_checkpoint`."""
    try:
        step = import_object(read)(folder).get("metrics", {}).get("step")
    except GenemapInputError:
        return None
    return step if isinstance(step, int) else None


def check_output(
    out: str | os.PathLike, steps: int, resume: bool = False, read: str = TrainingStage.read_checkpoint
) -> int:
    """Check the run's output folder; returns the step the run starts after (0, or the checkpoint's).

    A new run needs a new or empty folder: saving replaces the folder, so a checkpoint or other files in
    it would be lost. Resuming needs a checkpoint there that has steps left before ``steps``; ``read`` is
    how the stage reads its checkpoints (`TrainingStage.read_checkpoint`).
    """
    path = Path(out)
    if resume:
        import_object(read)(path)  # "no such checkpoint", "lacks model.safetensors", ...
        step = checkpoint_step(path, read)
        if step is None:
            raise GenemapInputError(f"{path}: checkpoint holds no step count; cannot resume it")
        if step >= steps:
            raise GenemapInputError(f"{path}: checkpoint is at step {step} of {steps}; raise 'steps' to train on")
        return step
    if checkpoint_step(path, read) is not None:
        raise GenemapInputError(f"{path}: holds a checkpoint already; resume it, or choose another output folder")
    if path.is_file() or (path.is_dir() and any(path.iterdir())):
        raise GenemapInputError(f"{path}: exists and is not empty; choose a new or empty output folder")
    return 0


@dataclass
class TrainingHistory:
    """Progress of one run, from its JSON lines: the loss per step, validation scores, the final summary."""

    total: int = 0
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    validation_steps: list[int] = field(default_factory=list)
    validation: list[float] = field(default_factory=list)  # mean PCC over the validation slides, or mean loss
    saved_steps: list[int] = field(default_factory=list)
    previews: list[str] = field(default_factory=list)  # images a run wrote to show its progress (stage 1's grids)
    done: dict | None = None  # the "done" event: checkpoint, best_validation, steps, cancelled, seconds
    other: list[str] = field(default_factory=list)  # lines that were not progress events (kept for errors)
    _pending: str = ""

    def feed(self, text: str) -> list[dict]:
        """Take output as it arrives (any piece of it); returns the events its complete lines held."""
        lines = (self._pending + text).split("\n")
        self._pending = lines.pop()
        return [event for line in lines if (event := self.add_line(line)) is not None]

    def finish(self) -> list[dict]:
        """The process ended: a last line without a newline counts too."""
        rest, self._pending = self._pending, ""
        event = self.add_line(rest)
        return [event] if event is not None else []

    def add_line(self, line: str) -> dict | None:
        line = line.strip()
        if not line:
            return None
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            event = None
        if not isinstance(event, dict) or "event" not in event:
            self.other.append(line)
            return None
        if event["event"] == "step":
            self.total = int(event.get("total", self.total))
            self.steps.append(int(event["step"]))
            self.losses.append(float(event["loss"]))
            # PixNet: PCC per validation slide; DiffBulk stage 1: the validation loss per noise band
            scores = event.get("validation") or event.get("validation_loss")
            if scores:
                self.validation_steps.append(int(event["step"]))
                self.validation.append(_nanmean(scores.values()))
            if event.get("preview"):
                self.previews.append(str(event["preview"]))
            if event.get("saved"):
                self.saved_steps.append(int(event["step"]))
        elif event["event"] == "done":
            self.done = event
        return event

    @property
    def step(self) -> int:
        return self.steps[-1] if self.steps else 0


def _nanmean(values) -> float:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(finite) / len(finite) if finite else math.nan


def _diffbulk_stage1_config(slides: list[dict], validation: list[str], settings: dict, out: str) -> dict:
    return {
        "slides": [{k: v for k, v in s.items() if v is not None} for s in slides],
        "validation": list(validation),
        "out": out,
        **{k: v for k, v in settings.items() if not (k == "taef2" and not str(v).strip())},
    }


def _stage1_setting(name: str, label: str, **options) -> Setting:
    """A DiffBulk stage-1 setting whose default is `DiffBulkStage1Config`'s (its module imports no torch)."""
    config_class = import_object("napari_genemap.train.diffbulk:DiffBulkStage1Config")
    return Setting(name, label, defaults_of(config_class)[name], **options)


register_stage(
    TrainingStage(
        command="diffbulk-stage1",
        label="DiffBulk stage 1 (diffusion)",
        description="a diffusion model that draws H&E tiles given their expression (DiffBulk's first stage)",
        settings=(
            _stage1_setting("steps", "steps", minimum=1, maximum=10**7, tip="optimiser steps in the whole run"),
            _stage1_setting("batch_size", "batch", minimum=1, maximum=4096, tip="tiles per step"),
            _stage1_setting("lr", "learning rate", minimum=0.0, maximum=1.0),
            _stage1_setting("tile_um", "tile (µm)", minimum=8.0, maximum=2000.0, tip="tile side, centred on spots"),
            _stage1_setting(
                "preset",
                "size",
                choices=import_object("napari_genemap.train.diffbulk:PRESET_NAMES"),
                tip="cpu-small: TAEF2 latents, 16 M parameters; paper: pixel space, 122 M (a GPU setting)",
            ),
            _stage1_setting(
                "taef2", "TAEF2 folder", tip="folder with taef2_encoder.pth and taef2_decoder.pth; empty: pixels"
            ),
            _stage1_setting("p_drop", "drop condition", minimum=0.0, maximum=1.0, tip="per-sample probability"),
            _stage1_setting("eval_every", "validate every", minimum=1, maximum=10**7, tip="steps between checkpoints"),
            _stage1_setting("preview_every", "preview every", minimum=0, maximum=10**7, tip="0: no generated grids"),
            _stage1_setting("guidance", "guidance", minimum=0.0, maximum=20.0, tip="classifier-free, for previews"),
            _stage1_setting("device", "device", choices=DEVICES),
            _stage1_setting("seed", "seed", minimum=0, maximum=2**31 - 1),
        ),
        build=_diffbulk_stage1_config,
        run="napari_genemap.train.diffbulk:train_diffbulk_stage1",
        config_class="napari_genemap.train.diffbulk:DiffBulkStage1Config",
        model_class="DiffBulkStage1",  # not in models.registry: a stage-1 checkpoint draws tiles, predicts no maps
        read_checkpoint="napari_genemap.models.diffbulk_format:read_stage1_config",
        validation_label="validation loss (mean of 4 noise bands)",
    )
)


def _diffbulk_stage2_config(slides: list[dict], validation: list[str], settings: dict, out: str) -> dict:
    from ..models.diffbulk_format import read_stage1_config

    stage1 = str(settings.get("stage1", "")).strip()
    if not stage1:
        raise GenemapInputError("stage 1 run: choose the folder of a trained DiffBulk stage 1")
    read_stage1_config(os.path.expanduser(stage1))  # "no such checkpoint", ... before a process starts
    config = _pixnet_config(slides, validation, settings, out)
    for name in ("stage1", "pathology", "taef2"):
        value = str(config.get(name, "")).strip()
        if value:
            config[name] = os.path.abspath(os.path.expanduser(value))
        else:
            config.pop(name, None)
    return config


def _stage2_setting(name: str, label: str, **options) -> Setting:
    """A DiffBulk stage-2 setting whose default is `DiffBulkStage2Config`'s (its module imports no torch)."""
    config_class = import_object("napari_genemap.train.diffbulk_stage2:DiffBulkStage2Config")
    return Setting(name, label, defaults_of(config_class)[name], **options)


register_stage(
    TrainingStage(
        command="diffbulk-stage2",
        label="DiffBulk stage 2 (fusion)",
        description="dense gene maps from a PixNet's features fused with a frozen stage-1 U-Net's",
        settings=(
            _stage2_setting("stage1", "stage 1 run", tip="folder of a trained DiffBulk stage 1 (frozen here)"),
            _stage2_setting(
                "pathology", "PixNet start", tip="a PixNet checkpoint folder for p; empty: ImageNet + a new decoder"
            ),
            _stage2_setting("taef2", "TAEF2 folder", tip="empty: the folder stage 1 was trained with"),
            _stage2_setting(
                "features",
                "features",
                choices=import_object("napari_genemap.train.diffbulk_stage2:FEATURE_CHOICES"),
                tip="both: p fused with f; pathology: p alone (the control); diffusion: f alone",
            ),
            _stage2_setting(
                "head",
                "head",
                choices=import_object("napari_genemap.train.diffbulk_stage2:HEADS"),
                tip="dense: a gene map, trained like PixNet; pooled (as published): one vector per spot-centred tile",
            ),
            _stage2_setting("steps", "steps", minimum=1, maximum=10**7, tip="optimiser steps in the whole schedule"),
            _stage2_setting("batch", "batch", minimum=1, maximum=4096, tip="windows per step"),
            _stage2_setting(
                "window", "window (px)", minimum=INPUT_MULTIPLE, maximum=4096, tip="a multiple of stage 1's tile"
            ),
            _stage2_setting("lr", "learning rate", minimum=0.0, maximum=1.0),
            _stage2_setting("eval_every", "validate every", minimum=1, maximum=10**7, tip="steps between checkpoints"),
            _stage2_setting("device", "device", choices=DEVICES),
            _stage2_setting("seed", "seed", minimum=0, maximum=2**31 - 1),
        ),
        build=_diffbulk_stage2_config,
        run="napari_genemap.train.diffbulk_stage2:train_diffbulk_stage2",
        config_class="napari_genemap.train.diffbulk_stage2:DiffBulkStage2Config",
        model_class="DiffBulkDense",
    )
)


def _diffst_config(slides: list[dict], validation: list[str], settings: dict, out: str) -> dict:
    config = _diffbulk_stage1_config(slides, validation, settings, out)
    pathology = str(config.pop("pathology", "")).strip()
    if pathology:
        config["pathology"] = os.path.abspath(os.path.expanduser(pathology))
    else:
        config["histology"] = False  # no PixNet named: the LR map and the gene graph alone
    return config


def _diffst_setting(name: str, label: str, **options) -> Setting:
    """A Diff-ST setting whose default is `DiffSTTrainConfig`'s (its module imports no torch)."""
    config_class = import_object("napari_genemap.train.diffst:DiffSTTrainConfig")
    return Setting(name, label, defaults_of(config_class)[name], **options)


register_stage(
    TrainingStage(
        command="diffst",
        label="Diff-ST (super-resolution)",
        description="high-resolution maps from measured low-resolution ones and the H&E, with their spread",
        settings=(
            _diffst_setting(
                "pathology", "PixNet features", tip="a PixNet checkpoint folder for histology; empty: no histology"
            ),
            _diffst_setting("protocol", "genes", choices=("hest", "hist2st", "triplex"), tip="hest: 50 most variable"),
            _diffst_setting("factor", "LR block", minimum=2, maximum=16, tip="HR spots per LR block along a side"),
            _diffst_setting("patch", "patch (spots)", minimum=2, maximum=256, tip="HR spots per patch side"),
            _diffst_setting("steps", "steps", minimum=1, maximum=10**7, tip="optimiser steps in the whole run"),
            _diffst_setting("batch_size", "batch", minimum=1, maximum=4096, tip="patches per step"),
            _diffst_setting("lr", "learning rate", minimum=0.0, maximum=1.0),
            _diffst_setting("eval_every", "validate every", minimum=1, maximum=10**7, tip="steps between checkpoints"),
            _diffst_setting("device", "device", choices=DEVICES),
            _diffst_setting("seed", "seed", minimum=0, maximum=2**31 - 1),
        ),
        build=_diffst_config,
        run="napari_genemap.train.diffst:train_diffst",
        config_class="napari_genemap.train.diffst:DiffSTTrainConfig",
        model_class="DiffST",  # not in models.registry: it super-resolves measured maps, predicts none from H&E
        read_checkpoint="napari_genemap.models.diffst_format:read_diffst_config",
    )
)
