"""A predicted map calibrated to the measured spots: the Gene maps panel's "calibrate to measured spots".

The histology decides the pattern, the measurement the amount: one gene's map is multiplied by a smooth
correction field that equals, on each measured spot, the spot's measured counts over the map's integral
there, so the calibrated map integrates to exactly what was measured on every spot (at the map's finest
level, where every pixel the disk touches takes the spot's factor). Between spots the factor is blended
from the nearest spots by inverse squared distance to their disks' edges, so it is continuous and reaches
each spot's own factor at its rim. `models.calibration.calibrate_to_blocks` is the same idea on a grid of
spots (the super-resolution baseline); this one works on the dense map the viewer shows.

Spots where the map predicts nothing (an integral of 0) cannot be rescaled and are left out of the field.
The field is written here rather than taken from scipy's interpolators: none of them is exact on disks
(RBF and griddata interpolate at points), and a k-nearest blend over a KD-tree, computed on a coarser grid
between disks (`CorrectionField.grid`), costs well under a second for a million map pixels of a view.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ..errors import GenemapInputError
from ..infer.view import MapLevel

#: Spots a factor is blended from, between spots.
NEAREST = 8
GRID_STEP = 4  # map pixels between the points where the blend between spots is computed
_FIELD_WINDOWS = 32  # recently read windows kept per level (napari re-reads a view as tiles arrive)


def spot_factors(measured: np.ndarray, integral: np.ndarray) -> np.ndarray:
    """Per spot, measured counts / the map's integral; NaN where the integral is not positive or unknown."""
    measured, integral = np.asarray(measured, np.float64), np.asarray(integral, np.float64)
    if measured.shape != integral.shape:
        raise GenemapInputError(f"calibration: {measured.shape} measured values for {integral.shape} integrals")
    good = np.isfinite(integral) & (integral > 0) & np.isfinite(measured)
    return np.where(good, measured / np.where(good, integral, 1.0), np.nan)


class CorrectionField:
    """The factor at any slide position (y, x in slide pixels), from spots at ``centres`` (n, 2; y, x) with
    ``radii`` (slide pixels) and ``factors`` (`spot_factors`; NaN spots are left out)."""

    def __init__(self, centres: np.ndarray, radii: np.ndarray, factors: np.ndarray):
        from scipy.spatial import cKDTree

        centres = np.asarray(centres, np.float64).reshape(-1, 2)
        factors = np.asarray(factors, np.float64).reshape(-1)
        radii = np.broadcast_to(np.asarray(radii, np.float64), factors.shape)
        kept = np.isfinite(factors)
        if not kept.any():
            raise GenemapInputError("calibration: no measured spot has a predicted integral above 0")
        self.centres, self.radii, self.factors = centres[kept], radii[kept], factors[kept]
        self.spots = int(kept.sum())
        self.left_out = int((~kept).sum())
        self._tree = cKDTree(self.centres)

    def at(self, points: np.ndarray, reach: float = 0.0) -> np.ndarray:
        """Factors at ``points`` (m, 2; y, x). A point within ``reach`` of a disk (e.g. half a pixel's
        diagonal: the pixel touches the disk) takes that spot's factor; the nearest such disk wins."""
        points = np.asarray(points, np.float64).reshape(-1, 2)
        k = min(NEAREST, self.spots)
        distance, index = self._tree.query(points, k=k)
        distance, index = distance.reshape(len(points), k), index.reshape(len(points), k)
        gap = np.maximum(distance - self.radii[index] - reach, 0.0)
        on_disk = gap[:, 0] == 0.0  # neighbours come nearest first: a touched disk is the first one
        weight = 1.0 / np.where(gap > 0, gap, 1.0) ** 2
        blended = (weight * self.factors[index]).sum(1) / weight.sum(1)
        return np.where(on_disk, self.factors[index[:, 0]], blended)

    def grid(self, rows: np.ndarray, cols: np.ndarray, pixel: float, reach: float = 0.0) -> np.ndarray:
        """Factors (len(rows), len(cols)) at the centres of map pixels ``rows`` x ``cols`` (consecutive
        indices; a pixel is ``pixel`` slide pixels wide), as `at` gives them but several times faster (a
        view is read on napari's thread): exact on every pixel within ``reach`` of a disk; between disks,
        where the blend is smooth, `at` on every `GRID_STEP`-th row and column of the whole map (so every
        window reads the same values) and bilinear in between."""
        rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
        if not len(rows) or not len(cols):
            return np.ones((len(rows), len(cols)))
        (coarse_rows, row_at, row_weight), (coarse_cols, col_at, col_weight) = (_lattice(rows), _lattice(cols))
        y, x = np.meshgrid((coarse_rows + 0.5) * pixel, (coarse_cols + 0.5) * pixel, indexing="ij")
        coarse = self.at(np.column_stack([y.ravel(), x.ravel()])).reshape(y.shape)
        top = coarse[row_at][:, col_at] * (1 - col_weight) + coarse[row_at][:, col_at + 1] * col_weight
        bottom = coarse[row_at + 1][:, col_at] * (1 - col_weight) + coarse[row_at + 1][:, col_at + 1] * col_weight
        values = top * (1 - row_weight[:, None]) + bottom * row_weight[:, None]
        # the disks: each pixel's nearest centre, looked up only as far as the largest disk reaches
        y, x = np.meshgrid((rows + 0.5) * pixel, (cols + 0.5) * pixel, indexing="ij")
        points = np.column_stack([y.ravel(), x.ravel()])
        distance, index = self._tree.query(points, k=1, distance_upper_bound=self.radii.max() + reach)
        near = np.isfinite(distance)
        on_disk = np.zeros(len(points), bool)
        on_disk[near] = distance[near] <= self.radii[index[near]] + reach
        values[on_disk.reshape(values.shape)] = self.factors[index[on_disk]]  # row-major, as the points
        return values


