"""DiffBulk stage 2, pooled (as published): a tile centred on a spot -> that spot's expression.

The dense model's parts and config (`diffbulk_dense`), averaged over the tile before the fusion: p is the
PixNet decoder map averaged over the tile, f each frozen U-Net decoder stage reduced (conv 3x3, GroupNorm,
SiLU) and averaged (`fusion.FeatureReducer` without a size), z = p + sigmoid(W_g [p; f]) * (W_p f), and a
linear head to the protocol-normalised expression (trained with MSE; no softplus, no spot integral). The tile
is the feature tile, stage 1's own (e.g. 256 µm = 128 px at 2 µm/px): the U-Net sees what it was trained on.

One vector per tile is not a map: the class is registered so its checkpoints load, and the tile engine
refuses it (`registry.GENE_MAP_MODELS`).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import GenemapInputError
from .diffbulk_dense import DiffBulkDense, DiffBulkDenseConfig
from .predict import to_input


class DiffBulkPooled(DiffBulkDense):
    """RGB tiles in [0, 1] (batch, 3, T, T), T = ``config.feature_tile`` -> expression (batch, genes)."""

    config_class = DiffBulkDenseConfig

    @classmethod
    def from_config(cls, config: DiffBulkDenseConfig) -> DiffBulkPooled:
        return cls(config)

    def start_head(self, mean_expression: torch.Tensor) -> None:
        """Start predicting the training spots' mean expression: a zero head with that bias (a PixNet's
        head predicts a density, not expression, so it is no start for this one)."""
        with torch.no_grad():
            self.head.weight.zero_()
            assert self.head.bias is not None  # built with a bias
            self.head.bias.copy_(mean_expression.to(self.head.bias))

    def forward(self, image: torch.Tensor, margin: int = 0) -> torch.Tensor:
        side = self.config.feature_tile
        if image.shape[-2:] != (side, side):
            raise GenemapInputError(
                f"DiffBulk pooled input {tuple(image.shape[-2:])} px: expected tiles of {side} x {side} px"
            )
        use = self.config.features
        p = None if use == "diffusion" else self.pathology.features(image).mean((2, 3))
        if use == "pathology":
            z = p
        else:
            f = self.reducer(self.stage_maps(image))
            z = self.fusion(f.new_zeros(f.shape[0], self.head.in_channels) if p is None else p, f)
        assert z is not None  # one of the branches ran
        return self.head(z[..., None, None])[..., 0, 0]


@torch.no_grad()
def predict_tiles(model: DiffBulkPooled, tiles: np.ndarray, batch: int = 16) -> np.ndarray:
    """Expression (n, genes) float32 of uint8 tiles (n, T, T, 3), in batches."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(tiles), batch):
        out.append(model(to_input(tiles[start : start + batch], device)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.n_genes), np.float32)
