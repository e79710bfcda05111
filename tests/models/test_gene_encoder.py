"""The open gene encoder: order carries no meaning, rows are keyed by gene symbol, padding changes nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_genemap.errors import GenemapInputError
from napari_genemap.models.gene_encoder import GeneEncoder, GeneEncoderConfig

GENES = [f"G{i}" for i in range(30)]


def _encoder(genes=GENES, dim=32) -> GeneEncoder:
    torch.manual_seed(0)
    return GeneEncoder(GeneEncoderConfig(genes=tuple(genes), dim=dim, heads=8)).double().eval()


def test_gene_order_does_not_change_the_vector():
    encoder = _encoder()
    values = np.random.default_rng(0).gamma(1.0, 1.0, len(GENES))
    order = np.random.default_rng(1).permutation(len(GENES))
    with torch.no_grad():
        straight = encoder.encode([(GENES, values)])
        shuffled = encoder.encode([([GENES[i] for i in order], values[order])])
    assert straight.shape == (1, 32)
    torch.testing.assert_close(straight, shuffled, rtol=0, atol=1e-6)
    assert not torch.allclose(straight, encoder.encode([(GENES, values[order])]))  # values stay tied to genes


def test_panels_that_share_genes_share_their_rows():
    encoder = GeneEncoder(GeneEncoderConfig(dim=16, heads=8)).double()
    first = encoder.gene_ids(["ERBB2", "CD74", "GNAS"], grow=True)
    second = encoder.gene_ids(["GNAS", "KRT19", "ERBB2"], grow=True)
    assert encoder.genes == ["ERBB2", "CD74", "GNAS", "KRT19"]
    assert first.tolist() == [0, 1, 2] and second.tolist() == [2, 3, 0]
    # training on the second panel moves the shared rows and the new one, never CD74's
    out = encoder.encode([(["GNAS", "KRT19", "ERBB2"], [1.0, 2.0, 3.0])])
    out.square().sum().backward()
    moved = encoder.embedding.grad.abs().sum(1) > 0
    assert moved.tolist() == [True, False, True, True]


def test_unseen_genes_are_added_or_refused():
    encoder = _encoder(GENES[:10])
    before = encoder.embedding.detach().clone()
    panel = (GENES[:10], np.arange(10.0))
    with torch.no_grad():
        reference = encoder.encode([panel])
    with pytest.raises(GenemapInputError, match=r"2 genes are not in its vocabulary of 10 \(e\.g\. NEW1, NEW2\)"):
        encoder.encode([(["G1", "NEW1", "NEW2"], [1.0, 2.0, 3.0])])
    assert len(encoder.genes) == 10  # a refusal adds nothing
    with torch.no_grad():
        encoder.encode([(["G1", "NEW1", "NEW2"], [1.0, 2.0, 3.0])], grow=True)
        after = encoder.encode([panel])
    assert encoder.genes[10:] == ["NEW1", "NEW2"] and encoder.embedding.shape == (12, 32)
    assert torch.equal(encoder.embedding[:10], before)  # old rows keep their values and meaning
    torch.testing.assert_close(after, reference, rtol=0, atol=0)


def test_padding_in_a_mixed_batch_changes_nothing():
    encoder = _encoder()
    rng = np.random.default_rng(2)
    small = (GENES[:5], rng.random(5))
    large = (GENES[3:25], rng.random(22))
    with torch.no_grad():
        alone = encoder.encode([small])
        batched = encoder.encode([small, large, ([], [])])
        values, ids, mask = encoder.batch_panels([small, large])
    assert mask.sum(1).tolist() == [17, 0]
    torch.testing.assert_close(batched[:1], alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(batched[1:2], encoder.encode([large]).detach(), rtol=0, atol=1e-6)
    assert torch.equal(batched[2], torch.zeros(32, dtype=torch.float64))  # an empty panel: a zero vector
    garbage = values.clone()
    garbage[mask] = 1e3  # whatever sits under the mask is ignored
    with torch.no_grad():
        torch.testing.assert_close(encoder(garbage, ids, mask)[:1], alone, rtol=0, atol=1e-6)


def test_vocabulary_travels_with_the_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    encoder = _encoder(["B", "A", "C"])
    encoder.gene_ids(["D"], grow=True)
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, tmp_path / "w.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(encoder.config.to_dict()))
    config = GeneEncoderConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert config.genes == ("B", "A", "C", "D")
    loaded = GeneEncoder.from_config(config).double().eval()
    loaded.load_state_dict(load_file(tmp_path / "w.safetensors"), strict=True)
    panel = (["D", "A"], [0.5, 2.0])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode([panel]), encoder.encode([panel]), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="weights hold 4 gene rows but the vocabulary has 2 symbols"):
        GeneEncoder(GeneEncoderConfig(genes=("A", "B"), dim=32)).load_state_dict(encoder.state_dict())
