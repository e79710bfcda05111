"""One entry point that recognises a slide's format and calls the matching reader."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import GenemapInputError
from .canonical import SlideInfo, build_spatialdata
from .images import check_mpp, is_image_path, open_image
from .legacy_st import legacy_st_files, read_counts_tsv, read_her2st, read_legacy_st
from .store import is_zarr_store, read_store
from .visium import is_visium_folder, read_visium

SUPPORTED = (
    "a SpatialData .zarr store, a Visium folder, a HER2ST folder (with section=), an ST image with its "
    "counts and alignment tables beside it, or a TIFF/OME-TIFF/JPEG/PNG slide"
)


@dataclass(frozen=True)
class SlideSource:
    """Where a slide was read from: enough for another process (the tile service, a dask worker) to read
    the same slide again. Travels between the session, the layers' metadata and the engine."""

    path: str
    section: str | None = None
    mpp: float | None = None  # only when the file gives none

    def read(self):
        return read_slide(self.path, section=self.section, mpp=self.mpp)

    @property
    def key(self) -> str:
        """What identifies the slide in layer metadata: one file can hold several sections."""
        return f"{self.path}::{self.section or ''}"


def detect_format(path: str | os.PathLike) -> str | None:
    """The reader a path needs ("zarr", "visium", "her2st", "legacy_st", "image"), or None; never raises."""
    try:
        return _detect_format(Path(path))
    except (OSError, GenemapInputError):
        return None


def _detect_format(path: Path) -> str | None:
    """`detect_format`, raising `GenemapInputError` (or OSError) where a folder it must look into is unreadable."""
    if is_zarr_store(path):
        return "zarr"
    if is_visium_folder(path):
        return "visium"
    if path.is_dir() and all((path / sub).is_dir() for sub in ("images", "counts", "spots")):
        return "her2st"
    if path.is_file() and is_image_path(path):
        files = legacy_st_files(path)
        return files["fmt"] if files else "image"
    return None


def read_image_slide(path: str | os.PathLike, mpp: float | None = None):
    """A slide with no ST data: the image alone."""
    pyramid = open_image(path, mpp=mpp)
    return build_spatialdata(pyramid, SlideInfo(source=str(path), format="image"), mpp=pyramid.mpp)


def read_slide(path: str | os.PathLike, *, section: str | None = None, mpp: float | None = None):
    """Any supported slide as canonical SpatialData (see `napari_genemap.io.canonical`)."""
    path = Path(path)
    if mpp is not None:  # before anything is read: a pixel size in the wrong unit is refused up front
        mpp = check_mpp(mpp, path)
    _check_exists(path)
    try:
        fmt = _detect_format(path)
    except OSError as error:
        raise GenemapInputError(f"{error.filename or path}: cannot be read ({error.strerror or error})") from None
    if fmt == "zarr":
        return read_store(path)
    if fmt == "visium":
        return read_visium(path, mpp=mpp)
    if fmt == "her2st" and path.is_dir():
        if section is None:
            sections = sorted(p.name.split(".")[0] for p in (path / "images").iterdir())
            raise GenemapInputError(f"{path}: HER2ST folder needs a section (one of {', '.join(sections)})")
        return read_her2st(path, section, mpp=mpp)
    if fmt in ("her2st", "legacy_st"):
        files = legacy_st_files(path)
        if files is None:  # detect_format found them; they went away since
            raise GenemapInputError(f"{path}: its counts and alignment files are gone")
        return read_legacy_st(
            files["image"],
            files["counts"],
            files["alignment"],
            fmt=files["fmt"],
            section=files["section"],
            mpp=mpp,
        )
    if fmt == "image":
        return read_image_slide(path, mpp=mpp)
    kind = "folder" if path.is_dir() else "file"
    raise GenemapInputError(f"{path}: this {kind} is not a slide napari-genemap reads; expected {SUPPORTED}")


def read_counts(path: str | os.PathLike):
    """A counts table without an image, as AnnData (spots x genes): an ``.h5ad`` file or a legacy ST counts
    table (``.tsv``, ``.tsv.gz``). For gene statistics that need no histology (a low-rank head's components)."""
    import anndata as ad

    path = Path(path)
    _check_exists(path)
    name = path.name.lower()
    if name.endswith(".h5ad"):
        try:
            return ad.read_h5ad(path)
        except (OSError, KeyError, ValueError) as error:
            raise GenemapInputError(f"{path}: not a readable .h5ad file ({error})") from None
    if name.endswith((".tsv", ".tsv.gz")):
        import pandas as pd

        table = read_counts_tsv(path)
        obs, var = pd.DataFrame(index=table.index.astype(str)), pd.DataFrame(index=table.columns.astype(str))
        return ad.AnnData(table.to_numpy(dtype="float32"), obs=obs, var=var)
    raise GenemapInputError(f"{path}: not a counts table; expected .h5ad, .tsv or .tsv.gz")


def _check_exists(path: Path) -> None:
    try:
        os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise GenemapInputError(f"{path}: symbolic link loop (it points back to itself); expected a file") from None
        if error.errno == errno.EACCES:
            raise GenemapInputError(f"{path}: permission denied") from None
        raise GenemapInputError(f"{path}: no such file or folder") from None
