"""Pseudo-bulk training pairs for DiffBulk: square tiles of a fixed side in µm and the expression summed
inside each.

Three sources, one output form (an AnnData of tiles x genes with raw counts in a sparse ``X``):

- measured spots of a canonical slide (`spot_tiles`): one tile centred on each spot, holding the summed
  counts of every spot whose *centre* falls inside it (a 112 µm tile on a 100 µm HER2ST spot, 200 µm apart,
  holds just that spot, close to DiffBulk's setting);
- a Xenium ``transcripts.parquet`` (`xenium_tiles`, `read_transcripts`) or any molecule table
  (`molecule_tiles`): molecules counted per tile of a regular grid;
- an AnnData of cells with positions (`cell_tiles`): cells' counts summed per tile of a regular grid.

Boxes are half-open, ``x0 <= x < x1`` and ``y0 <= y < y1``, so a point on a shared edge counts once. They
are in ``obs`` (``x0, y0, x1, y1``) in the unit named by ``uns["pseudobulk"]["unit"]``: ``"px"`` (slide
pixels, x = column, with ``"mpp"`` beside it) or ``"um"``. Counts stay raw; `normalise_tiles` applies a
named protocol from `napari_genemap.data.protocols`. All sums are sparse matrix products or
``np.floor`` binning, never Python loops over molecules.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from ..errors import GenemapInputError
from .protocols import Protocol

if TYPE_CHECKING:
    import anndata as ad
    import scipy.sparse as sp

Unit = Literal["um", "px"]
UNS_KEY = "pseudobulk"

#: Xenium's quality threshold: 10x's own tools and most analyses keep molecules with ``qv >= 20``
#: (a Phred-style score; 20 means about 1 % decoding error).
XENIUM_MIN_QV = 20.0
#: Feature names that are not genes: negative-control probes and codewords, unused (``BLANK_``,
#: ``UnassignedCodeword_``) and deprecated codewords, and genomic / intergenic controls of newer panels.
XENIUM_CONTROL_PATTERN = re.compile(
    r"^(?:NegControl|BLANK|Unassigned|Deprecated|Intergenic|GenomicControl|antisense)", re.IGNORECASE
)
#: Values of the ``codeword_category`` column (Xenium Onboard Analysis >= 2.0) that are real genes.
XENIUM_GENE_CATEGORIES = ("predesigned_gene", "custom_gene")
#: More tiles than this means the unit is almost certainly wrong (nm read as µm) or the tile far too small.
MAX_TILES = 5_000_000


def spot_tiles(sdata, tile_um: float = 112.0, *, source: str | None = None) -> ad.AnnData:
    """One tile of side ``tile_um`` centred on each measured spot of a canonical slide, with the summed raw
    counts of all spots whose centres lie inside it. Boxes in slide pixels (``unit="px"``, ``mpp`` beside).

    ``obs`` also holds ``spot`` (the centre spot's name), ``cx, cy`` and ``n_spots`` (spots summed).
    """
    import anndata as ad
    import scipy.sparse as sp

    from ..io import counts_table, slide_info, slide_mpp, spot_geometry

    source = source or str(slide_info(sdata).get("source") or "slide")
    table = counts_table(sdata)
    mpp = slide_mpp(sdata)
    side = _check_tile(tile_um, source) / mpp
    centers, _ = spot_geometry(sdata)
    x0, y0 = centers[:, 0] - side / 2, centers[:, 1] - side / 2
    members = _points_in_boxes(centers[:, 0], centers[:, 1], x0, y0, x0 + side, y0 + side)
    counts = sp.csr_matrix(table.X, dtype=np.float32)
    obs = pd.DataFrame(
        {
            "spot": table.obs_names.to_numpy(),
            "cx": centers[:, 0],
            "cy": centers[:, 1],
            "x0": x0,
            "y0": y0,
            "x1": x0 + side,
            "y1": y0 + side,
            "n_spots": np.asarray(members.sum(1)).ravel().astype(np.int64),
        },
        index=pd.Index(table.obs_names.astype(str), name="tile"),
    )
    tiles = ad.AnnData(X=sp.csr_matrix(members @ counts), obs=obs, var=pd.DataFrame(index=table.var_names.copy()))
    tiles.uns[UNS_KEY] = _uns("spots", "px", tile_um, side, source, mpp=mpp)
    return tiles


def read_transcripts(
    path: str | os.PathLike,
    *,
    min_qv: float | None = XENIUM_MIN_QV,
    drop_controls: bool = True,
) -> pd.DataFrame:
    """A Xenium ``transcripts.parquet`` as a molecule table with columns ``x, y`` (µm) and ``gene``.

    Xenium users' usual filter: molecules with ``qv < min_qv`` (default 20) are dropped, and with
    ``drop_controls`` every feature that is not a gene: where the file has ``codeword_category`` (XOA >= 2)
    only ``predesigned_gene`` / ``custom_gene`` rows stay, else names matching `XENIUM_CONTROL_PATTERN`
    (``NegControlProbe_``, ``NegControlCodeword_``, ``BLANK_``, ``UnassignedCodeword_``, ``Deprecated...``,
    ...) go. ``min_qv=None`` keeps every quality (for tables without a ``qv`` column). The frame's
    ``attrs`` record the source, the unit and how many rows each rule dropped.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise GenemapInputError(f"{path}: no such transcripts file")
    try:
        names = set(pq.read_schema(path).names)
    except Exception as error:  # pyarrow raises its own types for non-parquet files
        raise GenemapInputError(f"{path}: not a Parquet file ({type(error).__name__})") from None
    needed = ["x_location", "y_location", "feature_name"]
    if min_qv is not None:
        needed.append("qv")
    for column in needed:
        if column not in names:
            hint = " (pass min_qv=None to keep every molecule)" if column == "qv" else ""
            raise GenemapInputError(f"{path}: column {column!r} missing; expected a Xenium transcripts table{hint}")
    optional = [column for column in ("codeword_category",) if column in names]
    frame = pd.read_parquet(path, columns=needed + optional)
    genes = _as_text(frame["feature_name"])
    keep = np.ones(len(frame), dtype=bool)
    dropped: dict[str, int] = {}  # rows each rule matches (a row can match both)
    if min_qv is not None:
        low = frame["qv"].to_numpy() < min_qv
        dropped[f"qv below {min_qv:g}"] = int(low.sum())
        keep &= ~low
    if drop_controls:
        if optional:
            control = ~_as_text(frame["codeword_category"]).isin(XENIUM_GENE_CATEGORIES).to_numpy()
        else:
            control = genes.str.contains(XENIUM_CONTROL_PATTERN).to_numpy()
        dropped["control or non-gene features"] = int(control.sum())
        keep &= ~control
    molecules = pd.DataFrame(
        {
            "x": frame["x_location"].to_numpy(np.float64)[keep],
            "y": frame["y_location"].to_numpy(np.float64)[keep],
            "gene": genes.to_numpy()[keep],
        }
    )
    # the grid's default origin comes from every decoded molecule, so filters never shift the tiles
    extent = _extent(frame["x_location"].to_numpy(np.float64), frame["y_location"].to_numpy(np.float64))
    molecules.attrs.update(source=str(path), unit="um", dropped=dropped, n_read=len(frame), extent=extent)
    molecules.attrs["n_kept"] = int(keep.sum())
    return molecules


def xenium_tiles(
    path: str | os.PathLike,
    tile_um: float = 112.0,
    *,
    min_qv: float | None = XENIUM_MIN_QV,
    genes: list[str] | None = None,
    origin: tuple[float, float] | None = None,
) -> ad.AnnData:
    """`read_transcripts` then `molecule_tiles` in µm (Xenium's own unit): the filtered molecules of a
    ``transcripts.parquet`` counted per tile of a ``tile_um`` grid."""
    molecules = read_transcripts(path, min_qv=min_qv)
    return molecule_tiles(molecules, tile_um, unit="um", genes=genes, origin=origin)


def molecule_tiles(
    molecules: pd.DataFrame,
    tile_um: float = 112.0,
    *,
    unit: str = "um",
    mpp: float | None = None,
    genes: list[str] | None = None,
    origin: tuple[float, float] | None = None,
    columns: tuple[str, str, str] = ("x", "y", "gene"),
) -> ad.AnnData:
    """Molecules (one row each; ``columns`` name x, y and the gene) counted per tile of a regular grid.

    Positions are in ``unit``: ``"um"`` or ``"px"`` (slide pixels, then ``mpp`` µm/px is required and the
    tile side becomes ``tile_um / mpp`` px). The grid starts at ``origin`` (default: the floor of the
    smallest x and y, from ``molecules.attrs["extent"]`` where `read_transcripts` left it) and covers every
    molecule; empty tiles are kept. ``genes`` fixes the columns (others dropped, absent ones all zero);
    default: the sorted genes present.
    """
    source = str(molecules.attrs.get("source", "molecule table"))
    for column in columns:
        if column not in molecules.columns:
            raise GenemapInputError(
                f"{source}: column {column!r} missing; expected columns {', '.join(columns)} (pass columns=)"
            )
    x_name, y_name, gene_name = columns
    x = molecules[x_name].to_numpy(np.float64)
    y = molecules[y_name].to_numpy(np.float64)
    unit, side = _tile_side(unit, mpp, tile_um, source)
    codes, var_names = _gene_codes(_as_text(molecules[gene_name]), genes)
    extent = _extent(x, y)
    # the extent of every decoded molecule, so that filtering keeps the grid in place; unless the rows no
    # longer lie inside it (moved after reading: pandas carries attrs along)
    recorded = molecules.attrs.get("extent")
    inside = recorded and all(r <= e for r, e in zip(recorded[:2], extent[:2], strict=True))
    if inside and len(x) and all(r >= e for r, e in zip(recorded[2:], extent[2:], strict=True)):
        extent = list(recorded)
    tiles = _grid_sum(x, y, codes, len(var_names), side, origin, extent, source, values=None)
    tiles.var_names = pd.Index(var_names, name="gene")
    tiles.uns[UNS_KEY] = _uns("molecules", unit, tile_um, side, source, mpp=mpp, origin=tiles.uns.pop("origin"))
    if "dropped" in molecules.attrs:
        tiles.uns[UNS_KEY]["filter"] = {
            "rule": "Xenium: qv >= min_qv and genes only (no control probes or codewords)",
            "matched": dict(molecules.attrs["dropped"]),
            "n_read": int(molecules.attrs.get("n_read", len(molecules))),
            "n_kept": len(molecules),
        }
    return tiles


def cell_tiles(
    cells: ad.AnnData,
    tile_um: float = 112.0,
    *,
    unit: str,
    mpp: float | None = None,
    spatial_key: str = "spatial",
    origin: tuple[float, float] | None = None,
    source: str | None = None,
) -> ad.AnnData:
    """Cells (rows of raw counts, centre ``obsm[spatial_key]`` as (x, y)) summed per tile of a regular grid.

    ``unit`` says what the positions are in and has no default on purpose: ``"um"`` (Xenium, CosMx and
    MERSCOPE exports) or ``"px"`` (slide pixels, with ``mpp``). A cell counts where its centre falls.
    """
    import scipy.sparse as sp

    from ..io.canonical import check_counts

    source = source or "cells"
    if spatial_key not in cells.obsm:
        raise GenemapInputError(f"{source}: obsm[{spatial_key!r}] missing; expected cell centres as (x, y)")
    positions = np.asarray(cells.obsm[spatial_key], dtype=np.float64)
    if positions.ndim != 2 or positions.shape[1] < 2:
        raise GenemapInputError(f"{source}: obsm[{spatial_key!r}] has shape {positions.shape}; expected (cells, 2)")
    if not np.isfinite(positions[:, :2]).all():
        raise GenemapInputError(f"{source}: obsm[{spatial_key!r}] holds NaN or infinite positions")
    check_counts(cells.X, source)
    unit, side = _tile_side(unit, mpp, tile_um, source)
    x, y = positions[:, 0], positions[:, 1]
    tiles = _grid_sum(x, y, None, cells.n_vars, side, origin, _extent(x, y), source, values=sp.csr_matrix(cells.X))
    tiles.var_names = cells.var_names.copy()
    tiles.uns[UNS_KEY] = _uns("cells", unit, tile_um, side, source, mpp=mpp, origin=tiles.uns.pop("origin"))
    return tiles


def normalise_tiles(tiles: ad.AnnData, protocol: Protocol) -> ad.AnnData:
    """The tiles restricted to the protocol's genes (in its order), raw counts in ``X`` and the protocol's
    values in ``layers["protocol"]`` (dense float32); the protocol itself in ``uns["protocol"]``.

    Protocols that scale to a total use the total over *their* genes (`Protocol.normalise`), as the
    published protocols do. Genes the protocol needs but the tiles lack are refused by `Protocol.counts`.
    """
    import anndata as ad
    import scipy.sparse as sp

    raw = protocol.counts(tiles)
    result = ad.AnnData(
        X=sp.csr_matrix(raw.astype(np.float32)),
        obs=tiles.obs.copy(),
        var=pd.DataFrame(index=pd.Index(protocol.genes, name=tiles.var_names.name)),
        uns={key: value for key, value in tiles.uns.items()},
    )
    result.layers["protocol"] = protocol.normalise(raw).astype(np.float32)
    result.uns["protocol"] = protocol.to_dict()
    return result


def read_tiles(sdata, tiles: ad.AnnData, mpp: float) -> np.ndarray:
    """The H&E under each tile resampled to ``mpp`` µm/px, as (tiles, S, S, 3) uint8 with
    S = round(tile side in µm / mpp). Tiles need slide-pixel boxes (``unit="px"``); mirrored past edges.

    Each origin is rounded to a whole model pixel, so a tile may sit up to half a model pixel off its box.
    """
    from ..io import slide_mpp
    from .resample import ModelFrameReader

    info = tiles.uns.get(UNS_KEY, {})
    if info.get("unit") != "px":
        raise GenemapInputError(
            f"{info.get('source', 'tiles')}: tile boxes are in {info.get('unit')!r}; reading H&E needs slide "
            "pixels (unit 'px')"
        )
    reader = ModelFrameReader.from_sdata(sdata, mpp)
    factor = mpp / slide_mpp(sdata)  # slide pixels per model pixel
    size = round(float(info["tile_um"]) / mpp)
    x0 = np.round(tiles.obs["x0"].to_numpy() / factor).astype(int)
    y0 = np.round(tiles.obs["y0"].to_numpy() / factor).astype(int)
    out = np.empty((tiles.n_obs, size, size, 3), dtype=np.uint8)
    for i, (left, top) in enumerate(zip(x0, y0, strict=True)):  # one read per tile, not per pixel
        out[i] = reader.read(int(top), int(top) + size, int(left), int(left) + size)
    return out


# --- helpers ----------------------------------------------------------------------------------------------


def _check_tile(tile_um: float, source: str) -> float:
    try:
        tile_um = float(tile_um)
    except (TypeError, ValueError):
        raise GenemapInputError(f"{source}: tile size {tile_um!r} is not a number; expected µm") from None
    if not np.isfinite(tile_um) or tile_um <= 0:
        raise GenemapInputError(f"{source}: tile size {tile_um} µm; expected a positive number of micrometres")
    return tile_um


def _tile_side(unit: str, mpp: float | None, tile_um: float, source: str) -> tuple[Unit, float]:
    """The tile side in the positions' unit; refuses units it does not know and px without a pixel size."""
    from ..io.images import check_mpp

    tile_um = _check_tile(tile_um, source)
    normalised = {"um": "um", "µm": "um", "micron": "um", "microns": "um", "px": "px", "pixel": "px"}.get(
        str(unit).strip().lower()
    )
    if normalised is None:
        raise GenemapInputError(
            f"{source}: position unit {unit!r}; expected 'um' (micrometres) or 'px' (slide pixels, with mpp)"
        )
    if normalised == "um":
        return "um", tile_um
    if mpp is None:
        raise GenemapInputError(f"{source}: positions in slide pixels need the pixel size (mpp, µm per pixel)")
    return "px", tile_um / check_mpp(mpp, source)


def _as_text(column: pd.Series) -> pd.Series:
    """Feature names as str: older Xenium files store them as bytes."""
    if len(column) and isinstance(column.iloc[0], bytes):
        return column.str.decode("utf-8")
    return column.astype(str)


def _gene_codes(names: pd.Series, genes: list[str] | None) -> tuple[np.ndarray, list[str]]:
    """Integer gene codes per molecule (-1: not in ``genes``) and the column names."""
    if genes is None:
        categorical = pd.Categorical(names)
        return categorical.codes.astype(np.int64), [str(g) for g in categorical.categories]
    genes = [str(g) for g in genes]
    if len(set(genes)) != len(genes):
        raise GenemapInputError("genes: the list has duplicate names")
    return pd.Categorical(names, categories=genes).codes.astype(np.int64), genes


def _extent(x: np.ndarray, y: np.ndarray) -> list[float]:
    if len(x) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(x.min()), float(y.min()), float(x.max()), float(y.max())]


