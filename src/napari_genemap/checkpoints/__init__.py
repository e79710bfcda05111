"""Checkpoints shipped in the package (each a folder with weights, config and a model card)."""

from importlib.resources import files
from pathlib import Path

DEFAULT = "pixnet-her2st"


def shipped_checkpoint(name: str = DEFAULT) -> Path:
    """The folder of a shipped checkpoint, to pass to `napari_genemap.models.checkpoint.load_checkpoint`."""
    return Path(str(files("napari_genemap.checkpoints").joinpath(name)))
