"""Reading and writing regions of interest: CSV, .h5ad and the ROI elements of a SpatialData store.

ROIs live in slide pixels (x = column, y = row) as a GeoDataFrame indexed by unique names: circles are
shapely Points with a ``radius`` column, polygons are Polygons. Their expression table is the one
`napari_genemap.explore.rois.roi_table` makes (the geometry in µm and in slide pixels in ``obs``):

- CSV: name, kind, x_um, y_um, radius_um (circles), area_um2, then the same in slide pixels (x_px, y_px,
  radius_px, area_px2), then one column per gene with the protocol-normalised profile: every column
  says its unit, as the panel shows µm and the geometry lives in pixels. ``genemap aggregate`` and the
  Spots panel both write it with `write_csv`. Genes' values have 6 significant digits (``%.6g``), the
  geometry all of its float64 digits; pyarrow's CSV writer formats them a block of rows at a time in two
  threads (10^5 ROIs x 785 genes in seconds; pandas' ``%.6g`` took about a minute);
- Parquet: the CSV's columns, typed (genes float32), for tables too large for text;
- .h5ad: the table itself (X protocol-normalised, ``layers["integral"]`` raw-scale, the ROI geometry as
  WKT in slide pixels in ``obs["geometry_wkt_px"]``);
- SpatialData: shapes elements ``roi_circles`` (points + ``radius``) and ``roi_polygons`` (one element per
  geometry type, as spatialdata-plot and napari-spatialdata draw an element by its first geometry's type)
  and a table ``roi_expression`` annotating both (``region``/``roi_id``), all in ``"global"``; the geometry
  stays in slide pixels (the canonical form), the table's ``obs`` is the .h5ad's.

A store reopened without a model still shows its saved table (`saved_expression`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..errors import GenemapInputError
from .atomic import atomic_file, quiet_zarr

if TYPE_CHECKING:
    import anndata as ad
    import geopandas as gpd
    import pyarrow as pa
    import spatialdata as sd

ROI_CIRCLES_KEY = "roi_circles"
ROI_POLYGONS_KEY = "roi_polygons"
ROI_TABLE_KEY = "roi_expression"
ROI_KEYS = (ROI_CIRCLES_KEY, ROI_POLYGONS_KEY)

#: the geometry columns of an ROI table and its CSV, units in their names (µm first, as the panel shows)
UNIT_COLUMNS = ("x_um", "y_um", "radius_um", "area_um2", "x_px", "y_px", "radius_px", "area_px2")
#: what an ROI table file may be, by its name's ending
TABLE_SUFFIXES = {".csv": "the CSV", ".parquet": "the Parquet file", ".h5ad": "the AnnData file"}
#: ROIs formatted (CSV) or encoded (Parquet) at once, a block per thread
WRITE_ROWS = 4096


def circle_radii(rois: gpd.GeoDataFrame) -> np.ndarray:
    """The ``radius`` column in slide pixels (NaN for polygons, and for all when there is none)."""
    return rois["radius"].to_numpy(float) if "radius" in rois else np.full(len(rois), np.nan)


# --- CSV and .h5ad -------------------------------------------------------------------------------------------
def roi_frame(table: ad.AnnData) -> pd.DataFrame:
    """What the CSV holds: name, kind, the `UNIT_COLUMNS`, then one column per gene (X)."""
    missing = [column for column in ("kind", *UNIT_COLUMNS) if column not in table.obs]
    if missing:
        raise GenemapInputError(f"the ROI table has no {missing[0]!r} column (make it with roi_table)")
    values = table.X.toarray() if hasattr(table.X, "toarray") else np.asarray(table.X)
    frame = pd.DataFrame(values, columns=table.var_names.astype(str), index=range(table.n_obs))
    head = pd.DataFrame(
        {
            "name": table.obs_names.astype(str),
            "kind": table.obs["kind"].astype(str).to_numpy(),
            **{column: table.obs[column].to_numpy(float) for column in UNIT_COLUMNS},
        }
    )
    return pd.concat([head, frame], axis=1)


def roi_batches(
    table: ad.AnnData, rows: int = WRITE_ROWS, digits: int | None = None
) -> tuple[pa.Schema, list[Callable[[], pa.RecordBatch]]]:
    """`roi_frame`'s columns as Arrow record batches of ``rows`` ROIs each: (schema, one function per
    batch that makes it), so batches are made when written (a block of X at a time, never a second copy of
    the whole table), in any thread. ``digits``: the genes' values rounded to that many significant
    digits (as ``%.{digits}g`` would print them)."""
    import pyarrow as pa

    missing = [column for column in ("kind", *UNIT_COLUMNS) if column not in table.obs]
    if missing:
        raise GenemapInputError(f"the ROI table has no {missing[0]!r} column (make it with roi_table)")
    x_type = np.float32 if np.dtype(getattr(table.X, "dtype", np.float32)) == np.float32 else np.float64
    schema = pa.schema(
        [
            ("name", pa.string()),
            ("kind", pa.string()),
            *[(column, pa.float64()) for column in UNIT_COLUMNS],
            *[(str(gene), pa.from_numpy_dtype(x_type)) for gene in table.var_names],
        ]
    )
    names = np.asarray(table.obs_names.astype(str), dtype=object)
    kinds = np.asarray(table.obs["kind"].astype(str), dtype=object)
    units = [table.obs[column].to_numpy(float) for column in UNIT_COLUMNS]

    def batch(start: int) -> pa.RecordBatch:
        stop = min(table.n_obs, start + rows)
        block = table.X[start:stop]
        block = block.toarray() if hasattr(block, "toarray") else np.asarray(block)
        genes = np.ascontiguousarray(block.T, dtype=x_type)  # one contiguous row per gene: Arrow takes it as is
        if digits is not None:
            genes = _significant(genes, digits)
        head = [pa.array(names[start:stop], pa.string()), pa.array(kinds[start:stop], pa.string())]
        # NaN (a polygon's radius, an undefined value) is missing: an empty CSV field, as pandas wrote it
        missing = bool(np.isnan(genes).any())
        columns = [
            *head,
            *[pa.array(unit[start:stop], from_pandas=True) for unit in units],
            *[pa.array(gene, from_pandas=missing) for gene in genes],
        ]
        return pa.RecordBatch.from_arrays(columns, schema=schema)

    return schema, [functools.partial(batch, start) for start in range(0, table.n_obs, rows)]


_POWERS = 10.0 ** np.arange(-300, 301)


def _significant(values: np.ndarray, digits: int) -> np.ndarray:
    """``values`` rounded to ``digits`` significant decimal digits, in their own dtype: float(f"{v:.6g}")
    for every value (NaN, infinities and values beyond 1e±290 kept as they are), vectorised."""
    with np.errstate(divide="ignore", invalid="ignore"):
        exponent = np.floor(np.log10(np.abs(values)))
    exponent = np.nan_to_num(exponent, nan=0.0, posinf=0.0, neginf=0.0).astype(np.int64)
    scale = _POWERS[np.clip(digits - 1 - exponent, -300, 300) + 300]
    with np.errstate(over="ignore", invalid="ignore"):
        rounded = (np.rint(values * scale) / scale).astype(values.dtype)
    return np.where(np.abs(exponent) < 290, rounded, values)


def _ahead(items: Iterable, work: Callable, threads: int = 2) -> Iterator:
    """``work(item)`` for each item, in order, computed by ``threads`` threads a few items ahead (the
    Arrow writers and numpy release the GIL while they format, encode and copy)."""
    with ThreadPoolExecutor(threads) as pool:
        pending: list = []
        for item in items:
            pending.append(pool.submit(work, item))
            if len(pending) > 2 * threads:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def _write_csv(table: ad.AnnData, target: Path) -> None:
    """The CSV, a block of rows formatted per thread by pyarrow (the shortest decimal that reads back to
    each value, after the genes' values are rounded to 6 significant digits: the ``%.6g`` of before, and a
    fifth smaller than all of float32's digits; 10^5 x 785 log-scale values take ~10 CPU s either way)."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    schema, batches = roi_batches(table, digits=6)

    def text(batch: Callable[[], pa.RecordBatch]) -> pa.Buffer:
        sink = pa.BufferOutputStream()
        options = pa_csv.WriteOptions(include_header=False, quoting_style="needed")
        pa_csv.write_csv(batch(), sink, write_options=options)
        return sink.getvalue()

    with open(target, "wb") as file:
        header = pa.BufferOutputStream()
        pa_csv.write_csv(schema.empty_table(), header, write_options=pa_csv.WriteOptions(quoting_style="needed"))
        file.write(header.getvalue())
        for buffer in _ahead(batches, text):
            file.write(buffer)


def _write_parquet(table: ad.AnnData, target: Path) -> None:
    """The Parquet file: one row group per block of ROIs, snappy-compressed, no dictionaries (the values
    hardly repeat; dictionary encoding doubled the time)."""
    import pyarrow.parquet as pq

    schema, batches = roi_batches(table)
    with pq.ParquetWriter(target, schema, compression="snappy", use_dictionary=False) as writer:
        for batch in _ahead(batches, lambda make: make()):  # the next batches are made while one is encoded
            writer.write_batch(batch)


def write_csv(table: ad.AnnData, path: str | os.PathLike) -> Path:
    """Write `roi_frame` through a temporary file, so no half-written CSV is left."""
    return write_table_files(table, csv=path)[0]


def write_h5ad(table: ad.AnnData, path: str | os.PathLike) -> Path:
    """Write the ROI table as .h5ad through a temporary file."""
    return write_table_files(table, h5ad=path)[0]


def write_table_files(
    table: ad.AnnData,
    csv: str | os.PathLike | None = None,
    h5ad: str | os.PathLike | None = None,
    parquet: str | os.PathLike | None = None,
) -> list[Path]:
    """Write the ROI table as CSV, .h5ad and/or Parquet: all of them or none.

    Each goes to a temporary sibling first; only when every one is complete are they renamed onto their
    names, so a failure (a full disk, a missing folder) leaves neither a half file nor half the outputs."""
    targets: list[tuple[Path, str, str, Callable[[Path], object]]] = []
    if csv is not None:
        targets.append((Path(csv), "the CSV", Path(csv).suffix, lambda target: _write_csv(table, target)))
    if parquet is not None:
        targets.append((Path(parquet), "the Parquet file", ".parquet", lambda target: _write_parquet(table, target)))
    if h5ad is not None:
        if Path(h5ad).suffix != ".h5ad":
            raise GenemapInputError(f"{h5ad}: an AnnData file's name must end in .h5ad")
        targets.append((Path(h5ad), "the AnnData file", ".h5ad", table.write_h5ad))
    for path, what, _, _ in targets:
        if path.is_dir():
            raise GenemapInputError(f"{path}: is a folder; expected a file name for {what}")
    current = 0  # the output being written, for the message
    try:
        with contextlib.ExitStack() as stack:
            for index, (path, _, suffix, write) in enumerate(targets):
                current = index
                temporary = stack.enter_context(atomic_file(path, suffix))
                write(temporary)
            # leaving the stack renames every temporary onto its name (last first), or removes them all
    except OSError as error:
        path, what = targets[current][:2]
        raise GenemapInputError(f"{path}: cannot write {what} ({_os_reason(error)})") from None
    return [target[0] for target in targets]


def _os_reason(error: OSError) -> str:
    """The short reason of an OSError (h5py puts the C library's one deep inside a long message)."""
    found = re.search(r"error message = '([^']*)'", str(error))
    if found:
        return found.group(1)
    return error.strerror or str(error).split(" (")[0]


# --- SpatialData ---------------------------------------------------------------------------------------------
def roi_elements(rois: gpd.GeoDataFrame, table: ad.AnnData) -> tuple[dict, ad.AnnData]:
    """SpatialData elements for ROIs and their table: shapes by key (circles, polygons; only the kinds
    present) and the table annotating them (``region``, ``roi_id`` = position in ``rois``)."""
    import geopandas as gpd
    import shapely
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    from .canonical import COORDINATE_SYSTEM

    names = np.array([str(name) for name in rois.index], dtype=object)
    if list(names) != list(table.obs_names.astype(str)):
        raise GenemapInputError("the ROI table's rows do not match the ROIs (make it with roi_table)")
    is_circle = np.asarray(shapely.get_type_id(rois.geometry.values) == 0)
    roi_id = np.arange(len(rois))
    shapes = {}
    for key, members in ((ROI_CIRCLES_KEY, is_circle), (ROI_POLYGONS_KEY, ~is_circle)):
        if not members.any():
            continue
        columns = {"name": names[members]}
        if key == ROI_CIRCLES_KEY:
            columns["radius"] = circle_radii(rois)[members]
        frame = gpd.GeoDataFrame(columns, geometry=list(rois.geometry.values[members]), index=roi_id[members])
        shapes[key] = ShapesModel.parse(frame, transformations={COORDINATE_SYSTEM: Identity()})
    annotated = table.copy()
    annotated.obs["region"] = pd.Categorical(
        np.where(is_circle, ROI_CIRCLES_KEY, ROI_POLYGONS_KEY), categories=list(shapes)
    )
    annotated.obs["roi_id"] = roi_id
    return shapes, TableModel.parse(annotated, region=list(shapes), region_key="region", instance_key="roi_id")


def write_spatialdata(
    rois: gpd.GeoDataFrame, table: ad.AnnData, sdata: sd.SpatialData | None, path: str | os.PathLike
) -> Path:
    """Save ROIs and their table as SpatialData at ``path``.

    When ``path`` is the store ``sdata`` was read from (or any existing SpatialData store), the ROI elements
    go into it (`write_rois_into_store`); otherwise a new store gets the slide ``sdata`` plus the ROIs."""
    from .store import is_zarr_store, write_store

    path = Path(path)
    shapes, annotated = roi_elements(rois, table)
    if is_zarr_store(path):
        written = write_rois_into_store(path, shapes, annotated)
        if sdata is not None and sdata.path is not None and Path(sdata.path).resolve() == path.resolve():
            _replace_in_memory(sdata, shapes, annotated)
        return written
    if path.exists():
        raise GenemapInputError(f"{path}: exists and is not a SpatialData store; choose another path")
    if sdata is None:
        raise GenemapInputError(f"{path}: a new store needs the slide (open one first)")
    import spatialdata as sd

    slide = sd.SpatialData(
        images=dict(sdata.images),
        labels=dict(sdata.labels),
        points=dict(sdata.points),
        shapes={**{k: v for k, v in sdata.shapes.items() if k not in ROI_KEYS}, **shapes},
        tables={**{k: v for k, v in sdata.tables.items() if k != ROI_TABLE_KEY}, ROI_TABLE_KEY: annotated},
        attrs=dict(sdata.attrs),
    )
    return write_store(slide, path, overwrite=False)


def write_rois_into_store(store: str | os.PathLike, shapes: dict, table: ad.AnnData) -> Path:
    """Put ROI elements into an existing zarr v3 SpatialData store without ever leaving one half-written.

    The elements are written to a temporary sibling store first; each then replaces its namesake by a
    directory rename (shapes first, the table that refers to them last), stale ROI elements are moved out,
    and the store's consolidated metadata is rewritten. spatialdata's ``write_element`` cannot do this: it
    refuses to overwrite an element of the store it is backed by, and deleting first leaves a gap."""
    import spatialdata as sd
    import zarr

    store = Path(store)
    if not (store / "zarr.json").is_file():
        raise GenemapInputError(f"{store}: not a zarr v3 SpatialData store; save the ROIs to a new store instead")
    work = store.with_name(f".{store.name}.rois-{uuid.uuid4().hex[:8]}.partial")
    try:
        with quiet_zarr():
            sd.SpatialData(shapes=shapes, tables={ROI_TABLE_KEY: table}).write(work / "new.zarr")
        retired = work / "retired"
        retired.mkdir()
        moves = [("shapes", key) for key in shapes] + [("tables", ROI_TABLE_KEY)]
        for group, key in moves:
            target, source = store / group / key, work / "new.zarr" / group / key
            if not (store / group).is_dir():  # a store without any shapes or tables yet: move the group's zarr.json
                (store / group).mkdir()
                shutil.copy2(work / "new.zarr" / group / "zarr.json", store / group / "zarr.json")
            if target.exists():
                os.replace(target, retired / f"{group}-{key}")
            os.replace(source, target)
        for key in ROI_KEYS:
            if key not in shapes and (store / "shapes" / key).exists():
                os.replace(store / "shapes" / key, retired / f"shapes-{key}")
        with warnings.catch_warnings():
            # that parquet files are not zarr nodes, and that consolidation is not in the v3 spec (spatialdata uses it)
            warnings.filterwarnings("ignore", category=UserWarning, module="zarr")
            zarr.consolidate_metadata(str(store))
    except OSError as error:
        raise GenemapInputError(f"{store}: cannot write the ROIs ({error.strerror or error})") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return store


def _replace_in_memory(sdata, shapes: dict, table) -> None:
    """Keep an open slide in step with its store after `write_rois_into_store`."""
    for key in ROI_KEYS:
        if key in sdata.shapes and key not in shapes:
            del sdata.shapes[key]
    if ROI_TABLE_KEY in sdata.tables:
        del sdata.tables[ROI_TABLE_KEY]
    for key, element in shapes.items():
        sdata.shapes[key] = element
    sdata.tables[ROI_TABLE_KEY] = table


def read_rois(sdata: sd.SpatialData) -> tuple[gpd.GeoDataFrame | None, ad.AnnData | None]:
    """The ROIs a slide holds (as written by `write_spatialdata`, in their original order) and their
    table in the same order, or (None, None); the table is None when the store has none."""
    import geopandas as gpd

    parts = []
    for key in ROI_KEYS:
        if key in sdata.shapes:
            element = sdata.shapes[key]
            names = element["name"].astype(str) if "name" in element else [f"{key} {i}" for i in element.index]
            part = gpd.GeoDataFrame(
                {
                    "kind": "circle" if key == ROI_CIRCLES_KEY else "polygon",
                    "radius": element["radius"].to_numpy(float) if "radius" in element else np.nan,
                    "roi_id": np.asarray(element.index),
                },
                geometry=list(element.geometry.values),
                index=pd.Index(list(names), name="roi", dtype=object),
            )
            parts.append(part)
    if not parts:
        return None, None
    rois = pd.concat(parts).sort_values("roi_id", kind="stable")
    table = sdata.tables.get(ROI_TABLE_KEY)
    if table is not None:
        table = table[[name for name in rois.index if name in table.obs_names]].copy()
    return rois.drop(columns="roi_id"), table


# --- a store's saved expression ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SavedExpression:
    """The ROI table a store holds, by ROI name: shown when no model is running to recompute it."""

    genes: list[str]
    rows: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (X row, integral row)
    uns: dict
    source: str  # the store
    model: str  # which model computed it, in words

    def note(self) -> str:
        """The status line saying where the values come from."""
        return (
            f"showing the saved expression from {Path(self.source).name} ({self.model}); a running model recomputes it"
        )


def saved_expression(sdata: sd.SpatialData) -> SavedExpression | None:
    """The `roi_expression` table of a slide that holds ROIs (as `write_spatialdata` saves it), or None."""
    rois, table = read_rois(sdata)
    if rois is None or table is None or table.n_obs == 0:
        return None
    values = table.X.toarray() if hasattr(table.X, "toarray") else np.asarray(table.X)
    values = np.asarray(values, dtype=np.float32)
    integral = (
        np.asarray(table.layers["integral"], np.float32) if "integral" in table.layers else np.full_like(values, np.nan)
    )
    uns = dict(table.uns.get("genemap") or {})
    if uns.get("model"):
        model = f"model {uns['model']}"
    elif uns.get("model_sha256"):
        model = f"model sha256 {str(uns['model_sha256'])[:12]}"
    else:
        model = "model not recorded"
    rows = {str(name): (values[i], integral[i]) for i, name in enumerate(table.obs_names)}
    source = str(sdata.path) if sdata.path is not None else "the slide"
    return SavedExpression([str(g) for g in table.var_names], rows, uns, source, model)
