"""A Diff-ST checkpoint folder: everything super-resolution needs, loadable without unpickling anything.

``model.safetensors`` (the denoiser, its gene graph's adjacency included), ``config.json`` (format, the
`DiffSTConfig`, the protocol, the per-gene standardisation of the HR and LR maps, how histology features
are made, provenance, metrics) and, when the model uses histology, ``pathology/``: a copy of the PixNet
checkpoint whose features it was trained on (the features must come from the same weights at prediction).
``training_state.*`` beside them resume a run. Written atomically (a temporary sibling, then renamed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.protocols import Protocol
from ..data.superres import nearest_upsampled
from ..errors import GenemapInputError
from ..io.atomic import atomic_dir
from .diffst import DiffST, DiffSTConfig
from .diffst_format import (  # noqa: F401 - the format's names, re-exported with the model
    CHECKPOINT_DIR,
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    MODEL_CLASS,
    PATHOLOGY_DIR,
    WEIGHTS_FILE,
    checkpoint_folder,
    read_diffst_config,
)

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"


@dataclass(frozen=True)
class Standardisation:
    """Per-gene mean and standard deviation of the model's HR target and of the LR blocks (protocol values):
    the model sees and draws standardised maps; `unscale` brings them back.

    With ``residual`` the HR target is each spot's departure from its block's LR value (`prior`: the LR map's
    nearest upsampling), so the draws centre on the LR map and the model only learns what the LR map
    does not say, on the scale of the departures rather than of the spots. Without it (``residual`` False,
    as checkpoints written before it) the target is the HR map itself."""

    hr_mean: np.ndarray
    hr_std: np.ndarray
    lr_mean: np.ndarray
    lr_std: np.ndarray
    residual: bool = False

    def to_dict(self) -> dict:
        data: dict = {key: np.asarray(getattr(self, key), dtype=float).tolist() for key in STATISTICS}
        return {**data, "residual": self.residual}

    @classmethod
    def from_dict(cls, data: dict) -> Standardisation:
        statistics = {key: np.asarray(data[key], dtype=np.float32) for key in STATISTICS}
        return cls(**statistics, residual=bool(data.get("residual", False)))

    def prior(self, lr: np.ndarray, factor: int) -> np.ndarray:
        """What the HR target is taken relative to, for LR maps (..., genes, h, w) -> (..., genes, h*f, w*f):
        each block's value on its cells (residual), else zeros."""
        upsampled = nearest_upsampled(lr, factor)
        return upsampled if self.residual else np.zeros_like(upsampled)

    def hr(self, values: np.ndarray, prior: np.ndarray | float = 0.0) -> np.ndarray:
        """Standardised HR targets (..., genes, H, W) of protocol values."""
        return (values - prior - self.hr_mean[:, None, None]) / self.hr_std[:, None, None]

    def lr(self, values: np.ndarray) -> np.ndarray:
        """Standardised LR maps (..., genes, H, W)."""
        return (values - self.lr_mean[:, None, None]) / self.lr_std[:, None, None]

    def unscale(self, standardised: np.ndarray, prior: np.ndarray | float = 0.0, gene_axis: int = -3) -> np.ndarray:
        """Protocol values of standardised HR maps (the inverse of `hr`)."""
        shape = [1] * standardised.ndim
        shape[gene_axis] = -1
        return standardised * self.hr_std.reshape(shape) + self.hr_mean.reshape(shape) + prior


STATISTICS = ("hr_mean", "hr_std", "lr_mean", "lr_std")


@dataclass
class DiffSTCheckpoint:
    model: DiffST
    config: dict
    protocol: Protocol
    standardisation: Standardisation
    path: Path
    digest: str

    @property
    def histology(self) -> dict:
        """How features were made: ``diameter_px`` (the spot at the PixNet's µm/px) and ``tissue``."""
        return self.config.get("histology", {})

    @property
    def pathology(self) -> Path | None:
        folder = self.path / PATHOLOGY_DIR
        return folder if folder.is_dir() else None


def save_diffst(
    target: str | os.PathLike,
    model: DiffST,
    *,
    protocol: Protocol,
    standardisation: Standardisation,
    histology: dict | None = None,
    pathology: str | os.PathLike | None = None,
    provenance: dict | None = None,
    metrics: dict | None = None,
    training_state: tuple[dict[str, torch.Tensor], dict] | None = None,
) -> Path:
    """Write the folder (replacing an older one); ``pathology``: the PixNet checkpoint folder to copy in."""
    from safetensors.torch import save_file

    from .. import __version__

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_class": MODEL_CLASS,
        "package_version": __version__,
        "architecture": model.config.to_dict(),
        "genes": list(protocol.genes),
        "protocol": protocol.to_dict(),
        "standardisation": standardisation.to_dict(),
        "histology": histology or {},
        "provenance": provenance or {},
        "metrics": metrics or {},
    }
    state = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in model.state_dict().items()}
    source = None if pathology is None else Path(pathology)
    with atomic_dir(target, replace=True) as staging:
        staging.mkdir()
        save_file(state, os.fspath(staging / WEIGHTS_FILE), metadata={"format": FORMAT})
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
        if source is not None:
            shutil.copytree(source, staging / PATHOLOGY_DIR, ignore=shutil.ignore_patterns("training_state*"))
        if training_state is not None:
            tensors, values = training_state
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, os.fspath(staging / STATE_TENSORS)
            )
            (staging / STATE_JSON).write_text(json.dumps(values) + "\n")
    return target


def load_diffst(path: str | os.PathLike, device: str | torch.device = "cpu") -> DiffSTCheckpoint:
    """Rebuild the model from config.json and load its weights (safetensors: tensors only)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = checkpoint_folder(path)
    config = read_diffst_config(folder)
    config_path = folder / CONFIG_FILE
    try:
        architecture = DiffSTConfig.from_dict(config["architecture"])
        protocol = Protocol.from_dict(config["protocol"])
        standardisation = Standardisation.from_dict(config["standardisation"])
    except KeyError as error:
        raise GenemapInputError(f"{config_path}: field {error.args[0]!r} is missing") from None
    except (TypeError, ValueError) as error:
        raise GenemapInputError(f"{config_path}: malformed ({error})") from None
    if architecture.genes != protocol.n_genes or len(standardisation.hr_mean) != protocol.n_genes:
        raise GenemapInputError(f"{config_path}: the architecture, protocol and standardisation disagree on genes")
    weights = folder / WEIGHTS_FILE
    try:
        state = load_file(os.fspath(weights))
    except (SafetensorError, OSError) as error:
        raise GenemapInputError(f"{weights}: not a readable safetensors file ({error})") from None
    model = DiffST(architecture)
    own = model.state_dict()
    if set(own) != set(state):
        name = sorted(set(own) ^ set(state))[0]
        raise GenemapInputError(f"{weights}: does not match its config (e.g. weight {name!r})")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise GenemapInputError(
                f"{weights}: weight {key!r} has shape {tuple(value.shape)}; expected {tuple(own[key].shape)}"
            )
    model.load_state_dict(state)
    return DiffSTCheckpoint(
        model=model.to(device).eval(),
        config=config,
        protocol=protocol,
        standardisation=standardisation,
        path=folder,
        digest=hashlib.sha256(weights.read_bytes()).hexdigest(),
    )


def read_training_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    tensors, values = folder / STATE_TENSORS, folder / STATE_JSON
    if not tensors.is_file() or not values.is_file():
        raise GenemapInputError(f"{folder}: holds no training state ({STATE_TENSORS}, {STATE_JSON}); cannot resume")
    return load_file(os.fspath(tensors)), json.loads(values.read_text())
