"""Metrics against hand-computed values; the CLI prints the table and refuses bad input in one line."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_genemap.cli import main
from napari_genemap.evaluate import evaluate, pearson_per_gene


def test_known_pair():
    prediction = np.array([[1.0], [2.0], [3.0], [4.0]])
    truth = np.array([[2.0], [1.0], [4.0], [3.0]])
    # centred: (-1.5, -.5, .5, 1.5) and (-.5, -1.5, 1.5, .5); products sum to 3; norms sqrt(5) each
    assert pearson_per_gene(prediction, truth) == pytest.approx([0.6])
    result = evaluate(prediction, truth, ["g"])
    assert result.reported["MSE"] == pytest.approx(1.0)
    assert result.reported["MAE"] == pytest.approx(1.0)


def test_perfect_prediction():
    truth = np.random.default_rng(0).normal(size=(20, 5))
    result = evaluate(truth.copy(), truth, list("abcde"))
    row = result.reported
    assert row["PCC@F"] == pytest.approx(1.0) and row["PCC@S"] == pytest.approx(1.0)
    assert row["PCC@M"] == pytest.approx(1.0)
    assert row["MSE"] == 0 and row["MAE"] == 0 and row["n_undefined"] == 0


def test_constant_prediction_leaves_every_gene_undefined():
    truth = np.random.default_rng(0).normal(size=(10, 4))
    result = evaluate(np.full((10, 4), 0.3), truth, list("abcd"))
    assert result.reported["n_undefined"] == 4
    assert np.isnan(result.reported["PCC@M"])
    assert result.per_gene["all"].isna().all()
    zero = evaluate(np.full((10, 4), 0.3), truth, list("abcd"), nan_policy="zero")
    assert zero.reported["PCC@M"] == 0.0


def test_quartile_median_mean_over_genes():
    rng = np.random.default_rng(3)
    truth = rng.normal(size=(50, 4))
    targets = [0.2, 0.4, 0.6, 1.0]
    prediction = np.column_stack([_with_correlation(truth[:, i], r, rng) for i, r in enumerate(targets)])
    pcc = pearson_per_gene(prediction, truth)
    assert pcc == pytest.approx(targets, abs=1e-9)
    row = evaluate(prediction, truth, list("abcd")).reported
    # linear interpolation: the first quartile sits 3/4 of the way from 0.2 to 0.4
    assert row["PCC@F"] == pytest.approx(0.35)
    assert row["PCC@S"] == pytest.approx(0.5)
    assert row["PCC@M"] == pytest.approx(0.55)


def _with_correlation(x, r, rng):
    """A vector whose sample correlation with x is exactly r."""
    x = x - x.mean()
    noise = rng.normal(size=x.size)
    noise -= noise.mean()
    noise -= noise @ x / (x @ x) * x
    return r * x / np.linalg.norm(x) + np.sqrt(1 - r**2) * noise / np.linalg.norm(noise)


def test_pooling_per_section_differs_from_pooled():
    # within each section prediction and truth agree in order; across sections the offset breaks it
    truth = np.array([[1.0], [2.0], [3.0], [10.0], [11.0], [12.0]])
    prediction = np.array([[11.0], [12.0], [13.0], [0.0], [1.0], [2.0]])
    sections = ["A", "A", "A", "B", "B", "B"]
    per_section = evaluate(prediction, truth, ["g"], sections, pooling="section")
    assert per_section.summary.loc["A", "PCC@M"] == pytest.approx(1.0)
    assert per_section.reported["PCC@M"] == pytest.approx(1.0)
    assert per_section.reported["n_spots"] == 6
    pooled = evaluate(prediction, truth, ["g"], sections, pooling="pooled")
    # by hand: both means are 6.5; centred truth (-5.5,-4.5,-3.5,3.5,4.5,5.5), squares sum to 125.5;
    # centred prediction (4.5,5.5,6.5,-6.5,-5.5,-4.5), squares sum to 185.5; products sum to -144.5
    expected = -144.5 / np.sqrt(125.5 * 185.5)
    assert pooled.reported["PCC@M"] == pytest.approx(expected)
    assert "per section, then averaged" in per_section.describe()


def test_cli_evaluate_prints_the_table(tmp_path, capsys):
    from napari_genemap.data import hist2st
    from napari_genemap.sample import read_sample, sample_root

    table = read_sample().tables["counts"]
    truth = hist2st().transform(table)
    prediction = pd.DataFrame(truth, index=table.obs_names, columns=hist2st().genes)
    path = tmp_path / "prediction.csv"
    prediction.to_csv(path)
    image = sample_root() / "images" / "B4_crop.jpg"
    assert main(["evaluate", str(path), str(image), "--protocol", "hist2st"]) == 0
    out = capsys.readouterr().out
    assert "protocol hist2st" in out and "pooling per section" in out
    mean_row = next(line for line in out.splitlines() if line.startswith("mean"))
    assert mean_row.split()[4:7] == ["1.0000", "1.0000", "1.0000"]  # PCC@F, PCC@S, PCC@M

    prediction.rename(index=lambda name: f"spot-{name}").to_csv(path)
    assert main(["evaluate", str(path), str(image)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("genemap: error:") and "no row names match the measured spots" in err
    assert "\n" not in err


def test_paired_bootstrap_sd_of_a_change_in_mean_pcc():
    from napari_genemap.evaluate.metrics import paired_bootstrap_sd

    rng = np.random.default_rng(0)
    truth = rng.normal(size=(300, 20))
    good = truth + rng.normal(scale=1.0, size=truth.shape)
    worse = truth + rng.normal(scale=2.0, size=truth.shape)
    assert paired_bootstrap_sd(good, good, truth) == 0  # the same spots for both: no change in any draw
    spread = paired_bootstrap_sd(worse, good, truth, draws=300, seed=1)
    assert spread == paired_bootstrap_sd(worse, good, truth, draws=300, seed=1)  # the seed fixes the draws
    # the change in mean PCC (about 0.26 here) over resampled spots varies by roughly 1/sqrt(spots), shrunk
    # by averaging 20 genes and by the pairing
    assert 0.005 < spread < 0.05
