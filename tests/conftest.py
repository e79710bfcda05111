"""Shared fixtures: the real datasets in ../shared/data and small, real files made from them.

Markers are given here from what a test uses, so no test can forget its own: ``data`` (it reads the shared
datasets; skipped with one line where they are missing, e.g. a fresh clone elsewhere), ``gui`` (a napari
viewer or Qt). ``slow`` is marked by hand. ``make test`` runs all of them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest

# torchvision, timm and diffusers import triton, which segfaults when imported after Mesa's GL context
# exists (the GUI tests create one); importing it first makes the test order irrelevant.
with contextlib.suppress(ImportError):
    import triton  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
DATA_VARIABLE = "GENEMAP_SHARED_DATA"
SHARED_DATA = Path(os.environ.get(DATA_VARIABLE) or ROOT.parent / "shared" / "data")
DATA_FIXTURES = {"shared_data", "her2st"}
GUI_FIXTURES = {"make_napari_viewer", "qtbot"}


def pytest_collection_modifyitems(config, items):
    missing = pytest.mark.skip(reason=f"needs the shared datasets in {SHARED_DATA} (or set {DATA_VARIABLE})")
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & GUI_FIXTURES:
            item.add_marker(pytest.mark.gui)
        if used & DATA_FIXTURES:
            item.add_marker(pytest.mark.data)
            if not SHARED_DATA.is_dir():
                item.add_marker(missing)


@pytest.fixture(scope="session", autouse=True)
def shared_exports(tmp_path_factory):
    """One folder of exported model graphs for the whole run, as a user's machine keeps one: each test's fresh
    gene-map cache would otherwise export the shipped model again (~14 s each). Service children inherit it."""
    from napari_genemap.infer.backends import EXPORT_DIR_VARIABLE

    folder = tmp_path_factory.mktemp("exports")
    before = os.environ.get(EXPORT_DIR_VARIABLE)
    os.environ[EXPORT_DIR_VARIABLE] = str(folder)
    yield folder
    if before is None:
        os.environ.pop(EXPORT_DIR_VARIABLE, None)
    else:
        os.environ[EXPORT_DIR_VARIABLE] = before


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED_DATA


@pytest.fixture(scope="session")
def her2st(shared_data) -> Path:
    return shared_data / "her2st"


@pytest.fixture
def sample_copy(tmp_path) -> Path:
    """A writable copy of the bundled sample in HER2ST layout (to damage in tests)."""
    from napari_genemap.sample import sample_root

    target = tmp_path / "her2st"
    shutil.copytree(sample_root(), target)
    return target


@pytest.fixture(scope="session")
def sample_slide():
    """The bundled HER2ST crop as a canonical SpatialData (49 spots, 785 genes, 0.6875 µm/px)."""
    from napari_genemap.sample import read_sample

    return read_sample()


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> Path:
    """A small random PixNet at 4 µm/px, stride 8, three genes: fast enough to predict the sample often."""
    import torch

    from napari_genemap.data.protocols import Protocol
    from napari_genemap.models.checkpoint import save_checkpoint
    from napari_genemap.models.encoders import EncoderConfig
    from napari_genemap.models.pixnet import PixNet, PixNetConfig

    torch.manual_seed(0)
    genes = ("ERBB2", "CD74", "COL1A1")
    model = PixNet(PixNetConfig(len(genes), EncoderConfig(weights="random"), stride=8)).eval()
    model.set_output_scale(torch.tensor([0.3, 1.0, 3.0]))
    protocol = Protocol("small", genes, target_sum=1e4, log="ln")
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "small", model, protocol=protocol, mpp=4.0, window=128)


@pytest.fixture(scope="session")
def small_prediction(tmp_path_factory, random_checkpoint):
    """(checkpoint, store): `random_checkpoint` and the prediction store that ``genemap predict`` writes for
    the bundled sample with it, made in one process (no cluster, ~15 s)."""
    from napari_genemap.infer.predict import EngineSpec, write_prediction
    from napari_genemap.sample import sample_root

    root = tmp_path_factory.mktemp("small_prediction")
    checkpoint = random_checkpoint
    image = sample_root() / "images" / "B4_crop.jpg"
    spec = EngineSpec(str(image), str(checkpoint), str(root / "cache"), tile=128, halo=64, device="cpu")
    engine = spec.build()
    try:
        for level in range(engine.n_levels):
            rows, columns = engine.cache.tile_counts(level)
            engine.ensure(level, [(r, c) for r in range(rows) for c in range(columns)])
        store = write_prediction(engine, spec, root / "pred.zarr", list(range(len(engine.genes))))
    finally:
        engine.close()
    return checkpoint, store


@pytest.fixture(scope="session")
def tiny_pixel_edm():
    """DiffBulk's U-Net at test size: pixel space, 16 px tiles, widths 16 and 32, attention at 8 x 8."""
    from napari_genemap.models.edm import preset

    return preset(
        "cpu-small",
        in_channels=3,
        sample_size=16,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
        space="pixel",
    )


@pytest.fixture(scope="session")
def tiny_dense(tiny_pixel_edm):
    """make(features="both", seed=0, feature_tile=64) -> (a DiffBulk dense model, the random PixNet it
    starts from): three genes, stride 8, its feature tiles resampled to the tiny U-Net's 16 px."""
    import torch

    from napari_genemap.models.diffbulk import PIXEL_SPACE
    from napari_genemap.models.diffbulk_dense import DiffBulkDense, DiffBulkDenseConfig
    from napari_genemap.models.encoders import EncoderConfig
    from napari_genemap.models.pixnet import PixNet, PixNetConfig

    def make(features: str = "both", seed: int = 0, feature_tile: int = 64):
        torch.manual_seed(seed)
        pixnet = PixNet(PixNetConfig(3, EncoderConfig(weights="random"), stride=8)).eval()
        pixnet.set_output_scale(torch.tensor([0.5, 1.0, 2.0]))
        config = DiffBulkDenseConfig(
            3, pixnet.config, tiny_pixel_edm, PIXEL_SPACE, feature_tile=feature_tile, features=features
        )
        model = DiffBulkDense(config).eval()
        model.start_from_pixnet(pixnet)
        return model, pixnet

    return make
