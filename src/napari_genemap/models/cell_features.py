"""Histology features for every cell of a spot grid, at two scales: what Diff-ST is conditioned on.

A frozen gene-map model's last feature map (`PixNet.features`: the decoder's map before the gene head, at
its output stride) is computed over the whole section in windows with a halo, then averaged over two boxes
per grid cell: the **cell** scale (a box the spot's diameter wide, the tissue the spot measured) and the
**tissue** scale (a box ``tissue`` times wider: the neighbourhood). A PixNet trained on the training
sections is the best encoder we have here (its features already separate what predicts expression); the
features of a fold's PixNet never saw the fold's test section.

The boxes are averaged with a summed-area table (one lookup per box, exact for any box): a square box
rather than the disk, as the map is smooth at the spot's scale and a box costs nothing per cell.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch

from ..data.windows import crop
from ..errors import GenemapInputError


class FeatureModel(Protocol):
    """A gene-map model with a feature map before its head (PixNet)."""

    stride: int
    input_multiple: int

    def eval(self): ...

    def features(self, image: torch.Tensor, margin: int = 0) -> torch.Tensor: ...


@torch.no_grad()
def feature_map(
    model: FeatureModel,
    image: np.ndarray,
    *,
    window: int = 1024,
    halo: int = 64,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """``model.features`` over an (H, W, 3) uint8 image, in ``window``-px windows overlapping by ``halo`` px
    on each side (mirrored at the borders) -> (channels, ceil(H / stride), ceil(W / stride)) float32."""
    stride, multiple = int(model.stride), int(model.input_multiple)
    if window % multiple or halo % multiple or window <= 2 * halo:
        raise GenemapInputError(
            f"feature windows: window {window} px and halo {halo} px must be multiples of {multiple}, "
            "with the window more than twice the halo"
        )
    height, width = image.shape[:2]
    core = window - 2 * halo
    rows, cols = math.ceil(height / stride), math.ceil(width / stride)
    out: np.ndarray | None = None
    model.eval()
    for y0 in range(0, height, core):
        for x0 in range(0, width, core):
            tile = crop(image, x0 - halo, y0 - halo, window)
            x = torch.from_numpy(np.ascontiguousarray(tile)).to(device).permute(2, 0, 1)[None].float() / 255.0
            features = model.features(x, margin=halo // stride)[0].float().cpu().numpy()
            if out is None:
                out = np.zeros((len(features), rows, cols), dtype=np.float32)
            r0, c0 = y0 // stride, x0 // stride
            r1, c1 = min(rows, r0 + core // stride), min(cols, c0 + core // stride)
            out[:, r0:r1, c0:c1] = features[:, : r1 - r0, : c1 - c0]
    if out is None:
        raise GenemapInputError(f"feature map: the image is empty ({height} x {width} px)")
    return out


def box_means(features: np.ndarray, centres: np.ndarray, side: float) -> np.ndarray:
    """Means of a (channels, H, W) map over ``side``-wide boxes centred at ``centres`` (..., 2) as (x, y) in
    the map's pixels (pixel i covers [i, i + 1)); boxes are clipped to the map -> (..., channels)."""
    channels, height, width = features.shape
    table = np.zeros((channels, height + 1, width + 1), dtype=np.float64)
    table[:, 1:, 1:] = features.astype(np.float64).cumsum(1).cumsum(2)
    flat = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    half = max(side, 1.0) / 2

    def nearest(edge: np.ndarray) -> np.ndarray:  # halves round up (np.round would round them to even)
        return np.floor(edge + 0.5)

    x0 = np.clip(nearest(flat[:, 0] - half), 0, width - 1).astype(np.int64)
    y0 = np.clip(nearest(flat[:, 1] - half), 0, height - 1).astype(np.int64)
    x1 = np.clip(nearest(flat[:, 0] + half), x0 + 1, width).astype(np.int64)
    y1 = np.clip(nearest(flat[:, 1] + half), y0 + 1, height).astype(np.int64)
    sums = table[:, y1, x1] - table[:, y0, x1] - table[:, y1, x0] + table[:, y0, x0]
    means = (sums / ((y1 - y0) * (x1 - x0))).T.astype(np.float32)
    return means.reshape(*np.shape(centres)[:-1], channels)


def cell_features(
    features: np.ndarray, stride: int, centres: np.ndarray, diameter: float, tissue: float = 4.0
) -> np.ndarray:
    """Both scales for a grid of cells: ``centres`` (H, W, 2) and the spot ``diameter`` in the model's input
    pixels -> (2 x channels, H, W): the cell box's means, then the ``tissue``-times-wider box's."""
    if diameter <= 0 or tissue < 1:
        raise GenemapInputError(f"cell features: diameter {diameter} px, tissue x{tissue}; expected > 0 and >= 1")
    at = np.asarray(centres, dtype=np.float64) / stride
    cell = box_means(features, at, diameter / stride)
    around = box_means(features, at, tissue * diameter / stride)
    return np.moveaxis(np.concatenate([cell, around], -1), -1, 0)
