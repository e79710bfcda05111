"""``make demo``: the main job on the bundled sample.

For now (before the model lands) that is the data part: read the sample, summarise it, write it as a
SpatialData store and check that ``spatialdata.read_zarr`` gives back the same slide.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def same_slide(first, second) -> list[str]:
    """What differs between two canonical slides (empty when they are the same)."""
    from .io import counts_table, image_levels, slide_info, spot_geometry

    differences = []
    levels_a, scales_a = image_levels(first)
    levels_b, scales_b = image_levels(second)
    if len(levels_a) != len(levels_b) or not np.allclose(scales_a, scales_b):
        differences.append("image pyramid levels")
    elif not np.array_equal(np.asarray(levels_a[0]), np.asarray(levels_b[0])):
        differences.append("image pixels")
    centers_a, radius_a = spot_geometry(first)
    centers_b, radius_b = spot_geometry(second)
    if not (np.array_equal(centers_a, centers_b) and np.array_equal(radius_a, radius_b)):
        differences.append("spot geometry")
    table_a, table_b = counts_table(first), counts_table(second)
    if not (
        list(table_a.obs_names) == list(table_b.obs_names)
        and list(table_a.var_names) == list(table_b.var_names)
        and (table_a.X != table_b.X).nnz == 0
    ):
        differences.append("counts")
    if slide_info(first) != slide_info(second):
        differences.append("pixel size / provenance")
    return differences


def run_demo(out: Path) -> None:
    import spatialdata as sd

    from .io import write_store
    from .io.summary import describe
    from .sample import read_sample

    sdata = read_sample()
    print(describe(sdata))
    store = write_store(sdata, out / "sample.zarr", overwrite=True)
    differences = same_slide(sdata, sd.read_zarr(store))
    if differences:
        raise RuntimeError(f"{store}: read back differently ({', '.join(differences)})")
    print(f"wrote {store}; spatialdata.read_zarr reads it back unchanged")
