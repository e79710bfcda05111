"""ROI tables as files: the CSV and Parquet writers (`io.rois`) and ``genemap aggregate --out`` by format."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from napari_genemap.cli import main
from napari_genemap.io.rois import UNIT_COLUMNS, roi_frame, write_table_files

HEAD = ["name", "kind", *UNIT_COLUMNS]


def small_table(n: int = 9000) -> ad.AnnData:
    """An ROI table as `explore.rois.roi_table` makes it: circles and a polygon (no radius), awkward names,
    an undefined value; more rows than one write block."""
    rng = np.random.default_rng(0)
    obs = pd.DataFrame(
        {"kind": ["circle"] * (n - 1) + ["polygon"], **{column: rng.uniform(0, 500, n) for column in UNIT_COLUMNS}},
        index=pd.Index([f"roi {i}" for i in range(n - 2)] + ['a, "quoted" one', "polygon"], name="roi"),
    )
    obs.loc["polygon", ["radius_um", "radius_px"]] = np.nan
    values = (rng.gamma(1.0, 2.0, (n, 4)) * np.exp(rng.normal(0, 6, (n, 4)))).astype(np.float32)
    values[3, 1] = np.nan
    values[4] = [0.0, 1e-45, 3.4e38, 999999.5]  # zero, the smallest float32, the largest, rounding up a digit
    return ad.AnnData(X=values, obs=obs, var=pd.DataFrame(index=pd.Index(["A", "B,C", "D", "E"], name="gene")))


def six_digits(values: np.ndarray) -> np.ndarray:
    return np.array([float(f"{v:.6g}") for v in np.ravel(values)], np.float32).reshape(np.shape(values))


def test_csv_and_parquet_hold_the_table_exactly(tmp_path):
    table = small_table()
    write_table_files(table, csv=tmp_path / "t.csv", parquet=tmp_path / "t.parquet")
    expected = roi_frame(table)
    parquet = pd.read_parquet(tmp_path / "t.parquet")
    csv = pd.read_csv(tmp_path / "t.csv", float_precision="round_trip")  # pandas' default parser is not exact
    for written in (parquet, csv):
        assert list(written.columns) == [*HEAD, "A", "B,C", "D", "E"]
        assert list(written["name"]) == list(table.obs_names) and list(written["kind"]) == list(table.obs["kind"])
        # geometry as float64, genes as float32: both read back to the very same numbers (NaN stays NaN)
        np.testing.assert_array_equal(written[list(UNIT_COLUMNS)].to_numpy(float), expected[list(UNIT_COLUMNS)])
        genes = written[["A", "B,C", "D", "E"]].to_numpy(np.float64).astype(np.float32)
        # Parquet: the float32 values themselves; CSV: each as %.6g prints it, as the CSV always held them
        expected_genes = table.X if written is parquet else six_digits(table.X)
        np.testing.assert_array_equal(genes, expected_genes)
    assert parquet["A"].dtype == np.float32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "t.parquet"]  # no temporaries left


def circles(path, n: int = 300):
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0, 2000, n), rng.uniform(0, 2000, n)
    pd.DataFrame({"x": x, "y": y, "radius_um": np.exp(rng.uniform(np.log(0.5), np.log(200), n))}).to_csv(
        path, index=False
    )
    return path


def test_aggregate_writes_parquet_csv_and_h5ad_with_the_same_numbers(tmp_path, small_prediction, capsys):
    store = small_prediction[1]
    spots = circles(tmp_path / "circles.csv")
    args = ["aggregate", str(store), "--circles", str(spots)]
    assert main([*args, "--out", str(tmp_path / "t.parquet"), "--h5ad", str(tmp_path / "t.h5ad")]) == 0
    assert main([*args, "--out", str(tmp_path / "t.csv")]) == 0
    assert main([*args, "--out", str(tmp_path / "only.h5ad")]) == 0
    assert capsys.readouterr().err == ""
    table = ad.read_h5ad(tmp_path / "t.h5ad")
    parquet = pd.read_parquet(tmp_path / "t.parquet")
    genes = list(table.var_names)
    assert genes == ["ERBB2", "CD74", "COL1A1"]
    assert list(parquet.columns) == [*HEAD, *genes] and len(parquet) == 300
    assert (parquet["kind"] == "circle").all() and list(parquet["name"]) == list(table.obs_names)
    np.testing.assert_array_equal(parquet[genes].to_numpy(), table.X)  # float32, bit for bit
    np.testing.assert_array_equal(parquet[list(UNIT_COLUMNS)].to_numpy(), table.obs[list(UNIT_COLUMNS)].to_numpy())
    csv = pd.read_csv(tmp_path / "t.csv", float_precision="round_trip")
    np.testing.assert_array_equal(csv[genes].to_numpy().astype(np.float32), six_digits(table.X))
    only = ad.read_h5ad(tmp_path / "only.h5ad")
    np.testing.assert_array_equal(only.X, table.X)
    np.testing.assert_array_equal(only.layers["integral"], table.layers["integral"])


@pytest.mark.parametrize("out", ["table.xlsx", "table", "table.CSV", "table.parquet.tmp"])
def test_aggregate_refuses_an_unknown_table_format(tmp_path, small_prediction, capsys, out):
    spots = circles(tmp_path / "circles.csv", 3)
    code = main(["aggregate", str(small_prediction[1]), "--circles", str(spots), "--out", str(tmp_path / out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"genemap: error: --out {tmp_path / out}: ") and ".parquet" in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["circles.csv"]


def test_aggregate_refuses_two_anndata_outputs(tmp_path, small_prediction, capsys):
    spots = circles(tmp_path / "circles.csv", 3)
    argv = ["aggregate", str(small_prediction[1]), "--circles", str(spots), "--out", str(tmp_path / "a.h5ad")]
    assert main([*argv, "--h5ad", str(tmp_path / "b.h5ad")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--h5ad" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["circles.csv"]
