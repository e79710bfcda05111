"""DiffBulk stage 1 training on real tiles: 16 spots of HER2ST C2 to train, 8 of the bundled B4 crop to
validate, a tiny U-Net on TAEF2 latents. Checks the checkpoint, the previews, the per-band validation loss,
an exact resume, a cancel, the latent cache, one-line config errors and the CLI entry point."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_genemap.errors import GenemapInputError
from napari_genemap.models.diffbulk import CHECKPOINT_DIR, load_stage1, read_stage1_config, read_training_state
from napari_genemap.train.diffbulk import (
    BANDS,
    PRESET_NAMES,
    DiffBulkStage1Config,
    _subsets,
    train_diffbulk_stage1,
)

TINY_EDM = {
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
}
STEPS = 8


@pytest.fixture(scope="module")
def taef2(shared_data) -> Path:
    folder = shared_data.parent / "weights" / "taef2"
    if not (folder / "taef2_encoder.pth").is_file():
        pytest.skip(f"needs the TAEF2 weights in {folder}")
    return folder


def _settings(her2st: Path, taef2: Path, out: Path, **changes) -> dict:
    from napari_genemap.sample import sample_root

    return {
        "slides": [
            {"path": str(her2st), "section": "C2"},  # C2: no spots without counts (no warning)
            {"path": str(sample_root()), "section": "B4_crop", "name": "B4_crop"},
        ],
        "validation": ["B4_crop"],
        "out": str(out),
        "taef2": str(taef2),
        "max_tiles": 16,
        "validation_tiles": 8,
        "edm": TINY_EDM,
        "gene_encoder": {"dim": 32, "heads": 4, "layers": 1},
        "max_condition_genes": 64,
        "steps": STEPS,
        "batch_size": 4,
        "warmup": 2,
        "eval_every": 4,
        "preview_every": 4,
        "preview_n": 2,
        "preview_steps": 3,
        "device": "cpu",
        "threads": 1,
        **changes,
    }


def _config(folder: Path, settings: dict) -> DiffBulkStage1Config:
    """Through a file, as the CLI and the panel's subprocess read it."""
    path = folder / f"stage1-{len(list(folder.glob('stage1-*')))}.json"
    path.write_text(json.dumps(settings))
    return DiffBulkStage1Config.from_file(path)


def _run(config: DiffBulkStage1Config, **callbacks) -> tuple[dict, list[dict]]:
    records: list[dict] = []
    summary = train_diffbulk_stage1(config, on_metrics=records.append, **callbacks)
    return summary, records


def _mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "latents").glob("*.npy")}


@pytest.fixture(scope="module")
def runs(her2st, taef2, tmp_path_factory) -> dict:
    """Run "halves" stops at step 4 and is resumed to 8; run "full" goes to 8 at once (on a copy of the
    halves' latent cache, so the tiles are encoded once in this module)."""
    root = tmp_path_factory.mktemp("stage1")
    halves = root / "halves"
    first, first_records = _run(_config(root, _settings(her2st, taef2, halves, steps=4)))
    encoded_at = _mtimes(halves)
    shutil.copytree(halves / CHECKPOINT_DIR, root / "at-step-4")
    full = root / "full"
    shutil.copytree(halves / "latents", full / "latents")
    progress: list[tuple[int, int, str]] = []
    summary, records = _run(_config(root, _settings(her2st, taef2, full)), progress=lambda *a: progress.append(a))
    resumed, resumed_records = _run(_config(root, _settings(her2st, taef2, halves, resume=str(halves))))
    return {
        "root": root,
        "first": (first, first_records, encoded_at),
        "full": (summary, records, progress),
        "resumed": (resumed, resumed_records, _mtimes(halves)),
    }


