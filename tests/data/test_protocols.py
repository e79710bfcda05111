"""Protocols against values computed by hand, and their JSON round trip."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from napari_genemap.data import Protocol, get_protocol, hest, hist2st, triplex
from napari_genemap.errors import GenemapInputError


def _table(counts, genes):
    return ad.AnnData(X=np.asarray(counts, dtype=np.float32), var=pd.DataFrame(index=genes))


def test_scaling_then_log10_by_hand():
    protocol = Protocol("t", ("a", "b"), target_sum=1e4, log="log10")
    values = protocol.normalise(np.array([[1.0, 3.0], [0.0, 0.0]]))
    assert values[0] == pytest.approx([np.log10(2501), np.log10(7501)])
    assert values[1] == pytest.approx([0.0, 0.0])  # an empty spot stays empty, never NaN


def test_hist2st_uses_the_785_genes_and_only_their_total(her2st):
    from napari_genemap.sample import read_sample

    protocol = hist2st()
    assert protocol.n_genes == 785 and protocol.genes[:2] == ("HPS6", "TNC")
    assert protocol.log == "log10" and protocol.target_sum == 1e4
    table = read_sample().tables["counts"]
    values = protocol.transform(table)
    raw = table[:, list(protocol.genes)].X.toarray().astype(float)
    spot = int(np.argmax(raw.sum(1)))
    gene = protocol.genes.index("GNAS")
    assert values[spot, gene] == pytest.approx(np.log10(1 + raw[spot, gene] / raw[spot].sum() * 1e4))


def test_triplex_picks_genes_by_mean_and_uses_natural_log():
    first = _table([[5, 0, 1, 9], [5, 2, 1, 9]], ["g0", "g1", "g2", "g3"])
    second = _table([[4, 9, 0], [4, 9, 0]], ["g3", "g1", "g0"])  # g2 missing here: never selected
    protocol = triplex([first, second], n_genes=2)
    # pooled means over the shared genes g0, g1, g3: g0 (5+5+0+0)/4=2.5, g1 (0+2+9+9)/4=5, g3 (9+9+4+4)/4=6.5
    assert protocol.genes == ("g3", "g1")
    assert protocol.normalise(np.array([[1.0, 1.0]])) == pytest.approx(np.array([[np.log(5001), np.log(5001)]]))


def test_hest_picks_the_most_variable_genes_and_keeps_raw_scale():
    table = _table([[0, 10, 3], [0, 0, 3], [1, 10, 3]], ["steady", "varies", "flat"])
    protocol = hest([table], n_genes=1)
    assert protocol.genes == ("varies",)
    assert protocol.target_sum is None
    assert protocol.normalise(np.array([[10.0]])) == pytest.approx(np.array([[np.log(11.0)]]))


def test_normalise_works_on_torch_tensors_too():
    torch = pytest.importorskip("torch")
    protocol = hist2st()
    raw = np.random.default_rng(1).poisson(2.0, (3, 785)).astype(np.float64)
    assert protocol.normalise(torch.from_numpy(raw)).numpy() == pytest.approx(protocol.normalise(raw))


def test_round_trip_and_refusals():
    protocol = Protocol("triplex", ("A", "B", "C"), target_sum=1e4, log="ln")
    assert Protocol.from_json(protocol.to_json()) == protocol
    with pytest.raises(GenemapInputError, match="newer than this napari-genemap"):
        Protocol.from_dict({**protocol.to_dict(), "format": 99})
    with pytest.raises(GenemapInputError, match="unknown fields"):
        Protocol.from_dict({**protocol.to_dict(), "extra": 1})
    with pytest.raises(GenemapInputError, match="gene list is empty"):
        Protocol("x", ())
    with pytest.raises(GenemapInputError, match="protocol 'nope' unknown"):
        get_protocol("nope")
    with pytest.raises(GenemapInputError, match="missing from the data"):
        hist2st().transform(_table([[1, 2]], ["A", "B"]))
