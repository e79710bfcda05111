"""Aggregate a predicted gene map over circles and polygons (ROIs) -> an AnnData, one row per ROI.

Each ROI is the integral of the level-0 map over its area (exact partial-pixel coverage at the edge:
`models.aggregation` for circles, shapely intersection areas for polygons), kept on the raw scale in
``layers["integral"]`` and normalised by the model's protocol in ``X``. The map comes either from a
finished prediction store (`read_prediction`) or from a live `TileEngine`, which predicts the tiles an ROI
needs before it is read. Circles go through `disk_sums.integrate_disks` (streamed by map region and gene
group; why it is built that way is written there; ``benchmarks/roi_scale.py`` times 10^4 and 10^5 circles).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data.protocols import Protocol
from ..errors import GenemapInputError

#: Largest map block read at once (genes x rows x columns x 4 bytes); big ROIs are read a few genes at a time.
READ_BUDGET_BYTES = 256 * 2**20
#: ROIs normalised at once (temporaries of this many rows x genes stay below numpy's 4 MB huge pages, which
#: the kernel zeroes afresh for every allocation)
NORMALISE_ROWS = 512


@dataclass
class GeneMapSource:
    """Level 0 of a gene map: a region reader, its size, genes, pixel size (slide px) and protocol."""

    read: Callable[[int, int, int, int, slice], np.ndarray]  # (i0, i1, j0, j1, genes) -> (g, rows, cols)
    shape: tuple[int, int]
    genes: list[str]
    pixel_size: float  # slide pixels per map pixel
    protocol: Protocol
    slide_mpp: float
    provenance: dict
    read_total: Callable[[int, int, int, int], np.ndarray] | None = None  # (1, rows, cols) when genes is a subset
    chunks: tuple[int, int] | None = None  # (rows, columns) of the storage chunks, which reads should follow
    threaded_reads: bool = False  # whether ``read`` may run in a worker thread (to overlap with the sums)

    @classmethod
    def from_engine(cls, engine, slide_mpp: float, cached_only: bool = False) -> GeneMapSource:
        """A live engine's level 0. It predicts the tiles a read needs first, unless ``cached_only``: then
        it reads the cache as it is (missing tiles read as the store's fill value, 0), for a caller that
        has checked its ROIs' tiles are cached and must not wait for the model."""
        if cached_only:
            read = lambda i0, i1, j0, j1, genes: engine.cache.read(0, i0, i1, j0, j1, genes)  # noqa: E731
        else:
            read = lambda i0, i1, j0, j1, genes: engine.read(0, i0, i1, j0, j1, genes)  # noqa: E731
        return cls(
            read=read,
            shape=engine.level_shape(0),
            genes=list(engine.genes),
            pixel_size=engine.grid.map_pixel_size(0),
            protocol=engine.loaded.protocol,
            slide_mpp=slide_mpp,
            provenance={"model_sha256": engine.loaded.digest, "cache": str(engine.cache.path)},
            chunks=_tile_chunks(engine),
        )


def _tile_chunks(engine) -> tuple[int, int] | None:
    """The engine's tile side in level-0 map pixels (its cache's chunks), if it says."""
    side = getattr(getattr(engine, "grid", None), "tile_map", None)
    return (int(side), int(side)) if isinstance(side, int) and side > 0 else None


def read_prediction(path: str | os.PathLike) -> GeneMapSource:
    """The gene map of a store written by ``genemap predict``."""
    import spatialdata as sd

    from ..io import slide_mpp
    from ..io.canonical import ATTRS_KEY
    from .predict import GENE_MAPS_KEY, TOTAL_KEY

    path = Path(path)
    if not path.exists():
        raise GenemapInputError(f"{path}: no such prediction store")
    try:
        sdata = sd.read_zarr(path)
    except Exception as error:  # zarr/spatialdata raise many kinds; the user needs the file and the reason
        raise GenemapInputError(f"{path}: not a SpatialData store ({type(error).__name__}: {error})") from None
    genemap_attrs = sdata.attrs.get(ATTRS_KEY)
    prediction = genemap_attrs.get("prediction") if isinstance(genemap_attrs, dict) else None
    if GENE_MAPS_KEY not in sdata.images or not prediction:
        raise GenemapInputError(f"{path}: holds no gene maps (write one with 'genemap predict')")
    if not isinstance(prediction, dict):
        raise GenemapInputError(f"{path}: attribute {ATTRS_KEY}.prediction is not a mapping")
    element = sdata.images[GENE_MAPS_KEY]
    data = _level0(element).data
    genes = [str(g) for g in _level0(element).coords["c"].values]
    try:
        protocol = Protocol.from_dict(prediction.get("protocol"))  # type: ignore[arg-type]  # checked there
    except (GenemapInputError, TypeError, ValueError) as error:
        raise GenemapInputError(f"{path}: attribute {ATTRS_KEY}.prediction.protocol: {error}") from None
    pixel_size = _map_pixel_size(path, element, prediction)
    gene_maps = _zarr_level0(path, GENE_MAPS_KEY, data.shape)

    def read(i0: int, i1: int, j0: int, j1: int, genes: slice) -> np.ndarray:
        return _load(path, GENE_MAPS_KEY, gene_maps, data, (genes, slice(i0, i1), slice(j0, j1)))

    read_total = None
    if len(genes) < protocol.n_genes:  # a subset was written: its normalisation needs the all-gene total
        if TOTAL_KEY not in sdata.images:
            raise GenemapInputError(f"{path}: holds {len(genes)} of the model's genes but no '{TOTAL_KEY}' image")
        total = _level0(sdata.images[TOTAL_KEY]).data
        total_array = _zarr_level0(path, TOTAL_KEY, total.shape)

        def read_total(i0: int, i1: int, j0: int, j1: int) -> np.ndarray:
            return _load(path, TOTAL_KEY, total_array, total, (slice(None), slice(i0, i1), slice(j0, j1)))

    chunk_shape = gene_maps.chunks if gene_maps is not None else data.chunksize
    return GeneMapSource(
        read=read,
        shape=(int(data.shape[1]), int(data.shape[2])),
        genes=genes,
        pixel_size=pixel_size,
        protocol=protocol,
        slide_mpp=slide_mpp(sdata),
        provenance={"store": str(path), "model_sha256": prediction.get("model_sha256")},
        read_total=read_total,
        chunks=(int(chunk_shape[1]), int(chunk_shape[2])),
        threaded_reads=True,
    )


def _zarr_level0(path: Path, key: str, shape: tuple[int, ...]):
    """The zarr array behind image ``key``'s finest level, read directly: ~3x faster than through dask for
    a block of all genes (no task graph per chunk). None if the store is laid out otherwise (dask reads)."""
    try:
        import zarr

        group = zarr.open_group(path / "images" / key, mode="r")
        attrs: Any = dict(group.attrs)
        datasets = attrs.get("ome", attrs).get("multiscales", [{}])[0].get("datasets") or [{}]
        array = group[str(datasets[0].get("path", "s0"))]
    except Exception:  # noqa: BLE001 - any surprise in the layout: read through dask as before
        return None
    return array if isinstance(array, zarr.Array) and tuple(array.shape) == tuple(shape) else None


def _load(path: Path, name: str, array, dask_array, selection: tuple) -> np.ndarray:
    """Read a block of a store's image (from zarr when ``array`` is given, else through dask); a damaged
    chunk (codec, checksum, missing file) in one line."""
    try:
        return np.asarray(array[selection] if array is not None else dask_array[selection])
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as error:  # zarr and numcodecs raise many kinds for a damaged chunk
        detail = f"{type(error).__name__}: {error}".splitlines()[0]
        raise GenemapInputError(f"{path}: image '{name}' has a damaged chunk ({detail})") from None


def _map_pixel_size(path: Path, element, prediction: dict) -> float:
    """Slide pixels per map pixel: the element's own Scale transform (what viewers draw), else the
    ``map_pixel_size`` attribute; each must be a positive finite number."""
    from spatialdata.transformations import get_transformation

    try:
        matrix = get_transformation(element, "global").to_affine_matrix(("y", "x"), ("y", "x"))
        scale_y, scale_x = float(matrix[0, 0]), float(matrix[1, 1])
        if np.isfinite(scale_y) and scale_y > 0 and np.isclose(scale_y, scale_x, rtol=1e-6):
            return scale_y
    except Exception:  # noqa: S110 - no usable transform: the attribute decides
        pass
    value = prediction.get("map_pixel_size")
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value) or value <= 0:
        from ..io.canonical import ATTRS_KEY

        raise GenemapInputError(
            f"{path}: attribute {ATTRS_KEY}.prediction.map_pixel_size is {value!r}; expected a positive number "
            "(and the gene maps carry no usable scale transform)"
        )
    return float(value)


