"""Checkpoints: a folder with ``model.safetensors`` (weights only) and ``config.json`` (everything else).

The JSON holds the model class (a name in `registry.MODELS`; absent in early checkpoints, which are
PixNet), its architecture, the gene list, the protocol, the µm/px the model was trained at, the
training window and the provenance of the training data, so a checkpoint rebuilds and explains itself.
Loading never unpickles: safetensors holds tensors only. A checkpoint is written to a temporary sibling
folder and renamed into place, so a reader never sees half of one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

from ..data.protocols import Protocol
from ..data.stain import StainBasis
from ..errors import GenemapInputError
from ..io.atomic import atomic_dir
from .registry import DEFAULT_MODEL, EXPORTABLE, INPUT_MULTIPLE, MODELS, ModelConfig, model_class, model_name

if TYPE_CHECKING:  # torch is imported where weights are touched, so reading a config stays light (napari)
    import torch
    from torch import nn

FORMAT = "napari-genemap/pixnet"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class GeneMapModel:
    """A loaded model (PixNet or another registered class) with what it takes to use it on a slide.

    Opened with ``load_checkpoint(..., lazy=True)``, the torch module is built on first use of `model`: a
    process that runs the checkpoint's exported graph (`infer.backends`) then never imports torch, which
    is most of the wait before a viewer's first predicted pixels."""

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        protocol: Protocol,
        mpp: float,
        window: int,
        path: Path | None = None,
        provenance: dict | None = None,
        metrics: dict | None = None,
        digest: str = "",
        stride: int | None = None,
        build: Callable[[], nn.Module] | None = None,
        model_class: str = DEFAULT_MODEL,
        stain: StainBasis | None = None,
    ):
        """``model``, or ``build`` (made on first use) with the ``stride`` it will have; ``stain``: the
        stains its input is normalised to (`data.stain`), None when it takes slides as they are."""
        if model is None and (build is None or stride is None):
            raise ValueError("a GeneMapModel needs its model, or a builder and the model's stride")
        self.protocol = protocol
        self.mpp = mpp  # µm per input pixel the model was trained at
        self.window = window  # training window side in input pixels
        self.path = path
        self.provenance = provenance or {}
        self.metrics = metrics or {}
        self.digest = digest  # sha256 of the weights file: identifies the checkpoint in caches
        self.model_class = model_class  # its name in `registry.MODELS`
        self.stain = stain
        self._model, self._build, self._stride = model, build, stride
        self._lock = threading.Lock()

    @property
    def model(self) -> nn.Module:
        with self._lock:  # the model thread and the caller may both ask first
            if self._model is None:
                assert self._build is not None  # __init__ requires one of the two
                self._model, self._build = self._build(), None
            return self._model

    @property
    def built(self) -> bool:
        """Whether the torch module exists yet (a lazily opened checkpoint's stays unbuilt until used)."""
        return self._model is not None

    @property
    def genes(self) -> tuple[str, ...]:
        return self.protocol.genes

    @property
    def stride(self) -> int:
        if self._model is None:
            return cast(int, self._stride)
        # every registered model class has an int ``stride``; nn.Module's attribute typing cannot say so
        return cast(int, self._model.stride)

    @property
    def input_multiple(self) -> int:
        """Input sides (and the tile engine's tiles and halos) are multiples of this (32 for PixNet, which
        is the one class opened lazily)."""
        if self._model is None:
            return INPUT_MULTIPLE
        return int(getattr(self._model, "input_multiple", INPUT_MULTIPLE))

    @property
    def exportable(self) -> bool:
        """Whether the tile engine exports it to ONNX / OpenVINO by default (`registry.EXPORTABLE`)."""
        return self.model_class in EXPORTABLE

    def __repr__(self) -> str:
        return f"GeneMapModel({len(self.genes)} genes, {self.mpp} µm/px, stride {self.stride}, path={self.path})"


