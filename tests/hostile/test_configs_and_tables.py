"""Hostile configs, tables and checkpoints (issue 12, items 3, 4, 8, 10 and 14's duplicate obs names).

Each case is made from small real files: the bundled sample's counts and image, and the shipped checkpoint
copied to ``tmp_path`` and damaged there. Each ends in ``GenemapInputError`` from the public function and,
where a command reaches it, exit status 2 with one line on stderr naming the file and the field, row or
column at fault, and nothing written at the output path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_genemap.checkpoints import shipped_checkpoint
from napari_genemap.cli import main
from napari_genemap.data.protocols import hist2st
from napari_genemap.errors import GenemapInputError
from napari_genemap.sample import sample_root

SAMPLE = sample_root()
IMAGE = SAMPLE / "images" / "B4_crop.jpg"
IMAGE_MPP = 0.6854


def _cli(capsys, *argv) -> tuple[int, list[str]]:
    code = main([str(a) for a in argv])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _assert_refused(code: int, lines: list[str], *needles: str) -> None:
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("genemap: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _counts() -> pd.DataFrame:
    return pd.read_csv(SAMPLE / "counts" / "B4_crop.tsv.gz", sep="\t", index_col=0)


def _write_table(table: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".h5ad":
        import anndata as ad

        adata = ad.AnnData(
            X=table.to_numpy(np.float64),
            obs=pd.DataFrame(index=pd.Index(table.index, dtype=str)),
            var=pd.DataFrame(index=pd.Index(table.columns, dtype=str)),
        )
        adata.write_h5ad(path)
    else:
        table.to_csv(path, sep="\t" if path.suffix == ".tsv" else ",")
    return path


@pytest.fixture
def prediction(tmp_path) -> Path:
    """A perfect prediction of the sample's spots (the truth on the hist2st scale), as a CSV."""
    counts = _counts()
    values = hist2st().normalise(counts.to_numpy(np.float64))
    return _write_table(pd.DataFrame(values, index=counts.index, columns=counts.columns), tmp_path / "pred.csv")


# --- item 3: a bad cell in a truth counts table ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "shown"),
    [
        ("truth.csv", np.nan, "is nan"),
        ("truth.tsv", np.nan, "is nan"),
        ("truth.h5ad", np.nan, "is nan"),
        ("truth.csv", np.inf, "is inf"),
        ("truth.csv", -4.0, "is -4"),
    ],
)
def test_evaluate_refuses_a_bad_count_naming_row_and_column(tmp_path, capsys, prediction, name, value, shown):
    counts = _counts().astype(np.float64)
    counts.iloc[3, 5] = value
    truth = _write_table(counts, tmp_path / name)
    per_gene = tmp_path / "per_gene.csv"
    code, lines = _cli(capsys, "evaluate", prediction, truth, "--per-gene", per_gene)
    spot, gene = counts.index[3], counts.columns[5]
    _assert_refused(code, lines, str(truth), f"row 4 (spot {spot!r})", f"column {gene!r}", shown, "raw counts")
    assert not per_gene.exists()


def test_evaluate_accepts_the_clean_table(tmp_path, capsys, prediction):
    truth = _write_table(_counts(), tmp_path / "truth.csv")
    assert main(["evaluate", str(prediction), str(truth)]) == 0
    captured = capsys.readouterr()
    assert "PCC@M" in captured.out and not captured.err


@pytest.mark.filterwarnings("ignore:Observation names are not unique")
@pytest.mark.parametrize("which", ["truth.csv", "truth.h5ad", "pred.csv"])
def test_evaluate_refuses_duplicate_spot_names(tmp_path, capsys, prediction, which):
    counts = _counts()
    duplicated = counts.copy()
    duplicated.index = [*counts.index[:-1], counts.index[0]]  # the last row claims the first spot's name
    if which == "pred.csv":
        table = pd.read_csv(prediction, index_col=0)
        table.index = duplicated.index
        bad = _write_table(table, tmp_path / "pred_dup.csv")
        argv = [bad, _write_table(counts, tmp_path / "truth.csv")]
    else:
        bad = _write_table(duplicated, tmp_path / which)
        argv = [prediction, bad]
    code, lines = _cli(capsys, "evaluate", *argv)
    _assert_refused(code, lines, str(bad), repr(counts.index[0]), "2 times")


