"""DiffBulk stage 1 as one model: the open gene encoder and the EDM denoiser it conditions, with the space the
denoiser works in, saved together as a folder (``model.safetensors`` + ``config.json``).

The denoiser sees *diffusion space*: stored TAEF2 latents (z / 6 + 0.5, mean about 0.5, std about 0.13 on
H&E) or RGB in [0, 1], standardised as ``(stored - shift) * scale`` so that the data's std is close to EDM's
sigma_data = 0.5 (`LatentSpace`; TAEF2: shift 0.5, scale 6 x 0.63, i.e. about 0.63 z; pixels: shift 0.5,
scale 2, i.e. [-1, 1]). The checkpoint records the space, so the inverse (before decoding) is never guessed.

A stage-1 checkpoint is not a gene-map model (it draws tiles, it does not predict maps), so it has its own
format (`FORMAT`) and is not in `models.registry`; stage 2 reads it with `load_stage1`. Its folder may also
hold the training state (optimiser moments, step, random generators) that resuming needs: tensors in
``training_state.safetensors``, the rest in ``training_state.json``; never a pickle. Everything is written
into a temporary sibling folder and renamed into place (`io.atomic.atomic_dir`), so a reader (or a resumed
run after a crash) sees the whole of one save or the whole of the previous one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn

from ..errors import GenemapInputError
from ..io.atomic import atomic_dir
from .diffbulk_format import (  # noqa: F401 - the format's names, re-exported with the model
    CHECKPOINT_DIR,
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    MODEL_CLASS,
    WEIGHTS_FILE,
    checkpoint_folder,
    read_stage1_config,
)
from .edm import EDMConfig, EDMDenoiser, edm_loss, heun_sample
from .gene_encoder import GeneEncoder, GeneEncoderConfig

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"


@dataclass(frozen=True)
class LatentSpace:
    """How stored tiles (TAEF2 latents or RGB in [0, 1]) map to the denoiser's space and back."""

    space: str  # "taef2" or "pixel"
    shift: float
    scale: float
    downscale: int  # image pixels per diffusion pixel: 8 for TAEF2, 1 for pixels

    def __post_init__(self):
        if self.space not in ("taef2", "pixel"):
            raise GenemapInputError(f"latent space {self.space!r}; expected 'taef2' or 'pixel'")
        if not self.scale > 0 or self.downscale < 1:
            raise GenemapInputError(f"latent space: scale {self.scale} and downscale {self.downscale} must be positive")

    def to_diffusion(self, stored: torch.Tensor) -> torch.Tensor:
        return (stored - self.shift) * self.scale

    def from_diffusion(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.scale + self.shift

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LatentSpace:
        return cls(**data)


#: stored TAEF2 latents have std about 0.13; 6 x 0.63 brings them to about sigma_data (0.5).
TAEF2_SPACE = LatentSpace("taef2", shift=0.5, scale=6 * 0.63, downscale=8)
PIXEL_SPACE = LatentSpace("pixel", shift=0.5, scale=2.0, downscale=1)


def latent_space(space: str) -> LatentSpace:
    return TAEF2_SPACE if space == "taef2" else PIXEL_SPACE


class DiffBulkStage1(nn.Module):
    """Gene encoder + EDM denoiser: ``condition(panels)`` then D(x; sigma, condition) in diffusion space."""

    def __init__(self, edm: EDMConfig, genes: GeneEncoderConfig | None = None, latent: LatentSpace | None = None):
        super().__init__()
        genes = genes or GeneEncoderConfig()
        if edm.condition_dim != genes.dim:
            edm = replace(edm, condition_dim=genes.dim)  # the encoder's vector is the denoiser's condition
        self.latent = latent or latent_space(edm.space)
        if self.latent.space != edm.space:
            raise GenemapInputError(
                f"stage 1: the denoiser works in {edm.space!r} but the latent space is {self.latent.space!r}"
            )
        self.gene_encoder = GeneEncoder(genes)
        self.denoiser = EDMDenoiser(edm)

    @property
    def edm_config(self) -> EDMConfig:
        return self.denoiser.config

    @property
    def tile_px(self) -> int:
        """The side of the image tiles it draws, in image pixels."""
        return self.edm_config.sample_size * self.latent.downscale

    def condition(
        self, panels: Sequence[tuple[Sequence[str], Sequence[float] | np.ndarray | torch.Tensor]]
    ) -> torch.Tensor:
        """(genes, values) panels -> (len(panels), condition_dim); genes outside the vocabulary are refused."""
        return self.gene_encoder.encode(panels)

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        condition: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.denoiser(x, sigma, condition, keep)

    @torch.no_grad()
    def generate(
        self,
        noise: torch.Tensor,
        condition: torch.Tensor | None = None,
        *,
        steps: int = 32,
        guidance: float | None = None,
        progress: Callable[[int, int, str], None] | None = None,
    ) -> torch.Tensor:
        """Heun sampling from ``noise`` (B, C, s, s) ~ N(0, I); returns *stored* tiles (latents or RGB in [0, 1]),
        unconditioned when ``condition`` is None, with classifier-free guidance ``guidance`` otherwise."""
        x = heun_sample(self.denoiser, noise, condition, steps=steps, guidance=guidance, progress=progress)
        return self.latent.from_diffusion(x)


class Stage1Objective(nn.Module):
    """Stage 1's training loss on a batch (or a rank's shard of one) whose random choices were drawn
    beforehand (tiles, masking switch, gene subsets, sigmas, noise): the module DistributedDataParallel wraps.

    Kept and dropped samples go through `edm_loss` as two sub-batches (the gene encoder runs on the kept ones
    only; the U-Net has GroupNorm only, so the split changes no sample's output); the loss is their
    sample-weighted mean. Returns the loss and each sample's lambda-weighted MSE."""

    def __init__(self, model: DiffBulkStage1):
        super().__init__()
        self.model = model

    def forward(
        self,
        stored: torch.Tensor,
        keep: torch.Tensor,
        sigma: torch.Tensor,
        noise: torch.Tensor,
        panels: tuple[torch.Tensor, ...],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.model.latent.to_diffusion(stored)
        denoiser = self.model.denoiser
        parts = []
        if bool(keep.any()):
            condition = self.model.gene_encoder(*panels)
            parts.append(edm_loss(denoiser, x[keep], condition, sigma=sigma[keep], noise=noise[keep], p_drop=0))
        if not bool(keep.all()):
            parts.append(edm_loss(denoiser, x[~keep], None, sigma=sigma[~keep], noise=noise[~keep], p_drop=0))
        loss = cast(torch.Tensor, sum(part.loss * len(part.sigma) for part in parts)) / len(x)
        return loss, torch.cat([part.weighted_mse for part in parts])


@dataclass
class Stage1Checkpoint:
    """A loaded stage-1 model with what its config.json says about it."""

    model: DiffBulkStage1
    config: dict
    path: Path
    digest: str  # sha256 of model.safetensors

    @property
    def metrics(self) -> dict:
        return self.config.get("metrics", {})

    @property
    def provenance(self) -> dict:
        return self.config.get("provenance", {})

    @property
    def step(self) -> int | None:
        step = self.metrics.get("step")
        return step if isinstance(step, int) and not isinstance(step, bool) else None


def versions() -> dict:
    import diffusers

    from .. import __version__

    return {"napari_genemap": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__}


def save_stage1(
    target: str | os.PathLike,
    model: DiffBulkStage1,
    *,
    protocol: dict | None = None,
    tile: dict | None = None,
    provenance: dict | None = None,
    metrics: dict | None = None,
    training_state: tuple[dict[str, torch.Tensor], dict] | None = None,
) -> Path:
    """Write the checkpoint folder atomically (replacing an older one): float32 weights, the config (format,
    versions, gene vocabulary in row order, EDM config, latent space, ``protocol``, ``tile`` settings,
    ``provenance``, ``metrics``) and, for resuming, ``training_state`` = (tensors, JSON-able dict)."""
    from safetensors.torch import save_file

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_class": MODEL_CLASS,
        "versions": versions(),
        "gene_encoder": model.gene_encoder.config.to_dict(),  # with the vocabulary, in row order
        "edm": model.edm_config.to_dict(),
        "latent": model.latent.to_dict(),
        "protocol": protocol or {},
        "tile": tile or {},
        "provenance": provenance or {},
        "metrics": metrics or {},
    }
    state = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in model.state_dict().items()}
    with atomic_dir(target, replace=True) as staging:
        staging.mkdir()
        save_file(state, os.fspath(staging / WEIGHTS_FILE), metadata={"format": FORMAT})
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
        if training_state is not None:
            tensors, values = training_state
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, os.fspath(staging / STATE_TENSORS)
            )
            (staging / STATE_JSON).write_text(json.dumps(values) + "\n")
    return target


