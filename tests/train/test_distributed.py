"""DiffBulk stage 1 under ``torchrun --nproc_per_node 2`` (two CPU processes, gloo) computes the same run as
one process with the same global batch: the same losses step by step and the same weights, to float rounding.
A tiny pixel-space U-Net on 16 tiles of the bundled crop, 3 steps of 4 tiles (2 per process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from napari_genemap.models.diffbulk import CHECKPOINT_DIR, WEIGHTS_FILE
from napari_genemap.train.stages import write_config

STEPS = 3


def _config(out: Path) -> dict:
    from napari_genemap.sample import sample_root

    return {
        "slides": [{"path": str(sample_root()), "section": "B4_crop", "name": "B4_crop"}],
        "out": str(out),
        "max_tiles": 16,
        "validation_tiles": 4,
        "pixel_fallback": 16,  # no TAEF2: pixel space, 16 px tiles
        "edm": {
            "block_out_channels": [16, 32],
            "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
            "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "attention_head_dim": 8,
        },
        "gene_encoder": {"dim": 32, "heads": 4, "layers": 1},
        "max_condition_genes": 32,
        "steps": STEPS,
        "batch_size": 4,
        "lr": 1e-3,
        "warmup": 0,
        "eval_every": STEPS,
        "preview_every": 0,
        "device": "cpu",
        "threads": 1,
    }


def _events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, capsys):
    from napari_genemap.cli import main

    single = write_config(_config(tmp_path / "single"), tmp_path, "single")
    assert main(["train", "diffbulk-stage1", "--config", str(single), "--jsonl"]) == 0
    one = [e for e in _events(capsys.readouterr().out) if e["event"] == "step"]

    shared = write_config(_config(tmp_path / "ddp"), tmp_path, "ddp")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "napari_genemap.cli", "train", "diffbulk-stage1", "--config", str(shared), "--jsonl"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert done.returncode == 0, done.stderr[:3000] + "\n...\n" + done.stderr[-1500:]
    events = _events(done.stdout)
    two = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in two] == list(range(1, STEPS + 1))  # rank 0 alone reports
    assert [e["event"] for e in events].count("done") == 1 and events[-1]["checkpoint"]

    for a, b in zip(one, two, strict=True):
        assert b["objective"] == pytest.approx(a["objective"], rel=1e-4, abs=1e-5)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    bands_one, bands_two = one[-1]["validation_loss"], two[-1]["validation_loss"]
    assert bands_two == pytest.approx(bands_one, rel=1e-4)
    weights_one = load_file(os.fspath(tmp_path / "single" / CHECKPOINT_DIR / WEIGHTS_FILE))
    weights_two = load_file(os.fspath(tmp_path / "ddp" / CHECKPOINT_DIR / WEIGHTS_FILE))
    assert weights_one.keys() == weights_two.keys()
    initial = _initial(tmp_path)
    difference = sum(float((weights_one[k] - weights_two[k]).abs().sum()) for k in initial)
    change = sum(float((weights_one[k] - w).abs().sum()) for k, w in initial.items())
    # Tolerance: the summed weight difference is at most 1e-4 of what training changed (measured: 8e-6).
    # Single weights may differ by up to a few hundredths of Adam's step (lr): Adam turns rounding-level
    # gradients (attention key biases, whose true gradient is zero) into whole steps.
    assert difference <= 1e-4 * change, f"weights differ by {difference / change:.2e} of their change"
    worst = max(float((weights_one[k] - weights_two[k]).abs().max()) for k in weights_one)
    assert worst <= 0.05 * 1e-3 * STEPS, f"largest weight difference {worst:g}"


def _initial(tmp_path: Path) -> dict[str, torch.Tensor]:
    """The weights a run starts from (the same seed): what the trained weights are compared against."""
    from napari_genemap.models.diffbulk import DiffBulkStage1
    from napari_genemap.train.diffbulk import DiffBulkStage1Config

    config = DiffBulkStage1Config.from_dict(_config(tmp_path / "unused"))
    edm, genes, space = config.model_configs()
    torch.manual_seed(config.seed)
    model = DiffBulkStage1(edm, genes, space)
    trained = load_file(os.fspath(tmp_path / "single" / CHECKPOINT_DIR / WEIGHTS_FILE))
    return {k: v for k, v in model.state_dict().items() if k in trained and v.shape == trained[k].shape}


def test_a_batch_that_does_not_split_over_the_processes_is_refused_in_one_line(tmp_path):
    config = write_config({**_config(tmp_path / "odd"), "batch_size": 3}, tmp_path, "odd")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "napari_genemap.cli", "train", "diffbulk-stage1", "--config", str(config), "--jsonl"]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode != 0
    assert "genemap: error: batch 3 does not split over 2 processes; use a multiple of 2" in done.stderr
