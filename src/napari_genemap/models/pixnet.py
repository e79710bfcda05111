"""PixNet: an H&E window -> a dense, non-negative gene map (genes x H/stride x W/stride).

After Zhang, Yang & Pan ("Spatial Transcriptomics Analysis of Spatially Dense Gene Expression
Prediction"): a timm pyramid encoder and a u-net style decoder. Deep stages upsample by depth-to-space,
shallow ones by bilinear interpolation between composite blocks; each stage adds the refined skip and an
attention term. The map is a density (expression per output pixel): a spot's prediction is its integral
over the spot's disk (`aggregation.aggregate_disks`).

Attention: full softmax attention over a high-resolution map needs (HW)^2 memory, so every stage uses
*local* (neighbourhood) attention: each pixel attends to the ``attention_window`` x ``attention_window``
pixels around it. Its cost and memory are linear in the pixels, and unlike global or linear attention it is
translation-equivariant with a bounded receptive field, which is what lets tiles with a halo join without
seams.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GenemapInputError
from .encoders import Encoder, EncoderConfig
from .registry import INPUT_MULTIPLE

DECODER_WIDTHS = (160, 128, 64, 48, 32)  # bottleneck at /32, then the stages at /16, /8, /4, /2


@dataclass(frozen=True)
class PixNetConfig:
    """The architecture; saved with every checkpoint so a checkpoint rebuilds its own model."""

    n_genes: int
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    stride: int = 4  # output pixel side in input pixels: 2, 4, 8 or 16
    depth_to_space_stages: int = 2  # the deepest stages upsample by pixel shuffle, the rest bilinearly
    attention_window: int = 5
    gene_rank: int = 0  # 0: a 1x1 head to every gene; k: the genes as a learned combination of k components

    def __post_init__(self):
        if self.stride not in (2, 4, 8, 16):
            raise GenemapInputError(f"PixNet stride {self.stride}: expected 2, 4, 8 or 16")
        if self.n_genes < 1:
            raise GenemapInputError(f"PixNet n_genes {self.n_genes}: expected at least 1")
        if self.attention_window < 1 or self.attention_window % 2 == 0:
            raise GenemapInputError(f"PixNet attention_window {self.attention_window}: expected an odd number")
        if not 0 <= self.gene_rank < self.n_genes:
            raise GenemapInputError(
                f"PixNet gene_rank {self.gene_rank}: "
                f"expected 0 (full) or fewer components than its {self.n_genes} genes"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PixNetConfig:
        data = dict(data)
        data["encoder"] = EncoderConfig(**data.get("encoder", {}))
        return cls(**data)


def composite_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Depthwise 3x3 + BN + LeakyReLU, then pointwise 1x1 + BN + LeakyReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
        nn.BatchNorm2d(in_channels),
        nn.LeakyReLU(0.1, inplace=True),
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.1, inplace=True),
    )


class DepthToSpaceUp(nn.Module):
    """conv 3x3 to 4C, ReLU, pixel shuffle x2, conv 3x3, ReLU, composite block."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 4 * out_channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.PixelShuffle(2),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.ReLU(inplace=True),
            composite_block(out_channels, out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class BilinearUp(nn.Module):
    """Composite block, bilinear x2, composite block."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.before = composite_block(in_channels, out_channels)
        self.after = composite_block(out_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.before(x), scale_factor=2, mode="bilinear", align_corners=False)
        return self.after(x)


class SkipRefine(nn.Module):
    """Project an encoder skip to the stage width, then a residual depthwise block."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.project = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.refine = composite_block(out_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project(x)
        return x + self.refine(x)


class LocalAttention(nn.Module):
    """Softmax attention of each pixel over its ``window`` x ``window`` neighbourhood (Q, K, V by 1x1 convs).

    Computed offset by offset on a padded map (no unfold), so memory stays O(channels x pixels); positions
    outside the map are masked out rather than read as zeros.
    """

    def __init__(self, channels: int, window: int = 5):
        super().__init__()
        self.window = window
        self.key_channels = max(8, channels // 4)
        self.query = nn.Conv2d(channels, self.key_channels, 1)
        self.key = nn.Conv2d(channels, self.key_channels, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        pad = self.window // 2
        query = self.query(x) * self.key_channels**-0.5
        key = F.pad(self.key(x), (pad, pad, pad, pad))
        value = F.pad(self.value(x), (pad, pad, pad, pad))
        inside = F.pad(torch.ones_like(x[:, :1]), (pad, pad, pad, pad))
        offsets = [(dy, dx) for dy in range(self.window) for dx in range(self.window)]
        logits = torch.cat(
            [(query * key[..., dy : dy + height, dx : dx + width]).sum(1, keepdim=True) for dy, dx in offsets], 1
        )
        mask = torch.cat([inside[..., dy : dy + height, dx : dx + width] for dy, dx in offsets], 1)
        weights = torch.softmax(logits.masked_fill(mask == 0, float("-inf")), dim=1)
        attended = sum(
            weights[:, index : index + 1] * value[..., dy : dy + height, dx : dx + width]
            for index, (dy, dx) in enumerate(offsets)
        )
        return self.out(attended)


class DecoderStage(nn.Module):
    """Upsample x2, add the refined skip, add local attention."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, depth_to_space: bool, window: int):
        super().__init__()
        self.up = (DepthToSpaceUp if depth_to_space else BilinearUp)(in_channels, out_channels)
        self.skip = SkipRefine(skip_channels, out_channels)
        self.attention = LocalAttention(out_channels, window)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x) + self.skip(skip)
        return x + self.attention(x)


class PixNet(nn.Module):
    """RGB window in [0, 1] (batch, 3, H, W), H and W multiples of 32 -> density (batch, genes, H/s, W/s)."""

    config_class = PixNetConfig
    input_multiple = INPUT_MULTIPLE

    def __init__(self, config: PixNetConfig, load_encoder_weights: bool = True):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.encoder, load_weights=load_encoder_weights)
        channels, reductions = self.encoder.channels, self.encoder.reductions
        if reductions[-1] != 32:
            raise GenemapInputError(f"encoder {config.encoder.name!r}: deepest stride {reductions[-1]}; expected 32")
        self.bottleneck = composite_block(channels[-1], DECODER_WIDTHS[0])
        n_stages = {2: 4, 4: 3, 8: 2, 16: 1}[config.stride]
        self.stages = nn.ModuleList(
            DecoderStage(
                DECODER_WIDTHS[index],
                channels[-2 - index],
                DECODER_WIDTHS[index + 1],
                depth_to_space=index < config.depth_to_space_stages,
                window=config.attention_window,
            )
            for index in range(n_stages)
        )
        width = DECODER_WIDTHS[n_stages]
        # Low rank (issue 13's ablation): the features map to k component scores, and the head mixes the k
        # components into the genes; `set_gene_components` starts the mix at the counts' principal components.
        self.gene_factors = nn.Conv2d(width, config.gene_rank, 1, bias=False) if config.gene_rank else None
        self.head = nn.Conv2d(config.gene_rank or width, config.n_genes, 1)

    @classmethod
    def from_config(cls, config: PixNetConfig) -> PixNet:
        """The architecture with random weights and nothing downloaded (a checkpoint brings the weights)."""
        return cls(config, load_encoder_weights=False)

    @property
    def stride(self) -> int:
        return self.config.stride

    def forward(self, image: torch.Tensor, margin: int = 0) -> torch.Tensor:
        """``margin``: output pixels to drop on every side before the gene head. The tile engine keeps only
        a window's centre (the rest is halo, context for the decoder); the head and softplus act per pixel,
        so skipping them on the halo changes no kept value and saves most of their cost (785 genes at
        448 x 448 px for a 1792 px window, of which 256 x 256 are kept)."""
        features = self.features(image, margin)
        if self.gene_factors is not None:
            features = self.gene_factors(features)
        return F.softplus(self.head(features))

    @property
    def feature_channels(self) -> int:
        """Channels of `features`' map (what the gene head reads)."""
        return DECODER_WIDTHS[len(self.stages)]

    def features(self, image: torch.Tensor, margin: int = 0) -> torch.Tensor:
        """The decoder's last map (batch, `feature_channels`, H/s, W/s), before the gene head: what DiffBulk's
        stage 2 takes as the pathology feature p."""
        height, width = image.shape[-2:]
        if height % self.input_multiple or width % self.input_multiple:
            raise GenemapInputError(
                f"PixNet input {height} x {width} px: both sides must be multiples of {self.input_multiple}"
            )
        features = self.encoder(image)
        x = self.bottleneck(features[-1])
        for index, stage in enumerate(self.stages):
            x = stage(x, features[-2 - index])
        if margin:
            x = x[..., margin : x.shape[-2] - margin, margin : x.shape[-1] - margin]
        return x

    def set_output_scale(self, density: torch.Tensor) -> None:
        """Start the head at a per-gene density (expression per output pixel), e.g. the training mean."""
        set_output_scale(self.head, density)

    @torch.no_grad()
    def set_gene_components(self, components: torch.Tensor) -> None:
        """Start a low-rank head's mix at ``components`` (k, genes), e.g. the counts' principal axes: a
        component score then moves the genes together the way they co-vary in the data. The factors start
        small (the head starts near its output scale, as `set_output_scale` does for a full head)."""
        if self.gene_factors is None:
            raise GenemapInputError("set_gene_components: this PixNet has a full gene head (gene_rank 0)")
        components = torch.as_tensor(components, dtype=self.head.weight.dtype)
        if tuple(components.shape) != (self.config.gene_rank, self.config.n_genes):
            raise GenemapInputError(
                f"gene components of shape {tuple(components.shape)}; expected "
                f"({self.config.gene_rank}, {self.config.n_genes})"
            )
        self.head.weight.copy_(components.T[..., None, None])
        self.gene_factors.weight.mul_(0.1)


@torch.no_grad()
def set_output_scale(head: nn.Conv2d, density: torch.Tensor) -> None:
    """Start a gene head (softplus after it) at a per-gene density (expression per output pixel).

    The protocol loss cannot see the map's absolute scale, so starting near it saves many steps.
    """
    bias = head.bias
    assert bias is not None  # gene heads are built with a bias
    density = torch.as_tensor(density, dtype=bias.dtype).clamp(min=1e-6)
    bias.copy_(density + torch.log(-torch.expm1(-density)))  # softplus^-1
    head.weight.mul_(0.1)
