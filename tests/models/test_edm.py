"""EDM: preconditioning against its closed forms, the Heun sampler against an analytic Gaussian denoiser,
the masking switch, the presets, and a tiny U-Net that memorises 8 real H&E tiles."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from napari_genemap.errors import GenemapInputError
from napari_genemap.models.edm import (
    PRESETS,
    EDMConfig,
    EDMDenoiser,
    edm_loss,
    heun_sample,
    keep_condition,
    loss_weight,
    noise_levels,
    preconditioning,
    preset,
)

TINY = EDMConfig(
    in_channels=3,
    sample_size=16,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
    condition_dim=8,
    space="pixel",
)


def _tiny(seed: int = 0, **changes) -> EDMDenoiser:
    from dataclasses import replace

    torch.manual_seed(seed)
    return EDMDenoiser(replace(TINY, **changes)).eval()


@pytest.mark.parametrize("sigma", [0.002, 0.05, 0.5, 1.0, 7.0, 80.0])
def test_preconditioning_matches_its_closed_forms(sigma):
    c_skip, c_out, c_in, c_noise = preconditioning(torch.tensor(sigma, dtype=torch.float64))
    sd = 0.5
    assert c_skip.item() == pytest.approx(sd**2 / (sigma**2 + sd**2), rel=1e-12)
    assert c_out.item() == pytest.approx(sigma * sd / math.sqrt(sigma**2 + sd**2), rel=1e-12)
    assert c_in.item() == pytest.approx(1 / math.sqrt(sigma**2 + sd**2), rel=1e-12)
    assert c_noise.item() == pytest.approx(math.log(sigma) / 4, abs=1e-12)
    # EDM's design rules: unit-variance input, and lambda = 1 / c_out^2
    assert (c_in**2 * (sd**2 + sigma**2)).item() == pytest.approx(1.0)
    assert loss_weight(torch.tensor(sigma, dtype=torch.float64)).item() == pytest.approx(1 / c_out.item() ** 2)


def test_denoiser_tends_to_the_identity_as_sigma_vanishes():
    model = _tiny()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gaps = [(model(x, sigma) - x).abs().max().item() for sigma in (1e-1, 1e-2, 1e-3, 1e-4)]
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-3
    assert gaps[0] > 1e-2  # not trivially the identity everywhere


def _gaussian_denoiser(mean_conditional: float, mean_unconditional: float, std: float):
    """The optimal denoiser when the data are N(mean, std^2) per element: mean + std^2/(std^2+sigma^2) (x - mean)."""

    def denoise(x, sigma, condition, keep):
        mean = torch.where(keep, mean_conditional, mean_unconditional).to(x.dtype).reshape(-1, 1, 1, 1)
        shrink = (std**2 / (std**2 + sigma**2)).reshape(-1, 1, 1, 1)
        return mean + shrink * (x - mean)

    return denoise


def test_heun_sampler_draws_the_gaussian_the_denoiser_knows():
    denoise = _gaussian_denoiser(1.5, -0.5, 0.3)
    noise = torch.randn(4096, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    condition = torch.zeros(len(noise), 4, dtype=torch.float64)
    conditional = heun_sample(denoise, noise, condition, steps=32)
    assert conditional.mean().item() == pytest.approx(1.5, abs=0.02)
    assert conditional.std().item() == pytest.approx(0.3, rel=0.03)
    unconditional = heun_sample(denoise, noise, None, steps=32)
    assert unconditional.mean().item() == pytest.approx(-0.5, abs=0.02)
    # guidance w = 1 is the conditional model itself; w = 2 moves the mean to 2 * 1.5 - (-0.5)
    guided_once = heun_sample(denoise, noise, condition, steps=32, guidance=1.0)
    torch.testing.assert_close(guided_once, conditional, rtol=0, atol=1e-10)
    guided_twice = heun_sample(denoise, noise, condition, steps=32, guidance=2.0)
    assert guided_twice.mean().item() == pytest.approx(3.5, abs=0.03)
    levels = noise_levels(32)
    assert levels[0].item() == pytest.approx(80.0) and levels[-2].item() == pytest.approx(0.002) and levels[-1] == 0
    with pytest.raises(GenemapInputError, match="guidance needs a condition"):
        heun_sample(denoise, noise, None, guidance=2.0)


def test_a_dropped_condition_ignores_the_gene_values():
    model = _tiny()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    first, second = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(2))
    dropped = torch.zeros(3, dtype=torch.bool)
    with torch.no_grad():
        a = model(x, 0.7, first, dropped)
        b = model(x, 0.7, second, dropped)
        unconditioned = model(x, 0.7, None)
        kept = model(x, 0.7, first, ~dropped)
        mixed = model(x, 0.7, second, torch.tensor([True, False, True]))
    assert torch.equal(a, b) and torch.equal(a, unconditioned)
    assert (kept - a).abs().max() > 1e-4  # a kept condition does change the output
    assert torch.equal(mixed[1], a[1]) and not torch.equal(mixed[0], a[0])  # the switch is per sample


def test_the_switch_is_drawn_per_sample_and_the_loss_learns_its_weighting():
    keep = keep_condition(20000, 0.5, torch.Generator().manual_seed(0))
    assert keep.float().mean().item() == pytest.approx(0.5, abs=0.02)
    model = _tiny().train()
    x = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    result = edm_loss(model, x, torch.randn(16, 8), generator=torch.Generator().manual_seed(4))
    assert 0 < int(result.keep.sum()) < 16  # mixed within one batch
    assert result.sigma.log().mean().item() == pytest.approx(-0.4, abs=0.6)
    # u(sigma) starts at zero, so the first loss is plain EDM's weighted MSE; its gradient reaches the MLP
    torch.testing.assert_close(result.loss, result.weighted_mse.mean())
    result.loss.backward()
    assert model.uncertainty.mlp[-1].weight.grad.abs().sum() > 0


def test_presets_and_config_round_trip():
    small = preset("cpu-small")
    assert small.block_out_channels == (64, 128, 256) and (small.in_channels, small.sample_size) == (32, 28)
    assert EDMConfig.from_dict(json.loads(json.dumps(small.to_dict()))) == small
    torch.manual_seed(0)
    model = EDMDenoiser(small).eval()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(16.2e6, rel=0.01)
    with torch.no_grad():
        out = model(torch.randn(2, 32, 28, 28), torch.tensor([0.1, 3.0]), torch.randn(2, 256))
    assert out.shape == (2, 32, 28, 28)
    with torch.device("meta"):  # the GPU size, counted without allocating it
        paper = EDMDenoiser(PRESETS["paper"])
    assert sum(p.numel() for p in paper.parameters()) == pytest.approx(122e6, rel=0.01)
    assert (PRESETS["paper"].in_channels, PRESETS["paper"].sample_size) == (3, 224)
    with pytest.raises(GenemapInputError, match="EDM preset 'huge' unknown"):
        preset("huge")
    with pytest.raises(GenemapInputError, match="not divisible"):
        preset("cpu-small", sample_size=30)


@pytest.fixture(scope="module")
def he_tiles(her2st):
    """16 real H&E tiles, 16 x 16 px at a quarter of full resolution (2.7 µm/px), centred on C3's spots."""
    import pandas as pd
    from PIL import Image

    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        image = Image.open(her2st / "images" / "C3.jpg")
        image.draft("RGB", (image.width // 4, image.height // 4))  # JPEG decodes at 1/4 directly
        pixels = np.asarray(image.convert("RGB"))
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    spots = pd.read_csv(her2st / "spots" / "C3_selection.tsv", sep="\t").sample(16, random_state=0)
    tiles = [
        pixels[round(y / 4) - 8 : round(y / 4) + 8, round(x / 4) - 8 : round(x / 4) + 8]
        for x, y in zip(spots.pixel_x, spots.pixel_y, strict=True)
    ]
    return torch.tensor(np.stack(tiles)).permute(0, 3, 1, 2).float() / 255 * 2 - 1  # [-1, 1]


def test_a_tiny_unet_overfit_on_8_real_tiles_denoises_them_better_than_unrelated_ones(he_tiles):
    train, unrelated = he_tiles[:8], he_tiles[8:]
    model = _tiny(p_mean=-0.7, p_std=0.3)  # noise levels around 0.5, where the test looks

    def loss_at_half(tiles):
        generator = torch.Generator().manual_seed(123)
        with torch.no_grad():
            losses = [
                edm_loss(model, tiles, sigma=torch.tensor(0.5), generator=generator, uncertainty=False)
                for _ in range(4)
            ]
        return torch.stack([loss.weighted_mse for loss in losses]).mean().item()

    before = loss_at_half(train), loss_at_half(unrelated)
    optimiser = torch.optim.Adam(model.parameters(), 2e-3)
    generator = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(200):
        loss = edm_loss(model, train, generator=generator).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    seen, unseen = loss_at_half(train), loss_at_half(unrelated)
    assert before[0] == pytest.approx(before[1], rel=0.2)  # alike before training
    assert seen < 0.25 * before[0]
    assert seen < 0.5 * unseen  # measured: 0.056 vs 0.48 (before training 0.90 vs 0.99)
