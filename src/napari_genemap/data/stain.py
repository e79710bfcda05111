"""Stain normalisation (Macenko et al., ISBI 2009), per slide, as one fixed map of optical densities.

A model trained on stain-normalised input stores the stains of its training slides (`StainBasis`); a slide
it predicts has its own stains estimated once, from a low-resolution level, and every tile of that slide is
then mapped by the same 3 x 3 matrix in optical-density space (`normalising_matrix`, `apply_od_matrix`).

Written here rather than taken from torchstain: its normalisers estimate the stains of each image they are
given, so neighbouring tiles of one slide would be normalised differently and their maps would not join;
the slide-level estimate and the fixed per-tile map are the point of this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import GenemapInputError

OD_FLOOR = 0.15  # pixels lighter than this in any channel are glass, not stain (Macenko's beta)
ANGLE_PERCENTILE = 1.0  # robust extremes of the stain angles (Macenko's alpha)
MAX_PERCENTILE = 99.0  # a stain's "maximum" concentration
MIN_PIXELS = 100


@dataclass(frozen=True)
class StainBasis:
    """Haematoxylin and eosin as unit optical-density vectors (the columns of ``vectors``, 3 x 2, H first)
    and each stain's robust maximum concentration."""

    vectors: np.ndarray
    max_concentration: np.ndarray

    def to_dict(self) -> dict:
        return {
            "method": "macenko",
            "vectors": np.asarray(self.vectors).tolist(),
            "max_concentration": np.asarray(self.max_concentration).tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> StainBasis:
        vectors = np.asarray(data["vectors"], dtype=np.float64)
        maximum = np.asarray(data["max_concentration"], dtype=np.float64)
        if data.get("method") != "macenko" or vectors.shape != (3, 2) or maximum.shape != (2,):
            raise GenemapInputError(f"stain: {data!r}; expected macenko vectors (3 x 2) and 2 maximum concentrations")
        return cls(vectors, maximum)


def optical_density(pixels: np.ndarray) -> np.ndarray:
    """-ln((I + 1) / 256) of uint8 RGB values, float32 (white is 0; the +1 keeps black finite)."""
    return _OD_TABLE[np.asarray(pixels, dtype=np.uint8)]


_OD_TABLE = -np.log((np.arange(256, dtype=np.float64) + 1) / 256).astype(np.float32)


def fit_stains(pixels: np.ndarray, max_pixels: int = 200_000, seed: int = 0) -> StainBasis:
    """The H and E vectors and maximum concentrations of RGB pixels (..., 3) uint8 (glass is left out).

    Macenko: the plane of the two leading principal axes of the stained pixels' optical densities, the
    stains at the robust extremes of the pixels' angles in that plane (H is the one absorbing more red)."""
    od = optical_density(pixels).reshape(-1, 3)
    od = od[(od > OD_FLOOR).all(1)]
    if len(od) < MIN_PIXELS:
        raise GenemapInputError(
            f"stain estimate: {len(od)} stained pixels; expected at least {MIN_PIXELS} (is there tissue?)"
        )
    if len(od) > max_pixels:
        od = od[np.random.default_rng(seed).choice(len(od), max_pixels, replace=False)]
    od = od.astype(np.float64)
    _, axes = np.linalg.eigh(np.cov(od.T))
    plane = axes[:, [2, 1]]  # the two largest eigenvalues' axes, largest first
    plane[:, 0] *= np.sign(plane[:, 0].sum())  # stains absorb in every channel: the first axis points there
    projected = od @ plane
    angles = np.arctan2(projected[:, 1], projected[:, 0])
    low, high = np.percentile(angles, [ANGLE_PERCENTILE, 100 - ANGLE_PERCENTILE])
    stains = np.stack([plane @ np.array([np.cos(a), np.sin(a)]) for a in (low, high)], 1)
    stains *= np.sign(stains.sum(0))
    vectors = stains[:, np.argsort(-stains[0])]  # haematoxylin (first) absorbs red more than eosin
    vectors /= np.linalg.norm(vectors, axis=0)
    concentrations = np.linalg.lstsq(vectors, od.T, rcond=None)[0]
    maximum = np.percentile(concentrations, MAX_PERCENTILE, axis=1)
    if not (maximum > 0).all():
        raise GenemapInputError(f"stain estimate: maximum concentrations {maximum}; expected positive values")
    return StainBasis(vectors, maximum)


def slide_stains(sdata) -> StainBasis:
    """A canonical slide's stains, estimated from its overview level (the tissue mask's), so that the
    training slides and every slide a model predicts are measured alike."""
    from ..io.canonical import overview_pixels, slide_info

    try:
        return fit_stains(overview_pixels(sdata))
    except GenemapInputError as error:
        raise GenemapInputError(f"{slide_info(sdata).get('source', 'the slide')}: {error}") from None


def image_stains(images: list[np.ndarray], mpp: float) -> StainBasis:
    """The stains of (H, W, 3) uint8 images at ``mpp`` µm/px, pooled, read at the overview's pixel size
    (`slide_stains`'s) so that training slides and predicted slides are measured alike."""
    from ..io.canonical import OVERVIEW_MIN_UM

    step = max(1, round(OVERVIEW_MIN_UM / mpp))
    return fit_stains(np.concatenate([image[::step, ::step].reshape(-1, 3) for image in images]))


def named_stains(images: dict[str, np.ndarray], mpp: float) -> StainBasis:
    """`image_stains` of named images, an error naming them (a slide without tissue has no stains)."""
    try:
        return image_stains(list(images.values()), mpp)
    except GenemapInputError as error:
        raise GenemapInputError(f"{', '.join(images)}: {error}") from None


def normalising_matrix(source: StainBasis, target: StainBasis) -> np.ndarray:
    """The 3 x 3 map of optical densities that re-stains ``source``'s slide with ``target``'s stains:
    unmix into H and E, rescale each to the target's maximum, mix with the target's vectors."""
    scale = np.diag(target.max_concentration / source.max_concentration)
    return (target.vectors @ scale @ np.linalg.pinv(source.vectors)).astype(np.float32)


def apply_od_matrix(pixels: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """RGB uint8 pixels (..., 3) with their optical densities mapped by ``matrix``; glass stays glass."""
    od = optical_density(pixels) @ np.asarray(matrix, dtype=np.float32).T
    out = np.exp(-od, out=od)
    out *= 256
    out -= 1
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
