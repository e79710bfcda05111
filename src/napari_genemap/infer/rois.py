"""Regions of interest drawn on a slide: conversion from napari shapes, comparisons and exports (no Qt).

ROIs live in slide pixels (x = column, y = row) as a GeoDataFrame indexed by unique names: circles are
shapely Points with a ``radius`` column, polygons are Polygons, and ``kind`` says which. That is what the
tile service aggregates (`aggregate.aggregate_shapes`) and what the exports write:

- CSV: name, kind, x_um, y_um, radius_um (circles), area_um2, then the same in slide pixels (x_px, y_px,
  radius_px, area_px2), then one column per gene with the protocol-normalised profile: every column
  says its unit, as the panel shows µm and the geometry lives in pixels;
- .h5ad: the aggregation's AnnData (X protocol-normalised, ``layers["integral"]`` raw-scale) with the
  same columns in ``obs`` and the ROI geometry as WKT in slide pixels in ``obs["geometry_wkt_px"]``;
- SpatialData: shapes elements ``roi_circles`` (points + ``radius``) and ``roi_polygons`` (one element per
  geometry type, as spatialdata-plot and napari-spatialdata draw an element by its first geometry's type)
  and a table ``roi_expression`` annotating both (``region``/``roi_id``), all in ``"global"``; the geometry
  stays in slide pixels (the canonical form), the table's ``obs`` is the .h5ad's.

A store reopened without a model still shows its saved table (`saved_expression`), and the panel's undo
keeps snapshots of the ROIs (`RoiHistory`).
"""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..errors import GenemapInputError
from ..io.atomic import atomic_file, quiet_zarr

if TYPE_CHECKING:
    import anndata as ad
    import geopandas as gpd
    import spatialdata as sd

ROI_CIRCLES_KEY = "roi_circles"
ROI_POLYGONS_KEY = "roi_polygons"
ROI_TABLE_KEY = "roi_expression"
ROI_KEYS = (ROI_CIRCLES_KEY, ROI_POLYGONS_KEY)
ROI_LAYER_NAME = "ROIs"
#: napari shape types that enclose an area, and the ROI kind each becomes
AREA_SHAPES = {"ellipse": "circle", "rectangle": "polygon", "polygon": "polygon"}


# --- napari shapes <-> ROIs ----------------------------------------------------------------------------------
def roi_kind(shape_type: str) -> str | None:
    """ "circle" or "polygon" for a napari shape type, None for lines and paths (they enclose no area)."""
    return AREA_SHAPES.get(str(shape_type))


def circle_from_ellipse(vertices: np.ndarray) -> tuple[float, float, float]:
    """(x, y, radius) of the circle standing for a napari ellipse (4 bounding-box corners, (row, column)).

    The radius is the mean half-axis, so a circle drawn slightly oval keeps about its size."""
    corners = np.asarray(vertices, dtype=np.float64)[:, -2:]
    row, column = corners.mean(0)
    half_axes = np.linalg.norm(corners[1] - corners[0]) / 2, np.linalg.norm(corners[2] - corners[1]) / 2
    return float(column), float(row), float(np.mean(half_axes))


def ellipse_corners(x: float, y: float, radius: float) -> np.ndarray:
    """The 4 (row, column) corners napari stores for a circle of ``radius`` at (x, y) (all slide pixels)."""
    return np.array(
        [[y - radius, x - radius], [y - radius, x + radius], [y + radius, x + radius], [y + radius, x - radius]]
    )


def rois_from_shapes(data: Sequence[np.ndarray], shape_types: Sequence[str], names: Sequence[str]) -> gpd.GeoDataFrame:
    """napari shapes (vertices as (row, column) in slide pixels) -> ROIs in slide pixels, indexed by name.

    Ellipses become circles (see `circle_from_ellipse`); rectangles and polygons become polygons (made
    valid when drawn crossing themselves). Lines, paths and shapes without area raise a one-line error."""
    import geopandas as gpd
    import shapely

    names = [str(name) for name in names]
    if not len(data) == len(shape_types) == len(names):
        raise GenemapInputError(f"{len(data)} shapes, {len(shape_types)} shape types and {len(names)} names")
    _check_names(names)
    geometries, radii, kinds = [], [], []
    for vertices, shape_type, name in zip(data, shape_types, names):
        kind = roi_kind(shape_type)
        if kind is None:
            raise GenemapInputError(f"ROI {name!r} is a {shape_type}: only circles, ellipses and polygons have an area")
        vertices = np.asarray(vertices, dtype=np.float64)[:, -2:]
        if kind == "circle":
            x, y, radius = circle_from_ellipse(vertices)
            if not radius > 0:
                raise GenemapInputError(f"ROI {name!r}: the circle has no radius")
            geometries.append(shapely.Point(x, y))
            radii.append(radius)
        else:
            geometries.append(_valid_polygon(vertices[:, ::-1], name))
            radii.append(np.nan)
        kinds.append(kind)
    index = pd.Index(names, name="roi", dtype=object)
    return gpd.GeoDataFrame({"kind": kinds, "radius": np.asarray(radii, float)}, geometry=geometries, index=index)


