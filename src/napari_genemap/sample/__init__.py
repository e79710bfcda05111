"""The bundled demo sample (a crop of HER2ST section B4; CC BY 4.0, see README.md here)."""

from importlib.resources import files
from pathlib import Path

SECTION = "B4_crop"
SOURCE_SECTION = "B4"  # the HER2ST section the crop was cut from (models trained on B4 have seen it)


def sample_root() -> Path:
    """The sample's HER2ST-layout folder inside the installed package."""
    return Path(str(files("napari_genemap.sample").joinpath("her2st")))


def read_sample():
    """The demo sample as canonical SpatialData (H&E pyramid, 49 spots, 785 genes)."""
    from ..io import read_her2st

    sdata = read_her2st(sample_root(), SECTION)
    sdata.attrs["genemap"]["derived_from"] = SOURCE_SECTION
    return sdata