def save_checkpoint(
    target: str | os.PathLike,
    model: nn.Module,
    *,
    protocol: Protocol,
    mpp: float,
    window: int,
    provenance: dict | None = None,
    metrics: dict | None = None,
    dtype: torch.dtype | None = None,
    stain: StainBasis | None = None,
) -> Path:
    """Write a checkpoint folder atomically (temporary sibling, then rename over any old one); ``dtype``
    of the floating-point weights (default float32); ``stain``: the stains the model's input was normalised
    to in training (every slide it predicts is normalised to them too)."""
    import torch
    from safetensors.torch import save_file

    from .. import __version__

    architecture = cast(ModelConfig, model.config)  # what a registered model class carries (registry docstring)
    if protocol.n_genes != architecture.n_genes:
        raise GenemapInputError(f"protocol has {protocol.n_genes} genes; the model predicts {architecture.n_genes}")
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "model_class": model_name(type(model)),
        "architecture": architecture.to_dict(),
        "genes": list(protocol.genes),
        "protocol": protocol.to_dict(),
        "mpp": float(mpp),
        "window": int(window),
        "provenance": provenance or {},
        "metrics": metrics or {},
    }
    if stain is not None:
        config["stain"] = stain.to_dict()
    dtype = dtype or torch.float32
    state = {
        key: value.detach().to("cpu", dtype if value.is_floating_point() else value.dtype).contiguous()
        for key, value in model.state_dict().items()
        if not key.endswith("num_batches_tracked")
    }
    with atomic_dir(target, replace=True) as staging:
        staging.mkdir()
        save_file(state, os.fspath(staging / WEIGHTS_FILE), metadata={"format": FORMAT})
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    return target


def _checkpoint_folder(path: Path) -> Path:
    if path.is_file() and path.name in (WEIGHTS_FILE, CONFIG_FILE):
        return path.parent
    if not path.exists():
        raise GenemapInputError(f"{path}: no such checkpoint")
    if not path.is_dir():
        raise GenemapInputError(
            f"{path}: not a checkpoint (expected a folder holding {WEIGHTS_FILE} and {CONFIG_FILE})"
        )
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (path / name).is_file():
            raise GenemapInputError(f"{path}: checkpoint folder lacks {name}")
    return path


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}


def _shown(value: object) -> str:
    """A config value as the error shows it: JSON's own words for the containers, else its repr (shortened)."""
    if isinstance(value, (dict, list)) or value is None:
        return _JSON_TYPES[type(value)]
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_fields(config: dict, config_path: Path) -> None:
    """Every field's type and range (torch-free): one line naming the file and the field at fault."""

    def refuse(key: str, expected: str) -> GenemapInputError:
        return GenemapInputError(f"{config_path}: field {key!r} is {_shown(config[key])}; expected {expected}")

    model_class_name = config.get("model_class", DEFAULT_MODEL)
    if not isinstance(model_class_name, str) or model_class_name not in MODELS:
        raise GenemapInputError(
            f"{config_path}: field 'model_class': model class {_shown(model_class_name)} is not registered; "
            f"expected one of {sorted(MODELS)}"
        )
    mpp = config["mpp"]
    if not _is_number(mpp) or not math.isfinite(mpp) or mpp <= 0:
        raise refuse("mpp", "a positive number of µm per input pixel")
    window = config["window"]
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0 or window % INPUT_MULTIPLE:
        raise refuse("window", f"a positive whole number of input pixels, a multiple of {INPUT_MULTIPLE}")
    genes = config["genes"]
    if not isinstance(genes, list) or not genes:
        raise refuse("genes", "a non-empty list of gene names")
    wrong = next((i for i, g in enumerate(genes) if not isinstance(g, str) or not g), None)
    if wrong is not None:
        raise GenemapInputError(
            f"{config_path}: field 'genes' item {wrong + 1} is {_shown(genes[wrong])}; expected a gene name"
        )
    if len(set(genes)) != len(genes):
        duplicated = next(g for i, g in enumerate(genes) if g in genes[:i])
        raise GenemapInputError(f"{config_path}: field 'genes' names {duplicated!r} twice; expected unique names")
    architecture = config["architecture"]
    if not isinstance(architecture, dict):
        raise refuse("architecture", "an object of the model's architecture settings")
    n_genes = architecture.get("n_genes", len(genes))
    if not isinstance(n_genes, int) or isinstance(n_genes, bool) or n_genes < 1:
        raise GenemapInputError(
            f"{config_path}: field 'architecture.n_genes' is {_shown(n_genes)}; expected a positive whole number"
        )
    if n_genes != len(genes):
        raise GenemapInputError(
            f"{config_path}: {len(genes)} genes listed but the architecture predicts {n_genes} (field "
            "'architecture.n_genes')"
        )
    _check_protocol(config["protocol"], genes, config_path)
    for key in ("provenance", "metrics"):
        if key in config and not isinstance(config[key], dict):
            raise refuse(key, "an object")


