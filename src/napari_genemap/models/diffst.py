"""Diff-ST: a conditional diffusion model that draws a high-resolution (HR) expression map given the measured
low-resolution (LR) map and the histology under it (Wang et al., "Cross-modal Diffusion Modelling for
Super-resolved Spatial Transcriptomics", MICCAI 2024). Written from the paper's description; its released
code does not train as published.

The denoised quantity is the HR map of ``genes`` channels on a patch of ``patch x patch`` grid cells
(spots or bins), in per-gene standardised protocol values. The conditions, each switchable for ablation:

- **LR map** (always): upsampled to the HR grid (nearest: each block's value on its cells) with its mask,
  after the **gene graph** (`gene_graph.GeneGraph`, switch ``gene_graph``) has mixed co-expressed genes.
- **Histology** (switch ``histology``): a frozen encoder's features for every HR cell at two scales, the
  cell's own spot and the tissue around it (`histology_features`), projected per cell.
- **Disentangling and cross-modal modulation** (switch ``disentangle``): one shared head applied to both
  modalities (their shared part, pulled together by a consistency loss) and a specific head per modality;
  each modality's features are then modulated by the other's (a per-cell scale and shift, FiLM). Without
  it the two projections are simply concatenated.
- **Cross-attention** (switch ``cross_attention``): the denoiser's features at its coarser levels attend to
  the patch's histology tokens (one per cell; UNet2DConditionModel's cross-attention blocks), so a position
  can read histology elsewhere in the patch.

The condition maps are concatenated to the noisy map at the input (they are aligned cell for cell) and their
patch mean is added to the noise-level embedding, which modulates every resnet block (scale and shift).
The denoiser is a diffusers `UNet2DConditionModel` in EDM's preconditioning (`models.edm`), trained with
EDM's loss restricted to measured cells plus the paper's Charbonnier reconstruction term, and sampled with
EDM's Heun solver: K samples from K noises give a mean map and a per-cell spread.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GenemapInputError
from .edm import UncertaintyWeight, heun_sample, loss_weight, preconditioning, sample_sigma
from .gene_graph import GeneGraph


@dataclass(frozen=True)
class DiffSTConfig:
    genes: int
    factor: int = 2  # HR cells per LR cell along each side
    patch: int = 16  # HR cells per side of a patch
    histology_channels: int = 0  # per cell, both scales together (0: no histology)
    width: tuple[int, ...] = (64, 128)
    layers_per_block: int = 1
    condition: int = 32  # channels of each condition map (LR, histology; tripled when disentangled)
    token_dim: int = 64  # histology tokens for the cross-attention
    attention_head_dim: int = 32
    histology: bool = True
    gene_graph: bool = True
    disentangle: bool = True
    cross_attention: bool = True
    sigma_data: float = 1.0  # the targets are standardised per gene
    p_mean: float = -0.4
    p_std: float = 1.2

    def __post_init__(self):
        object.__setattr__(self, "width", tuple(self.width))
        if self.patch % self.factor or self.patch % 2 ** (len(self.width) - 1):
            raise GenemapInputError(
                f"Diff-ST config: patch {self.patch} must be a multiple of the factor {self.factor} and of the "
                f"U-Net's {2 ** (len(self.width) - 1)}x downsampling"
            )
        if self.histology and self.histology_channels < 1:
            raise GenemapInputError("Diff-ST config: histology is on but histology_channels is 0")

    @property
    def uses_histology(self) -> bool:
        return self.histology and self.histology_channels > 0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["width"] = list(self.width)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> DiffSTConfig:
        return cls(**data)


class Conditions(NamedTuple):
    """What a patch is conditioned on: ``lr`` (B, genes, P/f, P/f) standardised, ``lr_mask`` (B, P/f, P/f)
    (blocks holding a spot), ``histology`` (B, C, P, P) or None."""

    lr: torch.Tensor
    lr_mask: torch.Tensor
    histology: torch.Tensor | None = None

    def repeat(self, k: int) -> Conditions:
        """Each patch's conditions ``k`` times in a row (for ``k`` samples per patch)."""
        histology = None if self.histology is None else self.histology.repeat_interleave(k, 0)
        return Conditions(self.lr.repeat_interleave(k, 0), self.lr_mask.repeat_interleave(k, 0), histology)


class Encoded(NamedTuple):
    maps: torch.Tensor  # (B, channels, P, P) concatenated to the noisy map
    tokens: torch.Tensor  # (B, tokens, token_dim) for the cross-attention
    shared: tuple[torch.Tensor, torch.Tensor] | None  # the two modalities' shared parts (consistency loss)