def _grid_sum(
    x: np.ndarray,
    y: np.ndarray,
    codes: np.ndarray | None,
    n_genes: int,
    side: float,
    origin: tuple[float, float] | None,
    extent: list[float],
    source: str,
    values: sp.csr_matrix | None,
) -> ad.AnnData:
    """Sum per tile of a regular grid: molecules (gene ``codes``, one count each) or rows of ``values``."""
    import anndata as ad
    import scipy.sparse as sp

    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise GenemapInputError(f"{source}: positions hold NaN or infinite values")
    ox, oy = (np.floor(extent[0]), np.floor(extent[1])) if origin is None else (float(origin[0]), float(origin[1]))
    columns = np.floor((x - ox) / side).astype(np.int64)
    rows = np.floor((y - oy) / side).astype(np.int64)
    if len(x) and (columns.min() < 0 or rows.min() < 0):
        raise GenemapInputError(f"{source}: some positions lie left of or above the grid origin ({ox:g}, {oy:g})")
    n_columns = int(np.floor((extent[2] - ox) / side)) + 1 if len(x) else 0
    n_rows = int(np.floor((extent[3] - oy) / side)) + 1 if len(x) else 0
    n_columns, n_rows = max(n_columns, int(columns.max(initial=-1)) + 1), max(n_rows, int(rows.max(initial=-1)) + 1)
    if n_columns * n_rows > MAX_TILES:
        raise GenemapInputError(
            f"{source}: a {side:g}-unit tile grid over this extent has {n_columns * n_rows:,} tiles; are the "
            "positions in the unit given (µm vs pixels vs nm)?"
        )
    tile = rows * n_columns + columns
    n_tiles = n_rows * n_columns
    if values is None:
        assert codes is not None
        kept = codes >= 0
        X = sp.coo_matrix(
            (np.ones(int(kept.sum()), dtype=np.float32), (tile[kept], codes[kept])), shape=(n_tiles, n_genes)
        ).tocsr()
        totals = np.bincount(tile[kept], minlength=n_tiles)
    else:
        membership = sp.csr_matrix(
            (np.ones(len(tile), dtype=np.float32), (tile, np.arange(len(tile)))), shape=(n_tiles, len(tile))
        )
        X = sp.csr_matrix(membership @ values.astype(np.float32))
        totals = np.bincount(tile, minlength=n_tiles)
    X.sum_duplicates()
    grid_rows, grid_columns = np.divmod(np.arange(n_tiles), n_columns) if n_columns else (np.array([]),) * 2
    x0, y0 = ox + grid_columns * side, oy + grid_rows * side
    obs = pd.DataFrame(
        {
            "row": grid_rows.astype(np.int64),
            "col": grid_columns.astype(np.int64),
            "x0": x0,
            "y0": y0,
            "x1": x0 + side,
            "y1": y0 + side,
            "n_items": totals.astype(np.int64),  # molecules or cells summed
            # wholly inside the data's bounding box: edge tiles that run past it are partly unmeasured
            "complete": (x0 + side <= extent[2]) & (y0 + side <= extent[3]),
        },
        index=pd.Index([f"r{r}_c{c}" for r, c in zip(grid_rows, grid_columns, strict=True)], name="tile"),
    )
    tiles = ad.AnnData(X=X, obs=obs)
    tiles.uns["origin"] = [float(ox), float(oy)]
    return tiles


