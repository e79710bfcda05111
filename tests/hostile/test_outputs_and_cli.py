"""Hostile output places and arguments (issue 12, items 6, 10, 13 and 14, and a symlink loop as the slide).

Each case goes through the real command line (``main`` and capsys; a subprocess where a hang or a traceback
must be seen) and ends in exit status 2 with one line on stderr naming the path or option at fault, and
nothing left at or beside the output path: no temporary, no ``.partial``, no half of the outputs, no cache.
Full and read-only disks are small tmpfs mounts (root may mount them here); skipped with one line elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import napari_genemap
from napari_genemap.cli import main
from napari_genemap.sample import sample_root

SAMPLE = sample_root()
IMAGE = SAMPLE / "images" / "B4_crop.jpg"  # found with its spots by the HER2ST reader
SRC = Path(napari_genemap.__file__).resolve().parents[1]  # the package under test, for subprocesses


@pytest.fixture(scope="module")
def prediction(small_prediction) -> tuple[Path, Path]:
    return small_prediction  # (checkpoint, store): tests/conftest.py builds them once per session


@pytest.fixture
def circles_csv(tmp_path) -> Path:
    path = tmp_path / "circles.csv"
    pd.DataFrame({"x": [500.0, 900.0], "y": [500.0, 900.0], "radius": [50.0, 80.0]}).to_csv(path, index=False)
    return path


def _cli(capsys, *argv) -> tuple[int, list[str]]:
    code = main([str(a) for a in argv])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _assert_refused(code: int, lines: list[str], *needles: object) -> None:
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("genemap: error: "), lines[0]
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])


def _names(folder: Path) -> list[str]:
    """Everything in a folder, hidden names included (temporaries start with a dot)."""
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "64k", readonly: bool = False):
    """A small tmpfs at ``path``; the test is skipped (one line) where mounting is not permitted."""
    path.mkdir()
    options = f"size={size}" + (",ro" if readonly else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({' '.join(done.stderr.split()) or done.returncode})")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def _fill(folder: Path) -> None:
    """Write until the file system is full."""
    with open(folder / "pad", "wb", buffering=0) as pad, contextlib.suppress(OSError):
        while True:
            pad.write(b"\0" * 4096)


# --- 6: output places ----------------------------------------------------------------------------------------
def test_aggregate_out_in_a_missing_folder(tmp_path, prediction, circles_csv, capsys):
    code, lines = _cli(capsys, "aggregate", prediction[1], "--circles", circles_csv, "--out", tmp_path / "nodir/t.csv")
    _assert_refused(code, lines, "nodir", "does not exist")
    assert not (tmp_path / "nodir").exists()


def test_aggregate_out_that_is_a_folder(tmp_path, prediction, circles_csv, capsys):
    folder = tmp_path / "adir"
    folder.mkdir()
    code, lines = _cli(capsys, "aggregate", prediction[1], "--circles", circles_csv, "--out", folder)
    _assert_refused(code, lines, folder, "is a folder")
    assert _names(folder) == [] and _names(tmp_path) == ["adir", "circles.csv"]


def test_h5ad_into_a_missing_folder_writes_no_csv_either(tmp_path, prediction, circles_csv, capsys):
    out = tmp_path / "t.csv"
    code, lines = _cli(
        capsys, "aggregate", prediction[1], "--circles", circles_csv, "--out", out, "--h5ad", tmp_path / "nodir/t.h5ad"
    )
    _assert_refused(code, lines, "nodir", "does not exist")
    assert _names(tmp_path) == ["circles.csv"]  # not half the outputs


def test_evaluate_per_gene_into_a_missing_folder(tmp_path, capsys):
    truth = tmp_path / "truth.csv"
    pd.read_csv(SAMPLE / "counts" / "B4_crop.tsv.gz", sep="\t", index_col=0).to_csv(truth)
    code, lines = _cli(capsys, "evaluate", truth, truth, "--per-gene", tmp_path / "nodir" / "g.csv")
    _assert_refused(code, lines, "nodir", "does not exist")
    assert _names(tmp_path) == ["truth.csv"]


def test_demo_out_onto_a_file(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("mine")
    code, lines = _cli(capsys, "demo", "--out", target)
    _assert_refused(code, lines, target, "is a file")
    assert target.read_text() == "mine" and _names(tmp_path) == ["afile"]


def test_train_into_a_read_only_folder_is_refused_at_the_start(tmp_path, capsys):
    with tmpfs(tmp_path / "ro", readonly=True):
        config = tmp_path / "train.toml"
        config.write_text(
            f'out = "ro/ck"\nmpp = 4.0\nwindow = 128\nbatch = 2\nsteps = 2\neval_every = 1\nweights = "random"\n'
            f'slides = [ {{ path = "{SAMPLE}", section = "B4_crop" }} ]\n'
        )
        started = time.monotonic()
        code, lines = _cli(capsys, "train", "pixnet", "--config", config)
        _assert_refused(code, lines, tmp_path / "ro" / "ck", "Read-only file system")
        assert time.monotonic() - started < 20  # refused before training, not at the first save
        assert _names(tmp_path / "ro") == []


def test_aggregate_into_a_read_only_folder(tmp_path, prediction, circles_csv, capsys):
    with tmpfs(tmp_path / "ro", readonly=True):
        code, lines = _cli(capsys, "aggregate", prediction[1], "--circles", circles_csv, "--out", tmp_path / "ro/t.csv")
        _assert_refused(code, lines, tmp_path / "ro" / "t.csv", "Read-only file system")


def test_disk_full_for_the_store(tmp_path, capsys):
    with tmpfs(tmp_path / "full", size="40k") as full:
        code, lines = _cli(capsys, "convert", IMAGE, full / "s.zarr")
        _assert_refused(code, lines, full / "s.zarr", "No space left on device")
        assert _names(full) == []  # the temporary store is gone


def test_disk_full_for_the_csv(tmp_path, prediction, circles_csv, capsys):
    with tmpfs(tmp_path / "full", size="64k") as full:
        _fill(full)
        code, lines = _cli(capsys, "aggregate", prediction[1], "--circles", circles_csv, "--out", full / "t.csv")
        _assert_refused(code, lines, full / "t.csv", "No space left on device")
        assert _names(full) == ["pad"]


def test_disk_full_for_the_h5ad_leaves_neither_output(tmp_path, prediction, circles_csv, capsys):
    with tmpfs(tmp_path / "full", size="64k") as full:
        _fill(full)
        out = tmp_path / "t.csv"
        code, lines = _cli(
            capsys, "aggregate", prediction[1], "--circles", circles_csv, "--out", out, "--h5ad", full / "t.h5ad"
        )
        _assert_refused(code, lines, full / "t.h5ad", "No space left on device")
        assert len(lines[0]) < 200, lines[0]  # h5py's reason, not its whole report
        assert _names(full) == ["pad"] and not out.exists()


# --- 10: cluster and device ----------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_scheduler_where_nothing_listens_is_one_line_within_seconds(tmp_path, prediction):
    address = f"tcp://127.0.0.1:{_free_port()}"
    out = tmp_path / "s.zarr"
    command = [sys.executable, "-m", "napari_genemap.cli", "predict", str(IMAGE), "--out", str(out)]
    command += ["--model", str(prediction[0]), "--scheduler", address, "--tile", "128", "--halo", "64"]
    started = time.monotonic()
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(SRC)}
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    _assert_refused(done.returncode, lines, address)
    assert time.monotonic() - started < 30  # distributed alone waits 30 s, then a traceback
    assert _names(tmp_path) == []  # no s.zarr.cache either


def test_an_unknown_device_is_one_line_not_a_usage_block(tmp_path, prediction, capsys):
    code, lines = _cli(capsys, "predict", IMAGE, "--out", tmp_path / "b.zarr", "--device", "banana")
    _assert_refused(code, lines, "--device", "banana")
    assert _names(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_creates_no_cache(tmp_path, prediction, capsys):
    code, lines = _cli(
        capsys, "predict", IMAGE, "--out", tmp_path / "cu.zarr", "--model", prediction[0], "--device", "cuda"
    )
    _assert_refused(code, lines, "cuda")
    assert _names(tmp_path) == []  # no cu.zarr.cache


# --- 13: arguments first -------------------------------------------------------------------------------------
def test_an_out_name_without_zarr_is_refused_before_predicting(tmp_path, prediction, capsys, monkeypatch):
    import napari_genemap.infer.predict as predict

    monkeypatch.setattr(predict, "predict_slide", lambda *a, **k: pytest.fail("predicted before checking --out"))
    code, lines = _cli(capsys, "predict", IMAGE, "--out", tmp_path / "nozarr", "--model", prediction[0])
    _assert_refused(code, lines, tmp_path / "nozarr", ".zarr")
    assert _names(tmp_path) == []  # no nozarr.cache


# --- 14: lower -----------------------------------------------------------------------------------------------
def test_circles_wholly_outside_the_slide_are_named_in_one_warning(tmp_path, prediction, capsys):
    circles = tmp_path / "c.csv"
    pd.DataFrame({"x": [500.0, -900.0, 99999.0], "y": [500.0, -900.0, 5.0], "radius": [50, 80, 10]}).to_csv(
        circles, index=False
    )
    code, lines = _cli(capsys, "aggregate", prediction[1], "--circles", circles, "--out", tmp_path / "t.csv")
    assert code == 0 and len(lines) == 1, lines
    assert lines[0].startswith("genemap: warning: ") and "2 of 3 circles" in lines[0] and str(circles) in lines[0]
    values = pd.read_csv(tmp_path / "t.csv")[["ERBB2", "CD74", "COL1A1"]].to_numpy()
    assert (values[1:] == 0).all() and (values[0] > 0).all()


def test_aggregate_out_equal_to_circles_is_refused(tmp_path, prediction, circles_csv, capsys):
    before = circles_csv.read_bytes()
    code, lines = _cli(capsys, "aggregate", prediction[1], "--circles", circles_csv, "--out", circles_csv)
    _assert_refused(code, lines, "--out", "--circles")
    assert circles_csv.read_bytes() == before and _names(tmp_path) == ["circles.csv"]
    # the same file by another name (a relative path and a link) is the same file
    (tmp_path / "link.csv").symlink_to(circles_csv)
    code, lines = _cli(
        capsys, "aggregate", prediction[1], "--circles", circles_csv, "--out", tmp_path / "link.csv", "--overwrite"
    )
    _assert_refused(code, lines, "--circles")
    assert circles_csv.read_bytes() == before


def test_aggregate_keeps_an_existing_output_unless_overwrite(tmp_path, prediction, circles_csv, capsys):
    out = tmp_path / "t.csv"
    out.write_text("mine")
    args = ["aggregate", prediction[1], "--circles", circles_csv, "--out", out]
    code, lines = _cli(capsys, *args)
    _assert_refused(code, lines, out, "--overwrite")
    assert out.read_text() == "mine"
    code, lines = _cli(capsys, *args, "--overwrite")
    assert code == 0 and lines == [] and len(pd.read_csv(out)) == 2
    assert _names(tmp_path) == ["circles.csv", "t.csv"]


@pytest.mark.parametrize("offered", [42, None, object(), b"slide.jpg", [3], (None,), {"path": "x"}])
def test_get_reader_never_raises(offered):
    from napari_genemap.plugin import get_reader

    assert get_reader(offered) is None


# --- 7 (the CLI's part): a symlink loop as the slide ---------------------------------------------------------
def test_predict_on_a_symlink_loop(tmp_path, prediction, capsys):
    (tmp_path / "a.jpg").symlink_to(tmp_path / "b.jpg")
    (tmp_path / "b.jpg").symlink_to(tmp_path / "a.jpg")
    out = tmp_path / "out" / "p.zarr"
    (tmp_path / "out").mkdir()
    code, lines = _cli(capsys, "predict", tmp_path / "a.jpg", "--out", out, "--model", prediction[0])
    _assert_refused(code, lines, "a.jpg")
    assert _names(tmp_path / "out") == []


def test_argument_errors_are_one_line_for_every_command(capsys):
    for argv in (["predict"], ["aggregate", "x.zarr"], ["bogus"], ["evaluate", "a", "b", "--pooling", "x"], []):
        code, lines = _cli(capsys, *argv)
        _assert_refused(code, lines)
    with pytest.raises(SystemExit) as stop:  # --help still shows the usage and exits 0
        main(["--help"])
    assert stop.value.code == 0 and "usage: genemap" in capsys.readouterr().out


def test_outputs_checked_together_are_all_written(tmp_path, prediction, circles_csv, capsys):
    code, lines = _cli(
        capsys, "aggregate", prediction[1], "--circles", circles_csv, "--out", tmp_path / "t.csv",
        "--h5ad", tmp_path / "t.h5ad",
    )  # fmt: skip
    assert code == 0 and lines == []
    import anndata as ad

    table = ad.read_h5ad(tmp_path / "t.h5ad")
    np.testing.assert_allclose(
        pd.read_csv(tmp_path / "t.csv")[list(table.var_names)].to_numpy(), table.X, rtol=1e-5, atol=1e-6
    )
    assert _names(tmp_path) == ["circles.csv", "t.csv", "t.h5ad"]
