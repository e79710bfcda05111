"""The stage-1 (DiffBulk diffusion) checkpoint's format, torch-free: the Training panel reads a run's step
from it without importing torch (`train.stages`), `models.diffbulk` builds the model from it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import GenemapInputError

FORMAT = "napari-genemap/diffbulk-stage1"
FORMAT_VERSION = 1
MODEL_CLASS = "DiffBulkStage1"  # what `TrainingStage.model_class` names (not a gene-map model: see above)
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoint"  # where a training run keeps its checkpoint inside its output folder


def checkpoint_folder(path: str | os.PathLike) -> Path:
    """The checkpoint folder ``path`` names: itself, or the ``checkpoint/`` inside a training run's folder."""
    path = Path(path)
    if path.is_file() and path.name in (WEIGHTS_FILE, CONFIG_FILE):
        path = path.parent
    if (path / CHECKPOINT_DIR / CONFIG_FILE).is_file():
        path = path / CHECKPOINT_DIR
    if not path.exists():
        raise GenemapInputError(f"{path}: no such stage-1 checkpoint")
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (path / name).is_file():
            raise GenemapInputError(f"{path}: stage-1 checkpoint folder lacks {name}")
    return path


def read_stage1_config(path: str | os.PathLike) -> dict:
    """The checkpoint's config.json, checked for format and version (one line naming the file and field)."""
    config_path = checkpoint_folder(path) / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise GenemapInputError(f"{config_path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise GenemapInputError(f"{config_path}: expected an object with a stage-1 checkpoint's fields")
    if config.get("format") != FORMAT:
        raise GenemapInputError(f"{config_path}: field 'format' is {config.get('format')!r}; expected {FORMAT!r}")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise GenemapInputError(
            f"{config_path}: field 'format_version' is {version!r}; this napari-genemap reads 1 to {FORMAT_VERSION}"
        )
    for key in ("gene_encoder", "edm", "latent"):
        if not isinstance(config.get(key), dict):
            raise GenemapInputError(f"{config_path}: field {key!r} is missing or not an object")
    return config
