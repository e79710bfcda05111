"""Which model classes a checkpoint can name, by import path, so reading the registry never imports torch.

A checkpoint's ``config.json`` records its ``model_class`` (a name here); `load_checkpoint` imports the class
only when it builds one. A registered class provides ``config_class`` (with ``from_dict``, ``to_dict`` and
``n_genes``), ``from_config(config)`` (random weights, nothing downloaded: the checkpoint brings them), its
``config``, ``stride``, a ``head`` layer with one output per gene, ``forward(image, margin=0)`` and, when its
input sides must be multiples of more than `INPUT_MULTIPLE`, ``input_multiple``
(``margin``: output pixels to drop on each side, for the tile engine's halo). Register another with `register_model`.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

from ..errors import GenemapInputError

INPUT_MULTIPLE = 32  # a model's input sides are multiples of this: PixNet's deepest encoder stride

DEFAULT_MODEL = "PixNet"  # what a checkpoint without "model_class" holds (those saved before the key)

MODELS: dict[str, str] = {
    "PixNet": "napari_genemap.models.pixnet:PixNet",
    "DiffBulkDense": "napari_genemap.models.diffbulk_dense:DiffBulkDense",
    "DiffBulkPooled": "napari_genemap.models.diffbulk_pooled:DiffBulkPooled",
}
#: The classes that make gene maps (``forward(image, margin)`` -> a density map): what the tile engine runs.
#: DiffBulk's pooled model gives one expression vector per spot-centred tile instead.
GENE_MAP_MODELS = {"PixNet", "DiffBulkDense"}
#: The classes whose graph `infer.backends` exports to ONNX / OpenVINO by default (measured: PixNet); the
#: others run in torch unless a backend is asked for by name.
EXPORTABLE = {"PixNet"}


class ModelConfig(Protocol):
    """What a registered class's ``config`` (built by its ``config_class``) provides."""

    @property
    def n_genes(self) -> int: ...

    def to_dict(self) -> dict: ...


def register_model(name: str, path: str, gene_map: bool = True) -> None:
    """Make checkpoints naming ``name`` loadable; ``path`` is ``"package.module:Class"``; ``gene_map``: its
    forward gives a density map (what the tile engine and the viewer run), not one vector per tile."""
    if ":" not in path:
        raise ValueError(f"model path {path!r}: expected 'package.module:Class'")
    MODELS[name] = path
    if gene_map:
        GENE_MAP_MODELS.add(name)
    else:
        GENE_MAP_MODELS.discard(name)


def import_object(path: str):
    """The object a ``"package.module:attribute"`` path names (imported now, not before)."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def model_class(name: str) -> type[Any]:
    """The class registered under ``name``; a one-line error for an unknown one."""
    if name not in MODELS:
        raise GenemapInputError(f"model class {name!r} is not registered; expected one of {sorted(MODELS)}")
    try:
        return import_object(MODELS[name])
    except (ImportError, AttributeError) as error:
        raise GenemapInputError(f"model class {name!r}: cannot import {MODELS[name]} ({error})") from None


def model_name(cls: type) -> str:
    """The registered name of a model class (what a checkpoint records)."""
    path = f"{cls.__module__}:{cls.__qualname__}"
    for name, registered in MODELS.items():
        if registered == path:
            return name
    raise GenemapInputError(f"model class {path} is not registered; call register_model(name, {path!r})")


def describe(name: str, architecture: dict) -> str:
    """A checkpoint's architecture in a few words (the model card), read from its config without torch."""
    try:
        if "pathology" in architecture:  # DiffBulk stage 2, dense or pooled
            pathology, edm = architecture["pathology"], architecture["edm"]
            kind = "pooled (one vector per spot-centred tile)" if name == "DiffBulkPooled" else "dense"
            return (
                f"DiffBulk {kind}: PixNet on {pathology['encoder']['name']} fused with a diffusion U-Net "
                f"{tuple(edm['block_out_channels'])} on {architecture['feature_tile']} px tiles, features "
                f"{architecture['features']}, stride {pathology['stride']}"
            )
        return f"{name}: {architecture['encoder']['name']}, stride {architecture['stride']}"
    except (KeyError, TypeError):
        return f"{name} (architecture not described)"
