"""Issue 13's training switches: the count-likelihood term and the low-rank gene head started from PCA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from napari_genemap.data.gene_basis import gene_components, log_expression
from napari_genemap.data.protocols import hist2st
from napari_genemap.data.windows import load_training_slide
from napari_genemap.errors import GenemapInputError
from napari_genemap.models.checkpoint import load_checkpoint, save_checkpoint
from napari_genemap.models.encoders import EncoderConfig
from napari_genemap.models.pixnet import PixNet, PixNetConfig
from napari_genemap.train.config import TrainConfig
from napari_genemap.train.losses import RawTerm, spot_loss

MEASURED = torch.tensor([[0.0, 3.0, 12.0], [1.0, 0.0, 40.0], [5.0, 2.0, 7.0]], dtype=torch.float64)
PREDICTED = torch.tensor([[0.5, 2.0, 15.0], [2.0, 0.3, 30.0], [4.0, 2.5, 9.0]], dtype=torch.float64)


def test_poisson_term_is_the_half_deviance_over_the_mean_count():
    term = RawTerm("poisson", 3)
    y, mu = MEASURED.numpy(), PREDICTED.numpy()
    half_deviance = stats.poisson.logpmf(y, np.where(y > 0, y, 1e-300)) - stats.poisson.logpmf(y, mu)
    expected = half_deviance.mean() / (y.mean() + 1)
    assert float(term(PREDICTED, MEASURED)) == pytest.approx(expected, rel=1e-9)
    assert float(term(MEASURED, MEASURED)) == pytest.approx(0, abs=1e-7)  # zeros meet the 1e-6 floor
    assert not list(term.parameters())


def test_negative_binomial_term_matches_scipy_and_learns_its_dispersion():
    term = RawTerm("nb", 3).double()
    with torch.no_grad():
        term.log_dispersion.copy_(torch.log(torch.tensor([0.5, 4.0, 30.0])))
    theta = np.array([0.5, 4.0, 30.0])
    y, mu = MEASURED.numpy(), PREDICTED.numpy()

    def log_likelihood(mean):
        return stats.nbinom.logpmf(y, theta, theta / (theta + mean))

    expected = (log_likelihood(np.maximum(y, 1e-6)) - log_likelihood(mu)).mean() / (y.mean() + 1)
    value = term(PREDICTED, MEASURED)
    assert float(value.detach()) == pytest.approx(expected, rel=1e-6)  # θ went through float32
    value.backward()
    # the dispersion is fitted by the full likelihood, not by the deviance (whose θ-gradient differs)
    log_theta = term.log_dispersion.detach().clone().requires_grad_(True)
    full = -torch.distributions.NegativeBinomial(
        total_count=log_theta.exp(), logits=torch.log(PREDICTED) - log_theta
    ).log_prob(MEASURED)
    (full.mean() / (MEASURED.mean() + 1)).backward()
    torch.testing.assert_close(term.log_dispersion.grad, log_theta.grad, rtol=1e-6, atol=1e-12)
    # the prediction's own gradient vanishes where it equals the counts
    exact = MEASURED.clone().clamp(min=1e-6).requires_grad_(True)
    RawTerm("nb", 3).double()(exact, MEASURED).backward()
    assert float(exact.grad[MEASURED > 0].abs().max()) < 1e-9


def test_the_count_terms_plug_into_the_spot_loss_and_bad_names_are_refused():
    from napari_genemap.data.protocols import Protocol

    protocol = Protocol("test", ("a", "b", "c"), target_sum=1e4, log="ln")
    target = protocol.normalise(MEASURED)
    for kind in ("poisson", "nb"):
        with torch.no_grad():
            terms = spot_loss(PREDICTED, MEASURED, target, protocol, 0.1, RawTerm(kind, 3).double())
        assert float(terms["raw"]) > 0
        assert float(terms["loss"]) == pytest.approx(
            float(terms["mse"] + 0.5 * (1 - terms["pearson"]) + 0.1 * terms["raw"])
        )
    with pytest.raises(GenemapInputError, match="raw_loss 'gamma': expected one of log1p, poisson, nb"):
        RawTerm("gamma")


def test_gene_components_follow_genes_that_vary_together():
    rng = np.random.default_rng(0)
    level = rng.uniform(1, 100, 500)
    counts = np.stack([np.full(500, 1000.0), level, level, rng.poisson(50, 500)], 1)
    axes = gene_components([counts[:300], counts[300:]], 2)
    assert axes.shape == (2, 4) and axes.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(axes, axis=1), 1, rtol=1e-5)
    first = axes[0]
    assert first[1] == pytest.approx(first[2], abs=0.02) and first[1] > 0.65  # the pair, together, sign fixed
    assert abs(first[3]) < 0.15
    # ln(1 + counts scaled to 1e4): a hand value, and spots without counts are dropped
    np.testing.assert_allclose(log_expression(np.array([[1.0, 3.0], [0.0, 0.0]])), [[np.log1p(2500), np.log1p(7500)]])
    with pytest.raises(GenemapInputError, match="5 asked; 500 spots of 4 genes give 1 to 3"):
        gene_components([counts], 5)
    with pytest.raises(GenemapInputError, match="different gene counts"):
        gene_components([counts, counts[:, :3]], 1)


def test_a_low_rank_pixnet_starts_at_its_components_and_round_trips(tmp_path):
    config = PixNetConfig(n_genes=6, encoder=EncoderConfig("tf_efficientnet_lite0", "random"), stride=8, gene_rank=2)
    model = PixNet(config).eval()
    components = torch.linalg.qr(torch.randn(6, 2))[0].T
    model.set_gene_components(components)
    torch.testing.assert_close(model.head.weight[..., 0, 0].T, components)
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        scores = model.gene_factors(model.features(image))
        expected = torch.nn.functional.softplus(
            torch.einsum("kg,bkhw->bghw", components, scores) + model.head.bias[:, None, None]
        )
        torch.testing.assert_close(model(image), expected, rtol=1e-5, atol=1e-6)
    from napari_genemap.data.protocols import Protocol

    protocol = Protocol("test", tuple(f"g{i}" for i in range(6)), target_sum=1e4, log="ln")
    loaded = load_checkpoint(save_checkpoint(tmp_path / "ckpt", model, protocol=protocol, mpp=2.0, window=64))
    assert loaded.model.config.gene_rank == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(image), model(image))
    with pytest.raises(GenemapInputError, match="gene_rank 6: expected 0 .* fewer components than its 6 genes"):
        PixNetConfig(n_genes=6, gene_rank=6)
    with pytest.raises(GenemapInputError, match=r"shape \(3, 6\); expected \(2, 6\)"):
        model.set_gene_components(torch.zeros(3, 6))
    full = PixNet(PixNetConfig(n_genes=6, encoder=EncoderConfig("tf_efficientnet_lite0", "random"), stride=8))
    with pytest.raises(GenemapInputError, match="full gene head"):
        full.set_gene_components(components)


def test_ablation_config_errors(tmp_path):
    base = {"slides": [{"path": "data"}], "out": "ckpt"}
    with pytest.raises(GenemapInputError, match="raw_loss 'l2': expected one of log1p, poisson, nb"):
        TrainConfig.from_dict({**base, "raw_loss": "l2"})
    with pytest.raises(GenemapInputError, match="gene_rank -1"):
        TrainConfig.from_dict({**base, "gene_rank": -1})
    with pytest.raises(GenemapInputError, match="gene_basis is given but gene_rank is 0"):
        TrainConfig.from_dict({**base, "gene_basis": ["A1.tsv.gz"]})
    path = tmp_path / "run.toml"
    path.write_text('out = "ckpt"\nslides = [{path = "data"}]\ngene_rank = 4\ngene_basis = ["counts/A1.tsv.gz"]\n')
    assert TrainConfig.from_file(path).gene_basis == [str(tmp_path / "counts" / "A1.tsv.gz")]


@pytest.mark.slow
def test_a_low_rank_negative_binomial_run_fits_its_basis_on_counts_without_images(tmp_path, sample_slide, her2st):
    """Two steps on the bundled crop: the head starts at the PCA of two HER2ST sections that have no image
    here, and the run trains with the negative-binomial term."""
    from napari_genemap.io import read_counts
    from napari_genemap.train.pixnet import train_pixnet

    mpp = 4.0
    slide = load_training_slide(sample_slide, hist2st(), mpp, "B4_crop")
    basis = [str(her2st / "counts" / f"{section}.tsv.gz") for section in ("A1", "E1")]
    config = TrainConfig(
        slides=[{"path": "unused", "name": "B4_crop"}], out=str(tmp_path / "ckpt"), mpp=mpp, window=64,
        batch=2, steps=2, lr=1e-6, weights="random", stride=8, gene_rank=8, gene_basis=basis, raw_loss="nb",
    )  # fmt: skip
    records = []
    summary = train_pixnet(config, slides={"B4_crop": slide}, protocol=hist2st(), on_metrics=records.append)
    assert all(np.isfinite(r["loss"]) for r in records)
    loaded = load_checkpoint(summary["checkpoint"])
    assert loaded.model.config.gene_rank == 8
    expected = gene_components([hist2st().counts(read_counts(path)) for path in basis], 8)
    head = loaded.model.head.weight.detach()[..., 0, 0].T.float().numpy()  # (8, 785), float32 copy of the start
    cosine = (head * expected).sum(1) / np.linalg.norm(head, axis=1)
    assert cosine.min() > 0.999
    with pytest.raises(GenemapInputError, match="A1.tsv.gz: not a readable tab-separated counts table"):
        bad = tmp_path / "A1.tsv.gz"
        bad.write_bytes(b"\x1f\x8b not gzip")
        read_counts(bad)


def test_stain_jitter_strength_is_a_switch(sample_slide):
    from napari_genemap.train.sampler import WindowSampler

    slide = load_training_slide(sample_slide, hist2st(), 4.0, "B4_crop")
    plain = WindowSampler([slide], 64, seed=3, stain=0.0).batch(6).images
    still = WindowSampler([slide], 64, seed=3, stain=0.0).batch(6).images
    np.testing.assert_array_equal(plain, still)
    spreads = {}
    for strength in (0.05, 0.3):
        jittered = WindowSampler([slide], 64, seed=3, stain=strength).batch(6).images
        # same windows (the dihedral draws come first), so the log ratio is the jitter alone
        inside = (plain > 0.05) & (plain < 0.95) & (jittered > 0.01) & (jittered < 0.99)
        spreads[strength] = float(np.std(np.log(jittered[inside]) - np.log(plain[inside])))
    assert spreads[0.3] > 3 * spreads[0.05] > 0
    with pytest.raises(GenemapInputError, match="stain_jitter 2.0: expected 0 .none. to 1"):
        TrainConfig.from_dict({"slides": [{"path": "data"}], "out": "ckpt", "stain_jitter": 2.0})


def test_bfloat16_precision_runs_the_forward_pass_under_autocast(tmp_path, sample_slide):
    """The same first batch in both precisions (the run seeds itself): bf16's loss is near float32's but not the
    same number, so the switch reaches the model."""
    from napari_genemap.train.pixnet import train_pixnet

    mpp = 4.0
    slide = load_training_slide(sample_slide, hist2st(), mpp, "B4_crop")
    first = {}
    for precision in ("float32", "bfloat16"):
        config = TrainConfig(
            slides=[{"path": "unused", "name": "B4_crop"}], out=str(tmp_path / precision), mpp=mpp, window=64,
            batch=2, steps=1, lr=1e-3, weights="random", stride=8, precision=precision,
        )  # fmt: skip
        records = []
        train_pixnet(config, slides={"B4_crop": slide}, protocol=hist2st(), on_metrics=records.append)
        first[precision] = records[0]["loss"]
    assert np.isfinite(first["bfloat16"])
    assert first["bfloat16"] != first["float32"]
    assert first["bfloat16"] == pytest.approx(first["float32"], rel=0.05)
    with pytest.raises(GenemapInputError, match="precision 'float8': expected float32 or bfloat16"):
        TrainConfig.from_dict({"slides": [{"path": "data"}], "out": "ckpt", "precision": "float8"})
