"""Macenko stain normalisation: the estimate, the fixed per-slide map, and its use in training and the engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_genemap.data.protocols import Protocol, hist2st
from napari_genemap.data.stain import (
    StainBasis,
    apply_od_matrix,
    fit_stains,
    image_stains,
    normalising_matrix,
    optical_density,
    slide_stains,
)
from napari_genemap.errors import GenemapInputError

# Ruifrok & Johnston's haematoxylin and eosin, and a bluer / pinker pair standing for another lab
RUIFROK = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]]).T
OTHER_LAB = np.array([[0.50, 0.78, 0.38], [0.20, 0.93, 0.30]]).T


def stained(vectors: np.ndarray, concentrations: np.ndarray) -> np.ndarray:
    """Pixels (n, 3) uint8 of unit stain vectors mixed at (2, n) concentrations (Beer-Lambert)."""
    vectors = vectors / np.linalg.norm(vectors, axis=0)
    return np.clip(np.rint(256 * np.exp(-(vectors @ concentrations).T) - 1), 0, 255).astype(np.uint8)


def tissue_concentrations(n: int = 40_000, seed: int = 0) -> np.ndarray:
    """Mostly mixtures, with nuclei (haematoxylin-rich) and stroma (eosin-rich) at the extremes."""
    rng = np.random.default_rng(seed)
    share = rng.beta(0.6, 0.6, n)  # many pixels near pure H or pure E
    amount = rng.uniform(0.4, 1.6, n)
    return np.stack([share * amount, (1 - share) * amount])


def test_fit_stains_recovers_the_stain_vectors_of_a_mixture():
    basis = fit_stains(stained(RUIFROK, tissue_concentrations()))
    truth = RUIFROK / np.linalg.norm(RUIFROK, axis=0)
    cosines = (basis.vectors * truth).sum(0)
    assert cosines.min() > 0.995  # H first, E second, both found
    np.testing.assert_allclose(np.linalg.norm(basis.vectors, axis=0), 1, rtol=1e-9)
    assert basis.max_concentration.shape == (2,) and (basis.max_concentration > 0.5).all()


def test_normalising_re_stains_one_lab_as_another():
    concentrations = tissue_concentrations(seed=1)
    here, there = stained(OTHER_LAB, concentrations), stained(RUIFROK, concentrations)
    matrix = normalising_matrix(fit_stains(here), fit_stains(there))
    moved = apply_od_matrix(here, matrix).astype(int)
    before = np.abs(here.astype(int) - there).mean()
    after = np.abs(moved - there).mean()
    assert before > 12 and after < 3  # grey levels, mean over pixels and channels
    # glass stays glass, and the identity map changes nothing (the +1 in the density is undone exactly)
    assert (apply_od_matrix(np.full((4, 3), 255, np.uint8), matrix) == 255).all()
    np.testing.assert_array_equal(apply_od_matrix(here, np.eye(3)), here)
    assert optical_density(np.array([255], np.uint8))[0] == 0


def test_stain_errors_and_round_trip():
    with pytest.raises(GenemapInputError, match="0 stained pixels; expected at least 100"):
        fit_stains(np.full((50, 50, 3), 250, np.uint8))
    basis = fit_stains(stained(RUIFROK, tissue_concentrations()))
    again = StainBasis.from_dict(basis.to_dict())
    np.testing.assert_array_equal(again.vectors, basis.vectors)
    with pytest.raises(GenemapInputError, match="expected macenko vectors"):
        StainBasis.from_dict({"method": "macenko", "vectors": [[1, 0]], "max_concentration": [1, 1]})


def test_training_images_and_the_slide_overview_give_the_same_stains(sample_slide):
    from napari_genemap.data.windows import slide_image_at

    overview = slide_stains(sample_slide)
    model_frame = image_stains([slide_image_at(sample_slide, 2.0)], 2.0)
    assert (overview.vectors * model_frame.vectors).sum(0).min() > 0.995
    np.testing.assert_allclose(overview.max_concentration, model_frame.max_concentration, rtol=0.1)


def test_a_stain_normalised_model_keeps_its_stains_and_the_engine_applies_them(sample_slide, tmp_path):
    from napari_genemap.data.windows import load_training_slide
    from napari_genemap.infer.engine import TileEngine
    from napari_genemap.models.checkpoint import load_checkpoint
    from napari_genemap.train.config import TrainConfig
    from napari_genemap.train.pixnet import train_pixnet

    slide = load_training_slide(sample_slide, hist2st(), 4.0, "B4_crop")
    config = TrainConfig(
        slides=[{"path": "unused", "name": "B4_crop"}], out=str(tmp_path / "ckpt"), mpp=4.0, window=64,
        batch=2, steps=1, weights="random", stride=16, stain_normalise=True,
    )  # fmt: skip
    train_pixnet(config, slides={"B4_crop": slide}, protocol=hist2st())
    loaded = load_checkpoint(config.out)
    expected = image_stains([slide.image], 4.0)  # the one training slide's own stains
    np.testing.assert_allclose(loaded.stain.vectors, expected.vectors, rtol=1e-6)

    protocol = Protocol("test", ("g0",), target_sum=1e4, log="ln")
    from napari_genemap.models.checkpoint import GeneMapModel
    from napari_genemap.models.encoders import EncoderConfig
    from napari_genemap.models.pixnet import PixNet, PixNetConfig

    torch.manual_seed(0)
    model = PixNet(PixNetConfig(1, EncoderConfig(weights="random"), stride=16)).eval()
    other = fit_stains(stained(RUIFROK, tissue_concentrations()))
    normalised = GeneMapModel(model=model, protocol=protocol, mpp=4.0, window=128, digest="a" * 64, stain=other)
    plain = GeneMapModel(model=model, protocol=protocol, mpp=4.0, window=128, digest="a" * 64)
    engines = [
        TileEngine(m, sample_slide, tmp_path / name, tile=64, halo=32) for m, name in ((normalised, "n"), (plain, "p"))
    ]
    try:
        matrix = normalising_matrix(slide_stains(sample_slide), other)
        np.testing.assert_array_equal(engines[0].stain_matrix, matrix)
        assert engines[1].stain_matrix is None
        assert engines[0].cache.path != engines[1].cache.path  # the map is part of the cache's signature
        tiles = engines[0].grid_tiles(0, 0, 2, 0, 2)
        np.testing.assert_array_equal(engines[0]._windows(tiles), apply_od_matrix(engines[1]._windows(tiles), matrix))
    finally:
        for engine in engines:
            engine.close()


def test_a_slide_without_tissue_is_named_when_its_stains_cannot_be_estimated(tmp_path):
    from dataclasses import replace

    from PIL import Image

    from napari_genemap.io import read_slide
    from napari_genemap.train.pixnet import normalise_stains

    blank = tmp_path / "glass.png"
    Image.fromarray(np.full((600, 600, 3), 245, np.uint8)).save(blank)
    with pytest.raises(GenemapInputError, match=r"glass.png: stain estimate: 0 stained pixels"):
        slide_stains(read_slide(blank, mpp=1.0))

    from napari_genemap.data.windows import TrainingSlide

    tissue = stained(RUIFROK, tissue_concentrations(250 * 250)).reshape(250, 250, 3)
    empty = np.zeros((0, 785), np.float32)
    good = TrainingSlide("A", tissue, 2.0, np.zeros((0, 2)), np.zeros(0), empty, empty)
    bad = replace(good, name="B", image=np.full((250, 250, 3), 250, np.uint8))
    normalised, stain = normalise_stains({"A": good}, [])
    assert (stain.vectors * (RUIFROK / np.linalg.norm(RUIFROK, axis=0))).sum(0).min() > 0.99
    with pytest.raises(GenemapInputError, match=r"^B: stain estimate: 0 stained pixels"):
        normalise_stains({"A": good, "B": bad}, ["B"])