def _check_protocol(data: object, genes: list[str], config_path: Path) -> Protocol:
    if not isinstance(data, dict):
        raise GenemapInputError(f"{config_path}: field 'protocol' is {_shown(data)}; expected an object")
    target_sum = data.get("target_sum")
    if target_sum is not None and (not _is_number(target_sum) or not math.isfinite(target_sum) or target_sum <= 0):
        raise GenemapInputError(
            f"{config_path}: field 'protocol.target_sum' is {_shown(target_sum)}; expected a positive number or null"
        )
    version = data.get("format", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise GenemapInputError(f"{config_path}: field 'protocol.format' is {_shown(version)}; expected an integer")
    if not isinstance(data.get("name"), str) or not isinstance(data.get("genes"), list):
        raise GenemapInputError(f"{config_path}: field 'protocol' lacks a 'name' string or a 'genes' list")
    try:
        protocol = Protocol.from_dict(data)
    except GenemapInputError as error:
        raise GenemapInputError(f"{config_path}: field 'protocol': {error}") from None
    if list(protocol.genes) != genes:
        raise GenemapInputError(
            f"{config_path}: field 'protocol.genes' ({protocol.n_genes} genes) differs from field 'genes' "
            f"({len(genes)}); expected the same list in the same order"
        )
    return protocol


def read_checkpoint_config(path: str | os.PathLike) -> dict:
    """The checkpoint's JSON config, checked for format, version and every field's type and range (no torch)."""
    folder = _checkpoint_folder(Path(path))
    config_path = folder / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise GenemapInputError(f"{config_path}: not valid JSON ({error})") from None
    except OSError as error:
        raise GenemapInputError(f"{config_path}: cannot be read ({error.strerror or error})") from None
    if not isinstance(config, dict):
        raise GenemapInputError(
            f"{config_path}: holds {_JSON_TYPES.get(type(config), 'a number')}; expected an object "
            f"with the checkpoint's fields (format {FORMAT!r}, genes, mpp, window, ...)"
        )
    if config.get("format") != FORMAT:
        raise GenemapInputError(f"{config_path}: field 'format' is {config.get('format')!r}; expected {FORMAT!r}")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise GenemapInputError(
            f"{config_path}: field 'format_version' is {_shown(version)}; expected a whole number "
            f"(this napari-genemap reads 1 to {FORMAT_VERSION})"
        )
    if version > FORMAT_VERSION:
        raise GenemapInputError(
            f"{config_path}: format_version {version!r} is newer than this napari-genemap reads "
            f"({FORMAT_VERSION}); upgrade napari-genemap"
        )
    for key in ("architecture", "genes", "protocol", "mpp", "window"):
        if key not in config:
            raise GenemapInputError(f"{config_path}: field {key!r} is missing")
    _check_fields(config, config_path)
    return config


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu", *, lazy: bool = False) -> GeneMapModel:
    """Rebuild the model its config names and load the weights (safetensors only; cast to float32).

    ``lazy``: check the config now and build the model (importing torch) on first use of ``.model``, when
    the architecture names its ``stride`` (PixNet's does); a bad weights file is then reported at that use."""
    folder = _checkpoint_folder(Path(path))
    config = read_checkpoint_config(folder)
    config_path = folder / CONFIG_FILE
    protocol = _check_protocol(config["protocol"], config["genes"], config_path)
    weights_path = folder / WEIGHTS_FILE
    stride = config["architecture"].get("stride")
    name = config.get("model_class", DEFAULT_MODEL)
    # lazily only PixNet, whose stride and input multiple its config says without building it
    lazy = lazy and name == DEFAULT_MODEL and isinstance(stride, int) and not isinstance(stride, bool) and stride > 0
    model = None if lazy else _build_model(folder, config, device)
    return GeneMapModel(
        model,
        protocol=protocol,
        mpp=float(config["mpp"]),
        window=int(config["window"]),
        path=folder,
        provenance=config.get("provenance", {}),
        metrics=config.get("metrics", {}),
        digest=hashlib.sha256(weights_path.read_bytes()).hexdigest(),
        stride=stride if lazy else None,
        build=(lambda: _build_model(folder, config, device)) if lazy else None,
        model_class=name,
        stain=_read_stain(config, config_path),
    )


def _read_stain(config: dict, config_path: Path) -> StainBasis | None:
    if "stain" not in config:
        return None
    try:
        return StainBasis.from_dict(config["stain"])
    except (GenemapInputError, TypeError, KeyError, ValueError, AttributeError):
        raise GenemapInputError(
            f"{config_path}: field 'stain' is malformed; expected macenko vectors (3 x 2) and 2 maximum concentrations"
        ) from None


def _build_model(folder: Path, config: dict, device) -> nn.Module:
    """The registered class the config names, with the checkpoint's weights, checked one by one."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path = folder / CONFIG_FILE
    genes = list(config["genes"])
    cls = model_class(config.get("model_class", DEFAULT_MODEL))
    try:
        architecture = cls.config_class.from_dict(config["architecture"])
        model = cls.from_config(architecture)
    except GenemapInputError as error:
        raise GenemapInputError(f"{config_path}: field 'architecture': {error}") from None
    except (TypeError, KeyError, ValueError, AttributeError) as error:
        raise GenemapInputError(f"{config_path}: field 'architecture' is malformed ({error})") from None
    if architecture.n_genes != len(genes):
        raise GenemapInputError(
            f"{config_path}: {len(genes)} genes listed but the architecture predicts {architecture.n_genes}"
        )
    weights_path = folder / WEIGHTS_FILE
    try:
        state = load_file(os.fspath(weights_path))
    except (SafetensorError, OSError) as error:
        raise GenemapInputError(f"{weights_path}: not a readable safetensors file ({error})") from None
    head = state.get("head.weight")
    if head is None or head.shape[0] != len(genes):
        found = "no head" if head is None else f"a head for {head.shape[0]} genes"
        raise GenemapInputError(f"{weights_path}: holds {found}; {config_path} lists {len(genes)} genes")
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        name = sorted(missing or unexpected)[0]
        raise GenemapInputError(
            f"{weights_path}: does not match its architecture ({len(missing)} weights missing, "
            f"{len(unexpected)} unexpected, e.g. {name!r})"
        )
    own = model.state_dict()
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise GenemapInputError(
                f"{weights_path}: weight {key!r} has shape {tuple(value.shape)}; expected {tuple(own[key].shape)}"
            )
    for key, value in state.items():
        if value.is_floating_point():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise GenemapInputError(
                    f"{weights_path}: weight {key!r} holds {bad} NaN or infinite values; expected finite weights "
                    "(a damaged file or a diverged training run)"
                )
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    return model.to(device).eval()
