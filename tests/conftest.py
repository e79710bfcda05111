"""Shared fixtures: the real datasets in ../shared/data and small, real files made from them."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest

# torchvision, timm and diffusers import triton, which segfaults when imported after Mesa's GL context
# exists (the GUI tests create one); importing it first makes the test order irrelevant.
with contextlib.suppress(ImportError):
    import triton  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: the tests read the shared datasets beside the project")
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
