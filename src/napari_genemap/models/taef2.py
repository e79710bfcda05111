"""TAEF2, the tiny autoencoder distilled from the FLUX.2 VAE (madebyollin/taesd, MIT): an optional latent
space for DiffBulk's diffusion (224 px RGB -> 32 x 28 x 28), so a CPU can train stage 1.

Our own modules, written from the key layout of the published state dicts (``taef2_encoder.pth``,
``taef2_decoder.pth``: fp16 plain state dicts of an ``nn.Sequential``; see ``shared/weights/README.md``);
every key matches exactly, and the weights load with ``weights_only=True`` (no unpickling of code) and are
cast to float32. The weights are not shipped: give the folder that holds them.

Layout: residual blocks of three 3x3 convs (64 channels, ReLU between, identity skip, ReLU after the sum);
stride-2 3x3 convs without bias downsample three times (/8); the three blocks at the lowest resolution add a
``pool`` branch first, x + pool(x) with pool = 1x1 conv 64->256, GroupNorm(4, 256), ReLU, 1x1 conv 256->64
(the order that reconstructs H&E at 31 dB; applied after the block it gives 26 dB). The decoder soft-clamps
its input to (-3, 3) with 3 tanh(x / 3), then mirrors the encoder with nearest x2 upsampling.

Images are RGB in [0, 1]. Latents are stored as z / 6 + 0.5 (TAESD's convention; on H&E z has a std of
about 0.8, so stored latents sit near 0.5 with a std of about 0.14).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GenemapInputError

CHANNELS = 64
LATENT_CHANNELS = 32
DOWNSCALE = 8
LATENT_SCALE = 6.0  # stored = z / LATENT_SCALE + LATENT_SHIFT
LATENT_SHIFT = 0.5
FILES = {"encoder": "taef2_encoder.pth", "decoder": "taef2_decoder.pth"}


class Block(nn.Module):
    """relu(conv(y) + y) with y = x (+ pool(x) in the mid blocks)."""

    def __init__(self, pool: bool = False):
        super().__init__()
        self.conv = nn.Sequential(
            _conv(CHANNELS, CHANNELS), nn.ReLU(), _conv(CHANNELS, CHANNELS), nn.ReLU(), _conv(CHANNELS, CHANNELS)
        )
        self.pool = (
            nn.Sequential(
                nn.Conv2d(CHANNELS, 4 * CHANNELS, 1, bias=False),
                nn.GroupNorm(4, 4 * CHANNELS),
                nn.ReLU(),
                nn.Conv2d(4 * CHANNELS, CHANNELS, 1, bias=False),
            )
            if pool
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return F.relu(self.conv(x) + x)


class SoftClamp(nn.Module):
    """3 tanh(x / 3): keeps the decoder's input within (-3, 3) without a hard edge."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


def _conv(cin: int, cout: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)


def encoder() -> nn.Sequential:
    """RGB [0, 1] (B, 3, H, W) -> z (B, 32, H/8, W/8); keys as in ``taef2_encoder.pth``."""
    layers: list[nn.Module] = [_conv(3, CHANNELS), Block()]
    for stage in range(3):
        layers.append(_conv(CHANNELS, CHANNELS, stride=2, bias=False))
        layers += [Block(pool=stage == 2) for _ in range(3)]
    layers.append(_conv(CHANNELS, LATENT_CHANNELS))
    return nn.Sequential(*layers)


def decoder() -> nn.Sequential:
    """z (B, 32, h, w) -> RGB (B, 3, 8h, 8w), about [0, 1]; keys as in ``taef2_decoder.pth``."""
    layers: list[nn.Module] = [SoftClamp(), _conv(LATENT_CHANNELS, CHANNELS), nn.ReLU()]
    layers += [Block(pool=True) for _ in range(3)]
    for blocks in (3, 3, 1):
        layers += [nn.Upsample(scale_factor=2), _conv(CHANNELS, CHANNELS, bias=False)]
        layers += [Block() for _ in range(blocks)]
    layers.append(_conv(CHANNELS, 3))
    return nn.Sequential(*layers)


class TAEF2(nn.Module):
    """The pair, with helpers that speak RGB in [0, 1] and stored latents (z / 6 + 0.5)."""

    def __init__(self):
        super().__init__()
        self.encoder = encoder()
        self.decoder = decoder()

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> TAEF2:
        """Load ``taef2_encoder.pth`` and ``taef2_decoder.pth`` from ``folder`` (strict key match, float32),
        frozen and in eval mode."""
        model = cls()
        folder = Path(folder)
        for part, name in FILES.items():
            module = getattr(model, part)
            module.load_state_dict(_read_state(folder / name, module.state_dict()))
        return model.eval().requires_grad_(False)

    def encode(self, rgb: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] (B, 3, H, W), H and W multiples of 8 -> stored latents (B, 32, H/8, W/8)."""
        if rgb.ndim != 4 or rgb.shape[1] != 3 or rgb.shape[2] % DOWNSCALE or rgb.shape[3] % DOWNSCALE:
            raise GenemapInputError(
                f"TAEF2: image batch of shape {tuple(rgb.shape)}; expected (B, 3, H, W) with H, W multiples of 8"
            )
        return self.encoder(rgb) / LATENT_SCALE + LATENT_SHIFT

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Stored latents (B, 32, h, w) -> RGB in [0, 1] (B, 3, 8h, 8w)."""
        if latents.ndim != 4 or latents.shape[1] != LATENT_CHANNELS:
            raise GenemapInputError(f"TAEF2: latents of shape {tuple(latents.shape)}; expected (B, 32, h, w)")
        return self.decoder((latents - LATENT_SHIFT) * LATENT_SCALE).clamp(0, 1)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        """The round trip: what a tile looks like after passing through the latent space."""
        return self.decode(self.encode(rgb))


def _read_state(path: Path, target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A plain tensor state dict whose keys and shapes match ``target`` exactly, cast to float32."""
    if not path.is_file():
        raise GenemapInputError(f"{path}: TAEF2 weights file not found (expected {', '.join(FILES.values())})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors name no file; say which one and why
        raise GenemapInputError(f"{path}: not a plain tensor state dict ({type(error).__name__})") from None
    if not isinstance(state, dict):
        raise GenemapInputError(f"{path}: holds a {type(state).__name__}; expected a state dict")
    missing = [key for key in target if key not in state]
    unexpected = [key for key in state if key not in target]
    if missing or unexpected:
        example = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise GenemapInputError(
            f"{path}: {len(missing)} keys missing and {len(unexpected)} unexpected ({example}); expected TAEF2's layout"
        )
    for key, value in target.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise GenemapInputError(
                f"{path}: weight {key!r} has shape {tuple(state[key].shape)}; expected {tuple(value.shape)}"
            )
    return {key: value.to(torch.float32) for key, value in state.items()}
