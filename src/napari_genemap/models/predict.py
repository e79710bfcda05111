"""Run a model on pixels held in memory: one window's dense map (the demo, notebooks) and spot-centred
windows' spot values (evaluation, training-time validation); whole slides go through the tiled engine.

`to_input` is the one conversion from image pixels to what a model takes, shared by every caller.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..data.windows import crop
from .aggregation import aggregate_disks
from .registry import INPUT_MULTIPLE


def to_input(pixels: np.ndarray, device: str | torch.device | None = None) -> torch.Tensor:
    """(n, H, W, 3) uint8 -> (n, 3, H, W) float32 in [0, 1] on ``device`` (cast there: 4x less to copy).

    One (H, W, 3) image becomes a batch of one. The result stays a view of the channels-last pixels: the
    kernels torch picks, and so the last bits of a map, follow the strides, and these are the ones the
    tiles, spots and windows have always used.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(pixels)).to(device)
    if tensor.ndim == 3:
        return tensor.permute(2, 0, 1)[None].float() / 255
    return tensor.permute(0, 3, 1, 2).float() / 255


@torch.inference_mode()
def predict_map(model, image: np.ndarray) -> np.ndarray:
    """Density (genes, ceil(H/m)*m/stride, ...) of an (H, W, 3) uint8 image at the model's µm/px
    (m: the model's input multiple).

    The image is padded by reflection to a multiple of the model's input multiple (32 px for PixNet) at the
    bottom and right; the map covers the padded image, so map pixel (i, j) still covers image pixels
    [j*s, (j+1)*s) x [i*s, (i+1)*s).
    """
    model.eval()
    height, width = image.shape[:2]
    multiple = getattr(model, "input_multiple", INPUT_MULTIPLE)
    pad_y, pad_x = -height % multiple, -width % multiple
    if pad_y or pad_x:
        image = np.pad(image, ((0, pad_y), (0, pad_x), (0, 0)), mode="reflect")
    device = next(model.parameters()).device
    return model(to_input(image, device))[0].float().cpu().numpy()


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
    """Raw-scale predictions (spots, genes) for disks given in pixels of ``image`` (H, W, 3) uint8.

    Each spot gets the window centred on it, so every spot sees the same context wherever it lies; the
    window's dense map is integrated over the spot's disk.
    """
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
        density = model(to_input(windows, device)).float()
        for offset, index in enumerate(range(start, stop)):
            center = torch.as_tensor(centers[index] - origins[index])[None]
            radius = torch.as_tensor(radii[index : index + 1])
            out.append(aggregate_disks(density[offset], center, radius, stride=model.stride).cpu())
    return torch.cat(out).numpy().astype(np.float64)
