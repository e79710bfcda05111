"""10x Visium Space Ranger output folders, read through spatialdata-io and put into canonical form."""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from pathlib import Path

from ..errors import GenemapDataWarning, GenemapInputError
from .canonical import SlideInfo, build_spatialdata, check_counts
from .images import check_mpp, open_image, pyramid_from_array

#: Diameter of a Visium capture spot; with ``spot_diameter_fullres`` it gives the pixel size.
VISIUM_SPOT_DIAMETER_UM = 55.0


def is_visium_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "spatial" / "scalefactors_json.json").is_file()


def read_visium(path: str | os.PathLike, fullres_image: str | os.PathLike | None = None, mpp: float | None = None):
    """A Space Ranger ``outs``-like folder; the H&E is the full-resolution image if given, else the hires PNG.

    Spot centres and radii stay in full-resolution pixels (``spot_diameter_fullres``), and the hires image
    is scaled into that frame, so spots sit on the tissue whichever image is shown.
    """
    import spatialdata_io

    path = Path(path)
    if not is_visium_folder(path):
        raise GenemapInputError(f"{path}: not a Visium folder (expected spatial/scalefactors_json.json)")
    if mpp is not None:
        mpp = check_mpp(mpp, path)
    scalefactors = _read_scalefactors(path / "spatial" / "scalefactors_json.json")
    spot_diameter = _scalefactor(scalefactors, "spot_diameter_fullres", path / "spatial" / "scalefactors_json.json")
    if fullres_image is None:  # the hires PNG is the image: its scale is needed (and must not be 0)
        hires_scale = _scalefactor(scalefactors, "tissue_hires_scalef", path / "spatial" / "scalefactors_json.json")
    counts_files = sorted(path.glob("*filtered_feature_bc_matrix.h5"))
    if not counts_files:
        raise GenemapInputError(f"{path}: no filtered_feature_bc_matrix.h5; expected Space Ranger outputs")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # spatialdata-io's own deprecation chatter
            sdata = spatialdata_io.visium(
                path, dataset_id="visium", counts_file=counts_files[0].name, var_names_make_unique=False
            )
    except (OSError, ValueError, KeyError) as error:
        raise GenemapInputError(f"{path}: spatialdata-io could not read this Visium folder ({error})") from None

    table = sdata.tables["table"]
    adata = table.copy()
    duplicated = adata.var_names.duplicated()
    if duplicated.any():
        warnings.warn(
            GenemapDataWarning(
                f"{counts_files[0]}: {int(duplicated.sum())} repeated gene symbols made unique "
                f"(e.g. {adata.var_names[duplicated][0]!r} -> {adata.var_names[duplicated][0]}-1)"
            ),
            stacklevel=2,
        )
        adata.var_names_make_unique()
    check_counts(adata.X, str(counts_files[0]))
    shapes = sdata.shapes["visium"].loc[adata.obs["spot_id"].to_numpy()]
    centers = shapes.geometry.get_coordinates().to_numpy()
    for column in ("region", "spot_id"):
        del adata.obs[column]
    adata.uns.pop("spatialdata_attrs", None)

    if fullres_image is not None:
        image, image_scale = open_image(fullres_image), 1.0
    else:
        hires = sdata.images["visium_hires_image"]
        image = pyramid_from_array(hires.data, path / "spatial" / "tissue_hires_image.png")
        image_scale = 1.0 / hires_scale
    return build_spatialdata(
        image,
        SlideInfo(source=str(path), format="visium"),
        mpp=mpp if mpp is not None else VISIUM_SPOT_DIAMETER_UM / spot_diameter,
        centers=centers,
        radius=spot_diameter / 2,
        counts=adata,
        image_scale=image_scale,
    )


def _read_scalefactors(path: Path) -> dict:
    try:
        scalefactors = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise GenemapInputError(
            f"{path}: not a readable JSON file ({error}); expected Space Ranger scale factors"
        ) from None
    if not isinstance(scalefactors, dict):
        raise GenemapInputError(
            f"{path}: holds a {type(scalefactors).__name__}; expected a JSON object of scale factors"
        )
    return scalefactors


def _scalefactor(scalefactors: dict, key: str, path: Path) -> float:
    """One scale factor: a finite, positive number."""
    value = scalefactors.get(key)
    number = math.nan
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):
            number = float(value)
    if not math.isfinite(number) or number <= 0:
        shown = "missing" if value is None else repr(value)
        raise GenemapInputError(f"{path}: {key} is {shown}; expected a positive number")
    return number
