"""An AnnData ``.h5ad`` of spots (positions in ``obsm["spatial"]``) paired with its H&E image."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from ..errors import GenemapInputError
from .canonical import SlideInfo, build_spatialdata
from .images import open_image


def read_h5ad_slide(
    path: str | os.PathLike,
    image: str | os.PathLike,
    spot_diameter: float,
    *,
    mpp: float | None = None,
    spatial_key: str = "spatial",
    layer: str | None = None,
    require_raw: bool = True,
):
    """Spots from ``path`` on the slide ``image``; ``obsm[spatial_key]`` and ``spot_diameter`` in image pixels.

    Counts come from ``layers[layer]`` if named, else ``layers["counts"]`` if present, else ``X``. The pixel
    size comes from ``mpp``, else from the image file.
    """
    import anndata as ad

    path = Path(path)
    if not path.is_file():
        raise GenemapInputError(f"{path}: file not found")
    try:
        with warnings.catch_warnings():  # duplicate names are refused below, in one line
            warnings.filterwarnings("ignore", "(Observation|Variable) names are not unique")
            adata = ad.read_h5ad(path)
    except Exception as error:  # h5py and anndata raise many types for a damaged file
        raise GenemapInputError(f"{path}: not a readable .h5ad file ({error})") from None
    names = adata.obs_names
    if not names.is_unique:
        name = names[names.duplicated()][0]
        rows = np.flatnonzero(names == name) + 1
        raise GenemapInputError(
            f"{path}: obs name {name!r} appears {len(rows)} times (rows {rows[0]} and {rows[1]}); "
            "expected one name per spot"
        )
    if spatial_key not in adata.obsm:
        raise GenemapInputError(f"{path}: no obsm[{spatial_key!r}]; expected spot centres (x, y) in image pixels")
    centers = np.asarray(adata.obsm[spatial_key], dtype=np.float64)
    if centers.ndim != 2 or centers.shape[1] != 2:
        raise GenemapInputError(f"{path}: obsm[{spatial_key!r}] has shape {centers.shape}; expected (spots, 2)")
    if layer is None and "counts" in adata.layers:
        layer = "counts"
    if layer is not None and layer not in adata.layers:
        raise GenemapInputError(f"{path}: no layers[{layer!r}]; layers are {list(adata.layers)}")
    counts = ad.AnnData(
        X=adata.layers[layer] if layer else adata.X,
        obs=adata.obs.copy(),
        var=adata.var.copy(),
    )
    if spot_diameter is None or not float(spot_diameter) > 0:
        raise GenemapInputError(f"{path}: spot diameter {spot_diameter} px; expected a positive number of pixels")
    pyramid = open_image(image, mpp=mpp)
    return build_spatialdata(
        pyramid,
        SlideInfo(source=str(path), format="h5ad"),
        mpp=pyramid.mpp,
        centers=centers,
        radius=float(spot_diameter) / 2,
        counts=counts,
        require_raw=require_raw,
    )
