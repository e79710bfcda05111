"""The Diff-ST checkpoint folder's names and its config reader, without torch (the training panel and the
CLI's checks read checkpoints before any process starts; `diffst_checkpoint` loads the weights)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import GenemapInputError

FORMAT = "napari-genemap-diffst"
FORMAT_VERSION = 1
MODEL_CLASS = "DiffST"
CHECKPOINT_DIR = "checkpoint"  # inside a training run's folder
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PATHOLOGY_DIR = "pathology"


def checkpoint_folder(path: str | os.PathLike) -> Path:
    """The folder ``path`` names: itself, or the ``checkpoint/`` inside a training run's folder."""
    path = Path(path)
    if path.is_file() and path.name in (WEIGHTS_FILE, CONFIG_FILE):
        path = path.parent
    if (path / CHECKPOINT_DIR / CONFIG_FILE).is_file():
        path = path / CHECKPOINT_DIR
    if not path.exists():
        raise GenemapInputError(f"{path}: no such Diff-ST checkpoint")
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (path / name).is_file():
            raise GenemapInputError(f"{path}: Diff-ST checkpoint folder lacks {name}")
    return path


def read_diffst_config(path: str | os.PathLike) -> dict:
    """config.json, checked for format and version (torch is imported, but nothing is built)."""
    config_path = checkpoint_folder(path) / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise GenemapInputError(f"{config_path}: not valid JSON ({error})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise GenemapInputError(f"{config_path}: field 'format' is {found!r}; expected {FORMAT!r}")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise GenemapInputError(
            f"{config_path}: field 'format_version' is {version!r}; this napari-genemap reads 1 to {FORMAT_VERSION}"
        )
    return config
