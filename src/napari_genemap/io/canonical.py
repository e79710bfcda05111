"""The one canonical in-memory form of a slide: a `spatialdata.SpatialData`.

- ``images["he"]``: the H&E as a lazy multiscale (c, y, x) uint8 image;
- ``shapes["spots"]``: measured spots as circles, centre in slide pixels and ``radius`` in slide pixels;
- ``tables["counts"]``: raw counts (spots x genes) annotating ``spots`` (``region``/``spot_id`` columns).

All elements live in the coordinate system ``"global"`` whose unit is one full-resolution slide pixel
(x = column, y = row); an image stored at lower resolution (a Visium hires PNG) carries a scale into it.
The pixel size of ``"global"`` in µm and the provenance are in ``sdata.attrs["genemap"]`` and, so they
survive any table-only export, in ``tables["counts"].uns["genemap"]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..errors import GenemapInputError
from .images import ImagePyramid, check_mpp

if TYPE_CHECKING:
    import anndata as ad
    import dask.array as da
    import spatialdata as sd

IMAGE_KEY = "he"
SPOTS_KEY = "spots"
TABLE_KEY = "counts"
COORDINATE_SYSTEM = "global"
ATTRS_KEY = "genemap"


@dataclass(frozen=True)
class SlideInfo:
    """What a reader knows about where a slide came from."""

    source: str  # the path the user gave
    format: str  # "her2st", "legacy_st", "visium", "h5ad", "image", ...
    section: str | None = None


def check_gene_names(genes: Sequence[str], source: str) -> list[str]:
    genes = [str(g) for g in genes]
    if not genes:
        raise GenemapInputError(f"{source}: the gene list is empty; expected at least one gene column")
    duplicated = pd.Index(genes)[pd.Index(genes).duplicated()].unique()
    if len(duplicated):
        shown = ", ".join(map(str, duplicated[:5]))
        raise GenemapInputError(
            f"{source}: {len(duplicated)} duplicate gene names (e.g. {shown}); expected unique names"
        )
    return genes


def check_counts(matrix, source: str, require_raw: bool = True) -> None:
    """Raw UMI counts are non-negative integers; anything else means the file holds something else."""
    values = matrix.data if hasattr(matrix, "data") and not isinstance(matrix, np.ndarray) else np.asarray(matrix)
    if values.size == 0:
        return
    if not np.all(np.isfinite(values)):
        raise GenemapInputError(f"{source}: counts contain NaN or infinite values; expected raw counts")
    if not require_raw:
        return
    if values.min() < 0:
        raise GenemapInputError(f"{source}: counts contain negative values (min {values.min():g}); expected raw counts")
    fractional = values[values != np.round(values)]
    if fractional.size:
        raise GenemapInputError(
            f"{source}: counts contain non-integer values (e.g. {fractional[0]:g}); expected raw counts "
            "(pass require_raw=False to read normalised values as they are)"
        )


def check_spots_inside(
    centers: np.ndarray, names: Sequence[str], image_size_xy: tuple[float, float], source: str
) -> None:
    width, height = image_size_xy
    missing = ~np.isfinite(centers).all(axis=1)
    if missing.any():
        first = int(np.flatnonzero(missing)[0])
        raise GenemapInputError(
            f"{source}: {int(missing.sum())} spot centres are not finite numbers (e.g. spot {names[first]!r} at "
            f"x={centers[first, 0]}, y={centers[first, 1]}); expected pixel coordinates"
        )
    outside = (centers[:, 0] < 0) | (centers[:, 1] < 0) | (centers[:, 0] >= width) | (centers[:, 1] >= height)
    if outside.any():
        first = int(np.flatnonzero(outside)[0])
        raise GenemapInputError(
            f"{source}: {int(outside.sum())} spot centres lie outside the {width:.0f} x {height:.0f} px image "
            f"(e.g. spot {names[first]!r} at x={centers[first, 0]:.1f}, y={centers[first, 1]:.1f})"
        )


def build_spatialdata(
    image: ImagePyramid,
    info: SlideInfo,
    *,
    mpp: float | None,
    centers: np.ndarray | None = None,
    radius: np.ndarray | float | None = None,
    counts: ad.AnnData | None = None,
    image_scale: float = 1.0,
    require_raw: bool = True,
) -> sd.SpatialData:
    """Assemble and check the canonical SpatialData.

    ``centers`` (n, 2) are (x, y) and ``radius`` is in full-resolution slide pixels; ``image_scale`` is
    how many slide pixels one level-0 image pixel spans. ``counts`` rows are the spots, in order.
    """
    import spatialdata as sd
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    source = info.source
    if mpp is None:
        raise GenemapInputError(
            f"{source}: pixel size unknown; pass its µm per pixel (mpp=, or --mpp on the command line)"
        )
    mpp = check_mpp(mpp, source)
    attrs = {"mpp": mpp, "source": source, "format": info.format, "section": info.section or ""}
    images = {IMAGE_KEY: pyramid_to_datatree(image.levels, image.downsamples, image_scale)}
    shapes, tables = {}, {}
    if counts is not None:
        if centers is None or radius is None:
            raise ValueError("counts need spot centres and radii")
        centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
        if len(centers) != counts.n_obs:
            raise ValueError(f"{len(centers)} spot centres for {counts.n_obs} count rows")
        if counts.n_obs == 0:
            raise GenemapInputError(f"{source}: no spots with counts; expected at least one measured spot")
        radius = np.broadcast_to(np.asarray(radius, dtype=np.float64), (len(centers),)).copy()
        if not np.all(radius > 0):
            raise GenemapInputError(f"{source}: spot radius must be positive, got {radius.min():g}")
        check_gene_names(counts.var_names, source)
        check_counts(counts.X, source, require_raw=require_raw)
        height, width = image.shape
        check_spots_inside(centers, list(counts.obs_names), (width * image_scale, height * image_scale), source)

        spots = ShapesModel.parse(
            centers,
            geometry=0,
            radius=radius,
            index=pd.RangeIndex(len(centers)),
            transformations={COORDINATE_SYSTEM: Identity()},
        )
        table = counts.copy()
        table.obs = table.obs.copy()
        table.obs["region"] = pd.Categorical([SPOTS_KEY] * table.n_obs)
        table.obs["spot_id"] = np.arange(table.n_obs)
        table.obsm["spatial"] = centers.copy()
        table.uns[ATTRS_KEY] = dict(attrs)
        shapes[SPOTS_KEY] = spots
        tables[TABLE_KEY] = TableModel.parse(table, region=SPOTS_KEY, region_key="region", instance_key="spot_id")
    sdata = sd.SpatialData(images=images, shapes=shapes, tables=tables)
    sdata.attrs[ATTRS_KEY] = attrs
    return sdata


def pyramid_to_datatree(
    levels: Sequence[da.Array],
    downsamples: Sequence[float],
    image_scale: float = 1.0,
    channels: Sequence[str] = ("r", "g", "b"),
):
    """A multiscale image element from precomputed (c, y, x) levels, scaled into ``"global"``."""
    import xarray as xr
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale, set_transformation

    datasets = {}
    for index, (level, downsample) in enumerate(zip(levels, downsamples, strict=True)):
        array = Image2DModel.parse(level, dims=("c", "y", "x"), c_coords=list(channels))
        scale = image_scale * downsample
        set_transformation(array, Scale([scale, scale], axes=("y", "x")), COORDINATE_SYSTEM)
        datasets[f"scale{index}"] = xr.Dataset({"image": array})
    return xr.DataTree.from_dict(datasets)


# --- accessors used by the models, the engine and the plugin ---------------------------------------------


def slide_mpp(sdata: sd.SpatialData) -> float:
    """µm per slide pixel of the ``"global"`` coordinate system."""
    attrs = sdata.attrs.get(ATTRS_KEY) or {}
    if "mpp" not in attrs and TABLE_KEY in sdata.tables:
        attrs = sdata.tables[TABLE_KEY].uns.get(ATTRS_KEY, {})
    if "mpp" not in attrs:
        raise GenemapInputError("SpatialData object has no pixel size (attrs['genemap']['mpp']); expected one")
    return float(attrs["mpp"])


def slide_info(sdata: sd.SpatialData) -> dict:
    attrs = dict(sdata.attrs.get(ATTRS_KEY) or {})
    attrs.setdefault("mpp", slide_mpp(sdata))
    return attrs


def image_levels(sdata: sd.SpatialData) -> tuple[list[da.Array], list[float]]:
    """The H&E levels as (c, y, x) dask arrays and, per level, slide pixels per image pixel."""
    from spatialdata.transformations import get_transformation

    tree = sdata.images[IMAGE_KEY]
    arrays, scales = [], []
    for name in sorted(tree.children, key=lambda key: int(key.removeprefix("scale"))):
        array = tree[name]["image"]
        matrix = get_transformation(array, COORDINATE_SYSTEM).to_affine_matrix(("y", "x"), ("y", "x"))
        arrays.append(array.data)
        scales.append(float(matrix[1, 1]))
    return arrays, scales


OVERVIEW_MIN_UM = 4.0  # an overview's pixels are at least this large: fine enough for tiles and the 8 µm map


def overview_level(levels: list, scales: list[float], mpp: float, max_side: int = 2048) -> int:
    """The level a whole-slide estimate (tissue mask, stains) reads: the finest of at most ``max_side`` px
    whose pixels are at least `OVERVIEW_MIN_UM`, else the coarsest small enough, else the coarsest."""
    coarse_enough = [i for i, level in enumerate(levels) if max(level.shape[1:]) <= max_side]
    fine_enough = [i for i in coarse_enough if scales[i] * mpp >= OVERVIEW_MIN_UM]
    return (fine_enough or coarse_enough or [len(levels) - 1])[0]


def overview_pixels(sdata: sd.SpatialData) -> np.ndarray:
    """The overview level's pixels (y, x, 3) uint8 (see `overview_level`)."""
    levels, scales = image_levels(sdata)
    return np.moveaxis(np.asarray(levels[overview_level(levels, scales, slide_mpp(sdata))]), 0, -1)


def spot_geometry(sdata: sd.SpatialData) -> tuple[np.ndarray, np.ndarray]:
    """Spot centres (n, 2) as (x, y) and radii (n,), in slide pixels, in the counts table's row order."""
    spots = sdata.shapes[SPOTS_KEY]
    table = sdata.tables[TABLE_KEY]
    order = spots.loc[table.obs["spot_id"].to_numpy()]
    centers = np.column_stack([order.geometry.x.to_numpy(), order.geometry.y.to_numpy()])
    return centers, order["radius"].to_numpy(dtype=np.float64)


def counts_table(sdata: sd.SpatialData) -> ad.AnnData:
    if TABLE_KEY not in sdata.tables:
        raise GenemapInputError("this slide has no measured spots (no 'counts' table)")
    return sdata.tables[TABLE_KEY]