def _points_in_boxes(
    x: np.ndarray, y: np.ndarray, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray, chunk: int = 1024
) -> sp.csr_matrix:
    """Sparse (boxes, points) membership of points in half-open boxes, in chunks of boxes (bounded memory)."""
    import scipy.sparse as sp

    blocks = []
    for start in range(0, len(x0), chunk):
        stop = start + chunk
        inside = (
            (x[None, :] >= x0[start:stop, None])
            & (x[None, :] < x1[start:stop, None])
            & (y[None, :] >= y0[start:stop, None])
            & (y[None, :] < y1[start:stop, None])
        )
        blocks.append(sp.csr_matrix(inside, dtype=np.float32))
    if not blocks:
        return sp.csr_matrix((0, len(x)), dtype=np.float32)
    return sp.csr_matrix(sp.vstack(blocks))


def _uns(
    kind: str,
    unit: str,
    tile_um: float,
    side: float,
    source: str,
    *,
    mpp: float | None = None,
    origin: list[float] | None = None,
) -> dict:
    """What the tiles are, in a form h5ad can store (no None values)."""
    info: dict = {"kind": kind, "unit": unit, "tile_um": float(tile_um), "tile": float(side), "source": source}
    if mpp is not None:
        info["mpp"] = float(mpp)
    if origin is not None:
        info["origin"] = list(origin)
    info["boxes"] = "half-open [x0, x1) x [y0, y1), x = column"
    return info
