"""Model backends: the exported graph gives torch's map on a real window; exports are made once per
checkpoint and margin; a failed export falls back to torch with one warning; impossible choices are refused."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_genemap.checkpoints import shipped_checkpoint
from napari_genemap.data.resample import ModelFrameReader
from napari_genemap.errors import GenemapDataWarning, GenemapInputError
from napari_genemap.infer.backends import build_runner, export_path, resolve_backend
from napari_genemap.models.checkpoint import load_checkpoint

CPU = "cpu"
HALO_MARGIN = 96  # the engine's default halo (384 px) in the shipped model's map pixels (stride 4)


@pytest.fixture(scope="module")
def shipped():
    return load_checkpoint(shipped_checkpoint())


@pytest.fixture(scope="module")
def real_window(shipped, sample_slide):
    """A 1024 px window of the sample's H&E at the model's 2 µm/px (the frame is ~700 px: mirrored past it)."""
    reader = ModelFrameReader.from_sdata(sample_slide, shipped.mpp)
    return reader.read(-160, 864, -160, 864)[None]


@pytest.fixture(scope="module")
def torch_map(shipped, real_window):
    run, backend = build_runner(shipped, "torch", CPU, HALO_MARGIN, None, torch.get_num_threads())
    assert backend == "torch"
    return run(real_window)


@pytest.mark.parametrize(
    ("backend", "max_error", "min_pearson"),
    [
        # float32 graphs: measured 6e-4 of the map's maximum (folded batch norms, other summation orders)
        ("onnxruntime", 2e-3, 0.99999),
        ("openvino", 2e-3, 0.99999),
        # bfloat16 keeps 8 bits of mantissa: measured 5% of the maximum at worst, Pearson 0.9995 over pixels
        ("openvino-bf16", 0.1, 0.999),
    ],
)
def test_the_exported_model_gives_torchs_map_on_a_real_window(
    shipped, real_window, torch_map, shared_exports, backend, max_error, min_pearson
):
    root = shared_exports  # one export serves all three backends, and the tests that start a tile service
    run, got = build_runner(shipped, backend, CPU, HALO_MARGIN, root, torch.get_num_threads())
    assert got == backend
    density = run(real_window)
    assert density.shape == torch_map.shape == (1, len(shipped.genes), 64, 64)  # 256 px of centre, stride 4
    assert density.dtype == np.float32
    error = np.abs(density - torch_map).max() / torch_map.max()
    assert error < max_error
    pearson = np.corrcoef(density.ravel(), torch_map.ravel())[0, 1]
    assert pearson > min_pearson
    assert export_path(root, shipped.digest, HALO_MARGIN).is_file()


def test_an_export_is_made_once_per_checkpoint_and_margin(random_checkpoint, tmp_path):
    loaded = load_checkpoint(random_checkpoint)
    build_runner(loaded, "onnxruntime", CPU, 4, tmp_path, 1)
    path = export_path(tmp_path, loaded.digest, 4)
    assert loaded.digest[:24] in path.name
    made = path.stat().st_mtime_ns
    build_runner(loaded, "openvino", CPU, 4, tmp_path, 1)  # another backend, the same graph
    assert path.stat().st_mtime_ns == made
    build_runner(loaded, "onnxruntime", CPU, 8, tmp_path, 1)  # another margin: another graph
    assert len(list(tmp_path.glob("*.onnx"))) == 2
    assert not list(tmp_path.glob(".*tmp"))  # no half-written export left


def test_a_failed_export_falls_back_to_torch_with_one_warning(random_checkpoint, tmp_path):
    loaded = load_checkpoint(random_checkpoint)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("the export folder cannot be made under a file")
    with pytest.warns(GenemapDataWarning, match="openvino backend unavailable .* running the model in torch") as seen:
        run, backend = build_runner(loaded, "openvino", CPU, 0, blocker, 1)
    assert backend == "torch" and len(seen) == 1
    pixels = np.random.default_rng(0).integers(0, 256, (1, 128, 128, 3), dtype=np.uint8)
    with torch.inference_mode():
        expected = loaded.model(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255).numpy()
    np.testing.assert_array_equal(run(pixels), expected)


def test_backend_choices_are_resolved_or_refused_in_one_line():
    assert resolve_backend("auto", "cuda") == "torch"
    assert resolve_backend("auto", "cpu", exportable=False) == "torch"
    assert resolve_backend("auto", "cpu") in ("openvino", "openvino-bf16")
    with pytest.raises(GenemapInputError, match="backend 'openvino' runs on the CPU; on device 'cuda' expected"):
        resolve_backend("openvino", "cuda")
    with pytest.raises(GenemapInputError, match="backend 'tensorrt': expected one of auto, torch"):
        resolve_backend("tensorrt", "cpu")


def test_the_engine_keys_its_cache_by_backend(random_checkpoint, sample_slide, tmp_path):
    from napari_genemap.infer.engine import TileEngine

    loaded = load_checkpoint(random_checkpoint)
    paths = set()
    for backend in ("torch", "openvino"):
        engine = TileEngine(loaded, sample_slide, tmp_path, tile=128, halo=64, backend=backend)
        try:
            assert engine.owner.ready() == backend
            paths.add(engine.cache.path)
        finally:
            engine.close()
    assert len(paths) == 2


def test_genemap_predict_refuses_an_unknown_backend_in_one_line_before_any_work(tmp_path, capsys):
    from napari_genemap.cli import main
    from napari_genemap.sample import sample_root

    image = sample_root() / "images" / "B4_crop.jpg"
    code = main(["predict", str(image), "--out", str(tmp_path / "p.zarr"), "--backend", "tensorrt"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("genemap: error: "), lines
    assert "--backend" in lines[0] and "tensorrt" in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []  # no store, no cache


def test_an_engine_whose_export_exists_never_builds_the_torch_model(
    random_checkpoint, sample_slide, tmp_path, monkeypatch
):
    from napari_genemap.infer.backends import EXPORT_DIR_VARIABLE
    from napari_genemap.infer.engine import TileEngine

    monkeypatch.setenv(EXPORT_DIR_VARIABLE, str(tmp_path / "exports"))  # none made yet

    def predicted(cache_root):
        loaded = load_checkpoint(random_checkpoint, lazy=True)
        assert not loaded.built and loaded.stride == 8  # from the config alone
        engine = TileEngine(loaded, sample_slide, cache_root, tile=128, halo=64, backend="openvino", start_model=True)
        try:
            assert engine.owner.ready(timeout=120) == "openvino"
            built_for_ready = loaded.built
            return engine.predict_tiles([(1, 1), (1, 2)]), built_for_ready, loaded.built
        finally:
            engine.close()

    first, built_to_export, _ = predicted(tmp_path / "first")
    assert built_to_export  # the export needs the torch model once
    again, built_for_ready, built_at_all = predicted(tmp_path / "again")
    assert not built_for_ready and not built_at_all  # ...and never again
    for tile, values in first.items():
        np.testing.assert_array_equal(again[tile], values)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the service's /proc/PID/maps")
def test_a_tile_service_whose_export_exists_starts_without_torch(shared_exports, tmp_path):
    """What a user waits for when a viewer opens: torch's import and the model build (3 s of the 5 s to
    "ready" here) are skipped once the checkpoint's graph is exported; the first tile and circle still come."""
    import geopandas as gpd
    import shapely

    from napari_genemap.infer.backends import export_onnx
    from napari_genemap.infer.predict import EngineSpec
    from napari_genemap.infer.service import TileService
    from napari_genemap.sample import SECTION, sample_root

    export_onnx(load_checkpoint(shipped_checkpoint(), lazy=True), HALO_MARGIN, shared_exports)
    spec = EngineSpec(
        slide=str(sample_root()), section=SECTION, checkpoint=str(shipped_checkpoint()), cache_root=str(tmp_path)
    )
    service = TileService(spec)
    try:
        assert service.wait("ready", timeout=120).payload["backend"].startswith("openvino")
        service.want([(0, 0, 0)])
        while not service.wait("tiles", timeout=120).payload["done"]:
            pass
        circles = gpd.GeoDataFrame({"radius": [60.0]}, geometry=shapely.points([(700, 700)]), index=["a"])
        service.aggregate(circles)  # a drawn circle, or the Pearson at the measured spots
        assert service.wait("aggregated", timeout=120).payload["table"].n_obs == 1
        libraries = Path(f"/proc/{service._process.pid}/maps").read_text()
        assert "libopenvino" in libraries and "libtorch" not in libraries
    finally:
        service.close()


