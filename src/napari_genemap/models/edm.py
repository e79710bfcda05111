"""DiffBulk stage 1: an EDM denoiser that draws tissue given an expression vector.

Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models" (EDM, NeurIPS 2022):
the network F is wrapped as D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), with

    c_skip = sd^2 / (sigma^2 + sd^2)    c_out = sigma sd / sqrt(sigma^2 + sd^2)
    c_in   = 1 / sqrt(sigma^2 + sd^2)   c_noise = ln(sigma) / 4           (sd = sigma_data = 0.5)

so that F's input and target have unit variance at every noise level. Training draws
ln(sigma) ~ N(P_mean, P_std^2) with P_mean = -0.4, P_std = 1.0 (DiffBulk's setting; EDM used -1.2) and
weights the squared error by lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2. EDM2 (Karras et al. 2024)
adds a learned log-variance u(sigma) per noise level: loss = lambda ||D - x||^2 / exp(u) + u, which
balances the noise levels' contributions automatically (`UncertaintyWeight`).

The condition (a `GeneEncoder` vector) is projected and added to the U-Net's noise-level embedding. It is
dropped **per sample** with probability ``p_drop`` (DiffBulk's "probabilistic masking switch", which the
paper draws once per batch): a dropped sample gets nothing added, so the same U-Net also denoises
unconditioned and the sampler can use classifier-free guidance.

Sampling: EDM's deterministic 2nd-order Heun solver (Algorithm 1) on the rho = 7 noise schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple, cast

import torch
from torch import nn

from ..errors import GenemapInputError

SIGMA_DATA = 0.5
#: A denoiser as the sampler sees it: D(x, sigma (B,), condition (B, dim) or None, keep (B,) bool) -> x0.
Denoise = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class EDMConfig:
    """The U-Net (diffusers `UNet2DModel` arguments), the condition size and EDM's training constants."""

    in_channels: int = 32  # TAEF2 latents; 3 in pixel space
    sample_size: int = 28  # 224 px tiles through TAEF2's /8
    block_out_channels: tuple[int, ...] = (64, 128, 256)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 2
    attention_head_dim: int = 32
    norm_num_groups: int = 32
    dropout: float = 0.0
    condition_dim: int = 256  # the gene encoder's output size
    space: str = "taef2"  # "taef2" (latents x/6 + 0.5, see models.taef2) or "pixel"
    sigma_data: float = SIGMA_DATA
    p_mean: float = -0.4
    p_std: float = 1.0
    p_drop: float = 0.5

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        object.__setattr__(self, "down_block_types", tuple(self.down_block_types))
        object.__setattr__(self, "up_block_types", tuple(self.up_block_types))
        if not len(self.block_out_channels) == len(self.down_block_types) == len(self.up_block_types):
            raise GenemapInputError("EDM config: block_out_channels, down and up block types differ in length")
        if self.space not in ("taef2", "pixel"):
            raise GenemapInputError(f"EDM config: space {self.space!r}; expected 'taef2' or 'pixel'")
        if not 0.0 <= self.p_drop <= 1.0:
            raise GenemapInputError(f"EDM config: p_drop {self.p_drop}; expected a probability in [0, 1]")
        if self.sample_size % 2 ** (len(self.block_out_channels) - 1):
            raise GenemapInputError(
                f"EDM config: sample_size {self.sample_size} is not divisible by the U-Net's "
                f"{2 ** (len(self.block_out_channels) - 1)}x downsampling"
            )

    def to_dict(self) -> dict:
        data = asdict(self)
        for key in ("block_out_channels", "down_block_types", "up_block_types"):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict) -> EDMConfig:
        return cls(**data)


#: ``cpu-small``: the widths measured on two CPU cores in issue 16 (0.58 s per batch of 16 on 32 x 28 x 28
#: TAEF2 latents), 16.2 M parameters with attention at 14 x 14 and 7 x 7. ``paper``: DiffBulk's published
#: scale, pixel space, 224 px tiles at 0.5 µm/px, 122.3 M parameters (the paper: 122 M): a GPU setting.
PRESETS: dict[str, EDMConfig] = {
    "cpu-small": EDMConfig(),
    "paper": EDMConfig(
        in_channels=3,
        sample_size=224,
        block_out_channels=(128, 256, 320, 512, 512),
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        attention_head_dim=64,
        dropout=0.1,
        condition_dim=256,
        space="pixel",
    ),
}


