"""Read any window of a slide in the model's frame (resampled to the model's µm/px) from the lazy pyramid.

Training (`windows.slide_image_at`) and inference (the tile engine) both read pixels through this one
class, so a model sees the same pixels in both.

Only the pyramid chunks under a window are decoded. Each model pixel is resampled from the same source
pixels with the same filter whichever window asks for it (PIL's resize with a fractional ``box`` and a
margin that holds the whole filter support), so overlapping windows agree where they overlap and tiles
agree with one large window. Outside the slide the image is mirrored (numpy's "reflect").
"""

from __future__ import annotations

import math

import numpy as np


def reflect_index(index: np.ndarray, size: int) -> np.ndarray:
    """Map indices onto [0, size) by mirroring at the edges without repeating them (numpy's "reflect")."""
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    index = np.abs(index) % period
    return np.where(index >= size, period - index, index)


LANCZOS_SUPPORT = 3  # Lanczos-3 reaches three source pixels either side, times the reduction factor


class ModelFrameReader:
    """Windows of an (H, W, 3) uint8 model-frame image backed by a lazy (c, y, x) pyramid."""

    def __init__(self, levels, scales: list[float], factor: float):
        """``levels``: (3, y, x) dask arrays, finest first; ``scales``: slide pixels per level pixel;
        ``factor``: slide pixels per model pixel (model µm/px over slide µm/px)."""
        full_height, full_width = levels[0].shape[1:]
        self.height = max(1, round(full_height / factor))
        self.width = max(1, round(full_width / factor))
        # the coarsest level still at least as fine as the model, so resampling only ever reduces
        self.level_index = max((i for i, s in enumerate(scales) if s <= factor + 1e-9), default=0)
        self.level = levels[self.level_index]
        level_height, level_width = self.level.shape[1:]
        # level pixels per model pixel, per axis, exactly as a whole-image resize would use them
        self.scale_y, self.scale_x = level_height / self.height, level_width / self.width
        self.identity = self.scale_y == 1 and self.scale_x == 1

    @classmethod
    def from_sdata(cls, sdata, model_mpp: float) -> ModelFrameReader:
        from ..io import image_levels, slide_mpp

        levels, scales = image_levels(sdata)
        return cls(levels, scales, model_mpp / slide_mpp(sdata))

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Model pixels [y0, y1) x [x0, x1) as (y1 - y0, x1 - x0, 3) uint8, mirrored past the edges."""
        rows = reflect_index(np.arange(y0, y1), self.height)
        columns = reflect_index(np.arange(x0, x1), self.width)
        top, bottom, left, right = rows.min(), rows.max() + 1, columns.min(), columns.max() + 1
        inside = self._read_inside(int(top), int(bottom), int(left), int(right))
        if y0 == top and y1 == bottom and x0 == left and x1 == right:
            return inside
        return inside[np.ix_(rows - top, columns - left)]

    def _read_inside(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        level_height, level_width = self.level.shape[1:]
        if self.identity:
            return np.ascontiguousarray(np.moveaxis(np.asarray(self.level[:, y0:y1, x0:x1]), 0, -1))
        from PIL import Image

        margin_y = math.ceil(LANCZOS_SUPPORT * self.scale_y) + 2
        margin_x = math.ceil(LANCZOS_SUPPORT * self.scale_x) + 2
        top = max(0, math.floor(y0 * self.scale_y) - margin_y)
        bottom = min(level_height, math.ceil(y1 * self.scale_y) + margin_y)
        left = max(0, math.floor(x0 * self.scale_x) - margin_x)
        right = min(level_width, math.ceil(x1 * self.scale_x) + margin_x)
        source = np.ascontiguousarray(np.moveaxis(np.asarray(self.level[:, top:bottom, left:right]), 0, -1))
        box = (x0 * self.scale_x - left, y0 * self.scale_y - top, x1 * self.scale_x - left, y1 * self.scale_y - top)
        resized = Image.fromarray(source).resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS, box=box)
        return np.array(resized)  # writable: torch.from_numpy warns on read-only arrays
