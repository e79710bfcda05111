"""DiffBulk stage 2, dense: PixNet's map features fused per map position with a frozen diffusion U-Net's.

A gene-map model like PixNet (registered as ``DiffBulkDense``): an H&E window at the model's µm/px ->
a non-negative density (genes x H/s x W/s), integrated over spots and circles the same way, so the tile
engine, ``genemap predict``, the Gene maps panel and ROI aggregation use it unchanged.

- **p**: a PixNet's decoder map before its gene head (`PixNet.features`), started from a trained PixNet
  checkpoint (the best pathology encoder we have) and fine-tuned.
- **f**: the window is cut into ``feature_tile`` x ``feature_tile`` squares (stage 1's tile, e.g. 256 µm at
  2 µm/px = 128 px); each is resampled to stage 1's tile size, encoded by TAEF2 (in TAEF2 space), noised to
  sigma 0.01 with one seeded draw and passed once, unconditioned, through the frozen stage-1 U-Net
  (`fusion.DiffusionFeatures`). Every decoder stage's map is reduced (conv 3x3, GroupNorm, SiLU) and
  resampled to the square's map pixels (`fusion.FeatureReducer`). Squares are what stage 1 saw (its U-Net has
  attention and GroupNorm over the whole tile), so a square's features depend on that square alone; they sit on
  a lattice that starts at the window's corner, and `input_multiple` (a multiple of the square) keeps the tile
  engine's windows on one slide-wide lattice, which is what makes tiles agree with one large window.
- **z** = p + sigmoid(W_g [p; f]) * (W_p f) per map position (`fusion.GatedFusion`), then the gene head and
  softplus. W_p starts at zero and the head at the PixNet's own head, so an untrained model predicts exactly
  what its PixNet predicts: training can only add what f brings.

``features`` selects the ablations of issue 16: "both", "pathology" (z = p: PixNet fine-tuned the same way)
or "diffusion" (p = 0: f alone through the same fusion).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional

from ..errors import GenemapInputError
from .diffbulk import LatentSpace
from .edm import EDMConfig, EDMDenoiser
from .fusion import FEATURE_SIGMA, DiffusionFeatures, FeatureReducer, GatedFusion
from .pixnet import PixNet, PixNetConfig
from .registry import INPUT_MULTIPLE
from .taef2 import LATENT_SCALE, LATENT_SHIFT
from .taef2 import encoder as taef2_encoder

FEATURE_CHOICES = ("both", "pathology", "diffusion")


@dataclass(frozen=True)
class DiffBulkDenseConfig:
    """The architecture; saved with every checkpoint so a checkpoint rebuilds its own model."""

    n_genes: int
    pathology: PixNetConfig  # the p branch (its own gene head is not used)
    edm: EDMConfig  # the frozen stage-1 U-Net
    latent: LatentSpace  # the space stage 1 works in (TAEF2 latents or pixels)
    feature_tile: int  # model pixels per U-Net tile: stage 1's tile_um / the model's µm/px
    feature_width: int = 32  # channels per decoder stage after reduction
    features: str = "both"  # "both", "pathology" (p only) or "diffusion" (f only)
    sigma: float = FEATURE_SIGMA
    seed: int = 0  # the noise draw the U-Net sees its tiles with

    def __post_init__(self):
        if self.features not in FEATURE_CHOICES:
            raise GenemapInputError(
                f"DiffBulk features {self.features!r}: expected one of {', '.join(FEATURE_CHOICES)}"
            )
        if self.feature_tile < 1 or self.feature_tile % self.pathology.stride:
            raise GenemapInputError(
                f"DiffBulk feature tile {self.feature_tile} px: expected a positive multiple of the stride "
                f"{self.pathology.stride}"
            )
        if self.n_genes != self.pathology.n_genes:
            raise GenemapInputError(f"DiffBulk: {self.n_genes} genes but its PixNet has {self.pathology.n_genes}")

    @property
    def stride(self) -> int:
        return self.pathology.stride

    @property
    def tile_px(self) -> int:
        """The side of stage 1's image tiles (what a feature tile is resampled to)."""
        return self.edm.sample_size * self.latent.downscale

    def to_dict(self) -> dict:
        data = asdict(self)
        data["pathology"] = self.pathology.to_dict()
        data["edm"] = self.edm.to_dict()
        data["latent"] = self.latent.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> DiffBulkDenseConfig:
        data = dict(data)
        data["pathology"] = PixNetConfig.from_dict(data["pathology"])
        data["edm"] = EDMConfig.from_dict(data["edm"])
        data["latent"] = LatentSpace.from_dict(data["latent"])
        return cls(**data)


