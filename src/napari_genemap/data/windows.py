"""Training samples: image windows together with the measured spots that lie wholly inside them.

A `TrainingSlide` holds one slide resampled to the model's µm/px in memory (a HER2ST section at 2 µm/px
is 3,400 x 3,200 px, 33 MB), its spots in that pixel frame and their raw and protocol-normalised values.
`WindowSampler` cuts random windows that contain at least one whole spot, with flips, 90° rotations and a
stain jitter applied to the pixels and the spot coordinates alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import GenemapInputError
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


@dataclass
class WindowBatch:
    """Windows (batch, 3, S, S) float32 in [0, 1] and, per window, the spots wholly inside it."""

    images: np.ndarray
    centers: list[np.ndarray]  # per window (n_i, 2), window pixels
    radii: list[np.ndarray]
    raw: np.ndarray  # (sum n_i, genes), windows in order
    targets: np.ndarray


def spots_inside(centers: np.ndarray, radii: np.ndarray, x0: float, y0: float, size: int) -> np.ndarray:
    """Indices of the disks wholly inside the window [x0, x0 + size) x [y0, y0 + size)."""
    x, y = centers[:, 0], centers[:, 1]
    inside = (x - radii >= x0) & (x + radii <= x0 + size) & (y - radii >= y0) & (y + radii <= y0 + size)
    return np.flatnonzero(inside)


def stain_jitter(window: np.ndarray, rng: np.random.Generator, strength: float = 0.05) -> np.ndarray:
    """Scale and shift each channel's optical density (how stain amounts vary between labs), then brightness.

    window: (3, S, S) float32 in [0, 1]."""
    density = -np.log(np.clip(window, 1 / 255, 1))
    scale = 1 + rng.normal(0, strength, (3, 1, 1))
    shift = rng.normal(0, strength / 2, (3, 1, 1))
    jittered = np.exp(-(density * scale + shift)) * (1 + rng.normal(0, strength / 2))
    return np.clip(jittered, 0, 1).astype(np.float32)


def _augment(window: np.ndarray, centers: np.ndarray, size: int, rng: np.random.Generator):
    """A random dihedral transform (flips and 90° rotations) of a square window and its spot centres."""
    centers = centers.copy()
    if rng.random() < 0.5:  # mirror columns
        window = window[:, :, ::-1]
        centers[:, 0] = size - centers[:, 0]
    if rng.random() < 0.5:  # transpose: together with the mirror this reaches all eight symmetries
        window = window.transpose(0, 2, 1)
        centers = np.ascontiguousarray(centers[:, ::-1])
    if rng.random() < 0.5:  # mirror rows
        window = window[:, ::-1, :]
        centers[:, 1] = size - centers[:, 1]
    return np.ascontiguousarray(window), centers


class WindowSampler:
    """Random training windows of ``size`` px, each holding at least one whole spot."""

    def __init__(self, slides: list[TrainingSlide], size: int, augment: bool = True, seed: int = 0):
        self.slides = slides
        self.size = size
        self.augment = augment
        self.rng = np.random.default_rng(seed)
        fits = [np.flatnonzero(2 * slide.radii <= size - 2) for slide in slides]  # room for whole-pixel origins
        self._choices = [(i, j) for i, spots in enumerate(fits) for j in spots]
        if not self._choices:
            raise GenemapInputError(f"no measured spot fits in a {size} px training window")

    def window(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, TrainingSlide, np.ndarray]:
        """One window (3, S, S) with its spots' centres, radii and indices into its slide."""
        from ..models.predict import to_input

        slide_index, spot = self._choices[self.rng.integers(len(self._choices))]
        slide = self.slides[slide_index]
        size = self.size
        (cx, cy), radius = slide.centers[spot], slide.radii[spot]
        # any whole-pixel origin that keeps the chosen spot wholly inside, uniformly
        x0 = int(self.rng.integers(np.ceil(cx + radius - size), np.floor(cx - radius) + 1))
        y0 = int(self.rng.integers(np.ceil(cy + radius - size), np.floor(cy - radius) + 1))
        window = crop(slide.image, x0, y0, size)
        members = spots_inside(slide.centers, slide.radii, x0, y0, size)
        centers = slide.centers[members] - (x0, y0)
        window = to_input(window)[0].numpy()
        if self.augment:
            window, centers = _augment(window, centers, size, self.rng)
            window = stain_jitter(window, self.rng)
        return window, centers, slide.radii[members], slide, members

    def batch(self, n: int) -> WindowBatch:
        windows, centers, radii, raw, targets = [], [], [], [], []
        for _ in range(n):
            window, window_centers, window_radii, slide, members = self.window()
            windows.append(window)
            centers.append(window_centers)
            radii.append(window_radii)
            raw.append(slide.raw[members])
            targets.append(slide.targets[members])
        return WindowBatch(np.stack(windows), centers, radii, np.concatenate(raw), np.concatenate(targets))


def crop(image: np.ndarray, x0: int, y0: int, size: int) -> np.ndarray:
    """image[y0:y0+size, x0:x0+size] of an (H, W, 3) array, mirrored at the slide's borders."""
    height, width = image.shape[:2]
    if x0 >= 0 and y0 >= 0 and x0 + size <= width and y0 + size <= height:
        return image[y0 : y0 + size, x0 : x0 + size]
    rows = reflect_index(np.arange(y0, y0 + size), height)
    columns = reflect_index(np.arange(x0, x0 + size), width)
    return image[np.ix_(rows, columns)]