def test_a_short_run_writes_a_loadable_checkpoint_previews_and_band_losses(runs, her2st):
    from PIL import Image

    from napari_genemap.data.protocols import hist2st

    summary, records, progress = runs["full"]
    out = runs["root"] / "full"
    assert summary["checkpoint"] == str(out / CHECKPOINT_DIR) and not summary["cancelled"]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    loaded = load_stage1(out)  # the run folder or its checkpoint/ both load
    assert loaded.step == STEPS and not loaded.model.training
    config = loaded.config
    assert config["format"] == "napari-genemap/diffbulk-stage1" and set(config["versions"]) >= {"torch", "diffusers"}
    assert config["gene_encoder"]["genes"] == list(hist2st().genes)  # the vocabulary, in row order
    assert config["latent"] == {"space": "taef2", "shift": 0.5, "scale": pytest.approx(3.78), "downscale": 8}
    assert config["edm"]["block_out_channels"] == [32, 64] and config["edm"]["condition_dim"] == 32
    assert config["tile"] == {"tile_um": 112.0, "tile_px": 224, "mpp": 0.5}
    assert [s["section"] for s in config["provenance"]["training"]] == ["C2"]
    assert config["provenance"]["tiles"] == {"C2": 16, "B4_crop": 16}
    # validation per noise band at every eval step, conditioned and not, finite
    evaluated = [r for r in records if "validation_loss" in r]
    assert [r["step"] for r in evaluated] == [4, 8] and all(r["saved"] for r in evaluated)
    for record in evaluated:
        for key in ("validation_loss", "validation_loss_unconditioned"):
            assert list(record[key]) == [name for name, _, _ in BANDS]
            assert all(np.isfinite(v) and v > 0 for v in record[key].values())
    assert config["metrics"]["validation_loss"] == evaluated[-1]["validation_loss"]
    # the preview grid: the spot's tile and 2 drawn for its profile over 2 unconditioned, 224 px each
    previews = [r["preview"] for r in records if "preview" in r]
    assert previews == [str(out / "previews" / f"step-{s:07d}.png") for s in (4, 8)]
    with Image.open(previews[-1]) as image:
        assert image.format == "PNG" and image.size == (3 * 224 + 2 * 4, 2 * 224 + 4)
        pixels = np.asarray(image)
    assert pixels[:224, :224].std() > 10  # the real tile, decoded through TAEF2: tissue
    assert not list((out / "previews").glob(".*"))  # no temporary left behind
    # progress: every step, with an ETA; the loaded model draws tiles of the stored shape
    assert [p[0] for p in progress if p[0] > 0] == list(range(1, STEPS + 1))
    assert all("ETA" in p[2] for p in progress if p[0] > 0)
    noise = torch.randn(1, 32, 28, 28, generator=torch.Generator().manual_seed(0))
    drawn = loaded.model.generate(
        noise, loaded.model.condition([(config["gene_encoder"]["genes"][:2], [2.0, 1.0])]), steps=2
    )
    assert drawn.shape == (1, 32, 28, 28) and torch.isfinite(drawn).all()


def test_resume_continues_the_steps_and_matches_an_uninterrupted_run(runs):
    """Weights, AdamW moments, step and every generator are restored, so the resumed run draws the same
    batches, genes, sigmas and noise as the unbroken one. Not bitwise: MKL / oneDNN on this CPU round
    differently from one process history to the next (two *fresh* runs in one process differ by ~1e-7 in
    the loss at step 2 under MKL_CBWR=STRICT), so weights agree to 2e-5, while 4 steps move them by > 2e-4
    and a resume that lost the AdamW moments would be off by about one step (1e-4)."""
    first, first_records, _ = runs["first"]
    resumed, records, _ = runs["resumed"]
    assert first["steps"] == 4 and [r["step"] for r in first_records][-1] == 4
    assert [r["step"] for r in records] == list(range(5, STEPS + 1))
    halves = load_stage1(runs["root"] / "halves")
    full = load_stage1(runs["root"] / "full")
    assert halves.step == full.step == STEPS
    full_state, halves_state = full.model.state_dict(), halves.model.state_dict()
    for key, value in full_state.items():
        torch.testing.assert_close(halves_state[key], value, atol=2e-5, rtol=0, msg=key)
    before = load_stage1(runs["root"] / "at-step-4").model.state_dict()
    moved = max(float((full_state[k] - before[k]).abs().max()) for k in full_state)
    assert moved > 2e-4
    full_losses = [r["loss"] for r in runs["full"][1]]
    np.testing.assert_allclose([r["loss"] for r in first_records + records], full_losses, rtol=1e-5)
    tensors, values = read_training_state(runs["root"] / "halves")
    assert values["step"] == STEPS and any(k.endswith("exp_avg_sq") for k in tensors)


def test_latents_are_encoded_once(runs):
    first, _, encoded_at = runs["first"]
    resumed, _, after = runs["resumed"]
    assert first["latents"] == {"encoded_tiles": 32, "cached_slides": 0}
    assert resumed["latents"] == {"encoded_tiles": 0, "cached_slides": 2}
    assert runs["full"][0]["latents"] == {"encoded_tiles": 0, "cached_slides": 2}  # the copied cache
    assert after == encoded_at and len(after) == 2  # the same files, not written again
    cached = np.load(next((runs["root"] / "halves" / "latents").glob("C2-*.npy")))
    assert cached.shape == (16, 1, 32, 28, 28) and cached.dtype == np.float16
    assert abs(float(cached.mean()) - 0.5) < 0.05  # TAEF2's stored latents


