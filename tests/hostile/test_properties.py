"""Property-based hostile input (issue 12's fuzz part): random circle tables, spot tables and checkpoint
configs into the readers and ``genemap aggregate``.

Whatever comes in: never a traceback (exit 0, or exit 2 with one ``genemap: error:`` line; the readers raise
only `GenemapInputError`), and never a NaN in an output without a warning saying so. One small prediction
store is built per session and reused; example counts stay small so the module runs in about a minute.
"""

from __future__ import annotations

import json
import math
import shutil
import uuid
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from napari_genemap.cli import main
from napari_genemap.errors import GenemapDataWarning, GenemapInputError
from napari_genemap.sample import sample_root

SETTINGS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,  # the same examples on every run: a failure here is reproducible, never flaky
)

#: hostile cell values: NaN, infinities, negative, zero, huge, tiny, text, empty
CELLS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -1.0, 1e308, -1e308, 1e-320, 5.0, 50.0, 2000.0, 1e6]),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.sampled_from(["", "abc", "nan", "inf", "1e999", "NaN", " 12 ", "1,5", '"', "0x10"]),
    st.text(max_size=6),
)


@pytest.fixture(scope="module")
def prediction(small_prediction) -> tuple[Path, Path]:
    return small_prediction  # (checkpoint, store): tests/conftest.py builds them once per session


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _fresh(work: Path) -> Path:
    folder = work / uuid.uuid4().hex[:8]
    folder.mkdir()
    return folder


def _one_line_or_success(code: int, err: str) -> list[str]:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err, err
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("genemap: error: "), lines
    assert all(line.startswith(("genemap: error: ", "genemap: warning: ")) for line in lines), lines
    return lines


# --- circle tables into `genemap aggregate` ------------------------------------------------------------------
@st.composite
def circle_tables(draw) -> pd.DataFrame:
    radius = draw(st.sampled_from(["radius", "radius_um", "r"]))
    columns = draw(st.sampled_from([["x", "y", radius], ["x", "y", radius, "name"], ["y", radius], ["x", "y"]]))
    rows = draw(st.integers(min_value=0, max_value=6))
    sizes = st.one_of(st.floats(0.5, 400), st.sampled_from([1e308, 1e12, 3e4, 1e-320, 1e-3]))
    good = {"x": st.floats(-300, 2300), "y": st.floats(-300, 2300), radius: sizes}
    data = {
        column: [draw(good.get(column, CELLS) if draw(st.integers(0, 9)) < 8 else CELLS) for _ in range(rows)]
        for column in columns
    }
    return pd.DataFrame(data, columns=columns)


@SETTINGS
@given(table=circle_tables())
@example(table=pd.DataFrame({"x": [500.0], "y": [500.0], "radius": [1e308]}))  # area overflows: refused
@example(table=pd.DataFrame({"x": [500.0, -900.0], "y": [500.0, -900.0], "radius_um": [30.0, 1e-320]}))
def test_aggregate_any_circle_table(prediction, work, capsys, table):
    folder = _fresh(work)
    circles, out = folder / "circles.csv", folder / "t.csv"
    table.to_csv(circles, index=False)
    code = main(["aggregate", str(prediction[1]), "--circles", str(circles), "--out", str(out)])
    lines = _one_line_or_success(code, capsys.readouterr().err)
    if code == 2:
        assert not out.exists()
        assert sorted(p.name for p in folder.iterdir()) == ["circles.csv"]
        return
    written = pd.read_csv(out)
    genes = written[["ERBB2", "CD74", "COL1A1"]].to_numpy(float)
    if not np.isfinite(genes).all():
        assert any("warning" in line and ("NaN" in line or "undefined" in line) for line in lines), lines
    assert len(written) == len(table)


# --- spot tables into the HER2ST reader and `genemap info` ----------------------------------------------------
SPOT_COLUMNS = ["x", "y", "new_x", "new_y", "pixel_x", "pixel_y", "selected"]


