"""``genemap generate``: tiles drawn from a DiffBulk stage-1 model for a profile (a CSV or a measured spot of
the bundled crop), unconditioned ones from the same noise below, and one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from napari_genemap.cli import main
from napari_genemap.data.protocols import hist2st
from napari_genemap.models.diffbulk import DiffBulkStage1, save_stage1
from napari_genemap.models.gene_encoder import GeneEncoderConfig
from napari_genemap.models.generate import GAP

SIDE = 16  # the tiny U-Net's tiles (conftest.tiny_pixel_edm), pixel space


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, tiny_pixel_edm) -> Path:
    """A random pixel-space stage 1 over the hist2st genes, 112 µm tiles of 16 px, with its protocol."""
    torch.manual_seed(0)
    protocol = hist2st()
    model = DiffBulkStage1(tiny_pixel_edm, GeneEncoderConfig(dim=32, heads=4, layers=1))
    model.gene_encoder.add_genes(protocol.genes)
    with torch.no_grad():  # a condition strong enough to show in a random model's drawings
        model.gene_encoder.embedding.mul_(50)
    tile = {"tile_um": 112.0, "tile_px": SIDE, "mpp": 112.0 / SIDE}
    folder = tmp_path_factory.mktemp("stage1") / "checkpoint"
    return save_stage1(folder, model, protocol=protocol.to_dict(), tile=tile, metrics={"step": 1})


def _grid(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _tile(grid: np.ndarray, row: int, column: int) -> np.ndarray:
    y, x = row * (SIDE + GAP), column * (SIDE + GAP)
    return grid[y : y + SIDE, x : x + SIDE]


def test_a_profile_draws_a_row_above_unconditioned_tiles_from_the_same_noise(stage1, tmp_path, capsys):
    profile = tmp_path / "profile.csv"
    profile.write_text("gene,value\nKRT8,3.0\nIGKC,0.2\nNOT-A-GENE,1.0\n")
    out = tmp_path / "grid.png"
    argv = ["generate", str(stage1), "--profile", str(profile), "--n", "3", "--steps", "4", "--out", str(out)]
    assert main([*argv, "--device", "cpu"]) == 0
    assert "2 of its 3 genes known" in capsys.readouterr().out
    grid = _grid(out)
    assert grid.shape == (2 * SIDE + GAP, 3 * SIDE + 2 * GAP, 3)
    top, bottom = _tile(grid, 0, 0).astype(int), _tile(grid, 1, 0).astype(int)
    assert np.abs(top - bottom).mean() > 1  # the condition changed the drawing
    again = tmp_path / "again.png"
    argv[-1] = str(again)
    assert main([*argv, "--device", "cpu"]) == 0
    np.testing.assert_array_equal(_grid(again), grid)  # the seed fixes the noise
    other = tmp_path / "other.png"
    argv[-1] = str(other)
    assert main([*argv, "--device", "cpu", "--seed", "1"]) == 0
    assert not np.array_equal(_grid(other), grid)


def test_a_measured_spot_puts_its_own_tile_first(stage1, tmp_path, capsys):
    from napari_genemap.sample import sample_root

    out = tmp_path / "spot.png"
    spot = f"{sample_root()}:10x17"
    argv = ["generate", str(stage1), "--spot", spot, "--section", "B4_crop", "--n", "2", "--steps", "3"]
    assert main([*argv, "--out", str(out), "--device", "cpu"]) == 0
    assert "785 of its 785 genes known" in capsys.readouterr().out
    grid = _grid(out)
    assert grid.shape == (2 * SIDE + GAP, 3 * SIDE + 2 * GAP, 3)
    assert _tile(grid, 0, 0).std() > 5  # the spot's H&E, not an empty cell
    assert (_tile(grid, 1, 0) == 255).all()  # nothing under it


@pytest.mark.parametrize(
    "arguments, message",
    [
        ([], "one of --profile PROFILE.csv or --spot SLIDE:SPOT"),
        (["--profile", "{bad}"], "line 3: value 'x' is not a finite number"),
        (["--profile", "{unknown}"], "none of its 1 genes is in the model's vocabulary"),
        (["--profile", "{bad}", "--spot", "a:b"], "one of --profile"),
        (["--spot", "10x13"], "expected SLIDE:SPOT"),
    ],
)
def test_bad_input_is_one_line(stage1, tmp_path, capsys, arguments, message):
    bad, unknown = tmp_path / "bad.csv", tmp_path / "unknown.csv"
    bad.write_text("gene,value\nKRT8,1\nIGKC,x\n")
    unknown.write_text("gene,value\nNOT-A-GENE,1\n")
    arguments = [a.format(bad=bad, unknown=unknown) for a in arguments]
    assert main(["generate", str(stage1), *arguments, "--out", str(tmp_path / "g.png"), "--device", "cpu"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0]
    assert not (tmp_path / "g.png").exists()


def test_the_output_must_be_a_png_and_is_not_replaced_unasked(stage1, tmp_path, capsys):
    profile = tmp_path / "p.csv"
    profile.write_text("gene,value\nKRT8,1\n")
    assert main(["generate", str(stage1), "--profile", str(profile), "--out", str(tmp_path / "g.jpg")]) == 2
    assert "ending in .png" in capsys.readouterr().err
    existing = tmp_path / "g.png"
    existing.write_bytes(b"keep")
    assert main(["generate", str(stage1), "--profile", str(profile), "--out", str(existing)]) == 2
    assert "--overwrite" in capsys.readouterr().err and existing.read_bytes() == b"keep"
