"""The classic crop regressor (ST-Net style): a spot-centred crop -> encoder -> pooled -> linear head.

It predicts a spot's protocol-normalised profile directly and knows nothing of the spot's size; the
benchmark trains it beside PixNet, on the same folds, so the dense formulation is compared side by side.
"""

from __future__ import annotations

import torch
from torch import nn

from .encoders import Encoder, EncoderConfig


class CropRegressor(nn.Module):
    """RGB crops in [0, 1] (batch, 3, S, S) -> protocol values (batch, genes)."""

    def __init__(self, n_genes: int, encoder: EncoderConfig | None = None, dropout: float = 0.2):
        super().__init__()
        self.encoder = Encoder(encoder or EncoderConfig())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.encoder.channels[-1], n_genes))

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(crops)[-1].mean((-2, -1)))


@torch.inference_mode()
def pooled_features(encoder: Encoder, crops: torch.Tensor, levels: int = 2) -> torch.Tensor:
    """Frozen-encoder embedding of crops: the spatial mean of the deepest ``levels`` feature maps."""
    encoder.eval()
    return torch.cat([f.mean((-2, -1)) for f in encoder(crops)[-levels:]], 1)