@st.composite
def spot_tables(draw) -> pd.DataFrame:
    original = pd.read_csv(sample_root() / "spots" / "B4_crop_selection.tsv", sep="\t")
    table = original.copy().astype(object)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        kind = draw(st.sampled_from(["cell", "cell", "drop_column", "drop_rows", "duplicate_row"]))
        if kind == "cell":
            row = draw(st.integers(0, len(table) - 1))
            table.iat[row, draw(st.integers(0, table.shape[1] - 1))] = draw(CELLS)
        elif kind == "drop_column":
            table = table.drop(columns=draw(st.sampled_from(list(table.columns))))
        elif kind == "drop_rows":
            table = table.iloc[: draw(st.integers(0, len(table)))]
        elif len(table):
            table = pd.concat([table, table.iloc[[draw(st.integers(0, len(table) - 1))]]])
        if table.shape[1] == 0 or len(table) == 0:
            break
    return table


@SETTINGS
@given(table=spot_tables())
def test_read_any_spot_table(work, capsys, table):
    from napari_genemap.io import read_slide

    folder = _fresh(work)
    root = folder / "her2st"
    shutil.copytree(sample_root(), root)
    table.to_csv(root / "spots" / "B4_crop_selection.tsv", sep="\t", index=False)
    try:
        with warnings.catch_warnings():  # rows fixed or dropped are announced, one line each: allowed
            warnings.simplefilter("ignore", GenemapDataWarning)
            sdata = read_slide(root, section="B4_crop")
    except GenemapInputError as error:
        assert "\n" not in str(error) and str(error)
    else:
        from napari_genemap.io import spot_geometry

        centers, radii = spot_geometry(sdata)
        assert np.isfinite(centers).all() and np.isfinite(radii).all() and (radii > 0).all()
    code = main(["info", str(root), "--section", "B4_crop"])
    _one_line_or_success(code, capsys.readouterr().err)


# --- checkpoint configs into the checkpoint reader ------------------------------------------------------------
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), st.integers(), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8,
)
FIELDS = ["mpp", "window", "genes", "protocol", "architecture", "format", "format_version", "model_class", "metrics"]


@st.composite
def checkpoint_configs(draw, original: dict) -> object:
    if draw(st.integers(0, 4)) == 0:
        return draw(JSON)  # anything at all: [], null, a string, ...
    config = json.loads(json.dumps(original))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(FIELDS))
        choice = draw(st.integers(0, 3))
        if choice == 0:
            config.pop(key, None)
        elif choice == 1:
            config[key] = draw(st.one_of(CELLS.filter(lambda v: not (isinstance(v, float) and math.isnan(v))), JSON))
        elif isinstance(config.get(key), dict) and config[key]:
            inner = draw(st.sampled_from(sorted(config[key])))
            config[key][inner] = draw(st.one_of(JSON, st.sampled_from([0, -1, 1e9, "two", None, []])))
        else:
            config[key] = draw(st.sampled_from([0, -4.0, 1e-9, "two", None, [], {}, True, 2**70]))
    return config


@pytest.fixture(scope="module")
def checkpoint(prediction) -> tuple[Path, dict]:
    return prediction[0], json.loads((prediction[0] / "config.json").read_text())


@SETTINGS
@given(data=st.data())
def test_read_any_checkpoint_config(checkpoint, work, data):
    from napari_genemap.models.checkpoint import load_checkpoint, read_checkpoint_config

    source, original = checkpoint
    config = data.draw(checkpoint_configs(original))
    folder = _fresh(work) / "ckpt"
    shutil.copytree(source, folder)
    (folder / "config.json").write_text(json.dumps(config, allow_nan=True))
    try:
        read = read_checkpoint_config(folder)
        loaded = load_checkpoint(folder)
    except GenemapInputError as error:
        assert "\n" not in str(error) and str(error)
        return
    assert isinstance(read, dict)
    assert loaded.mpp > 0 and math.isfinite(loaded.mpp) and len(loaded.genes) == 3
