"""DiffBulk stage 2 training, run as the Training panel and ``genemap train diffbulk-stage2`` run it: a tiny
pixel-space stage 1 (saved as stage 1 saves it) and a small PixNet checkpoint, a few steps on the bundled
HER2ST crop. The stage-1 U-Net stays frozen, p and the fusion learn, and the checkpoint is a gene-map model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from napari_genemap.errors import GenemapInputError
from napari_genemap.models.checkpoint import load_checkpoint
from napari_genemap.models.diffbulk import DiffBulkStage1, load_stage1, save_stage1
from napari_genemap.models.gene_encoder import GeneEncoderConfig
from napari_genemap.train.stages import stage_named, write_config

TILE_UM = 64.0  # 16 px at the small PixNet's 4 µm/px: stage 1's own scale


def _save_stage1(folder: Path, tile_um: float, edm) -> Path:
    """A random pixel-space stage 1 with 16 px tiles of ``tile_um``, saved in stage 1's own format."""
    torch.manual_seed(0)
    model = DiffBulkStage1(edm, GeneEncoderConfig(dim=32, heads=4, layers=1))
    tile = {"tile_um": tile_um, "tile_px": model.tile_px, "mpp": tile_um / model.tile_px}
    return save_stage1(folder / "checkpoint", model, tile=tile, metrics={"step": 1})


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, tiny_pixel_edm) -> Path:
    return _save_stage1(tmp_path_factory.mktemp("stage1"), TILE_UM, tiny_pixel_edm)


@pytest.fixture(scope="module")
def pathology(tmp_path_factory) -> Path:
    """A small random PixNet at 4 µm/px, stride 8, over three genes the bundled crop measures."""
    from napari_genemap.data.protocols import Protocol
    from napari_genemap.models.checkpoint import save_checkpoint
    from napari_genemap.models.encoders import EncoderConfig
    from napari_genemap.models.pixnet import PixNet, PixNetConfig

    torch.manual_seed(0)
    genes = ("CD74", "KRT8", "IGKC")
    model = PixNet(PixNetConfig(len(genes), EncoderConfig(weights="random"), stride=8)).eval()
    model.set_output_scale(torch.tensor([0.3, 1.0, 3.0]))
    protocol = Protocol("small", genes, target_sum=1e4, log="ln")
    return save_checkpoint(tmp_path_factory.mktemp("pixnet") / "small", model, protocol=protocol, mpp=4.0, window=128)


def _slides() -> list[dict]:
    from napari_genemap.sample import sample_root

    return [{"path": str(sample_root()), "section": "B4_crop", "name": "B4_crop"}]


