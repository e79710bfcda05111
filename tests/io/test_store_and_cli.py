"""SpatialData stores round-trip exactly and are written atomically; the CLI speaks in one line."""

from __future__ import annotations

import numpy as np
import pytest
import spatialdata as sd

from napari_genemap.cli import main
from napari_genemap.demo import same_slide
from napari_genemap.errors import GenemapInputError
from napari_genemap.io import read_slide, write_store
from napari_genemap.sample import read_sample, sample_root


def test_store_round_trip_is_unchanged(tmp_path):
    sdata = read_sample()
    store = write_store(sdata, tmp_path / "sample.zarr")
    assert same_slide(sdata, sd.read_zarr(store)) == []
    again = read_slide(store)
    assert same_slide(sdata, again) == []
    # and what we read back writes again
    assert same_slide(sdata, read_slide(write_store(again, tmp_path / "copy.zarr"))) == []


def test_same_slide_notices_a_change(tmp_path):
    sdata = read_sample()
    other = read_sample()
    other.tables["counts"].X.data[0] += 1  # one stored count, one UMI more
    assert same_slide(sdata, other) == ["counts"]


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    sdata = read_sample()

    def write_then_fail(path, **kwargs):
        original(path, **kwargs)
        raise OSError("disk full")

    original = sdata.write
    monkeypatch.setattr(sdata, "write", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_store(sdata, tmp_path / "out.zarr")
    assert list(tmp_path.iterdir()) == []


def test_existing_store_is_not_overwritten_unless_asked(tmp_path):
    sdata = read_sample()
    write_store(sdata, tmp_path / "s.zarr")
    with pytest.raises(GenemapInputError, match="already exists"):
        write_store(sdata, tmp_path / "s.zarr")
    write_store(sdata, tmp_path / "s.zarr", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


def test_cli_info_convert_and_one_line_errors(tmp_path, capsys):
    image = sample_root() / "images" / "B4_crop.jpg"
    assert main(["info", str(image)]) == 0
    out = capsys.readouterr().out
    assert "spots      49" in out and "genes      785" in out and "µm/px" in out

    assert main(["convert", str(image), str(tmp_path / "b4.zarr")]) == 0
    assert (tmp_path / "b4.zarr").is_dir()

    broken = tmp_path / "broken" / "images"
    broken.mkdir(parents=True)
    (broken / "x.jpg").write_bytes(image.read_bytes()[:5000])
    assert main(["convert", str(broken / "x.jpg"), str(tmp_path / "x.zarr"), "--mpp", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "truncated" in err
    assert not (tmp_path / "x.zarr").exists()


def test_demo_round_trips_predicts_and_writes_its_outputs(tmp_path, capsys):
    import pandas as pd
    from PIL import Image

    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "spots      49" in out and "0.685" in out
    assert "reads it back unchanged" in out
    assert (tmp_path / "sample.zarr").is_dir()
    table = pd.read_csv(tmp_path / "spot_predictions.csv")
    assert table.shape == (49 * 4, 5 + 785)  # spot, x, y, circle, radius_um, then the genes
    assert list(table.columns[:5]) == ["spot", "x", "y", "circle", "radius_um"]
    assert table["circle"].value_counts().to_dict() == {"measured": 49, "25um": 49, "50um": 49, "200um": 49}
    by_circle = {name: group.iloc[:, 5:].to_numpy() for name, group in table.groupby("circle")}
    # the measured spots are 50 µm in radius: the 50 µm circles give the same profiles
    np.testing.assert_allclose(by_circle["measured"], by_circle["50um"], rtol=1e-3)
    assert not np.allclose(by_circle["25um"], by_circle["200um"], rtol=1e-2)
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["measured"], ["200um"])}
    assert float(rows["measured"][2]) > 0.1  # mean PCC over the 785 genes at the measured spots
    with Image.open(tmp_path / "overview.png") as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[0] > 500 and pixels.std() > 20