class DiffST(nn.Module):
    """D(x; sigma, conditions): the HR map's denoiser."""

    def __init__(self, config: DiffSTConfig, adjacency: np.ndarray | None = None):
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.config = c = config
        genes, width = c.genes, c.condition
        self.graph = GeneGraph(np.eye(genes) if adjacency is None else adjacency) if c.gene_graph else None
        self.lr_in = nn.Conv2d(genes + 1, width, 3, padding=1)
        if c.uses_histology:
            self.histology_in = nn.Sequential(nn.Conv2d(c.histology_channels, width, 1), nn.SiLU())
        if c.uses_histology and c.disentangle:
            self.shared = nn.Conv2d(width, width, 1)  # one head for both modalities
            self.specific_lr = nn.Conv2d(width, width, 1)
            self.specific_histology = nn.Conv2d(width, width, 1)
            self.modulate_lr = nn.Conv2d(width, 2 * width, 1)  # histology -> the LR features' scale, shift
            self.modulate_histology = nn.Conv2d(width, 2 * width, 1)
            for film in (self.modulate_lr, self.modulate_histology):
                nn.init.zeros_(film.weight)
                nn.init.zeros_(cast(torch.Tensor, film.bias))
        channels = width * (3 if c.uses_histology and c.disentangle else 2 if c.uses_histology else 1)
        attention = c.uses_histology and c.cross_attention
        if attention:
            self.tokens = nn.Linear(c.histology_channels, c.token_dim)
        levels = len(c.width)
        down = ["DownBlock2D"] + ["CrossAttnDownBlock2D" if attention else "DownBlock2D"] * (levels - 1)
        up = ["CrossAttnUpBlock2D" if attention else "UpBlock2D"] * (levels - 1) + ["UpBlock2D"]
        self.embedding_dim = 4 * c.width[0]
        self.unet = cast(
            nn.Module,
            UNet2DConditionModel(
                sample_size=c.patch,
                in_channels=genes + channels,
                out_channels=genes,
                down_block_types=tuple(down),
                up_block_types=tuple(up),
                mid_block_type="UNetMidBlock2DCrossAttn" if attention else "UNetMidBlock2D",
                block_out_channels=c.width,
                layers_per_block=c.layers_per_block,
                cross_attention_dim=c.token_dim,
                attention_head_dim=c.attention_head_dim,
                norm_num_groups=min(32, c.width[0]),
                resnet_time_scale_shift="scale_shift",  # the embedding scales and shifts every block (FiLM)
                class_embed_type="projection",  # the conditions' patch mean, added to the noise embedding
                projection_class_embeddings_input_dim=channels,
            ),
        )
        self.uncertainty = UncertaintyWeight()

    def encode(self, conditions: Conditions) -> Encoded:
        """The condition maps, tokens and shared parts of a batch (computed once per patch, not per step)."""
        c = self.config
        lr = conditions.lr if self.graph is None else self.graph(conditions.lr)
        lr = torch.cat([lr, conditions.lr_mask.unsqueeze(1).to(lr.dtype)], 1)
        lr = F.interpolate(lr, scale_factor=c.factor, mode="nearest")
        lr_features = F.silu(self.lr_in(lr))
        batch = len(lr)
        empty = lr.new_zeros(batch, 1, c.token_dim)
        if not c.uses_histology:
            return Encoded(lr_features, empty, None)
        if conditions.histology is None:
            raise GenemapInputError("Diff-ST: this model needs histology features")
        histology = conditions.histology.to(lr.dtype)
        tokens = self.tokens(histology.flatten(2).transpose(1, 2)) if c.cross_attention else empty
        histology_features = self.histology_in(histology)
        if not c.disentangle:
            return Encoded(torch.cat([lr_features, histology_features], 1), tokens, None)
        shared_lr, shared_histology = self.shared(lr_features), self.shared(histology_features)
        specific_lr = _film(self.specific_lr(lr_features), self.modulate_lr(histology_features))
        specific_histology = _film(self.specific_histology(histology_features), self.modulate_histology(lr_features))
        maps = torch.cat([(shared_lr + shared_histology) / 2, specific_lr, specific_histology], 1)
        return Encoded(maps, tokens, (shared_lr, shared_histology))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, encoded: Encoded) -> torch.Tensor:
        """Noisy HR maps ``x`` (B, genes, P, P) at ``sigma`` -> their denoised estimate."""
        batch = len(x)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(batch)
        c_skip, c_out, c_in, c_noise = preconditioning(sigma.reshape(-1, 1, 1, 1), self.config.sigma_data)
        maps = encoded.maps.to(x.dtype)
        out = self.unet(
            torch.cat([c_in * x, maps], 1),
            c_noise.reshape(-1),
            encoder_hidden_states=encoded.tokens.to(x.dtype),
            class_labels=maps.mean((2, 3)),
        ).sample
        return c_skip * x + c_out * out.to(x.dtype)


