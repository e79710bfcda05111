"""Super-resolve a slide's measured spots with a Diff-ST checkpoint and write the result as SpatialData.

The slide's spots are paired as in training (`data.superres.section_pair`): the LR map is the sums of its
``factor x factor`` blocks of spots, the HR grid its spots; the model draws the HR map from the LR map and
the histology, so every HR cell with a spot can be checked against what was measured there. The store
holds the slide as read (H&E, spots, counts) plus:

- ``shapes["superres_cells"]``: every HR grid cell on the slide's image in a block that holds a spot, as a
  circle of the spot's radius at its centre (slide pixels);
- ``tables["superres"]`` annotating them: ``X`` the mean of the ``samples`` draws (protocol values, the
  protocol in ``uns``), ``layers["spread"]`` their standard deviation, ``layers["lr"]`` the block's LR
  value on each of its cells; ``obs``: grid ``row``/``col``, ``measured`` (a spot is there) and, where one
  is, ``spot_index`` (its row in ``tables["counts"]``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import GenemapInputError

SUPERRES_TABLE = "superres"
SUPERRES_CELLS = "superres_cells"


def superres_slide(
    sdata,
    checkpoint: str | os.PathLike,
    *,
    samples: int = 8,
    steps: int = 20,
    seed: int = 0,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
):
    """``sdata`` (canonical, with measured spots) with the super-resolved cells and table added."""
    from ..data.spot_grid import spot_grid
    from ..data.superres import section_pair
    from ..device import resolve_device
    from ..io.canonical import COORDINATE_SYSTEM, TABLE_KEY, counts_table, image_levels, spot_geometry
    from ..models.checkpoint import load_checkpoint
    from ..models.diffst_checkpoint import load_diffst
    from ..models.diffst_section import section_histology, super_resolve_section

    if TABLE_KEY not in sdata.tables:
        raise GenemapInputError("this slide has no measured spots (no 'counts' table); Diff-ST needs them")
    torch_device = resolve_device(device)
    loaded = load_diffst(checkpoint, torch_device)
    config = loaded.model.config
    pair = section_pair(sdata, loaded.protocol, config.factor)
    if config.uses_histology:
        if loaded.pathology is None:
            raise GenemapInputError(f"{loaded.path}: uses histology but holds no pathology/ checkpoint")
        pathology = load_checkpoint(loaded.pathology, torch_device)
        tissue = float(loaded.histology.get("tissue", 4.0))
        features, _ = section_histology(sdata, pair, pathology, tissue, torch_device)
        pair = replace(pair, histology=features)
    drawn = super_resolve_section(
        loaded.model,
        loaded.standardisation,
        pair,
        samples=samples,
        steps=steps,
        seed=seed,
        device=torch_device,
        progress=progress,
    )
    covered = np.kron(pair.lr_spots > 0, np.ones((config.factor, config.factor), dtype=bool))
    levels, scales = image_levels(sdata)
    height, width = levels[0].shape[1] * scales[0], levels[0].shape[2] * scales[0]
    x, y = pair.centres[..., 0], pair.centres[..., 1]
    on_slide = (x >= 0) & (y >= 0) & (x < width) & (y < height)  # a crop's grid may reach past its image
    rows, cols = np.nonzero(covered & on_slide)
    _, radii = spot_geometry(sdata)
    centres = pair.centres[rows, cols]
    spot_index = np.full(pair.shape, -1, dtype=np.int64)
    grid = spot_grid(counts_table(sdata), str(pair.name))
    spot_index[grid.row, grid.col] = np.arange(len(grid.row))
    lr_on_cells = np.kron(pair.lr, np.ones((1, config.factor, config.factor), dtype=np.float32))

    import anndata as ad
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    cells = ShapesModel.parse(
        centres,
        geometry=0,
        radius=np.full(len(centres), float(np.median(radii))),
        index=pd.RangeIndex(len(centres)),
        transformations={COORDINATE_SYSTEM: Identity()},
    )
    obs = pd.DataFrame(
        {
            "row": rows,
            "col": cols,
            "measured": pair.hr_mask[rows, cols],
            "spot_index": spot_index[rows, cols],
            "region": pd.Categorical([SUPERRES_CELLS] * len(rows)),
            "cell_id": np.arange(len(rows)),
        },
        index=[f"r{r}c{c}" for r, c in zip(rows, cols, strict=True)],
    )
    table = ad.AnnData(
        X=drawn.mean[:, rows, cols].T.astype(np.float32),
        obs=obs,
        var=pd.DataFrame(index=list(loaded.protocol.genes)),
        layers={
            "spread": drawn.spread[:, rows, cols].T.astype(np.float32),
            "lr": lr_on_cells[:, rows, cols].T.astype(np.float32),
        },
        obsm={"spatial": centres.astype(np.float64)},
        uns={
            "genemap_superres": {
                "model": str(loaded.path),
                "model_sha256": loaded.digest,
                "protocol": loaded.protocol.to_json(),
                "factor": config.factor,
                "samples": samples,
                "steps": steps,
                "seed": seed,
            }
        },
    )
    sdata.shapes[SUPERRES_CELLS] = cells
    sdata.tables[SUPERRES_TABLE] = TableModel.parse(
        table, region=SUPERRES_CELLS, region_key="region", instance_key="cell_id"
    )
    return sdata


def write_superres(
    slide: str | os.PathLike,
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    section: str | None = None,
    overwrite: bool = False,
    **options,
) -> Path:
    """Read ``slide``, super-resolve it, write ``out`` (.zarr) atomically; returns the store's path."""
    from ..io import read_slide
    from ..io.store import write_store

    out = Path(out)
    if out.suffix != ".zarr":
        raise GenemapInputError(f"--out {out}: a SpatialData store's name must end in .zarr")
    if out.exists() and not overwrite:
        raise GenemapInputError(f"{out}: already exists (pass --overwrite)")
    sdata = superres_slide(read_slide(slide, section=section), checkpoint, **options)
    return write_store(sdata, out, overwrite=overwrite)