def _level0(element):
    """The finest level of a single- or multiscale image element."""
    return element["scale0"]["image"] if getattr(element, "children", None) else element


def aggregate_circles(
    source: GeneMapSource,
    centers: np.ndarray,
    radii: np.ndarray,
    names: Sequence[str] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
):
    """Circles with ``centers`` (n, 2) as (x, y) and ``radii`` (n,) in slide pixels -> AnnData.

    Exact (closed-form partial-pixel areas, float32 sums: ~1e-6 relative), streamed by map region and
    gene group (`disk_sums.integrate_disks`); ``progress`` hears of each region."""
    from .disk_sums import integrate_disks

    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
    radii = np.asarray(radii, dtype=np.float64).reshape(-1)
    if len(centers) != len(radii):
        raise GenemapInputError(f"{len(centers)} circle centres but {len(radii)} radii")
    if np.any(~np.isfinite(radii)) or np.any(radii <= 0) or np.any(~np.isfinite(centers)):
        raise GenemapInputError("circle radii must be positive and centres finite")
    scale = source.pixel_size
    map_centers, map_radii = centers / scale, radii / scale
    chunks, prefetch = source.chunks, source.threaded_reads
    integral = integrate_disks(
        source.read, source.shape, len(source.genes), map_centers, map_radii, chunks, progress, prefetch=prefetch
    )
    total = None
    read_total = source.read_total
    if read_total is not None:  # the all-gene total, for a store that holds some of the genes

        def total_map(i0: int, i1: int, j0: int, j1: int, genes: slice) -> np.ndarray:
            return read_total(i0, i1, j0, j1)[genes]

        total = integrate_disks(total_map, source.shape, 1, map_centers, map_radii, chunks, prefetch=prefetch)
    columns = {"radius": radii, "radius_um": radii * source.slide_mpp}
    return _roi_table(source, integral, centers, names, columns, total)