def test_cancel_keeps_the_last_checkpoint(runs, her2st, taef2):
    out = runs["root"] / "cancelled"
    shutil.copytree(runs["root"] / "halves" / "latents", out / "latents")
    records: list[dict] = []
    config = _config(runs["root"], _settings(her2st, taef2, out, preview_every=0))
    summary = train_diffbulk_stage1(config, on_metrics=records.append, cancel=lambda: len(records) >= 6)
    assert summary["cancelled"] and summary["steps"] == 6
    assert summary["checkpoint"] == str(out / CHECKPOINT_DIR)
    assert read_stage1_config(out)["metrics"]["step"] == 4  # saved at 4; steps 5 and 6 are not
    assert read_training_state(out)[1]["step"] == 4
    assert not (out / "previews").exists()
    with pytest.raises(GenemapInputError, match="holds a checkpoint already; resume it"):
        train_diffbulk_stage1(config)


def test_cancel_while_encoding_leaves_no_partial_cache(her2st, taef2, tmp_path):
    from napari_genemap.sample import sample_root

    settings = _settings(her2st, taef2, tmp_path / "run", validation=[])
    settings["slides"] = [{"path": str(sample_root()), "section": "B4_crop"}]  # a small image: a quick read
    asked: list[bool] = []
    summary = train_diffbulk_stage1(_config(tmp_path, settings), cancel=lambda: asked.append(True) or True)
    assert summary["cancelled"] and summary["steps"] == 0 and summary["checkpoint"] is None
    assert asked and not list((tmp_path / "run").rglob("*.npy"))  # asked after the first batch; nothing cached


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"steps": "ten"}, "steps"),
        ({"p_drop": 1.5}, "p_drop"),
        ({"panel_fraction_min": 0.9, "panel_fraction_max": 0.5}, "panel_fraction_min"),
        ({"preset": "huge"}, "preset"),
        ({"edm": {"block_out_channels": [32, 64]}}, "edm"),  # three block types in the preset
        ({"edm": {"widths": [1]}}, "edm"),
        ({"gene_encoder": {"dim": 30, "heads": 4}}, "gene_encoder"),
        ({"validation": ["nope"]}, "validation"),
        ({"device": "tpu"}, "device"),
        ({"learning_rate": 1e-3}, "learning_rate"),
    ],
)
def test_a_bad_config_field_is_one_line_naming_the_file_and_field(tmp_path, her2st, change, field):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_settings(her2st, tmp_path, tmp_path / "out", **change)))
    with pytest.raises(GenemapInputError) as error:
        DiffBulkStage1Config.from_file(path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}:") and repr(field) in message


def test_toml_config_resolves_paths_beside_it(tmp_path, her2st):
    path = tmp_path / "runs" / "stage1.toml"
    path.parent.mkdir()
    path.write_text(
        f'slides = [{{path = "{her2st}", section = "C2"}}]\nout = "run"\ntaef2 = "../weights"\n'
        "[edm]\nblock_out_channels = [32, 64]\n"
        'down_block_types = ["DownBlock2D", "DownBlock2D"]\nup_block_types = ["UpBlock2D", "UpBlock2D"]\n'
    )
    config = DiffBulkStage1Config.from_file(path)
    assert config.out == str(tmp_path / "runs" / "run") and config.taef2 == str(tmp_path / "weights")
    edm, genes, space = config.model_configs()
    assert edm.block_out_channels == (32, 64) and edm.condition_dim == genes.dim and space.space == "taef2"
    pixel = DiffBulkStage1Config(slides=config.slides, out="x").model_configs()[0]  # no TAEF2: pixels, 64 px
    assert (pixel.space, pixel.in_channels, pixel.sample_size) == ("pixel", 3, 64)