def preset(name: str, **changes) -> EDMConfig:
    """A named size (`PRESETS`), optionally with some fields changed."""
    if name not in PRESETS:
        raise GenemapInputError(f"EDM preset {name!r} unknown; expected one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **changes)


class Preconditioning(NamedTuple):
    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor
    c_noise: torch.Tensor


def preconditioning(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> Preconditioning:
    """EDM's coefficients at noise level ``sigma`` (any shape, > 0)."""
    variance = sigma**2 + sigma_data**2
    return Preconditioning(
        c_skip=sigma_data**2 / variance,
        c_out=sigma * sigma_data / variance.sqrt(),
        c_in=1 / variance.sqrt(),
        c_noise=sigma.log() / 4,
    )


def loss_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """EDM's lambda(sigma) = 1 / c_out^2: makes the effective target of F unit-weighted at every sigma."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def sample_sigma(
    n: int,
    p_mean: float = -0.4,
    p_std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training noise levels: ln(sigma) ~ N(p_mean, p_std^2), shape (n,)."""
    return (torch.randn(n, generator=generator, device=device) * p_std + p_mean).exp()


def keep_condition(
    n: int, p_drop: float, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """The masking switch, drawn per sample: True keeps the sample's condition, False drops it (prob p_drop)."""
    return torch.rand(n, generator=generator, device=device) >= p_drop


class UncertaintyWeight(nn.Module):
    """EDM2's learned log-variance u(sigma): fixed random Fourier features of c_noise, then a small MLP.

    The last layer starts at zero, so training starts from plain EDM weighting (u = 0)."""

    frequencies: torch.Tensor
    phases: torch.Tensor

    def __init__(self, features: int = 64, hidden: int = 64, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("frequencies", torch.randn(features, generator=generator))
        self.register_buffer("phases", torch.rand(features, generator=generator))
        last = nn.Linear(hidden, 1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.mlp = nn.Sequential(nn.Linear(features, hidden), nn.SiLU(), last)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        """c_noise (B,) -> u (B,)."""
        angles = 2 * math.pi * (c_noise.reshape(-1, 1).to(self.frequencies.dtype) * self.frequencies + self.phases)
        return self.mlp(angles.cos() * math.sqrt(2)).squeeze(-1)


class EDMDenoiser(nn.Module):
    """D(x; sigma, condition): a diffusers `UNet2DModel` in EDM's preconditioning."""

    def __init__(self, config: EDMConfig | None = None):
        super().__init__()
        from diffusers import UNet2DModel

        self.config = config = config or EDMConfig()
        # mypy does not see diffusers' ModelMixin as an nn.Module
        self.unet = cast(
            nn.Module,
            UNet2DModel(
                sample_size=config.sample_size,
                in_channels=config.in_channels,
                out_channels=config.in_channels,
                block_out_channels=config.block_out_channels,
                down_block_types=config.down_block_types,
                up_block_types=config.up_block_types,
                layers_per_block=config.layers_per_block,
                attention_head_dim=config.attention_head_dim,
                norm_num_groups=config.norm_num_groups,
                dropout=config.dropout,
                # "positional" (sinusoidal) embeds c_noise as EDM's own networks do; "fourier" would divide the
                # output by the timestep (score-SDE's convention), which breaks the preconditioning.
                time_embedding_type="positional",
                # "identity": the U-Net adds class_labels to its time embedding as they are, and the projection
                # below is ours. UNet2DModel offers no projection type (only UNet2DConditionModel does), and
                # "timestep" would embed the vector as if it were scalars. Adding to the embedding (not
                # cross-attention through UNet2DConditionModel) is what DiffBulk does: one vector per tile
                # reaches every resnet block through the embedding it adds, at no attention cost on CPU.
                class_embed_type="identity",
            ),
        )
        embedding_dim = 4 * config.block_out_channels[0]  # UNet2DModel's time embedding size
        self.condition = nn.Linear(config.condition_dim, embedding_dim)
        self.uncertainty = UncertaintyWeight()

    @classmethod
    def from_config(cls, config: EDMConfig) -> EDMDenoiser:
        return cls(config)

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        condition: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Noisy ``x`` (B, C, H, W) at ``sigma`` (scalar or (B,)) -> the denoised estimate of the clean x.

        ``condition`` (B, condition_dim) or None (unconditioned); ``keep`` (B,) bool drops the condition
        where False (default: keep all)."""
        batch = len(x)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(batch)
        c_skip, c_out, c_in, c_noise = preconditioning(sigma.reshape(-1, 1, 1, 1), self.config.sigma_data)
        embedding_dim = self.condition.out_features
        if condition is None:
            added = x.new_zeros(batch, embedding_dim)
        else:
            added = self.condition(condition.to(x.dtype))
            if keep is not None:
                added = added * keep.reshape(-1, 1).to(added.dtype)  # dropped: nothing added at all
        out = self.unet(c_in * x, c_noise.reshape(-1), class_labels=added).sample
        return c_skip * x + c_out * out.to(x.dtype)


class EDMLoss(NamedTuple):
    loss: torch.Tensor  # scalar to minimise (with EDM2's uncertainty when the denoiser has one)
    sigma: torch.Tensor  # (B,) the noise levels drawn
    weighted_mse: torch.Tensor  # (B,) lambda(sigma) x mean squared error, detached: for per-band curves
    keep: torch.Tensor  # (B,) which samples kept their condition


def edm_loss(
    denoiser: EDMDenoiser,
    x: torch.Tensor,
    condition: torch.Tensor | None = None,
    *,
    sigma: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    p_drop: float | None = None,
    generator: torch.Generator | None = None,
    uncertainty: bool = True,
) -> EDMLoss:
    """One EDM training loss on clean ``x``: noise levels from the config's lognormal (or ``sigma``), unit
    noise drawn (or ``noise``), the condition dropped per sample with ``p_drop`` (default the config's; 0
    draws nothing), EDM2's weighting if ``uncertainty``."""
    config = denoiser.config
    batch = len(x)
    if sigma is None:
        sigma = sample_sigma(batch, config.p_mean, config.p_std, generator, x.device)
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(batch)
    p_drop = config.p_drop if p_drop is None else p_drop
    if p_drop:
        keep = keep_condition(batch, p_drop, generator, x.device)
    else:
        keep = torch.ones(batch, dtype=torch.bool, device=x.device)
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    denoised = denoiser(x + noise * sigma.reshape(-1, 1, 1, 1), sigma, condition, keep)
    weighted = loss_weight(sigma, config.sigma_data) * (denoised - x).square().flatten(1).mean(1)
    if uncertainty:
        u = denoiser.uncertainty(preconditioning(sigma, config.sigma_data).c_noise)
        loss = (weighted / u.exp() + u).mean()
    else:
        loss = weighted.mean()
    return EDMLoss(loss, sigma, weighted.detach(), keep)


def noise_levels(
    steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, device=None
) -> torch.Tensor:
    """EDM's sampling schedule: ``steps`` levels from sigma_max to sigma_min spaced evenly in sigma^(1/rho),
    then 0; shape (steps + 1,), float64."""
    if steps < 1:
        raise GenemapInputError(f"sampler: steps {steps}; expected at least 1")
    i = torch.arange(steps, dtype=torch.float64, device=device)
    ramp = i / max(steps - 1, 1)
    levels = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([levels, levels.new_zeros(1)])


def guided(
    denoise: Denoise, x: torch.Tensor, sigma: torch.Tensor, condition: torch.Tensor | None, guidance: float | None
) -> torch.Tensor:
    """One denoiser call: conditional (or unconditional) when ``guidance`` is None, else classifier-free
    guidance D = D_uncond + w (D_cond - D_uncond), both halves in one batch."""
    batch = len(x)
    if guidance is None:
        keep = torch.full((batch,), condition is not None, dtype=torch.bool, device=x.device)
        return denoise(x, sigma, condition, keep)
    if condition is None:
        raise GenemapInputError("sampler: classifier-free guidance needs a condition")
    keep = torch.cat([torch.ones(batch, dtype=torch.bool), torch.zeros(batch, dtype=torch.bool)]).to(x.device)
    both = denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([condition, condition]), keep)
    conditional, unconditional = both[:batch], both[batch:]
    return unconditional + guidance * (conditional - unconditional)


@torch.no_grad()
def heun_sample(
    denoise: Denoise,
    noise: torch.Tensor,
    condition: torch.Tensor | None = None,
    *,
    steps: int = 32,
    guidance: float | None = None,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    progress: Callable[[int, int, str], None] | None = None,
) -> torch.Tensor:
    """EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 1): from ``noise`` ~ N(0, I) of the
    output's shape to samples, in ``steps`` levels (2 * steps - 1 denoiser evaluations; twice as many
    images per call with ``guidance``). ``denoise`` may be an `EDMDenoiser` or any function of its form."""
    levels = noise_levels(steps, sigma_min, sigma_max, rho, noise.device).to(noise.dtype)
    x = noise * levels[0]
    batch = len(x)
    for i in range(steps):
        sigma, following = levels[i], levels[i + 1]
        slope = (x - guided(denoise, x, sigma.expand(batch), condition, guidance)) / sigma
        proposal = x + (following - sigma) * slope
        if following > 0:  # second-order correction, except on the last step to sigma = 0
            corrected = (proposal - guided(denoise, proposal, following.expand(batch), condition, guidance)) / following
            proposal = x + (following - sigma) * (slope + corrected) / 2
        x = proposal
        if progress is not None:
            progress(i + 1, steps, f"sampling: sigma {float(following):.3g}")
    return x
