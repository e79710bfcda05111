"""Legacy Spatial Transcriptomics (ST) slides: an H&E image, a counts table and a spot alignment table.

Both shared ST datasets use this layout: HER2ST (``images/B4.jpg``, ``counts/B4.tsv.gz``,
``spots/B4_selection.tsv``) and the mouse olfactory bulb (``MOB1.jpg``, ``MOB1.tsv``,
``alignment_table_MOB1.tsv``). The counts index ``"10x14"`` names the spot at array x = 10, y = 14; the
alignment table gives each array position's centre in image pixels.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import GenemapDataWarning, GenemapInputError
from .canonical import SlideInfo, build_spatialdata, check_gene_names
from .images import check_mpp, open_image

#: Centre-to-centre distance of the ST array's spots and their diameter (Ståhl et al., Science 2016).
ST_PITCH_UM = 200.0
ST_SPOT_DIAMETER_UM = 100.0
ALIGNMENT_COLUMNS = ("x", "y", "pixel_x", "pixel_y")


def read_her2st(root: str | os.PathLike, section: str, mpp: float | None = None):
    """One HER2ST section (Andersson et al. 2021) from the dataset folder ``root``."""
    root = Path(root)
    return read_legacy_st(
        image=_find_image(root / "images", section),
        counts=root / "counts" / f"{section}.tsv.gz",
        alignment=root / "spots" / f"{section}_selection.tsv",
        fmt="her2st",
        section=section,
        mpp=mpp,
    )


def read_mouse_olfactory_bulb(root: str | os.PathLike, section: str, mpp: float | None = None):
    """One section (``MOB1``..``MOB4``) of the legacy-ST mouse olfactory bulb data (Ståhl et al. 2016)."""
    root = Path(root)
    return read_legacy_st(
        image=_find_image(root, section),
        counts=root / f"{section}.tsv",
        alignment=root / f"alignment_table_{section}.tsv",
        fmt="legacy_st",
        section=section,
        mpp=mpp,
    )


def legacy_st_files(image: str | os.PathLike) -> dict | None:
    """The counts and alignment files that belong to an image in either layout, or None."""
    image = Path(image)
    stem = image.name.split(".")[0]
    candidates = [
        (
            "her2st",
            image.parent.parent / "counts" / f"{stem}.tsv.gz",
            image.parent.parent / "spots" / f"{stem}_selection.tsv",
        ),
        ("legacy_st", image.parent / f"{stem}.tsv", image.parent / f"alignment_table_{stem}.tsv"),
    ]
    for fmt, counts, alignment in candidates:
        if is_file(counts) and is_file(alignment):
            return {"image": image, "counts": counts, "alignment": alignment, "fmt": fmt, "section": stem}
    return None


def read_legacy_st(
    image: str | os.PathLike,
    counts: str | os.PathLike,
    alignment: str | os.PathLike,
    *,
    fmt: str = "legacy_st",
    section: str | None = None,
    mpp: float | None = None,
):
    """Join counts to spot positions; the pixel size comes from the 200 µm spot grid unless given."""
    import anndata as ad
    import scipy.sparse as sp

    image, counts, alignment = Path(image), Path(counts), Path(alignment)
    for path in (image, counts, alignment):
        if not is_file(path):
            raise GenemapInputError(f"{path}: file not found (legacy ST needs an image, counts and alignment table)")
    if mpp is not None:
        mpp = check_mpp(mpp, image)
    pyramid = open_image(image)
    spots = _read_alignment(alignment)
    table = read_counts_tsv(counts)

    spots.index = pd.Index([f"{round(x)}x{round(y)}" for x, y in zip(spots["x"], spots["y"])], name="spot")
    unknown = table.index.difference(spots.index)
    if len(unknown) == len(table.index):
        raise GenemapInputError(
            f"{counts}: no count row matches a spot in {alignment.name} (e.g. {unknown[0]!r}); "
            "expected row names 'XxY' naming array positions of the alignment table"
        )
    if len(unknown):
        warnings.warn(
            GenemapDataWarning(
                f"{counts}: dropped {len(unknown)} count rows that match no spot in {alignment.name} "
                f"(e.g. {unknown[0]!r})"
            ),
            stacklevel=3,
        )
    if "selected" in spots:  # the alignment marks spots under tissue; counts of the others are not used
        spots = spots[spots["selected"] == 1]
    without_counts = spots.index.difference(table.index)
    if len(without_counts):
        warnings.warn(
            GenemapDataWarning(
                f"{alignment}: dropped {len(without_counts)} spots that have no row in {counts.name} "
                f"(e.g. {without_counts[0]!r})"
            ),
            stacklevel=3,
        )
    spots = spots[spots.index.isin(table.index)]
    kept = spots.index
    matrix = table.loc[kept].to_numpy()
    array_mpp = (
        mpp
        if mpp is not None
        else grid_mpp(spots[["x", "y"]].to_numpy(), spots[["pixel_x", "pixel_y"]].to_numpy(), alignment)
    )

    adata = ad.AnnData(
        X=sp.csr_matrix(matrix.astype(np.float32)),
        obs=pd.DataFrame(
            {"array_x": spots["x"].to_numpy(), "array_y": spots["y"].to_numpy()},
            index=pd.Index(kept, name="spot"),
        ),
        var=pd.DataFrame(index=pd.Index(table.columns, name="gene")),
    )
    return build_spatialdata(
        pyramid,
        SlideInfo(source=str(image), format=fmt, section=section),
        mpp=array_mpp,
        centers=spots[["pixel_x", "pixel_y"]].to_numpy(),
        radius=ST_SPOT_DIAMETER_UM / 2 / array_mpp,
        counts=adata,
    )


def grid_mpp(array_xy: np.ndarray, pixel_xy: np.ndarray, source: object = "spots") -> float:
    """µm per pixel from a least-squares fit of pixel positions on array positions (200 µm pitch)."""
    if len(array_xy) < 3:
        raise GenemapInputError(f"{source}: need at least 3 spots to measure the pixel size; pass mpp instead")
    design = np.column_stack([array_xy, np.ones(len(array_xy))])
    coef, *_ = np.linalg.lstsq(design, pixel_xy, rcond=None)
    pixels_per_step = np.linalg.norm(coef[:2], axis=1).mean()
    if not np.isfinite(pixels_per_step) or pixels_per_step <= 0:
        raise GenemapInputError(f"{source}: spot positions do not form a grid; pass mpp instead")
    return ST_PITCH_UM / pixels_per_step


def is_file(path: Path) -> bool:
    """``path.is_file()``, but a folder we may not enter is one clear line, not a missing file."""
    try:
        return path.is_file()
    except PermissionError:
        raise GenemapInputError(f"{path}: permission denied (its folder cannot be read)") from None


def _read_alignment(path: Path) -> pd.DataFrame:
    try:
        spots = pd.read_csv(path, sep="\t")
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError, OSError) as error:
        raise GenemapInputError(f"{path}: not a readable tab-separated alignment table ({error})") from None
    missing = [column for column in ALIGNMENT_COLUMNS if column not in spots]
    if missing:
        raise GenemapInputError(
            f"{path}: missing columns {', '.join(missing)}; expected {', '.join(ALIGNMENT_COLUMNS)}"
        )
    spots = spots.reset_index(drop=True)
    for column in ALIGNMENT_COLUMNS:  # line numbers below count the header as line 1
        values = pd.to_numeric(spots[column], errors="coerce").astype(np.float64)
        bad = ~np.isfinite(values.to_numpy())
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            cell = spots[column].iloc[row]
            shown = "empty or NaN" if pd.isna(cell) else repr(cell) if isinstance(cell, str) else f"{cell:g}"
            raise GenemapInputError(
                f"{path}: line {row + 2}, column {column}: {shown} is not a finite number; "
                f"expected {'array positions' if column in ('x', 'y') else 'pixel coordinates'} in every row"
            )
    positions = pd.Series([f"{round(x)}x{round(y)}" for x, y in zip(spots["x"], spots["y"])])
    repeated = positions.duplicated()
    if repeated.any():
        row = int(np.flatnonzero(repeated)[0])
        first = int(np.flatnonzero(positions == positions.iloc[row])[0])
        raise GenemapInputError(
            f"{path}: line {row + 2} repeats array position {positions.iloc[row]} of line {first + 2}; "
            "expected one row per spot"
        )
    return spots


def read_counts_tsv(path: str | os.PathLike) -> pd.DataFrame:
    """A legacy ST counts table (spots x genes, tab-separated, optionally gzipped), checked."""
    path = Path(path)
    try:
        # pandas renames repeated column names ("A", "A.1"), so the header is checked as written
        header = pd.read_csv(path, sep="\t", header=None, nrows=1).iloc[0, 1:].dropna().astype(str)
        check_gene_names(header, str(path))
        table = pd.read_csv(path, sep="\t", index_col=0)
    except (pd.errors.ParserError, UnicodeDecodeError, EOFError, OSError, pd.errors.EmptyDataError) as error:
        raise GenemapInputError(f"{path}: not a readable tab-separated counts table ({error})") from None
    if table.index.duplicated().any():
        raise GenemapInputError(f"{path}: duplicate spot rows (e.g. {table.index[table.index.duplicated()][0]!r})")
    non_numeric = [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]
    if non_numeric:
        raise GenemapInputError(f"{path}: gene column {non_numeric[0]!r} is not numeric; expected counts")
    return table


def _find_image(folder: Path, section: str) -> Path:
    for suffix in (".jpg", ".jpeg", ".png", ".tif", ".tiff"):
        if is_file(folder / f"{section}{suffix}"):
            return folder / f"{section}{suffix}"
    raise GenemapInputError(f"{folder}: no image for section {section!r} (looked for {section}.jpg/.png/.tif)")