def aggregate_polygons(source: GeneMapSource, polygons: Sequence, names: Sequence[str] | None = None):
    """Shapely polygons in slide pixels -> AnnData (exact pixel coverage along the boundary)."""
    import shapely
    import shapely.affinity

    integral = np.zeros((len(polygons), len(source.genes)), np.float64)
    read_total = source.read_total
    total = np.zeros((len(polygons), 1), np.float64) if read_total is not None else None
    centers = np.zeros((len(polygons), 2))
    areas = np.zeros(len(polygons))
    scale = source.pixel_size
    height, width = source.shape
    for index, polygon in enumerate(polygons):
        if not isinstance(polygon, shapely.Polygon | shapely.MultiPolygon) or polygon.is_empty or not polygon.is_valid:
            raise GenemapInputError(f"ROI {index}: expected a valid, non-empty polygon")
        centers[index] = polygon.centroid.x, polygon.centroid.y
        areas[index] = polygon.area
        in_map = shapely.affinity.scale(polygon, 1 / scale, 1 / scale, origin=(0, 0))
        x0, y0, x1, y1 = in_map.bounds
        i0, i1 = max(0, int(np.floor(y0))), min(height, int(np.ceil(y1)))
        j0, j1 = max(0, int(np.floor(x0))), min(width, int(np.ceil(x1)))
        if i1 <= i0 or j1 <= j0:
            continue
        rows, columns = np.mgrid[i0:i1, j0:j1]
        boxes = shapely.box(columns.ravel(), rows.ravel(), columns.ravel() + 1, rows.ravel() + 1)
        # whole pixels weigh 1 without computing an intersection; only the boundary's pixels do
        shapely.prepare(in_map)  # speeds up the predicates below, in place
        inside = shapely.contains_properly(in_map, boxes)
        weights = np.where(inside, 1.0, 0.0)
        edge = ~inside & shapely.intersects(in_map, boxes)
        weights[edge] = shapely.area(shapely.intersection(in_map, boxes[edge]))
        weights = weights.reshape(rows.shape).astype(np.float32)
        for genes in _gene_chunks(len(source.genes), weights.size):
            region = np.asarray(source.read(i0, i1, j0, j1, genes), dtype=np.float32)
            integral[index, genes] = np.tensordot(region, weights, axes=([1, 2], [0, 1]))
        if total is not None and read_total is not None:
            region = np.asarray(read_total(i0, i1, j0, j1), dtype=np.float32)
            total[index] = np.tensordot(region, weights, axes=([1, 2], [0, 1]))
    columns = {"area": areas, "area_um2": areas * source.slide_mpp**2}
    return _roi_table(source, integral, centers, names, columns, total)