def build_stage1(config: dict, source: str | os.PathLike = "stage-1 config") -> DiffBulkStage1:
    """A model with random weights from a checkpoint config's ``edm``, ``gene_encoder`` and ``latent``."""

    def part(key: str, make: Callable[[dict], object]):
        try:
            return make(config[key])
        except GenemapInputError as error:
            raise GenemapInputError(f"{source}: field {key!r}: {error}") from None
        except (TypeError, ValueError) as error:
            raise GenemapInputError(f"{source}: field {key!r} is malformed ({error})") from None

    edm = cast(EDMConfig, part("edm", EDMConfig.from_dict))
    genes = cast(GeneEncoderConfig, part("gene_encoder", GeneEncoderConfig.from_dict))
    return DiffBulkStage1(edm, genes, cast(LatentSpace, part("latent", LatentSpace.from_dict)))


def load_stage1(path: str | os.PathLike, device: str | torch.device = "cpu") -> Stage1Checkpoint:
    """Rebuild the model from its config and load the weights (safetensors: tensors only, no code)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = checkpoint_folder(path)
    config = read_stage1_config(folder)
    model = build_stage1(config, folder / CONFIG_FILE)
    weights = folder / WEIGHTS_FILE
    try:
        state = load_file(os.fspath(weights))
    except (SafetensorError, OSError) as error:
        raise GenemapInputError(f"{weights}: not a readable safetensors file ({error})") from None
    own = model.state_dict()
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    if missing or unexpected:
        name = sorted(missing or unexpected)[0]
        raise GenemapInputError(
            f"{weights}: does not match its config ({len(missing)} weights missing, {len(unexpected)} unexpected, "
            f"e.g. {name!r})"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise GenemapInputError(
                f"{weights}: weight {key!r} has shape {tuple(value.shape)}; expected {tuple(own[key].shape)}"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise GenemapInputError(f"{weights}: weight {key!r} holds NaN or infinite values")
    model.load_state_dict(state)
    return Stage1Checkpoint(
        model=model.to(device).eval(),
        config=config,
        path=folder,
        digest=hashlib.sha256(weights.read_bytes()).hexdigest(),
    )


def read_training_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and JSON values a training run saved beside the weights (for resuming)."""
    from safetensors.torch import load_file

    folder = checkpoint_folder(path)
    tensors, values = folder / STATE_TENSORS, folder / STATE_JSON
    if not tensors.is_file() or not values.is_file():
        raise GenemapInputError(f"{folder}: holds no training state ({STATE_TENSORS}, {STATE_JSON}); cannot resume it")
    try:
        return load_file(os.fspath(tensors)), json.loads(values.read_text())
    except Exception as error:  # safetensors and json raise their own types
        raise GenemapInputError(f"{folder}: training state unreadable ({type(error).__name__}: {error})") from None