def _valid_polygon(xy: np.ndarray, name: str):
    import shapely

    if len(xy) < 3:
        raise GenemapInputError(f"ROI {name!r}: a polygon needs at least 3 vertices")
    polygon = shapely.Polygon(xy)
    if not polygon.is_valid:  # drawn crossing itself: keep every enclosed part
        fixed = shapely.make_valid(polygon)
        parts = [g for g in getattr(fixed, "geoms", [fixed]) if isinstance(g, shapely.Polygon | shapely.MultiPolygon)]
        polygon = shapely.union_all(parts) if parts else shapely.Polygon()
    if polygon.is_empty or polygon.area <= 0:
        raise GenemapInputError(f"ROI {name!r}: the polygon encloses no area")
    return polygon


def shapes_from_rois(rois: gpd.GeoDataFrame) -> tuple[list[np.ndarray], list[str], list[str]]:
    """ROIs -> napari shapes: (vertices as (row, column) in slide pixels, shape types, names).

    Multipolygons become one polygon per part, named "<name> (k)"."""
    import shapely

    data, types, names = [], [], []
    for name, geometry, radius in zip(rois.index, rois.geometry, _radii(rois)):
        if isinstance(geometry, shapely.Point):
            data.append(ellipse_corners(geometry.x, geometry.y, float(radius)))
            types.append("ellipse")
            names.append(str(name))
            continue
        parts = list(geometry.geoms) if isinstance(geometry, shapely.MultiPolygon) else [geometry]
        for number, part in enumerate(parts, 1):
            xy = np.asarray(part.exterior.coords)[:-1]
            data.append(xy[:, ::-1].copy())
            types.append("polygon")
            names.append(str(name) if len(parts) == 1 else f"{name} ({number})")
    return data, types, names


def _radii(rois) -> np.ndarray:
    return rois["radius"].to_numpy(float) if "radius" in rois else np.full(len(rois), np.nan)


def _check_names(names: Sequence[str]) -> None:
    if any(not name.strip() for name in names):
        raise GenemapInputError("every ROI needs a name; found an empty one")
    duplicated = pd.Index(names)[pd.Index(names).duplicated()].unique()
    if len(duplicated):
        raise GenemapInputError(f"ROI names must be unique; {duplicated[0]!r} is used more than once")


# --- comparing ROIs ------------------------------------------------------------------------------------------
def log2_fold_change(a: np.ndarray, b: np.ndarray, log: str) -> np.ndarray:
    """log2 fold change of profile ``a`` over ``b``, both on the protocol's scale X = log_base(1 + v).

    v is the protocol-scaled expression (counts per 10⁴ for hist2st and triplex; the raw-scale integral for
    hest, which therefore also grows with ROI size). A difference of X values is log_base((1 + v_a) /
    (1 + v_b)): the log ratio with a pseudocount of 1 in the protocol's own units, which stays finite for
    genes absent from one ROI and damps ratios of tiny values. Dividing by log_base(2) makes it log2.
    (A ratio of the X values themselves would be a ratio of logs, with no meaning as a fold change.)"""
    if log not in ("log10", "ln"):
        raise GenemapInputError(f"protocol log {log!r}; expected 'log10' or 'ln'")
    base2 = np.log10(2.0) if log == "log10" else np.log(2.0)
    return (np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) / base2


def protocol_log(table: ad.AnnData) -> str:
    """The log of the protocol that made ``table.X`` (from ``uns["genemap"]["protocol"]``)."""
    protocol = (table.uns.get("genemap") or {}).get("protocol") or {}
    if "log" not in protocol:
        raise GenemapInputError("the ROI table does not say which protocol normalised it (uns['genemap'])")
    return str(protocol["log"])