def _gene_chunks(n_genes: int, pixels: int) -> list[slice]:
    step = max(1, min(n_genes, READ_BUDGET_BYTES // max(1, 4 * pixels)))
    return [slice(start, min(start + step, n_genes)) for start in range(0, n_genes, step)]


def _roi_table(source: GeneMapSource, integral: np.ndarray, centers: np.ndarray, names, columns: dict, total=None):
    import anndata as ad
    import pandas as pd

    names = [str(n) for n in names] if names is not None else [f"roi_{i}" for i in range(len(integral))]
    if len(names) != len(integral) or len(set(names)) != len(names):
        raise GenemapInputError("ROI names must be unique, one per ROI")
    obs = pd.DataFrame({"x": centers[:, 0], "y": centers[:, 1], **columns}, index=pd.Index(names, name="roi"))
    values = np.empty(integral.shape, np.float32)

    def normalise(start: int) -> None:  # a block of rows: no full-size temporaries
        rows = slice(start, start + NORMALISE_ROWS)
        part = None if total is None else np.asarray(total)[rows, 0]
        values[rows] = source.protocol.normalise(integral[rows], part, source.genes)

    with ThreadPoolExecutor(2) as pool:  # numpy's loops release the GIL
        list(pool.map(normalise, range(0, len(integral), NORMALISE_ROWS)))
    table = ad.AnnData(
        X=values,
        obs=obs,
        var=pd.DataFrame(index=pd.Index(source.genes, name="gene")),
        layers={"integral": integral.astype(np.float32, copy=False)},  # circles' float32 sums: not copied
        obsm={"spatial": centers.astype(np.float64)},
    )
    table.uns["genemap"] = {
        "protocol": source.protocol.to_dict(),
        "X": f"integral normalised by protocol {source.protocol.name}",
        "integral": "raw-scale integral of the predicted density over the ROI",
        "coordinates": "slide pixels (x = column)",
        **{k: v for k, v in source.provenance.items() if v is not None},
    }
    return table


def read_circles_csv(path: str | os.PathLike, slide_mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """x, y and radius (slide pixels) or radius_um (converted with the slide's µm/px) from a CSV."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise GenemapInputError(f"{path}: no such circles file")
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as error:
        raise GenemapInputError(f"{path}: not a readable CSV ({error})") from None
    radius_column = "radius" if "radius" in table else "radius_um" if "radius_um" in table else None
    if not {"x", "y"} <= set(table.columns) or radius_column is None:
        raise GenemapInputError(
            f"{path}: expected columns x, y and radius (px) or radius_um; found {list(table.columns)}"
        )
    values = table[["x", "y", radius_column]].apply(pd.to_numeric, errors="coerce")
    bad = values.isna().any(axis=1) | (values[radius_column] <= 0)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise GenemapInputError(f"{path}: row {row + 2} needs numeric x, y and a positive {radius_column}")
    radii = values[radius_column].to_numpy(float)
    if radius_column == "radius_um":
        radii = radii / slide_mpp
    return values[["x", "y"]].to_numpy(float), radii


def predict_measured_spots(
    loaded,
    sdata,
    cache_root: str | os.PathLike,
    tile: int | None = None,
    halo: int | None = None,
    tta: bool = False,
):
    """The slide's dense map through the tile engine, integrated over its measured spots -> AnnData.

    The same path as ``genemap predict`` then ``genemap aggregate`` at the spots (the benchmark uses it);
    ``tta``: the engine's test-time augmentation."""
    from ..io import counts_table, slide_mpp, spot_geometry
    from .engine import TileEngine

    sizes: dict[str, Any] = {key: value for key, value in {"tile": tile, "halo": halo}.items() if value is not None}
    engine = TileEngine(loaded, sdata, Path(cache_root), tta=tta, **sizes)
    try:
        centers, radii = spot_geometry(sdata)
        source = GeneMapSource.from_engine(engine, slide_mpp(sdata))
        return aggregate_circles(source, centers, radii, names=list(counts_table(sdata).obs_names))
    finally:
        engine.close()


def aggregate_shapes(source: GeneMapSource, shapes):
    """A SpatialData shapes element (GeoDataFrame in slide pixels): circles (points with a ``radius``
    column) and polygons, in one AnnData named by the element's index."""
    import anndata as ad
    import shapely

    geometry = shapes.geometry
    is_point = np.asarray(shapely.get_type_id(geometry.values) == 0)
    names = [str(name) for name in shapes.index]
    parts = []
    if is_point.any():
        if "radius" not in shapes:
            raise GenemapInputError("shapes: points need a 'radius' column (slide pixels) to be circles")
        points = shapes[is_point]
        centers = np.column_stack([points.geometry.x.to_numpy(), points.geometry.y.to_numpy()])
        parts.append(aggregate_circles(source, centers, points["radius"].to_numpy(float), np.array(names)[is_point]))
    if (~is_point).any():
        parts.append(aggregate_polygons(source, list(geometry[~is_point]), np.array(names)[~is_point]))
    # outer: circles keep their radius and polygons their area (NaN for the other kind)
    table = ad.concat(parts, join="outer", merge="same", uns_merge="first") if len(parts) > 1 else parts[0]
    return table[names].copy()