class DiffBulkDense(nn.Module):
    """RGB window in [0, 1] (batch, 3, H, W), H and W multiples of `input_multiple` -> density (batch, genes,
    H/s, W/s), like PixNet."""

    config_class = DiffBulkDenseConfig

    def __init__(self, config: DiffBulkDenseConfig):
        super().__init__()
        self.config = config
        self.pathology = PixNet.from_config(config.pathology)
        del self.pathology.head  # p is the map before PixNet's head; this model's own head reads z
        denoiser = EDMDenoiser(config.edm)
        self.encoder_taef2 = taef2_encoder().requires_grad_(False) if config.latent.space == "taef2" else None
        self.diffusion = DiffusionFeatures(denoiser, config.sigma)
        self.reducer = FeatureReducer(self.diffusion.channels, config.feature_width)
        p_dim = self.pathology.feature_channels
        self.fusion = GatedFusion(p_dim, self.reducer.dim)
        self.head = nn.Conv2d(p_dim, config.n_genes, 1)
        with torch.no_grad():
            self.fusion.project.weight.zero_()  # z = p at the start: the model begins as its PixNet
            self.fusion.project.bias.zero_()

    @classmethod
    def from_config(cls, config: DiffBulkDenseConfig) -> DiffBulkDense:
        """The architecture with random weights and nothing downloaded (a checkpoint brings the weights)."""
        return cls(config)

    @property
    def stride(self) -> int:
        return self.config.stride

    @property
    def encoder(self) -> PixNet:
        """The pretrained part a trainer moves slower (`train.pixnet.train_pixnet`): p's whole PixNet."""
        return self.pathology

    @property
    def input_multiple(self) -> int:
        """Window sides (and the tile engine's tile and halo) are multiples of this: PixNet's 32 and the
        feature tile, so every window's feature lattice is the slide's."""
        return math.lcm(INPUT_MULTIPLE, self.config.feature_tile)

    def start_from_pixnet(self, pixnet: PixNet) -> None:
        """Copy a trained PixNet into p and its gene head into this head (with f's projection at zero the
        model then predicts exactly what ``pixnet`` does)."""
        if pixnet.gene_factors is not None:
            raise GenemapInputError("DiffBulk stage 2: its PixNet has a low-rank gene head; p needs a full one")
        own = {k: v for k, v in pixnet.state_dict().items() if not k.startswith("head.")}
        self.pathology.load_state_dict(own)
        with torch.no_grad():
            self.head.weight.copy_(pixnet.head.weight)
            assert self.head.bias is not None and pixnet.head.bias is not None  # both built with a bias
            self.head.bias.copy_(pixnet.head.bias)

    def start_from_stage1(self, denoiser_state: dict[str, torch.Tensor], taef2_state: dict[str, torch.Tensor] | None):
        """Load the stage-1 U-Net (frozen from here on) and, in TAEF2 space, TAEF2's encoder."""
        self.diffusion.denoiser.load_state_dict(denoiser_state)
        if self.encoder_taef2 is not None:
            if taef2_state is None:
                raise GenemapInputError("DiffBulk stage 2: stage 1 works in TAEF2 latents; TAEF2's encoder is needed")
            self.encoder_taef2.load_state_dict(taef2_state)

    def train(self, mode: bool = True) -> DiffBulkDense:
        super().train(mode)
        self.diffusion.train(mode)  # keeps the frozen denoiser in eval mode
        if self.encoder_taef2 is not None:
            self.encoder_taef2.eval()
        return self

    def forward(self, image: torch.Tensor, margin: int = 0) -> torch.Tensor:
        """``margin``: output pixels dropped on every side (the tile engine's halo); tiles wholly inside it
        are not passed through the U-Net at all."""
        height, width = image.shape[-2:]
        multiple = self.input_multiple
        if height % multiple or width % multiple:
            raise GenemapInputError(f"DiffBulk input {height} x {width} px: both sides must be multiples of {multiple}")
        use = self.config.features
        if use == "pathology":
            return functional.softplus(self.head(self.pathology.features(image, margin)))
        f = self.diffusion_map(image, margin)
        if use == "diffusion":  # p = 0: f alone through the same fusion
            p = f.new_zeros(f.shape[0], self.head.in_channels, *f.shape[2:])
        else:
            p = self.pathology.features(image, margin)
        return functional.softplus(self.head(self.fusion(p, f)))

    def diffusion_map(self, image: torch.Tensor, margin: int = 0) -> torch.Tensor:
        """f: (batch, reducer.dim, H/s - 2 margin, W/s - 2 margin), tile by tile (see the module docstring)."""
        tile, stride = self.config.feature_tile, self.stride
        batch, _, height, width = image.shape
        skip = (margin * stride) // tile  # tiles wholly in the dropped margin
        rows, cols = height // tile - 2 * skip, width // tile - 2 * skip
        inner = image[..., skip * tile : height - skip * tile, skip * tile : width - skip * tile]
        tiles = inner.reshape(batch, 3, rows, tile, cols, tile).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, tile, tile)
        f = self._tile_features(tiles)  # (batch * rows * cols, dim, tile / s, tile / s)
        side = tile // stride
        f = (
            f.reshape(batch, rows, cols, -1, side, side)
            .permute(0, 3, 1, 4, 2, 5)
            .reshape(batch, -1, rows * side, cols * side)
        )
        left = margin - skip * side  # what is left of the margin inside the computed tiles
        return f[..., left : f.shape[-2] - left, left : f.shape[-1] - left] if left else f

    def _tile_features(self, tiles: torch.Tensor) -> torch.Tensor:
        side = self.config.feature_tile // self.stride
        return self.reducer(self.stage_maps(tiles), size=(side, side))

    def stage_maps(self, tiles: torch.Tensor) -> list[torch.Tensor]:
        """The frozen U-Net's decoder maps of feature tiles (n, 3, T, T): resampled to stage 1's tile size,
        TAEF2-encoded when stage 1 works in its latents, seen once at sigma 0.01 with the config's noise."""
        config = self.config
        with torch.no_grad():
            if tiles.shape[-1] != config.tile_px:
                tiles = functional.interpolate(
                    tiles, size=(config.tile_px, config.tile_px), mode="bilinear", align_corners=False, antialias=True
                )
            if self.encoder_taef2 is not None:
                stored = self.encoder_taef2(tiles) / LATENT_SCALE + LATENT_SHIFT
            else:
                stored = tiles
            return self.diffusion(config.latent.to_diffusion(stored), seed=config.seed)