def fold_changes(table: ad.AnnData, first: str, second: str, n: int = 15) -> pd.Series:
    """The ``n`` genes whose log2 fold change of ROI ``first`` over ``second`` is largest in size (signed)."""
    _require_rows(table, [first, second])
    values = log2_fold_change(_row(table, first), _row(table, second), protocol_log(table))
    series = pd.Series(values, index=table.var_names.astype(str), name=f"log2 FC {first} / {second}")
    order = np.argsort(-np.abs(values), kind="stable")[:n]
    return series.iloc[order]


def top_genes(table: ad.AnnData, name: str, n: int = 15) -> pd.Series:
    """The ``n`` genes of highest protocol-normalised value in ROI ``name``."""
    _require_rows(table, [name])
    values = _row(table, name)
    order = np.argsort(-values, kind="stable")[:n]
    return pd.Series(values[order], index=table.var_names.astype(str)[order], name=name)


def _require_rows(table, names) -> None:
    missing = [name for name in names if name not in table.obs_names]
    if missing:
        raise GenemapInputError(f"no expression for ROI {missing[0]!r} (yet)")


def _row(table, name: str) -> np.ndarray:
    values = table[name].X
    return np.asarray(values.toarray() if hasattr(values, "toarray") else values, dtype=np.float64).ravel()


# --- the export table ----------------------------------------------------------------------------------------
def roi_table(rois: gpd.GeoDataFrame, table: ad.AnnData, slide_mpp: float) -> ad.AnnData:
    """The aggregation ``table`` in the ROIs' order with what every export needs in ``obs``: kind, centre,
    radius (circles) and area in µm and in slide pixels (`UNIT_COLUMNS`), and the geometry as WKT (slide
    pixels); ``obsm["spatial"]`` is the centre in slide pixels."""
    import shapely

    names = [str(name) for name in rois.index]
    _check_names(names)
    missing = [name for name in names if name not in table.obs_names]
    if missing:
        raise GenemapInputError(f"no expression for ROI {missing[0]!r}: aggregate it first")
    if not (np.isfinite(slide_mpp) and slide_mpp > 0):
        raise GenemapInputError(f"slide µm per pixel {slide_mpp}: expected a positive number")
    out = table[names].copy()
    geometry = rois.geometry.values
    radius = _radii(rois)
    is_circle = np.asarray(shapely.get_type_id(geometry) == 0)
    area = np.where(is_circle, np.pi * radius**2, shapely.area(geometry))
    x = np.where(is_circle, shapely.get_x(geometry), shapely.get_x(shapely.centroid(geometry)))
    y = np.where(is_circle, shapely.get_y(geometry), shapely.get_y(shapely.centroid(geometry)))
    radius = np.where(is_circle, radius, np.nan)
    out.obs = pd.DataFrame(
        {
            "kind": np.where(is_circle, "circle", "polygon"),
            "x_um": x * slide_mpp,
            "y_um": y * slide_mpp,
            "radius_um": radius * slide_mpp,
            "area_um2": area * slide_mpp**2,
            "x_px": x,
            "y_px": y,
            "radius_px": radius,
            "area_px2": area,
            "geometry_wkt_px": shapely.to_wkt(geometry, rounding_precision=-1),
        },
        index=pd.Index(names, name="roi"),
    )
    out.obsm["spatial"] = np.column_stack([x, y])
    out.uns["genemap"] = {
        **dict(out.uns.get("genemap") or {}),
        "slide_mpp": float(slide_mpp),
        "coordinates": "obs *_um: µm; obs *_px, geometry_wkt_px and obsm['spatial']: slide pixels (x = column)",
    }
    return out


#: the geometry columns of `roi_table` and the CSV, units in their names (µm first, as the panel shows)
UNIT_COLUMNS = ("x_um", "y_um", "radius_um", "area_um2", "x_px", "y_px", "radius_px", "area_px2")


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


def write_csv(table: ad.AnnData, path: str | os.PathLike) -> Path:
    """Write `roi_frame` (6 significant digits) through a temporary file, so no half-written CSV is left."""
    return _write_through_temporary(
        Path(path), lambda target: roi_frame(table).to_csv(target, index=False, float_format="%.6g"), "the CSV"
    )


def write_h5ad(table: ad.AnnData, path: str | os.PathLike) -> Path:
    """Write the ROI table as .h5ad through a temporary file."""
    path = Path(path)
    if path.suffix != ".h5ad":
        raise GenemapInputError(f"{path}: an AnnData file's name must end in .h5ad")
    return _write_through_temporary(path, table.write_h5ad, "the AnnData file", suffix=".h5ad")


