"""Training slides in memory and the window arithmetic that keeps spots whole.

A `TrainingSlide` holds one slide resampled to the model's µm/px in memory (a HER2ST section at 2 µm/px
is 3,400 x 3,200 px, 33 MB), its spots in that pixel frame and their raw and protocol-normalised values.
`crop` mirrors windows at the borders; `spots_inside` says which spots a window holds wholly. The random
windows a run trains on are cut in `napari_genemap.train.sampler`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .protocols import Protocol
from .resample import ModelFrameReader, reflect_index


@dataclass
class TrainingSlide:
    """One slide at the model's resolution; coordinates are pixels of ``image`` (x = column)."""

    name: str
    image: np.ndarray  # (H, W, 3) uint8
    mpp: float
    centers: np.ndarray  # (spots, 2) float64, (x, y)
    radii: np.ndarray  # (spots,) float64
    raw: np.ndarray  # (spots, genes) float32: counts of the protocol's genes
    targets: np.ndarray  # (spots, genes) float32: protocol-normalised


def slide_image_at(sdata, mpp: float) -> np.ndarray:
    """The slide's H&E resampled to ``mpp`` µm/px as an (H, W, 3) uint8 array (in memory)."""
    reader = ModelFrameReader.from_sdata(sdata, mpp)
    return reader.read(0, reader.height, 0, reader.width)


def load_training_slide(sdata, protocol: Protocol, mpp: float, name: str | None = None) -> TrainingSlide:
    """Resample a canonical slide with measured spots to ``mpp`` and attach its protocol values."""
    from ..io import counts_table, slide_info, slide_mpp, spot_geometry

    table = counts_table(sdata)
    factor = mpp / slide_mpp(sdata)
    centers, radii = spot_geometry(sdata)
    raw = protocol.counts(table).astype(np.float32)
    return TrainingSlide(
        name=name or str(slide_info(sdata).get("section") or slide_info(sdata).get("source")),
        image=slide_image_at(sdata, mpp),
        mpp=mpp,
        centers=centers / factor,
        radii=radii / factor,
        raw=raw,
        targets=protocol.normalise(raw.astype(np.float64)).astype(np.float32),
    )


def spots_inside(centers: np.ndarray, radii: np.ndarray, x0: float, y0: float, size: int) -> np.ndarray:
    """Indices of the disks wholly inside the window [x0, x0 + size) x [y0, y0 + size)."""
    x, y = centers[:, 0], centers[:, 1]
    inside = (x - radii >= x0) & (x + radii <= x0 + size) & (y - radii >= y0) & (y + radii <= y0 + size)
    return np.flatnonzero(inside)


def crop(image: np.ndarray, x0: int, y0: int, size: int) -> np.ndarray:
    """image[y0:y0+size, x0:x0+size] of an (H, W, 3) array, mirrored at the slide's borders."""
    height, width = image.shape[:2]
    if x0 >= 0 and y0 >= 0 and x0 + size <= width and y0 + size <= height:
        return image[y0 : y0 + size, x0 : x0 + size]
    rows = reflect_index(np.arange(y0, y0 + size), height)
    columns = reflect_index(np.arange(x0, x0 + size), width)
    return image[np.ix_(rows, columns)]


def spot_crops(slide: TrainingSlide, size: int) -> np.ndarray:
    """Tiles (spots, size, size, 3) uint8 centred on each spot of ``slide``, mirrored at its borders."""
    origins = np.floor(slide.centers - size / 2).astype(np.int64)
    return np.stack([crop(slide.image, x, y, size) for x, y in origins])
