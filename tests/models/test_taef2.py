"""TAEF2: our modules take the published weights key for key, and a real H&E tile survives the round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_genemap.errors import GenemapInputError
from napari_genemap.models.taef2 import FILES, TAEF2, decoder, encoder


@pytest.fixture(scope="module")
def taef2_folder(shared_data) -> Path:
    folder = shared_data.parent / "weights" / "taef2"
    if not all((folder / name).is_file() for name in FILES.values()):
        pytest.skip(f"needs the TAEF2 weights ({', '.join(FILES.values())}) in {folder}")
    return folder


@pytest.fixture(scope="module")
def taef2(taef2_folder) -> TAEF2:
    return TAEF2.from_folder(taef2_folder)


def test_state_dicts_match_key_for_key(taef2_folder, taef2):
    for part, build in (("encoder", encoder), ("decoder", decoder)):
        published = torch.load(taef2_folder / FILES[part], map_location="cpu", weights_only=True)
        ours = build().state_dict()
        assert list(ours) == list(published)  # same keys, same order
        assert all(ours[key].shape == published[key].shape for key in ours)
        loaded = getattr(taef2, part).state_dict()
        assert all(value.dtype == torch.float32 for value in loaded.values())
        assert all(torch.equal(loaded[key], published[key].float()) for key in published)
    assert not any(p.requires_grad for p in taef2.parameters()) and not taef2.training


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / (a - b).square().mean()))


def test_a_real_he_tile_round_trips_above_25_db(her2st, taef2):
    from PIL import Image

    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(her2st / "images" / "C3.jpg") as image:
            crop = np.asarray(image.crop((3000, 3000, 3224, 3224)).convert("RGB"))  # tumour and stroma
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    rgb = torch.from_numpy(crop.copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        latents = taef2.encode(rgb)
        restored = taef2.decode(latents)
    assert latents.shape == (1, 32, 28, 28)
    assert restored.shape == rgb.shape and restored.min() >= 0 and restored.max() <= 1
    assert latents.mean().item() == pytest.approx(0.5, abs=0.05)  # stored as z / 6 + 0.5
    assert _psnr(restored, rgb) > 25  # measured 31.2 dB
    blurred = torch.nn.functional.avg_pool2d(rgb, 8).repeat_interleave(8, 2).repeat_interleave(8, 3)
    assert _psnr(restored, rgb) > _psnr(blurred, rgb) + 5  # far better than the 8x8 block means


def test_refusals_name_the_file(tmp_path, taef2_folder):
    with pytest.raises(GenemapInputError, match=r"taef2_encoder\.pth: TAEF2 weights file not found"):
        TAEF2.from_folder(tmp_path)
    published = torch.load(taef2_folder / FILES["encoder"], map_location="cpu", weights_only=True)
    del published["14.bias"]
    torch.save(published, tmp_path / FILES["encoder"])
    with pytest.raises(GenemapInputError, match=r"taef2_encoder\.pth: 1 keys missing .*'14\.bias'"):
        TAEF2.from_folder(tmp_path)
    with pytest.raises(GenemapInputError, match="multiples of 8"):
        TAEF2().encode(torch.zeros(1, 3, 30, 32))