def test_test_time_augmentation_averages_the_eight_views_turned_back(random_checkpoint, sample_slide, tmp_path):
    """Each view's map is turned back before the mean, so the averaged map turns with its window (a wrong
    inverse breaks that), equals the mean of the model's own maps of the eight views, and differs from one
    view (the model itself is not symmetric)."""
    from napari_genemap.infer.backends import DihedralMean
    from napari_genemap.infer.engine import TileEngine
    from napari_genemap.models.predict import to_input

    loaded = load_checkpoint(random_checkpoint)
    reader = ModelFrameReader.from_sdata(sample_slide, loaded.mpp)
    window = reader.read(40, 168, 40, 168)[None]  # 128 px of real H&E at 4 µm/px
    run, _ = build_runner(loaded, "torch", CPU, 2, None)
    tta = DihedralMean(run)
    mean = tta(window)
    assert mean.shape == (1, 3, 12, 12) and mean.dtype == np.float32  # 16 map px less the margin of 2
    with torch.no_grad():
        pixels = to_input(window)
        views = []
        for turns in range(4):
            for mirror in (False, True):
                view = torch.rot90(pixels, turns, (2, 3))
                view = view.flip(3) if mirror else view
                density = loaded.model(view, 2)
                views.append(torch.rot90(density.flip(3) if mirror else density, -turns, (2, 3)))
    np.testing.assert_allclose(mean, torch.stack(views).mean(0).numpy(), rtol=1e-5, atol=1e-6)
    turned = np.ascontiguousarray(np.rot90(window, 1, axes=(1, 2))[:, :, ::-1])
    np.testing.assert_allclose(tta(turned), np.rot90(mean, 1, axes=(2, 3))[..., ::-1], rtol=1e-5, atol=1e-6)
    assert np.abs(mean - run(window)).max() > 1e-3 * np.abs(mean).max()

    engine = TileEngine(loaded, sample_slide, tmp_path, tile=128, halo=64, backend="torch", tta=True)
    plain = TileEngine(loaded, sample_slide, tmp_path, tile=128, halo=64, backend="torch")
    try:
        assert engine.cache.path != plain.cache.path  # other values, another cache
        tile = engine.predict_tiles([(1, 1)])[(1, 1)]
        window_box = engine.grid.window_box(1, 1)
        margin, _ = engine.grid.valid_in_output()
        expected = DihedralMean(build_runner(loaded, "torch", CPU, margin, None)[0])(
            engine.reader.read(*window_box)[None]
        )[0]
        np.testing.assert_allclose(tile, expected[:, : tile.shape[1], : tile.shape[2]], rtol=1e-5, atol=1e-6)
    finally:
        engine.close()
        plain.close()