def _run_from_cli(settings: dict, out: Path, capsys) -> list[dict]:
    from napari_genemap.cli import main

    stage = stage_named("diffbulk-stage2")
    config = stage.config(_slides(), [], settings, str(out))  # what the Training panel writes
    path = write_config({**config, "mpp": 4.0, "window": 128, "batch": 2, "threads": 1}, out.parent, out.name)
    assert main(["train", "diffbulk-stage2", "--config", str(path), "--jsonl"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_stage2_trains_p_and_the_fusion_and_leaves_the_unet_frozen(stage1, pathology, tmp_path, capsys):
    settings = {"stage1": str(stage1), "pathology": str(pathology), "steps": 3, "eval_every": 3}
    events = _run_from_cli({**settings, "device": "cpu"}, tmp_path / "both", capsys)
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3]
    assert events[-1]["event"] == "done" and events[-1]["checkpoint"] == str(tmp_path / "both")

    dense = load_checkpoint(tmp_path / "both")
    pixnet = load_checkpoint(pathology)
    assert dense.model_class == "DiffBulkDense" and dense.genes == pixnet.genes and dense.mpp == 4.0
    unet = load_stage1(stage1).model.denoiser.state_dict()  # the U-Net inside is stage 1's, weight for weight
    for key, value in dense.model.diffusion.denoiser.state_dict().items():
        torch.testing.assert_close(value, unet[key], rtol=0, atol=0, msg=key)
    assert dense.model.fusion.project.weight.abs().max() > 0  # started at zero, trained
    moved = [
        (a - b).abs().max().item()
        for (name, a), b in zip(
            dense.model.pathology.state_dict().items(),
            [v for k, v in pixnet.model.state_dict().items() if not k.startswith("head.")],
            strict=True,
        )
        if a.is_floating_point() and "running" not in name
    ]
    assert max(moved) > 0  # p was fine-tuned
    image = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        assert (dense.model(image) - pixnet.model(image)).abs().max() > 0


def test_the_pathology_control_trains_p_alone(stage1, pathology, tmp_path, capsys):
    settings = {"stage1": str(stage1), "pathology": str(pathology), "steps": 1, "eval_every": 1}
    _run_from_cli({**settings, "features": "pathology", "device": "cpu"}, tmp_path / "p", capsys)
    control = load_checkpoint(tmp_path / "p")
    assert control.model.config.features == "pathology"
    assert control.model.fusion.project.weight.abs().max() == 0  # f never reached the loss


def test_a_missing_stage1_is_refused_in_one_line_before_a_process_starts(tmp_path, pathology):
    stage = stage_named("diffbulk-stage2")
    with pytest.raises(GenemapInputError, match="stage 1 run: choose"):
        stage.config(_slides(), [], {"pathology": str(pathology)}, str(tmp_path / "out"))
    with pytest.raises(GenemapInputError, match="no-such-run"):
        stage.config(_slides(), [], {"stage1": str(tmp_path / "no-such-run")}, str(tmp_path / "out"))
    assert stage.makes_gene_maps  # its checkpoints are offered to Slide & model


def test_stage1_tiles_off_the_model_grid_are_refused_in_one_line(stage1, pathology, tmp_path, tiny_pixel_edm):
    from napari_genemap.errors import GenemapDataWarning
    from napari_genemap.train.diffbulk_stage2 import DiffBulkStage2Config, build_stage2_model

    config = DiffBulkStage2Config(
        slides=_slides(), out=str(tmp_path / "x"), stage1=str(stage1), pathology=str(pathology), mpp=3.0
    )
    with pytest.raises(GenemapInputError, match=r"its 64 µm tiles are 21.33.* px at 3.0 µm/px"):
        build_stage2_model(config)
    config.mpp = 2.0
    with pytest.raises(GenemapInputError, match="PixNet works at 4.0 µm/px; the config asks 2.0"):
        build_stage2_model(config)
    coarse = _save_stage1(tmp_path, 256.0, tiny_pixel_edm)  # 16 px tiles of 256 µm: 64 px at 4 µm/px, resampled to 16
    config.stage1, config.mpp, config.window = str(coarse), 4.0, 96
    with pytest.raises(GenemapInputError, match="window 96 px: expected a multiple of 64"):
        build_stage2_model(config)
    config.window = 128
    with pytest.warns(GenemapDataWarning, match="stage 1 learned 16 µm/px tiles.*tile_um = 16 x 4 = 64"):
        model, _, _ = build_stage2_model(config)
    assert model.config.feature_tile == 64


@pytest.fixture(scope="module")
def stage1_32(tmp_path_factory, tiny_pixel_edm) -> Path:
    """Stage 1 with 32 px tiles of 128 µm: 32 px at the small PixNet's 4 µm/px, the pooled model's input."""
    from dataclasses import replace

    return _save_stage1(tmp_path_factory.mktemp("stage1-32"), 128.0, replace(tiny_pixel_edm, sample_size=32))


def test_a_pooled_stage2_trains_on_spot_tiles_and_is_not_offered_as_a_gene_map(stage1_32, pathology, tmp_path, capsys):
    from napari_genemap.infer.engine import TileEngine
    from napari_genemap.sample import read_sample

    settings = {"stage1": str(stage1_32), "pathology": str(pathology), "head": "pooled", "steps": 3, "eval_every": 3}
    events = _run_from_cli({**settings, "device": "cpu"}, tmp_path / "pooled", capsys)
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3]
    assert events[-1]["event"] == "done" and events[-1]["checkpoint"] == str(tmp_path / "pooled")

    pooled = load_checkpoint(tmp_path / "pooled")
    assert (
        pooled.model_class == "DiffBulkPooled"
        and pooled.window == 32
        and list(pooled.genes) == ["CD74", "KRT8", "IGKC"]
    )
    unet = load_stage1(stage1_32).model.denoiser.state_dict()
    for key, value in pooled.model.diffusion.denoiser.state_dict().items():
        torch.testing.assert_close(value, unet[key], rtol=0, atol=0, msg=key)
    assert pooled.model.fusion.project.weight.abs().max() > 0  # started at zero, trained
    with torch.no_grad():
        expression = pooled.model(torch.rand(2, 3, 32, 32))
    assert expression.shape == (2, 3) and torch.isfinite(expression).all()
    with pytest.raises(GenemapInputError, match="expected tiles of 32 x 32 px"):
        pooled.model(torch.rand(1, 3, 64, 64))
    with pytest.raises(GenemapInputError, match="gives one expression vector per spot-centred tile, not a gene map"):
        TileEngine(pooled, read_sample(), tmp_path / "cache")
    stage = stage_named("diffbulk-stage2")
    assert not stage.offers(tmp_path / "pooled") and stage.offers(pathology)


def test_a_registered_model_says_whether_it_makes_gene_maps(monkeypatch):
    from napari_genemap.models import registry

    monkeypatch.setattr(registry, "MODELS", dict(registry.MODELS))
    monkeypatch.setattr(registry, "GENE_MAP_MODELS", set(registry.GENE_MAP_MODELS))
    registry.register_model("MyMapModel", "my_package.models:MyMapModel")
    registry.register_model("MyTileModel", "my_package.models:MyTileModel", gene_map=False)
    assert "MyMapModel" in registry.GENE_MAP_MODELS and "MyTileModel" not in registry.GENE_MAP_MODELS
    assert {"MyMapModel", "MyTileModel"} <= set(registry.MODELS)
    assert {"PixNet", "DiffBulkDense"} <= registry.GENE_MAP_MODELS and "DiffBulkPooled" not in registry.GENE_MAP_MODELS


def test_an_untrained_pooled_model_predicts_the_mean_and_its_p_is_the_pixnet_map_averaged(tiny_dense):
    from dataclasses import replace

    from napari_genemap.models.diffbulk_pooled import DiffBulkPooled

    dense, pixnet = tiny_dense()
    mean = torch.tensor([0.5, 1.5, 3.0])
    pooled = DiffBulkPooled(dense.config).eval()
    pooled.start_from_pixnet(pixnet)
    pooled.start_head(mean)
    tiles = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(pooled(tiles), mean.expand(2, 3))  # W_p = 0, head 0: the training mean
        control = DiffBulkPooled(replace(dense.config, features="pathology")).eval()
        control.start_from_pixnet(pixnet)  # p's trunk and, here, PixNet's head weights
        expected = torch.nn.functional.conv2d(pixnet.features(tiles).mean((2, 3), keepdim=True), pixnet.head.weight)
        expected = expected[..., 0, 0] + pixnet.head.bias
        torch.testing.assert_close(control(tiles), expected, rtol=1e-5, atol=1e-6)