def _film(features: torch.Tensor, scale_shift: torch.Tensor) -> torch.Tensor:
    scale, shift = scale_shift.chunk(2, 1)
    return features * (1 + scale) + shift


class DiffSTLoss(NamedTuple):
    loss: torch.Tensor
    diffusion: torch.Tensor  # EDM's weighted error over measured cells, detached
    reconstruction: torch.Tensor  # the Charbonnier term, detached
    consistency: torch.Tensor  # the shared parts' disagreement, detached (0 without disentangling)


def diffst_loss(
    model: DiffST,
    hr: torch.Tensor,
    hr_mask: torch.Tensor,
    conditions: Conditions,
    *,
    charbonnier: float = 1.0,
    consistency: float = 0.1,
    epsilon: float = 1e-3,
    generator: torch.Generator | None = None,
) -> DiffSTLoss:
    """One training loss on clean standardised HR maps ``hr`` (B, genes, P, P), measured where ``hr_mask``
    (B, P, P): EDM's weighted squared error with EDM2's learned noise-level weighting, plus ``charbonnier``
    x the Charbonnier error sqrt(d^2 + eps^2) of the denoised map (the paper's reconstruction term), plus
    ``consistency`` x the mean squared difference of the two modalities' shared parts."""
    config = model.config
    batch = len(hr)
    weight = hr_mask.unsqueeze(1).to(hr.dtype)
    hr = hr * weight  # cells without a spot hold nothing, whatever the caller left there
    sigma = sample_sigma(batch, config.p_mean, config.p_std, generator, hr.device).to(hr.dtype)
    noise = torch.randn(hr.shape, generator=generator, device=hr.device, dtype=hr.dtype)
    encoded = model.encode(conditions)
    denoised = model(hr + noise * sigma.reshape(-1, 1, 1, 1), sigma, encoded)
    cells = (weight.sum((1, 2, 3)) * hr.shape[1]).clamp_min(1)
    error = (denoised - hr) * weight
    weighted = loss_weight(sigma, config.sigma_data) * error.square().sum((1, 2, 3)) / cells
    u = model.uncertainty(preconditioning(sigma, config.sigma_data).c_noise)
    diffusion = (weighted / u.exp() + u).mean()
    reconstruction = ((error.square() + epsilon**2).sqrt() * weight).sum((1, 2, 3)).div(cells).mean()
    agreement = hr.new_zeros(())
    if encoded.shared is not None:
        agreement = (encoded.shared[0] - encoded.shared[1]).square().mean()
    loss = diffusion + charbonnier * reconstruction + consistency * agreement
    return DiffSTLoss(loss, weighted.mean().detach(), reconstruction.detach(), agreement.detach())


class SuperResolved(NamedTuple):
    mean: torch.Tensor  # (B, genes, P, P) the samples' mean
    spread: torch.Tensor  # (B, genes, P, P) their standard deviation
    samples: torch.Tensor  # (B, K, genes, P, P)


@torch.no_grad()
def super_resolve(
    model: DiffST, conditions: Conditions, *, samples: int = 8, steps: int = 20, seed: int = 0
) -> SuperResolved:
    """``samples`` HR maps per patch from as many noises (a fixed ``seed`` gives the same maps), drawn by
    EDM's Heun solver in ``steps`` noise levels; their mean and standard deviation."""
    if samples < 1:
        raise GenemapInputError(f"Diff-ST: samples {samples}; expected at least 1")
    config = model.config
    batch = len(conditions.lr)
    device = conditions.lr.device
    encoded = model.encode(conditions.repeat(samples))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    shape = (batch * samples, config.genes, config.patch, config.patch)
    noise = torch.randn(shape, generator=generator).to(device, conditions.lr.dtype)
    drawn = heun_sample(
        lambda x, sigma, _condition, _keep: model(x, sigma, encoded),
        noise,
        steps=steps,
        sigma_max=80.0 * config.sigma_data / 0.5,
    ).reshape(batch, samples, *shape[1:])
    spread = drawn.std(1, correction=1) if samples > 1 else torch.zeros_like(drawn[:, 0])
    return SuperResolved(drawn.mean(1), spread, drawn)
