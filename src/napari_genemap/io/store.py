"""SpatialData ``.zarr`` stores: read back what we wrote, write atomically."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import GenemapInputError
from .atomic import atomic_dir, quiet_zarr
from .canonical import ATTRS_KEY, IMAGE_KEY


def is_zarr_store(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / "zarr.json").is_file() or (path / ".zgroup").is_file())


def read_store(path: str | os.PathLike):
    """A SpatialData store in the canonical layout (an ``he`` image and the pixel size)."""
    import spatialdata as sd

    path = Path(path)
    if not is_zarr_store(path):
        raise GenemapInputError(f"{path}: not a zarr store (no zarr.json or .zgroup)")
    try:
        sdata = sd.read_zarr(path)
    except Exception as error:  # zarr/ome-zarr raise many types for a damaged store
        raise GenemapInputError(f"{path}: not a readable SpatialData store ({error})") from None
    if IMAGE_KEY not in sdata.images:
        raise GenemapInputError(
            f"{path}: SpatialData store has no {IMAGE_KEY!r} image (images: {list(sdata.images) or 'none'}); "
            "expected a store written by napari-genemap"
        )
    if ATTRS_KEY not in sdata.attrs:
        raise GenemapInputError(f"{path}: SpatialData store has no attrs[{ATTRS_KEY!r}] with the pixel size")
    return sdata


def write_store(sdata, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write to a temporary sibling, then rename, so a failed or killed write leaves no half store."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise GenemapInputError(f"{path}: already exists; choose another path or overwrite it")
    if path.suffix != ".zarr":
        raise GenemapInputError(f"{path}: a SpatialData store's name must end in .zarr")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(path, replace=overwrite) as temporary, quiet_zarr():
        sdata.write(temporary)
    sdata.path = path  # spatialdata points the object at where it wrote: the temporary name
    return path