def test_gene_subsets_stay_in_the_fraction_range_and_the_panel():
    rng = np.random.default_rng(0)
    values = np.arange(40 * 20, dtype=np.float32).reshape(40, 20)
    rows = np.arange(100, 120)
    config = DiffBulkStage1Config(slides=[{"path": "x"}], out="x", panel_fraction_min=0.5)
    panel_values, panel_rows, padding = _subsets(values, rows, config, rng)
    sizes = (~padding).sum(1)
    assert sizes.min() >= 10 and sizes.max() <= 20 and len(set(sizes)) > 3  # random sizes in [50 %, 100 %]
    for i in range(40):
        chosen = panel_rows[i, ~padding[i]]
        assert len(set(chosen)) == len(chosen) and set(chosen) <= set(rows)  # distinct genes of the panel
        np.testing.assert_array_equal(panel_values[i, ~padding[i]], values[i, chosen - 100])  # their own values
    capped = _subsets(values, rows, DiffBulkStage1Config(slides=[{"path": "x"}], out="x", max_condition_genes=4), rng)
    assert (~capped[2]).sum(1).max() == 4


def test_the_stage_is_registered_with_its_presets():
    from napari_genemap.models.edm import PRESETS
    from napari_genemap.train.stages import STAGES, defaults_of, stage_named

    stage = stage_named("diffbulk-stage1")
    assert stage in STAGES and stage.model_class == "DiffBulkStage1"
    assert tuple(PRESETS) == PRESET_NAMES
    defaults = defaults_of(DiffBulkStage1Config)
    assert all(setting.default == defaults[setting.name] for setting in stage.settings)


def test_genemap_train_diffbulk_stage1_runs_from_the_cli(runs, her2st, taef2, capsys):
    from napari_genemap.cli import main
    from napari_genemap.sample import sample_root
    from napari_genemap.train.stages import stage_named, write_config

    out = runs["root"] / "cli"
    shutil.copytree(runs["root"] / "halves" / "latents", out / "latents")
    stage = stage_named("diffbulk-stage1")
    slides = [{"path": str(her2st), "section": "C2"}, {"path": str(sample_root()), "section": "B4_crop"}]
    settings = {"steps": 2, "eval_every": 2, "preview_every": 0, "taef2": str(taef2), "device": "cpu"}
    config = stage.config(slides, ["B4_crop"], settings, str(out))  # what the Training panel writes
    tiny = {k: v for k, v in _settings(her2st, taef2, out).items() if k not in config or k == "batch_size"}
    path = write_config({**config, **tiny, "batch_size": 4}, runs["root"], "cli")
    assert main(["train", "diffbulk-stage1", "--config", str(path), "--jsonl"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2] and set(steps[-1]["validation_loss"]) == {n for n, _, _ in BANDS}
    assert events[-1]["event"] == "done" and events[-1]["checkpoint"] == str(out / CHECKPOINT_DIR)
    assert load_stage1(out).step == 2


def test_other_checkpoints_are_refused_in_one_line(tmp_path):
    from napari_genemap.checkpoints import shipped_checkpoint

    with pytest.raises(
        GenemapInputError, match=r"field 'format' is 'napari-genemap/pixnet'; expected 'napari-genemap/diffbulk-stage1'"
    ):
        load_stage1(shipped_checkpoint())
    with pytest.raises(GenemapInputError, match="no such stage-1 checkpoint"):
        load_stage1(tmp_path / "nothing")
    with pytest.raises(GenemapInputError, match="holds no training state"):
        read_training_state(shipped_checkpoint())


def test_without_taef2_it_trains_in_pixel_space_at_64_px(her2st, tmp_path):
    from PIL import Image

    from napari_genemap.sample import sample_root

    settings = _settings(her2st, Path(""), tmp_path / "run", validation=[], steps=2, eval_every=2, preview_every=2)
    settings["slides"] = [{"path": str(sample_root()), "section": "B4_crop"}]
    settings["taef2"] = ""  # nothing downloads: the TAEF2 preset falls back to pixels
    summary, records = _run(_config(tmp_path, settings))
    loaded = load_stage1(summary["checkpoint"])
    assert loaded.config["latent"]["space"] == "pixel" and loaded.config["tile"]["tile_px"] == 64
    assert loaded.config["edm"]["in_channels"] == 3 and loaded.model.tile_px == 64
    assert records[-1]["validation_on"] == "training tiles"  # no slide held out
    with Image.open(records[-1]["preview"]) as image:
        assert image.size == (3 * 64 + 2 * 4, 2 * 64 + 4)
    cached = np.load(next((tmp_path / "run" / "latents").glob("*.npy")))
    assert cached.shape == (16, 1, 3, 64, 64) and cached.min() >= 0 and cached.max() <= 1  # RGB in [0, 1]
