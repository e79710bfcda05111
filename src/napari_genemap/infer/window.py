"""Predict the dense map of one in-memory window (the demo, notebooks); whole slides go through the tiles."""

from __future__ import annotations

import numpy as np
import torch

MULTIPLE = 32  # PixNet's input sides must be multiples of its deepest stride


@torch.inference_mode()
def predict_map(model, image: np.ndarray) -> np.ndarray:
    """Density (genes, ceil(H/32)*32/stride, ...) of an (H, W, 3) uint8 image at the model's µm/px.

    The image is padded by reflection to a multiple of 32 px at the bottom and right; the map covers the
    padded image, so map pixel (i, j) still covers image pixels [j*s, (j+1)*s) x [i*s, (i+1)*s).
    """
    model.eval()
    height, width = image.shape[:2]
    pad_y, pad_x = -height % MULTIPLE, -width % MULTIPLE
    if pad_y or pad_x:
        image = np.pad(image, ((0, pad_y), (0, pad_x), (0, 0)), mode="reflect")
    device = next(model.parameters()).device
    pixels = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)[None].float() / 255
    return model(pixels)[0].float().cpu().numpy()
