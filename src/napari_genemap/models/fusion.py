"""DiffBulk stage 2: a frozen diffusion U-Net's features, fused with a pathology encoder's, predict expression.

A tile's latents are noised to a small sigma (0.01) with a seeded draw and passed once, unconditioned, through
the stage-1 denoiser; the U-Net's decoder outputs (its middle block and every up block: one map per
resolution) are collected by forward hooks. Each is reduced by conv 3x3 -> GroupNorm -> SiLU, then either
averaged over the tile (the **pooled** head, as published: one vector f per tile) or resampled to the output
grid (the **dense** head: f at every map position). With the pathology encoder's feature p, DiffBulk's gated
residual fusion is

    z = p + sigmoid(W_g [p; f]) * (W_p f)

per tile, or per map position with the same weights as 1 x 1 convolutions; a linear head maps z to the genes
(the dense head's output goes through softplus: a non-negative density, integrated over spots like PixNet's).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional

FEATURE_SIGMA = 0.01  # the noise level the frozen U-Net sees its (clean) input at


class DiffusionFeatures(nn.Module):
    """The frozen stage-1 denoiser as a feature extractor: latents (B, C, H, W) -> one map per decoder stage.

    The noise is drawn from a generator seeded by ``seed`` (the same draw for every tile of a batch), so the
    same tile gives the same features whatever batch it comes in."""

    def __init__(self, denoiser: nn.Module, sigma: float = FEATURE_SIGMA):
        super().__init__()
        self.denoiser = denoiser.eval().requires_grad_(False)
        self.sigma = sigma
        unet: Any = denoiser.unet  # a diffusers UNet2DModel
        self.stages = [unet.mid_block, *unet.up_blocks]
        self._maps: list[torch.Tensor] = []
        for stage in self.stages:
            stage.register_forward_hook(lambda _module, _inputs, output: self._maps.append(output))

    @property
    def channels(self) -> list[int]:
        """Channels of each stage's map (what `FeatureReducer` is built for)."""
        unet: Any = self.denoiser.unet
        widths = list(unet.config.block_out_channels)
        return [widths[-1], *reversed(widths)]

    @torch.no_grad()
    def forward(self, latents: torch.Tensor, seed: int = 0) -> list[torch.Tensor]:
        generator = torch.Generator(device=latents.device).manual_seed(seed)
        # one noise draw shared by every tile of the batch: a tile's features never depend on its position in
        # a batch or on its neighbours (the dense model's tiles then agree wherever a window puts them)
        noise = torch.randn((1, *latents.shape[1:]), generator=generator, device=latents.device, dtype=latents.dtype)
        self._maps = []
        self.denoiser(latents + self.sigma * noise, self.sigma)
        maps, self._maps = self._maps, []
        return maps

    def train(self, mode: bool = True) -> DiffusionFeatures:
        super().train(mode)
        self.denoiser.eval()  # frozen: its GroupNorm and dropout stay in inference mode
        return self


class FeatureReducer(nn.Module):
    """conv 3x3 -> GroupNorm -> SiLU on each stage's map, then pooled (B, F) or resampled to (B, F, h, w)."""

    def __init__(self, channels: list[int], width: int = 64, groups: int = 8):
        super().__init__()
        self.reduce = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(groups, width), nn.SiLU()) for c in channels
        )
        self.dim = width * len(channels)

    def forward(self, maps: list[torch.Tensor], size: tuple[int, int] | None = None) -> torch.Tensor:
        """``size`` None: one vector per tile (global average); else every map resampled to ``size``."""
        reduced = [reduce(m) for reduce, m in zip(self.reduce, maps, strict=True)]
        if size is None:
            return torch.cat([r.mean((2, 3)) for r in reduced], 1)
        return torch.cat([functional.interpolate(r, size, mode="bilinear", align_corners=False) for r in reduced], 1)


class GatedFusion(nn.Module):
    """z = p + sigmoid(W_g [p; f]) * (W_p f), on vectors (B, D) or per position on maps (B, D, h, w)."""

    def __init__(self, p_dim: int, f_dim: int):
        super().__init__()
        self.gate = nn.Linear(p_dim + f_dim, p_dim)
        self.project = nn.Linear(f_dim, p_dim)

    def forward(self, p: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        if p.ndim == 4:  # the same weights at every map position (1 x 1 convolutions), channels last
            return self._fuse(p.permute(0, 2, 3, 1), f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self._fuse(p, f)

    def _fuse(self, p: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return p + torch.sigmoid(self.gate(torch.cat([p, f], -1))) * self.project(f)


class FusionHead(nn.Module):
    """Fused features -> genes: ``dense`` gives a softplus density map (B, genes, h, w), else (B, genes)."""

    def __init__(self, p_dim: int, f_dim: int, n_genes: int, dense: bool):
        super().__init__()
        self.fusion = GatedFusion(p_dim, f_dim)
        self.head = nn.Linear(p_dim, n_genes)
        self.dense = dense

    def forward(self, p: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        z = self.fusion(p, f)
        if not self.dense:
            return self.head(z)
        return functional.softplus(self.head(z.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