def _write_through_temporary(path: Path, write, what: str, suffix: str = "") -> Path:
    """``write(temporary)`` then rename onto ``path``: no half-written file is ever left at ``path``."""
    try:
        with atomic_file(path, suffix) as temporary:
            write(temporary)
    except OSError as error:
        raise GenemapInputError(f"{path}: cannot write {what} ({error.strerror or error})") from None
    return path


# --- SpatialData ---------------------------------------------------------------------------------------------
def roi_elements(rois: gpd.GeoDataFrame, table: ad.AnnData) -> tuple[dict, ad.AnnData]:
    """SpatialData elements for ROIs and their `roi_table`: shapes by key (circles, polygons; only the
    kinds present) and the table annotating them (``region``, ``roi_id`` = position in ``rois``)."""
    import geopandas as gpd
    import shapely
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    from ..io.canonical import COORDINATE_SYSTEM

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
            columns["radius"] = _radii(rois)[members]
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
    """Save ROIs and their `roi_table` as SpatialData at ``path``.

    When ``path`` is the store ``sdata`` was read from (or any existing SpatialData store), the ROI elements
    go into it (`write_rois_into_store`); otherwise a new store gets the slide ``sdata`` plus the ROIs."""
    from ..io.store import is_zarr_store, write_store

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


def roi_layer(sdata: sd.SpatialData) -> tuple | None:
    """The slide's ROIs as a napari shapes layer-data tuple (in slide pixels, scaled to µm), or None."""
    from ..io.canonical import slide_info

    rois, _ = read_rois(sdata)
    if rois is None:
        return None
    data, types, names = shapes_from_rois(rois)
    info = slide_info(sdata)
    mpp = float(info["mpp"])
    meta = {
        "name": ROI_LAYER_NAME,
        "shape_type": types,
        "features": pd.DataFrame({"name": pd.Series(names, dtype=object)}),
        **roi_layer_style(sdata),
        "scale": (mpp, mpp),
        "units": ("µm", "µm"),
        "metadata": {"genemap": {"element": ROI_LAYER_NAME, **info}, "sdata": sdata},
    }
    return data, meta, "shapes"


def roi_layer_style(sdata: sd.SpatialData | None = None) -> dict:
    """How ROIs are drawn: yellow outlines labelled with their name, a width that suits the slide's size."""
    from ..io.canonical import image_levels

    side = 2048
    if sdata is not None:
        levels, scales = image_levels(sdata)
        side = max(levels[0].shape[1:]) * scales[0]
    return {
        "edge_color": "yellow",
        "face_color": [1.0, 1.0, 0.0, 0.08],
        "edge_width": max(2.0, side / 500),
        # the name above each ROI, as large as the table's text and in the outline's colour
        "text": {"string": "{name}", "color": "yellow", "size": 12, "anchor": "upper_left"},
        "feature_defaults": {"name": ""},
    }


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


# --- undo ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class RoiState:
    """The ROIs as the shapes layer holds them: vertices ((row, column), slide pixels), shape types, names."""

    data: tuple[np.ndarray, ...]
    types: tuple[str, ...]
    names: tuple[str, ...]

    @classmethod
    def of(cls, data: Sequence[np.ndarray], types: Sequence[str], names: Sequence[str]) -> RoiState:
        return cls(tuple(np.array(v, dtype=np.float64) for v in data), tuple(map(str, types)), tuple(map(str, names)))

    def same(self, other: RoiState) -> bool:
        return (
            self.types == other.types
            and self.names == other.names
            and all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(self.data, other.data))
        )


class RoiHistory:
    """Snapshots of the ROIs after each add, delete, move or rename (the last is the present); undo steps back."""

    def __init__(self, limit: int = 200):
        self.limit = limit
        self._states: list[RoiState] = []

    def __len__(self) -> int:
        return len(self._states)

    def record(self, state: RoiState) -> None:
        """Remember ``state`` when it differs from the last one (re-sent events add nothing)."""
        if self._states and self._states[-1].same(state):
            return
        self._states.append(state)
        del self._states[: -self.limit]

    def undo(self, present: RoiState) -> RoiState | None:
        """The state before ``present`` (which is recorded first, so an unrecorded change is undone too),
        or None when there is nothing to go back to."""
        self.record(present)
        if len(self._states) < 2:
            return None
        self._states.pop()
        return self._states[-1]