def _lattice(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The multiples of `GRID_STEP` around consecutive ``indices``, and for each index the lattice point
    before it and its weight toward the next."""
    first = indices[0] // GRID_STEP
    last = indices[-1] // GRID_STEP + 1
    lattice = np.arange(first, last + 1) * GRID_STEP
    at = indices // GRID_STEP - first
    return lattice, at, (indices % GRID_STEP) / GRID_STEP


class CalibratedLevel(MapLevel):
    """One level of a gene's map (`infer.view.CachedLevel`, or any 2-D array whose pixel (i, j) covers
    slide pixels [i s, (i + 1) s) x [j s, (j + 1) s)) times the correction field: what a napari layer
    holds. NaN (not predicted, glass) stays NaN."""

    def __init__(self, level, field: CorrectionField, pixel: float):
        self.level, self.field, self.pixel = level, field, float(pixel)  # pixel: side in slide pixels
        self.shape = tuple(int(s) for s in level.shape)
        self._windows: OrderedDict[tuple[int, int, int, int], np.ndarray] = OrderedDict()

    def factors(self, i0: int, i1: int, j0: int, j1: int) -> np.ndarray:
        """The field on map pixels [i0, i1) x [j0, j1), at their centres, kept for re-reads."""
        key = (i0, i1, j0, j1)
        if key not in self._windows:
            reach = self.pixel * np.sqrt(0.5)  # half the diagonal: every pixel touching a disk
            grid = self.field.grid(np.arange(i0, i1), np.arange(j0, j1), self.pixel, reach)
            self._windows[key] = grid.astype(np.float32)
            while len(self._windows) > _FIELD_WINDOWS:
                self._windows.popitem(last=False)
        self._windows.move_to_end(key)
        return self._windows[key]

    def read(self, i0: int, i1: int, j0: int, j1: int) -> np.ndarray:
        """Map pixels [i0, i1) x [j0, j1) calibrated (NaN past the map, as `CachedLevel.read`)."""
        level = self.level
        base = level.read(i0, i1, j0, j1) if hasattr(level, "read") else np.asarray(level[i0:i1, j0:j1])
        rows, cols = base.shape
        return base.astype(np.float32) * self.factors(i0, i0 + rows, j0, j0 + cols)


def calibrated_levels(levels: list, field: CorrectionField, finest_pixel: float) -> list[CalibratedLevel]:
    """Every level of a multiscale map (finest first, each twice the previous's pixel) calibrated."""
    return [CalibratedLevel(level, field, finest_pixel * 2**index) for index, level in enumerate(levels)]


def measured_circles(sdata):
    """Every measured spot of a slide as a circle for the tile service (GeoDataFrame in slide pixels, a
    ``radius`` column, indexed by the counts table's spot names)."""
    import geopandas as gpd
    import shapely

    from ..io import counts_table, spot_geometry

    centres, radii = spot_geometry(sdata)
    return gpd.GeoDataFrame(
        {"radius": radii},
        geometry=shapely.points(centres),
        index=counts_table(sdata).obs_names.astype(str),
    )


def field_for(sdata, gene: str, integrals) -> CorrectionField:
    """The correction field of ``gene`` from the service's integrals of the map over `measured_circles`
    (an AnnData with ``layers["integral"]``, rows named by spot) and the slide's measured counts."""
    from ..io import counts_table

    counts = counts_table(sdata)
    if gene not in counts.var_names:
        raise GenemapInputError(f"calibration: gene {gene!r} is not measured on this slide")
    circles = measured_circles(sdata)
    rows = circles.loc[list(integrals.obs_names)]
    measured = counts[list(integrals.obs_names), gene].X
    measured = np.asarray(measured.todense() if hasattr(measured, "todense") else measured).reshape(-1)
    integral = np.asarray(integrals[:, gene].layers["integral"]).reshape(-1)
    centres = np.column_stack([rows.geometry.y.to_numpy(), rows.geometry.x.to_numpy()])
    return CorrectionField(centres, rows["radius"].to_numpy(), spot_factors(measured, integral))
