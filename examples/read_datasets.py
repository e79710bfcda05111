"""Read every kind of shared dataset into the canonical SpatialData and summarise it.

Run from the project root: ``.venv/bin/python examples/read_datasets.py`` (reads ../shared/data).
"""

import warnings
from pathlib import Path

from napari_genemap.io import read_h5ad_slide, read_slide
from napari_genemap.io.summary import describe

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

warnings.simplefilter("default")  # show what the readers dropped, once each
slides = {
    "HER2ST section B4": read_slide(DATA / "her2st", section="B4"),
    "HER2ST C3, found from its image": read_slide(DATA / "her2st" / "images" / "C3.jpg"),
    "Visium Space Ranger folder": read_slide(DATA / "visium_mouse_brain"),
    "legacy ST mouse olfactory bulb": read_slide(DATA / "st_mouse_olfactory_bulb" / "MOB1.jpg"),
    "AnnData + image (values already normalised)": read_h5ad_slide(
        DATA / "visium_mouse_brain" / "test_data.h5ad",
        DATA / "visium_mouse_brain" / "test_img.jpg",
        spot_diameter=89.44,
        mpp=55 / 89.44,
        require_raw=False,
    ),
    "image only": read_slide(DATA / "visium_mouse_brain" / "test_img.jpg", mpp=55 / 89.44),
}
for title, sdata in slides.items():
    print(f"== {title}\n{describe(sdata)}\n")
