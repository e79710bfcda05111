"""Random training windows: each holds at least one whole measured spot, with flips, 90° rotations and a
stain jitter applied to the pixels and the spot coordinates alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..data.windows import TrainingSlide, crop, spots_inside
from ..errors import GenemapInputError
from ..models.predict import to_input


@dataclass
class WindowBatch:
    """Windows (batch, 3, S, S) float32 in [0, 1] and, per window, the spots wholly inside it."""

    images: np.ndarray
    centers: list[np.ndarray]  # per window (n_i, 2), window pixels
    radii: list[np.ndarray]
    raw: np.ndarray  # (sum n_i, genes), windows in order
    targets: np.ndarray


def stain_jitter(window: np.ndarray, rng: np.random.Generator, strength: float = 0.05) -> np.ndarray:
    """Scale and shift each channel's optical density (how stain amounts vary between labs), then brightness.

    window: (3, S, S) float32 in [0, 1]."""
    density = -np.log(np.clip(window, 1 / 255, 1))
    scale = 1 + rng.normal(0, strength, (3, 1, 1))
    shift = rng.normal(0, strength / 2, (3, 1, 1))
    jittered = np.exp(-(density * scale + shift)) * (1 + rng.normal(0, strength / 2))
    return np.clip(jittered, 0, 1).astype(np.float32)


def random_dihedral(crops: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each square crop (n, C, S, S) under its own random dihedral transform (90° rotations, a mirror)."""
    out = np.empty_like(crops)
    for index, one in enumerate(crops):
        one = np.rot90(one, int(rng.integers(4)), axes=(1, 2))
        out[index] = one[:, :, ::-1] if rng.random() < 0.5 else one
    return out


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

    def __init__(
        self, slides: list[TrainingSlide], size: int, augment: bool = True, seed: int = 0, stain: float = 0.05
    ):
        self.slides = slides
        self.size = size
        self.augment = augment
        self.stain = stain  # `stain_jitter`'s strength
        self.rng = np.random.default_rng(seed)
        fits = [np.flatnonzero(2 * slide.radii <= size - 2) for slide in slides]  # room for whole-pixel origins
        self._choices = [(i, j) for i, spots in enumerate(fits) for j in spots]
        if not self._choices:
            raise GenemapInputError(f"no measured spot fits in a {size} px training window")

    def window(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, TrainingSlide, np.ndarray]:
        """One window (3, S, S) with its spots' centres, radii and indices into its slide."""
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
            window = stain_jitter(window, self.rng, self.stain)
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