# --- items 4 and 8: checkpoint config.json fields -----------------------------------------------------------


def _set(key, value):
    def edit(config):
        config[key] = value

    return edit


def _set_in(outer, key, value):
    def edit(config):
        config[outer][key] = value

    return edit


def _reverse_protocol_genes(config):
    config["protocol"]["genes"] = config["protocol"]["genes"][::-1]


def _first_gene(value):
    def edit(config):
        config["genes"][0] = value

    return edit


CONFIG_CASES = [
    ("array", "[]", "holds an array"),
    ("null", "null", "holds null"),
    ("string", '"pixnet"', "holds a string"),
    ("mpp-zero", _set("mpp", 0), "field 'mpp' is 0"),
    ("mpp-negative", _set("mpp", -2.0), "field 'mpp' is -2.0"),
    ("mpp-text", _set("mpp", "two"), "field 'mpp' is 'two'"),
    ("mpp-nan", _set("mpp", float("nan")), "field 'mpp' is nan"),
    ("mpp-bool", _set("mpp", True), "field 'mpp' is True"),
    ("mpp-null", _set("mpp", None), "field 'mpp' is null"),
    ("window-text", _set("window", "big"), "field 'window' is 'big'"),
    ("window-zero", _set("window", 0), "field 'window' is 0"),
    ("window-negative", _set("window", -256), "field 'window' is -256"),
    ("window-fraction", _set("window", 256.5), "field 'window' is 256.5"),
    ("window-not-multiple", _set("window", 100), "field 'window' is 100"),
    ("genes-text", _set("genes", "HPS6"), "field 'genes' is 'HPS6'"),
    ("genes-number", _first_gene(0), "field 'genes' item 1 is 0"),
    ("genes-duplicate", _first_gene("TNC"), "field 'genes' names 'TNC' twice"),
    ("architecture-array", _set("architecture", []), "field 'architecture' is an array"),
    ("n_genes-text", _set_in("architecture", "n_genes", "785"), "field 'architecture.n_genes' is '785'"),
    ("protocol-array", _set("protocol", []), "field 'protocol' is an array"),
    ("target_sum-text", _set_in("protocol", "target_sum", "x"), "field 'protocol.target_sum' is 'x'"),
    ("protocol-format-text", _set_in("protocol", "format", "x"), "field 'protocol.format' is 'x'"),
    ("protocol-genes-order", _reverse_protocol_genes, "field 'protocol.genes'"),
    ("provenance-array", _set("provenance", []), "field 'provenance' is an array"),
    ("metrics-text", _set("metrics", "x"), "field 'metrics' is 'x'"),
    ("format_version-text", _set("format_version", "1"), "field 'format_version' is '1'"),
    ("model_class-unknown", _set("model_class", "Nope"), "field 'model_class': model class 'Nope' is not registered"),
]


@pytest.fixture
def checkpoint_copy(tmp_path) -> Path:
    return Path(shutil.copytree(shipped_checkpoint(), tmp_path / "checkpoint"))


