"""Training samples, checkpoints and a short real training run on the bundled HER2ST crop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_genemap.data.protocols import hist2st
from napari_genemap.data.windows import crop, load_training_slide, spots_inside
from napari_genemap.errors import GenemapInputError
from napari_genemap.models.checkpoint import load_checkpoint, read_checkpoint_config, save_checkpoint
from napari_genemap.models.encoders import EncoderConfig
from napari_genemap.models.pixnet import PixNet, PixNetConfig
from napari_genemap.train.sampler import WindowSampler

MPP = 4.0  # the 2048 px crop at 0.6875 µm/px becomes 352 px: small enough for CPU tests


@pytest.fixture(scope="module")
def training_slide(sample_slide):
    return load_training_slide(sample_slide, hist2st(), MPP, "B4_crop")


def test_training_slide_is_resampled_with_its_spots(training_slide, sample_slide):
    from napari_genemap.io import slide_mpp, spot_geometry

    centers, radii = spot_geometry(sample_slide)
    mpp = slide_mpp(sample_slide)  # 0.686 µm/px, from the spot grid
    side = round(2048 * mpp / MPP)
    assert training_slide.image.shape == (side, side, 3) and side == 351
    np.testing.assert_allclose(training_slide.centers, centers * mpp / MPP)
    np.testing.assert_allclose(training_slide.radii, 50 / MPP, rtol=0.01)  # 100 µm ST spots
    assert training_slide.targets.shape == (49, 785)
    np.testing.assert_allclose(training_slide.targets, hist2st().normalise(training_slide.raw.astype(float)), 1e-5)


def test_spots_inside_means_wholly_inside():
    centers = np.array([[10.0, 10.0], [5.0, 50.0], [95.0, 95.0]])
    radii = np.array([5.0, 6.0, 5.0])
    assert spots_inside(centers, radii, 0, 0, 100).tolist() == [0, 2]
    assert spots_inside(centers, radii, 6, 6, 100).tolist() == [2]  # spot 0 now crosses the edge
    assert spots_inside(centers, radii, 0, 0, 99).tolist() == [0]  # spot 2 reaches x = 100


def test_crop_reflects_at_the_borders():
    image = np.arange(5 * 4 * 3, dtype=np.uint8).reshape(5, 4, 3)
    out = crop(image, -2, 3, 4)
    assert out.shape == (4, 4, 3)
    np.testing.assert_array_equal(out[:2, 2:], image[3:5, 0:2])
    np.testing.assert_array_equal(out[:, 1], image[np.array([3, 4, 3, 2]), 1])  # rows 3, 4 then reflected
    far = crop(image, 9, 0, 4)  # wholly outside: the mirror folds back and forth
    np.testing.assert_array_equal(far[0, :, 0], image[0, [3, 2, 1, 0], 0])


def test_augmented_windows_keep_each_spot_on_its_pixels(training_slide):
    """Mark every spot centre in the image; after flips and rotations the marks sit at the new centres."""
    marked = training_slide.image.copy()
    marked[...] = 0
    for x, y in np.round(training_slide.centers - 0.5).astype(int):  # the pixel holding the centre
        marked[y, x] = 255
    slide = type(training_slide)(**{**training_slide.__dict__, "image": marked})
    sampler = WindowSampler([slide], size=128, augment=True, seed=3)
    sampler_checks = 0
    for _ in range(20):
        window, centers, radii, _, members = sampler.window()
        assert len(members) >= 1
        assert (centers - radii[:, None] >= 0).all() and (centers + radii[:, None] <= 128).all()
        lit = window.max(0) > 0.5  # stain jitter keeps marks bright and background dark
        for x, y in centers:
            assert lit[int(np.floor(y)), int(np.floor(x))] or lit[int(np.floor(y - 1e-6)), int(np.floor(x - 1e-6))]
            sampler_checks += 1
    assert sampler_checks > 20


def _small_model(n_genes=785):
    return PixNet(PixNetConfig(n_genes=n_genes, encoder=EncoderConfig(weights="random"), stride=8)).eval()


def test_checkpoint_round_trip_float16(tmp_path):
    model = _small_model()
    path = save_checkpoint(
        tmp_path / "ckpt", model, protocol=hist2st(), mpp=2.0, window=256, dtype=torch.float16, metrics={"a": 1}
    )
    loaded = load_checkpoint(path)
    assert loaded.genes == hist2st().genes and loaded.mpp == 2.0 and loaded.stride == 8 and loaded.window == 256
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(image), model(image), rtol=0.02, atol=1e-3)
    assert load_checkpoint(path / "model.safetensors").digest == loaded.digest
    assert len(loaded.digest) == 64


def test_checkpoint_errors_are_one_line(tmp_path):
    with pytest.raises(GenemapInputError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nowhere")
    path = save_checkpoint(tmp_path / "ckpt", _small_model(), protocol=hist2st(), mpp=2.0, window=256)

    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(GenemapInputError, match="format_version 99 is newer"):
        load_checkpoint(path)

    wrong_genes = {**config, "genes": config["genes"][:10]}
    (path / "config.json").write_text(json.dumps(wrong_genes))
    with pytest.raises(GenemapInputError, match="10 genes listed but the architecture predicts 785"):
        load_checkpoint(path)

    other = save_checkpoint(tmp_path / "other", _small_model(3), protocol=_protocol(3), mpp=2.0, window=256)
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(GenemapInputError, match="holds a head for 3 genes; .* lists 785 genes"):
        load_checkpoint(path)

    # a pickle in place of the weights is refused, never unpickled
    torch.save(_small_model().state_dict(), path / "model.safetensors")
    with pytest.raises(GenemapInputError, match="not a readable safetensors file"):
        load_checkpoint(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(GenemapInputError, match="lacks model.safetensors"):
        read_checkpoint_config(path)


def _protocol(n):
    from napari_genemap.data.protocols import Protocol

    return Protocol("test", tuple(f"g{i}" for i in range(n)), target_sum=1e4, log="ln")


@pytest.mark.slow
def test_a_short_training_run_on_real_spots_improves_the_loss(tmp_path, training_slide):
    """Ten steps on the bundled crop: the checkpoint reloads, and predictions follow training."""
    from napari_genemap.models.predict import predict_spots
    from napari_genemap.train.pixnet import TrainConfig, train_pixnet

    config = TrainConfig(
        slides=[{"path": "unused", "name": "B4_crop"}],
        out=str(tmp_path / "ckpt"),
        mpp=MPP,
        window=128,
        batch=4,
        steps=12,
        lr=2e-3,
        weights="random",
        stride=8,
    )
    records = []
    summary = train_pixnet(config, slides={"B4_crop": training_slide}, protocol=hist2st(), on_metrics=records.append)
    assert summary["steps"] == 12 and not summary["cancelled"]
    assert records[-1].get("saved")  # no validation slide: the last step is kept
    losses = [r["loss"] for r in records]
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    loaded = load_checkpoint(summary["checkpoint"])
    assert loaded.provenance["training"][0]["name"] == "B4_crop"
    raw = predict_spots(loaded.model, training_slide.image, training_slide.centers, training_slide.radii, 128)
    assert raw.shape == (49, 785) and np.isfinite(raw).all() and (raw >= 0).all()
    # the density's scale follows the counts (the raw-scale term): total per spot within 3x of measured
    ratio = raw.sum(1).mean() / training_slide.raw.sum(1).mean()
    assert 1 / 3 < ratio < 3


@pytest.mark.slow
def test_training_can_be_cancelled(tmp_path, training_slide):
    from napari_genemap.train.pixnet import TrainConfig, train_pixnet

    config = TrainConfig(
        slides=[{"path": "unused", "name": "B4_crop"}], out=str(tmp_path / "ckpt"), mpp=MPP, window=64,
        batch=2, steps=50, weights="random", stride=8,
    )  # fmt: skip
    calls = []
    summary = train_pixnet(
        config, slides={"B4_crop": training_slide}, protocol=hist2st(), cancel=lambda: calls.append(1) or len(calls) > 3
    )
    assert summary["cancelled"] and summary["steps"] == 3


def test_training_logs_its_start_and_each_validation_under_the_package_logger(tmp_path, training_slide, caplog):
    from napari_genemap.train.pixnet import TrainConfig, train_pixnet

    config = TrainConfig(
        slides=[{"path": "unused", "name": "B4_crop"}], out=str(tmp_path / "ckpt"), mpp=MPP, window=64,
        batch=2, steps=2, eval_every=1, weights="random", stride=8,
    )  # fmt: skip
    with caplog.at_level("INFO", logger="napari_genemap"):
        train_pixnet(config, slides={"B4_crop": training_slide}, protocol=hist2st())
    messages = [r.getMessage() for r in caplog.records if r.name == "napari_genemap.train.pixnet"]
    assert messages[0].startswith("training 2 step(s) from step 0 on cpu: B4_crop; validation none")
    assert [m.split(":")[0] for m in messages[1:]] == ["step 1", "step 2"]
    assert messages[-1].endswith(f"saved {tmp_path / 'ckpt'}")


def test_train_config_errors(tmp_path):
    from napari_genemap.train.config import TrainConfig

    path = tmp_path / "run.toml"
    path.write_text('out = "ckpt"\nslides = [{path = "data"}]\nwindw = 256\n')
    with pytest.raises(GenemapInputError, match="run.toml: unknown field 'windw'"):
        TrainConfig.from_file(path)
    path.write_text('out = "ckpt"\nslides = [{path = "data"}]\nwindow = 100\n')
    with pytest.raises(GenemapInputError, match="window 100: expected a multiple of 32"):
        TrainConfig.from_file(path)
    path.write_text('slides = [{path = "data"}]\n')
    with pytest.raises(GenemapInputError, match="field 'out' is missing"):
        TrainConfig.from_file(path)
    path.write_text('out = "ckpt"\nslides = [{path = "data"}]\n')
    config = TrainConfig.from_file(path)
    assert config.out == str(tmp_path / "ckpt") and config.slides[0]["path"] == str(tmp_path / "data")


def test_genemap_train_cli_streams_json_lines(tmp_path, capsys):
    from napari_genemap.cli import main
    from napari_genemap.sample import SECTION, sample_root

    config = tmp_path / "run.toml"
    config.write_text(
        f'out = "ckpt"\nmpp = {MPP}\nwindow = 64\nbatch = 2\nsteps = 2\nweights = "random"\nstride = 8\n'
        f'slides = [{{path = "{sample_root()}", section = "{SECTION}"}}]\n'
    )
    assert main(["train", "pixnet", "--config", str(config), "--jsonl"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in events] == ["step", "step", "done"]
    assert events[-1]["checkpoint"] == str(tmp_path / "ckpt") and (tmp_path / "ckpt" / "model.safetensors").is_file()
    assert main(["train", "pixnet", "--config", str(tmp_path / "none.toml")]) == 2
    assert "none.toml: no such training config" in capsys.readouterr().err


def test_predict_map_pads_to_a_multiple_of_32_by_reflection():
    from napari_genemap.models.predict import predict_map

    model = _small_model(n_genes=3)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (70, 100, 3), dtype=np.uint8)
    density = predict_map(model, image)
    assert density.shape == (3, 96 // 8, 128 // 8)
    padded = np.pad(image, ((0, 26), (0, 28), (0, 0)), mode="reflect")
    with torch.no_grad():
        expected = model(torch.from_numpy(padded).permute(2, 0, 1)[None].float() / 255)[0].numpy()
    np.testing.assert_allclose(density, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_resume_continues_the_step_count_schedule_and_weights(tmp_path, training_slide):
    """Cancel after 2 of 4 steps, resume for the other 2: steps 3 and 4 run at the rates one uninterrupted
    schedule gives them (warm-up 1 step, cosine to 0 at step 4), starting from the saved weights."""
    import math

    from safetensors.torch import load_file

    from napari_genemap.train.pixnet import TrainConfig, train_pixnet

    def config(**changes):
        settings = dict(out=str(tmp_path / "ckpt"), mpp=MPP, window=64, batch=2, steps=4, lr=1e-3, eval_every=2)
        return TrainConfig(
            slides=[{"path": "unused", "name": "B4_crop"}], weights="random", stride=8, **{**settings, **changes}
        )

    def rate(step):  # the decoder's rate at a 1-based step of a 4-step schedule
        return 1e-3 * 0.5 * (1 + math.cos(math.pi * (step - 1) / 4))

    slides = {"B4_crop": training_slide}
    first = []
    summary = train_pixnet(
        config(), slides=slides, protocol=hist2st(), on_metrics=first.append, cancel=lambda: len(first) >= 2
    )
    assert summary["cancelled"] and [r["step"] for r in first] == [1, 2]
    assert first[-1]["saved"]  # no validation slide: saved every eval_every steps, so the cancel keeps one
    assert read_checkpoint_config(tmp_path / "ckpt")["metrics"]["step"] == 2
    assert [r["lr"] for r in first] == pytest.approx([rate(1), rate(2)])
    saved = load_file(tmp_path / "ckpt" / "model.safetensors")

    # lr 0: nothing moves, so the resumed run's weights are the checkpoint's, not a fresh start
    frozen, still = [], tmp_path / "still"
    summary = train_pixnet(
        config(resume=str(tmp_path / "ckpt"), out=str(still), lr=0.0),
        slides=slides, protocol=hist2st(), on_metrics=frozen.append,
    )  # fmt: skip
    assert [r["step"] for r in frozen] == [3, 4] and summary["checkpoint"] == str(still)
    resumed = load_checkpoint(still).model
    for name, value in resumed.named_parameters():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0, msg=name)

    second = []
    summary = train_pixnet(
        config(resume=str(tmp_path / "ckpt")), slides=slides, protocol=hist2st(), on_metrics=second.append
    )
    assert [r["step"] for r in second] == [3, 4] and summary["steps"] == 2 and not summary["cancelled"]
    assert [r["lr"] for r in second] == pytest.approx([rate(3), rate(4)])
    assert read_checkpoint_config(tmp_path / "ckpt")["metrics"]["step"] == 4
    moved = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert not torch.equal(moved["head.weight"], saved["head.weight"])

    with pytest.raises(GenemapInputError, match="checkpoint is at step 4 of 4; raise 'steps'"):
        train_pixnet(config(resume=str(tmp_path / "ckpt")), slides=slides, protocol=hist2st())
    with pytest.raises(GenemapInputError, match="checkpoint works at 4.0 µm/px; the config asks 2.0"):
        train_pixnet(config(resume=str(tmp_path / "ckpt"), steps=8, mpp=2.0), slides=slides, protocol=hist2st())


@pytest.mark.slow
def test_genemap_train_cli_resumes(tmp_path, capsys):
    from napari_genemap.cli import main
    from napari_genemap.sample import SECTION, sample_root

    config = tmp_path / "run.toml"
    config.write_text(
        f'out = "ckpt"\nmpp = {MPP}\nwindow = 64\nbatch = 2\nsteps = 3\nweights = "random"\nstride = 8\n'
        f'slides = [{{path = "{sample_root()}", section = "{SECTION}"}}]\n'
    )
    assert main(["train", "pixnet", "--config", str(config), "--out", str(tmp_path / "first"), "--jsonl"]) == 0
    capsys.readouterr()
    config.write_text(config.read_text().replace("steps = 3", "steps = 5"))
    assert main(["train", "pixnet", "--config", str(config), "--resume", str(tmp_path / "first"), "--jsonl"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["event"], e.get("step")) for e in events] == [("step", 4), ("step", 5), ("done", None)]
    assert events[0]["total"] == 5 and events[-1]["steps"] == 2
    config_json = read_checkpoint_config(tmp_path / "ckpt")
    assert config_json["metrics"]["step"] == 5 and config_json["provenance"]["config"]["resume"] == str(
        tmp_path / "first"
    )
