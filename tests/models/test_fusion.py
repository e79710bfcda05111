"""DiffBulk stage 2's parts: frozen diffusion features are reproducible, the gated fusion is the published
formula, and the dense head is the pooled head applied at every map position."""

from __future__ import annotations

import pytest
import torch

from napari_genemap.models.edm import EDMDenoiser, preset
from napari_genemap.models.fusion import DiffusionFeatures, FeatureReducer, FusionHead, GatedFusion


@pytest.fixture(scope="module")
def denoiser() -> EDMDenoiser:
    torch.manual_seed(0)
    return EDMDenoiser(
        preset(
            "cpu-small",
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            sample_size=16,
            norm_num_groups=8,
            attention_head_dim=8,
        )
    )


def test_diffusion_features_are_the_same_for_the_same_input_and_seed(denoiser):
    features = DiffusionFeatures(denoiser)
    latents = torch.randn(2, 32, 16, 16, generator=torch.Generator().manual_seed(1))
    first, again, other_seed = features(latents, seed=3), features(latents, seed=3), features(latents, seed=4)
    assert [tuple(m.shape[1:]) for m in first] == [(64, 8, 8), (64, 16, 16), (32, 16, 16)]
    assert [m.shape[1] for m in first] == features.channels
    for a, b, c in zip(first, again, other_seed, strict=True):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)  # the seed is what fixes the noise
    features.train()
    assert not features.denoiser.training and not any(p.requires_grad for p in features.denoiser.parameters())
    # one tile's features do not depend on its batch neighbours
    for index in (0, 1):
        alone = features(latents[index : index + 1], seed=3)
        for whole, single in zip(first, alone, strict=True):
            torch.testing.assert_close(single[0], whole[index], rtol=1e-4, atol=1e-5)


def test_gated_fusion_is_the_published_formula():
    torch.manual_seed(0)
    fusion = GatedFusion(p_dim=5, f_dim=7)
    p, f = torch.randn(3, 5), torch.randn(3, 7)
    w_g, b_g = fusion.gate.weight, fusion.gate.bias
    w_p, b_p = fusion.project.weight, fusion.project.bias
    expected = p + torch.sigmoid(torch.cat([p, f], 1) @ w_g.T + b_g) * (f @ w_p.T + b_p)
    torch.testing.assert_close(fusion(p, f), expected)
    with torch.no_grad():  # a gate that is shut leaves the pathology feature alone
        fusion.gate.bias.fill_(-1e4)
    torch.testing.assert_close(fusion(p, f), p)


def test_the_dense_head_is_the_pooled_head_at_every_position(denoiser):
    torch.manual_seed(0)
    features = DiffusionFeatures(denoiser)
    reducer = FeatureReducer(features.channels, width=16)
    maps = features(torch.randn(2, 32, 16, 16), seed=0)
    pooled_f, dense_f = reducer(maps), reducer(maps, size=(4, 4))
    assert pooled_f.shape == (2, reducer.dim) and dense_f.shape == (2, reducer.dim, 4, 4)
    head = FusionHead(p_dim=10, f_dim=reducer.dim, n_genes=6, dense=False)
    dense = FusionHead(p_dim=10, f_dim=reducer.dim, n_genes=6, dense=True)
    dense.load_state_dict(head.state_dict())
    p_map = torch.randn(2, 10, 4, 4)
    density = dense(p_map, dense_f)
    assert density.shape == (2, 6, 4, 4) and (density >= 0).all()
    i, j = 2, 1
    at_position = head(p_map[:, :, i, j], dense_f[:, :, i, j])
    torch.testing.assert_close(density[:, :, i, j], torch.nn.functional.softplus(at_position))
