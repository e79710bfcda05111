"""``genemap predict`` and ``genemap aggregate``: the command-line contract, resume after a kill, ROIs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_genemap.cli import main
from napari_genemap.io import slide_mpp
from napari_genemap.io.rois import UNIT_COLUMNS
from napari_genemap.models.checkpoint import load_checkpoint
from napari_genemap.sample import read_sample, sample_root

IMAGE = sample_root() / "images" / "B4_crop.jpg"  # found with its spots by the HER2ST reader


@pytest.fixture(scope="module")
def checkpoint(random_checkpoint) -> Path:
    return random_checkpoint


def spots_csv(path: Path, radius_column: str = "radius") -> tuple[np.ndarray, np.ndarray]:
    from napari_genemap.io import spot_geometry

    sdata = read_sample()
    centers, radii = spot_geometry(sdata)
    values = radii if radius_column == "radius" else radii * slide_mpp(sdata)
    pd.DataFrame({"x": centers[:, 0], "y": centers[:, 1], radius_column: values}).to_csv(path, index=False)
    return centers, radii


@pytest.mark.slow
def test_predict_then_aggregate_at_the_measured_spots(tmp_path, checkpoint, capsys):
    out = tmp_path / "pred.zarr"
    args = ["predict", str(IMAGE), "--out", str(out), "--model", str(checkpoint), "--tile", "128", "--halo", "64"]
    assert main(args) == 0
    assert "predicted" in capsys.readouterr().out
    centers, radii = spots_csv(tmp_path / "spots.csv", "radius_um")
    assert (
        main(["aggregate", str(out), "--circles", str(tmp_path / "spots.csv"), "--out", str(tmp_path / "t.csv")]) == 0
    )
    table = pd.read_csv(tmp_path / "t.csv")
    assert list(table.columns) == ["name", "kind", *UNIT_COLUMNS, "ERBB2", "CD74", "COL1A1"] and len(table) == 49
    assert (table["kind"] == "circle").all()
    np.testing.assert_allclose(table[["x_px", "y_px"]].to_numpy(), centers)
    np.testing.assert_allclose(table["radius_px"], radii, rtol=1e-6)  # µm converted back to slide px
    np.testing.assert_allclose(table["radius_um"], radii * slide_mpp(read_sample()), rtol=1e-5)

    # the same numbers straight from the engine (no store, no CLI): aggregation at the spots
    from napari_genemap.infer.aggregate import predict_measured_spots

    direct = predict_measured_spots(load_checkpoint(checkpoint), read_sample(), tmp_path / "cache2", 128, 64)
    np.testing.assert_allclose(table[["ERBB2", "CD74", "COL1A1"]].to_numpy(), direct.X, rtol=1e-5, atol=1e-6)
    assert (direct.layers["integral"] > 0).all()

    # the store opens in spatialdata with the map on the H&E's coordinates
    import spatialdata as sd
    from spatialdata.transformations import get_transformation

    sdata = sd.read_zarr(out)
    scale = get_transformation(sdata.images["gene_maps"], "global").to_affine_matrix(("y", "x"), ("y", "x"))[0, 0]
    assert scale == pytest.approx(8 * 4.0 / 0.6854, rel=1e-3)  # stride 8 x (4 µm/px over 0.6854 µm/px)


def test_genes_subset_keeps_the_protocol_normalisation(tmp_path, checkpoint):
    full, part = tmp_path / "full.zarr", tmp_path / "part.zarr"
    common = ["--model", str(checkpoint), "--tile", "128", "--halo", "64", "--cache", str(tmp_path / "cache")]
    assert main(["predict", str(IMAGE), "--out", str(full), *common]) == 0
    assert main(["predict", str(IMAGE), "--out", str(part), "--genes", "CD74", *common]) == 0
    spots_csv(tmp_path / "spots.csv")
    for store in (full, part):
        assert main(["aggregate", str(store), "--circles", str(tmp_path / "spots.csv"), "--out", f"{store}.csv"]) == 0
    np.testing.assert_allclose(pd.read_csv(f"{part}.csv")["CD74"], pd.read_csv(f"{full}.csv")["CD74"], rtol=1e-5)


def test_command_line_errors_are_one_line(tmp_path, checkpoint, capsys):
    flat = tmp_path / "plain.jpg"
    flat.write_bytes(IMAGE.read_bytes())  # no spot files beside it: an image without a pixel size
    assert main(["predict", str(flat), "--out", str(tmp_path / "x.zarr"), "--model", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pixel size" in err and "--mpp" in err
    assert main(["predict", str(IMAGE), "--out", str(tmp_path / "x.zarr"), "--model", str(tmp_path / "nope")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y,r\n1,2,3\n")
    assert main(["aggregate", str(tmp_path / "missing.zarr"), "--circles", str(bad), "--out", "t.csv"]) == 2
    assert "no such prediction store" in capsys.readouterr().err


def _done_tiles(cache: Path) -> int:
    """Level-0 tiles the cache counts as done: their completion markers, written after the data (a shard
    without its marker, from a process killed in between, is predicted again); 0 while the cache is still
    being created (its staging folder is renamed under the walk)."""
    try:
        return sum(1 for path in cache.rglob("level0/done/*") if path.is_file() and not path.name.startswith("."))
    except FileNotFoundError:
        return 0


def test_a_killed_prediction_resumes_without_recomputing(tmp_path, checkpoint):
    """Kill ``genemap predict`` mid-run (SIGKILL, workers included), rerun: no tile twice, same maps."""
    cache = tmp_path / "cache"
    command = [sys.executable, "-m", "napari_genemap.cli", "predict", str(IMAGE), "--out", str(tmp_path / "a.zarr")]
    command += ["--model", str(checkpoint), "--tile", "32", "--halo", "32", "--cache", str(cache)]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    process = subprocess.Popen(command, start_new_session=True, **quiet)
    deadline = time.monotonic() + 120
    while _done_tiles(cache) < 20 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done_before = _done_tiles(cache)
    assert 20 <= done_before < 121  # 11 x 11 tiles of 32 px over the 351 px model frame
    assert not (tmp_path / "a.zarr").exists()

    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    counts = re.search(r"(\d+) tiles \((\d+) with tissue\), (\d+) already cached, (\d+) predicted", result.stdout)
    tiles, tissue, cached, predicted = (int(value) for value in counts.groups())
    assert tiles == 121 and cached == done_before
    assert predicted == tiles - cached  # every tile the killed run finished is reused, none is predicted twice
    assert 0 < predicted < tissue  # ...and the killed run had predicted some tissue tiles itself

    # the resumed maps equal a fresh, uninterrupted prediction (up to float16 rounding of batch-size effects)
    import spatialdata as sd

    from napari_genemap.infer.engine import TileEngine

    resumed = np.asarray(sd.read_zarr(tmp_path / "a.zarr").images["gene_maps"].data, dtype=np.float32)
    engine = TileEngine(load_checkpoint(checkpoint), read_sample(), tmp_path / "fresh", tile=32, halo=32)
    try:
        fresh = engine.read(0, 0, resumed.shape[1], 0, resumed.shape[2]).astype(np.float32)
    finally:
        engine.close()
    np.testing.assert_allclose(resumed, fresh, rtol=1e-3, atol=1e-6)
