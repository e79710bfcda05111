"""Predict measured spots from spot-centred windows (evaluation and training-time validation).

Each spot gets the window centred on it, so every spot sees the same amount of context whatever its
place on the slide; the dense map of that window is integrated over the spot's disk. Whole-slide maps
and any-ROI aggregation come from the tiled engine instead.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..data.windows import crop
from ..models.aggregation import aggregate_disks


@torch.inference_mode()
def predict_spots(
    model,
    image: np.ndarray,
    centers: np.ndarray,
    radii: np.ndarray,
    window: int,
    batch_size: int = 8,
    cancel: Callable[[], bool] | None = None,
) -> np.ndarray:
    """Raw-scale predictions (spots, genes) for disks given in pixels of ``image`` (H, W, 3) uint8."""
    model.eval()
    device = next(model.parameters()).device
    if np.any(2 * radii > window):
        raise ValueError(f"a spot of diameter {2 * radii.max():.0f} px does not fit in a {window} px window")
    origins = np.floor(centers - window / 2).astype(np.int64)
    out = []
    for start in range(0, len(centers), batch_size):
        if cancel is not None and cancel():
            raise InterruptedError("prediction cancelled")
        stop = min(start + batch_size, len(centers))
        windows = np.stack([crop(image, x, y, window) for x, y in origins[start:stop]])
        pixels = torch.from_numpy(windows).to(device).permute(0, 3, 1, 2).float() / 255
        density = model(pixels).float()
        for offset, index in enumerate(range(start, stop)):
            center = torch.as_tensor(centers[index] - origins[index])[None]
            radius = torch.as_tensor(radii[index : index + 1])
            out.append(aggregate_disks(density[offset], center, radius, stride=model.stride).cpu())
    return torch.cat(out).numpy().astype(np.float64)
