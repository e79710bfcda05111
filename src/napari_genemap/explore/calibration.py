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
(RBF and griddata interpolate at points), and a k-nearest blend over a KD-tree is cheap per view.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ..errors import GenemapInputError

#: Spots a factor is blended from, between spots.
NEAREST = 8
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


class CalibratedLevel:
    """One level of a gene's map (`infer.view.CachedLevel`, or any 2-D array-like whose pixel (i, j)
    covers slide pixels [i s, (i + 1) s) x [j s, (j + 1) s)) times the correction field: what a napari
    layer holds. NaN (not predicted, glass) stays NaN."""

    ndim = 2
    dtype = np.dtype("float32")

    def __init__(self, level, field: CorrectionField, pixel: float):
        self.level, self.field, self.pixel = level, field, float(pixel)  # pixel: side in slide pixels
        self.shape = tuple(int(s) for s in level.shape)
        self._windows: OrderedDict[tuple[int, int, int, int], np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    def factors(self, i0: int, i1: int, j0: int, j1: int) -> np.ndarray:
        """The field on map pixels [i0, i1) x [j0, j1), at their centres, kept for re-reads."""
        key = (i0, i1, j0, j1)
        if key not in self._windows:
            rows = (np.arange(i0, i1) + 0.5) * self.pixel
            cols = (np.arange(j0, j1) + 0.5) * self.pixel
            y, x = np.meshgrid(rows, cols, indexing="ij")
            reach = self.pixel * np.sqrt(0.5)  # half the diagonal: every pixel touching a disk
            values = self.field.at(np.column_stack([y.ravel(), x.ravel()]), reach).reshape(y.shape)
            self._windows[key] = values.astype(np.float32)
            while len(self._windows) > _FIELD_WINDOWS:
                self._windows.popitem(last=False)
        self._windows.move_to_end(key)
        return self._windows[key]

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (2 - len(key))
        if len(key) != 2:
            raise IndexError(f"a gene map level is 2-D; got {len(key)} indices")
        boxes, squeeze = [], []
        for axis, (item, size) in enumerate(zip(key, self.shape, strict=True)):
            if isinstance(item, slice):
                start, stop, step = item.indices(size)
                if step < 1:
                    raise IndexError("gene map levels are sliced with positive steps")
                boxes.append((start, max(start, stop), step))
            else:
                index = int(item) + (size if int(item) < 0 else 0)
                boxes.append((index, index + 1, 1))
                squeeze.append(axis)
        (i0, i1, di), (j0, j1, dj) = boxes
        values = self.read(i0, i1, j0, j1)[::di, ::dj]
        return values.squeeze(tuple(squeeze)) if squeeze else values

    def read(self, i0: int, i1: int, j0: int, j1: int) -> np.ndarray:
        """Map pixels [i0, i1) x [j0, j1) calibrated (`CachedLevel.read`'s contract: NaN past the map)."""
        level = self.level
        base = level.read(i0, i1, j0, j1) if hasattr(level, "read") else np.asarray(level[i0:i1, j0:j1])
        rows, cols = base.shape
        return base.astype(np.float32) * self.factors(i0, i0 + rows, j0, j0 + cols)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        values = self[:, :]
        return values if dtype is None else values.astype(dtype)


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
