"""Diff-ST's model: the gene graph from a toy co-expression matrix, the switches, the masked loss, sampler
determinism, and a small model that learns to denoise a real patch of the bundled crop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_genemap.errors import GenemapInputError
from napari_genemap.models.diffst import Conditions, DiffST, DiffSTConfig, diffst_loss, super_resolve
from napari_genemap.models.gene_graph import GeneGraph, coexpression_graph

SMALL = {"width": (32, 32), "condition": 16, "token_dim": 32, "attention_head_dim": 16}


def test_the_gene_graph_links_co_expressed_genes_only():
    rng = np.random.default_rng(0)
    a, c = rng.normal(size=200), rng.normal(size=200)
    values = np.column_stack([a, 2 * a + 1, c, -a])  # b follows a; c is independent; d is a's opposite
    graph = coexpression_graph(values, threshold=0.3)
    expected = np.array([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(graph, expected, atol=0.02)  # |r(a, c)| is about 0.1 by chance, under 0.3
    assert np.allclose(graph, graph.T)
    with pytest.raises(GenemapInputError, match="threshold 0"):
        coexpression_graph(values, threshold=0)


def test_the_graph_layer_starts_as_identity_and_mixes_by_the_adjacency():
    adjacency = coexpression_graph(np.column_stack([np.arange(9.0), np.arange(9.0) ** 2, np.sin(np.arange(9.0))]))
    layer = GeneGraph(adjacency)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(layer(x), x)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 0.0, -1.0]))
    mixed = torch.einsum("gh,bhyx->bgyx", torch.as_tensor(adjacency), x)
    expected = x + torch.tensor([0.5, 0.0, -1.0]).reshape(1, 3, 1, 1) * mixed
    torch.testing.assert_close(layer(x), expected)


def _conditions(batch: int, genes: int, histology: int, patch: int = 8, factor: int = 2) -> Conditions:
    generator = torch.Generator().manual_seed(1)
    small = patch // factor
    return Conditions(
        torch.randn(batch, genes, small, small, generator=generator),
        torch.ones(batch, small, small, dtype=torch.bool),
        torch.randn(batch, histology, patch, patch, generator=generator) if histology else None,
    )


@pytest.mark.parametrize(
    ("switch", "absent"),
    [("histology", "histology_in"), ("cross_attention", "tokens"), ("disentangle", "shared"), ("gene_graph", "graph")],
)
def test_each_switch_removes_its_part(switch, absent):
    config = DiffSTConfig(genes=3, patch=8, histology_channels=6, **SMALL)
    off = DiffSTConfig(**{**config.to_dict(), switch: False})
    assert getattr(DiffST(config), absent, None) is not None
    assert getattr(DiffST(off), absent, None) is None
    model = DiffST(off).eval()
    x = torch.randn(2, 3, 8, 8)
    out = model(x, 0.5, model.encode(_conditions(2, 3, 6)))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_the_loss_ignores_cells_without_a_spot():
    model = DiffST(DiffSTConfig(genes=3, patch=8, histology_channels=6, **SMALL))
    conditions = _conditions(2, 3, 6)
    hr = torch.randn(2, 3, 8, 8)
    mask = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(2)) > 0.4
    changed = torch.where(mask.unsqueeze(1), hr, hr + 100.0)
    losses = [
        diffst_loss(model, h, mask, conditions, generator=torch.Generator().manual_seed(3)) for h in (hr, changed)
    ]
    torch.testing.assert_close(losses[0].loss, losses[1].loss)
    assert losses[0].consistency > 0  # the two shared parts start apart


def test_sampling_is_deterministic_for_a_seed():
    model = DiffST(DiffSTConfig(genes=3, patch=8, histology_channels=6, **SMALL)).eval()
    conditions = _conditions(2, 3, 6)
    first = super_resolve(model, conditions, samples=3, steps=4, seed=7)
    again = super_resolve(model, conditions, samples=3, steps=4, seed=7)
    other = super_resolve(model, conditions, samples=3, steps=4, seed=8)
    torch.testing.assert_close(first.samples, again.samples, rtol=0, atol=0)
    assert not torch.allclose(first.samples, other.samples)
    assert first.mean.shape == first.spread.shape == (2, 3, 8, 8) and first.samples.shape == (2, 3, 3, 8, 8)
    torch.testing.assert_close(first.spread, first.samples.std(1))
    # the samples of one patch differ (they come from different noises), so the spread is not zero
    assert float(first.spread.mean()) > 0


def test_a_small_model_learns_to_denoise_a_real_patch(sample_slide):
    """Trained on one real 8 x 8 patch of the bundled crop, the denoiser recovers it from sigma 0.5 far better
    than the noisy input, and better than from a patch conditioned on another LR map."""
    from napari_genemap.data.protocols import Protocol
    from napari_genemap.data.superres import cut_patches, patch_origins, section_pair

    torch.manual_seed(0)
    panel = Protocol("panel", ("KRT8", "MUCL1", "KRT86"), target_sum=None, log="ln")
    pair = section_pair(sample_slide, panel, factor=2)
    patches = cut_patches(pair, patch_origins(pair, 8)[:1], 8)
    mean, std = pair.hr[:, pair.hr_mask].mean(1), pair.hr[:, pair.hr_mask].std(1)
    hr = torch.as_tensor((patches.hr - mean[:, None, None]) / std[:, None, None]) * torch.as_tensor(patches.hr_mask)
    lr = torch.as_tensor(patches.lr - patches.lr.mean((2, 3), keepdims=True))
    mask = torch.as_tensor(patches.hr_mask)
    conditions = Conditions(lr, torch.as_tensor(patches.lr_spots > 0))
    model = DiffST(DiffSTConfig(genes=3, patch=8, histology=False, **SMALL))
    optimiser = torch.optim.AdamW(model.parameters(), 2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        batch = [t.repeat(8, *[1] * (t.ndim - 1)) for t in (hr, mask, *conditions[:2])]
        loss = diffst_loss(model, batch[0], batch[1], Conditions(batch[2], batch[3]), generator=generator)
        optimiser.zero_grad()
        loss.loss.backward()
        optimiser.step()
    model.eval()
    noise = torch.randn(hr.shape, generator=generator)
    with torch.no_grad():
        denoised = model(hr + 0.5 * noise, 0.5, model.encode(conditions))
        swapped = model(hr + 0.5 * noise, 0.5, model.encode(Conditions(-lr.flip(-1), conditions.lr_mask)))
    measured = mask.unsqueeze(1).expand_as(hr)
    error = float((denoised - hr)[measured].square().mean())
    assert error < 0.25 * float((0.5 * noise)[measured].square().mean())
    assert error < float((swapped - hr)[measured].square().mean())
