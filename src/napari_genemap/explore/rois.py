"""Regions of interest drawn on a slide: geometry, names and comparisons (no Qt, no napari).

ROIs live in slide pixels (x = column, y = row) as a GeoDataFrame indexed by unique names: circles are
shapely Points with a ``radius`` column, polygons are Polygons, and ``kind`` says which. That is what the
tile service aggregates (`infer.aggregate.aggregate_shapes`), what `roi_table` turns an aggregation into,
and what `io.rois` writes. napari shapes come in as (row, column) vertices in slide pixels.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..errors import GenemapInputError
from ..io.rois import circle_radii

if TYPE_CHECKING:
    import anndata as ad
    import geopandas as gpd

#: napari shape types that enclose an area, and the ROI kind each becomes
AREA_SHAPES = {"ellipse": "circle", "rectangle": "polygon", "polygon": "polygon"}
#: what an ROI without a name of its own is called: "ROI 1", "ROI 2", ...
NAME_PREFIX = "ROI "


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


def polygon_area(vertices: np.ndarray) -> float:
    """The area enclosed by (row, column) vertices, in squared slide pixels (0 for fewer than 3)."""
    import shapely

    vertices = np.asarray(vertices, dtype=np.float64)[:, -2:]
    return float(shapely.Polygon(vertices).area) if len(vertices) >= 3 else 0.0


def rois_from_shapes(data: Sequence[np.ndarray], shape_types: Sequence[str], names: Sequence[str]) -> gpd.GeoDataFrame:
    """napari shapes (vertices as (row, column) in slide pixels) -> ROIs in slide pixels, indexed by name.

    Ellipses become circles (see `circle_from_ellipse`); rectangles and polygons become polygons (made
    valid when drawn crossing themselves). Lines, paths and shapes without area raise a one-line error."""
    import geopandas as gpd
    import shapely

    names = [str(name) for name in names]
    if not len(data) == len(shape_types) == len(names):
        raise GenemapInputError(f"{len(data)} shapes, {len(shape_types)} shape types and {len(names)} names")
    check_names(names)
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


def circles(centers: np.ndarray, radii: np.ndarray, names: Sequence[str]) -> gpd.GeoDataFrame:
    """Circles with ``centers`` (n, 2) as (x, y) and ``radii`` (n,) in slide pixels, as ROIs."""
    import geopandas as gpd
    import shapely

    names = [str(name) for name in names]
    check_names(names)
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
    return gpd.GeoDataFrame(
        {"kind": "circle", "radius": np.asarray(radii, dtype=np.float64)},
        geometry=shapely.points(centers),
        index=pd.Index(names, name="roi", dtype=object),
    )


def circles_outside(centers: np.ndarray, radii: np.ndarray, width: float, height: float) -> np.ndarray:
    """Which circles ((x, y) centres and radii, slide pixels) lie wholly outside ``0..width x 0..height``:
    their integrals are zero (nothing there was predicted), which a user should hear about."""
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
    radii = np.asarray(radii, dtype=np.float64).reshape(-1)
    x, y = centers[:, 0], centers[:, 1]
    return np.asarray((x + radii <= 0) | (y + radii <= 0) | (x - radii >= width) | (y - radii >= height))


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
    for name, geometry, radius in zip(rois.index, rois.geometry, circle_radii(rois)):
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


# --- names ---------------------------------------------------------------------------------------------------
def check_names(names: Sequence[str]) -> None:
    """Every ROI has a name of its own: raise a one-line error for an empty or repeated one."""
    if any(not name.strip() for name in names):
        raise GenemapInputError("every ROI needs a name; found an empty one")
    duplicated = pd.Index(names)[pd.Index(names).duplicated()].unique()
    if len(duplicated):
        raise GenemapInputError(f"ROI names must be unique; {duplicated[0]!r} is used more than once")


def fill_names(names: Sequence[str | None]) -> list[str]:
    """``names`` with each empty or repeated one (after its first use) replaced by the next free "ROI n",
    counting on from the largest n taken."""
    filled = ["" if pd.isna(name) else str(name) for name in names]
    bad = [not name.strip() or name in filled[:position] for position, name in enumerate(filled)]
    taken = {name for name, is_bad in zip(filled, bad) if not is_bad}
    numbers = [name.removeprefix(NAME_PREFIX) for name in taken if name.startswith(NAME_PREFIX)]
    number = max((int(n) for n in numbers if n.isdigit()), default=0)
    for position in [p for p, is_bad in enumerate(bad) if is_bad]:
        number += 1
        while f"{NAME_PREFIX}{number}" in taken:
            number += 1
        filled[position] = f"{NAME_PREFIX}{number}"
    return filled


def renamed(names: Sequence[str], row: int, name: str) -> list[str]:
    """``names`` with ROI ``row`` called ``name`` (stripped); a one-line error for an empty or taken name."""
    name, names = name.strip(), list(names)
    if not name:
        raise GenemapInputError("an ROI needs a name")
    if name in names[:row] + names[row + 1 :]:
        raise GenemapInputError(f"the name {name!r} is taken; choose another")
    names[row] = name
    return names


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
    radius (circles) and area in µm and in slide pixels (`io.rois.UNIT_COLUMNS`), and the geometry as WKT
    (slide pixels); ``obsm["spatial"]`` is the centre in slide pixels. When ``table`` is already in the
    ROIs' order the result shares its matrices (X, layers) rather than copying them."""
    import shapely

    names = [str(name) for name in rois.index]
    check_names(names)
    missing = np.flatnonzero(~pd.Index(names).isin(table.obs_names))
    if len(missing):
        raise GenemapInputError(f"no expression for ROI {names[missing[0]]!r}: aggregate it first")
    if not (np.isfinite(slide_mpp) and slide_mpp > 0):
        raise GenemapInputError(f"slide µm per pixel {slide_mpp}: expected a positive number")
    if names == list(table.obs_names.astype(str)):
        # already in the ROIs' order: a new table around the same matrices, not a copy of them (10^5 ROIs x
        # 785 genes are 0.6 GB in X and layers["integral"])
        import anndata as ad

        out = ad.AnnData(
            X=table.X,
            var=table.var.copy(),
            layers=dict(table.layers),
            obsm=dict(table.obsm),
            uns=copy.deepcopy(dict(table.uns)),
        )
    else:
        out = table[names].copy()
    geometry = np.asarray(rois.geometry.values)  # shapely's own arrays: no pandas dispatch per call
    radius = circle_radii(rois)
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