@pytest.mark.parametrize(("damage", "expected"), [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_checkpoint_config_fields_are_checked_on_read(tmp_path, capsys, checkpoint_copy, damage, expected):
    from napari_genemap.models.checkpoint import read_checkpoint_config

    config_path = checkpoint_copy / "config.json"
    if isinstance(damage, str):
        config_path.write_text(damage)
    else:
        config = json.loads(config_path.read_text())
        damage(config)
        config_path.write_text(json.dumps(config))  # NaN is written as Python's json writes it
    with pytest.raises(GenemapInputError, match="config.json: ") as raised:
        read_checkpoint_config(checkpoint_copy)  # torch-free: the napari panel and the CLI read this first
    assert expected in str(raised.value)
    out = tmp_path / "p.zarr"
    code, lines = _cli(capsys, "predict", IMAGE, "--mpp", IMAGE_MPP, "--model", checkpoint_copy, "--out", out)
    _assert_refused(code, lines, str(config_path), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no store, no cache beside it


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weights_are_refused_on_load(tmp_path, capsys, checkpoint_copy, value):
    from safetensors.torch import load_file, save_file

    from napari_genemap.models.checkpoint import FORMAT, load_checkpoint

    weights = checkpoint_copy / "model.safetensors"
    state = load_file(weights)
    state["head.weight"][3, 0] = value
    save_file(state, weights, metadata={"format": FORMAT})
    with pytest.raises(GenemapInputError, match=r"model\.safetensors: weight 'head\.weight' holds 1 NaN or infinite"):
        load_checkpoint(checkpoint_copy)
    out = tmp_path / "p.zarr"
    code, lines = _cli(capsys, "predict", IMAGE, "--mpp", IMAGE_MPP, "--model", checkpoint_copy, "--out", out)
    _assert_refused(code, lines, str(weights), "'head.weight'", "NaN or infinite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


# --- item 10: devices -----------------------------------------------------------------------------------


@pytest.fixture
def no_accelerator(monkeypatch):
    """This machine as one without CUDA or MPS, whatever it has."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize("name", ["cuda", "mps", "banana", "CUDA"])
def test_a_device_the_machine_lacks_is_refused(no_accelerator, name):
    import torch

    from napari_genemap.device import resolve_device

    with pytest.raises(GenemapInputError, match=f"device '{name}'.* expected"):
        resolve_device(name)
    assert resolve_device("auto") == torch.device("cpu")


def test_predict_on_cuda_without_cuda_is_one_line(tmp_path, capsys, no_accelerator):
    from napari_genemap.device import resolve_device

    with pytest.raises(GenemapInputError):  # checked first: on the branch-start code this returned a device
        resolve_device("cuda")
    out = tmp_path / "p.zarr"
    code, lines = _cli(
        capsys, "predict", IMAGE, "--mpp", IMAGE_MPP, "--device", "cuda", "--out", out, "--cache", tmp_path / "c"
    )
    _assert_refused(code, lines, "device 'cuda'", "'cpu'")
    assert not out.exists()


def test_a_training_config_naming_an_unknown_device_is_one_line(tmp_path, capsys):
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"slides": [{"path": str(SAMPLE)}], "out": "ckpt", "device": "banana"}))
    code, lines = _cli(capsys, "train", "pixnet", "--config", config)
    _assert_refused(code, lines, str(config), "device 'banana'", "expected one of auto, cpu, cuda, mps")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.json"]


# --- item 14: duplicate obs names in an h5ad slide ----------------------------------------------------------


def _h5ad_slide(path: Path, names: list[str]) -> Path:
    import anndata as ad

    counts = _counts()
    spots = pd.read_csv(SAMPLE / "spots" / "B4_crop_selection.tsv", sep="\t")
    spots.index = [f"{x}x{y}" for x, y in zip(spots["x"], spots["y"], strict=True)]
    spots = spots.loc[counts.index]
    adata = ad.AnnData(
        X=counts.to_numpy(np.float32),
        obs=pd.DataFrame(index=pd.Index(names, dtype=str)),
        var=pd.DataFrame(index=pd.Index(counts.columns, dtype=str)),
    )
    adata.obsm["spatial"] = spots[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    adata.write_h5ad(path)
    return path


@pytest.mark.filterwarnings("ignore:Observation names are not unique")
def test_h5ad_slide_with_duplicate_obs_names_is_refused(tmp_path):
    from napari_genemap.io import counts_table, read_h5ad_slide

    names = list(_counts().index)
    good = _h5ad_slide(tmp_path / "good.h5ad", names)
    assert counts_table(read_h5ad_slide(good, IMAGE, 80.0, mpp=IMAGE_MPP)).n_obs == len(names)
    bad = _h5ad_slide(tmp_path / "dup.h5ad", [*names[:-1], names[0]])
    with pytest.raises(GenemapInputError, match=rf"dup\.h5ad: obs name '{names[0]}' appears 2 times \(rows 1 and 49\)"):
        read_h5ad_slide(bad, IMAGE, 80.0, mpp=IMAGE_MPP)
