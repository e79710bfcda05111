"""A map calibrated to measured spots integrates to what was measured on every spot of the bundled crop,
blends continuously between spots, keeps NaN, and leaves out spots the map gives nothing to."""

from __future__ import annotations

import numpy as np
import pytest

from napari_genemap.errors import GenemapInputError
from napari_genemap.explore.calibration import CorrectionField, calibrated_levels, spot_factors
from napari_genemap.infer.disk_sums import integrate_disks

PIXEL = 8.0  # slide pixels per map pixel (5.5 µm on the crop)


def disk_integrals(array: np.ndarray, centres_xy: np.ndarray, radii: np.ndarray) -> np.ndarray:
    def read(i0, i1, j0, j1, genes):
        return np.asarray(array[i0:i1, j0:j1], np.float32)[None]

    return integrate_disks(read, array.shape, 1, centres_xy / PIXEL, radii / PIXEL)[:, 0]


@pytest.fixture
def crop(sample_slide):
    from napari_genemap.io import counts_table, spot_geometry

    centres, radii = spot_geometry(sample_slide)
    width, height = (centres.max(0) + radii.max()) / PIXEL + 4  # every spot's disk on the map
    shape = (int(height), int(width))
    y, x = np.mgrid[: shape[0], : shape[1]]
    smooth = (1.0 + np.sin(y / 9.0) * np.cos(x / 13.0) + x / shape[1]).astype(np.float32)  # > 0, not flat
    table = counts_table(sample_slide)
    total = np.asarray(table.X.sum(0)).ravel()
    counts = np.asarray(table[:, int(np.argmax(total))].X.todense()).ravel()  # the crop's most expressed gene
    return centres, radii, smooth, counts


def test_the_calibrated_map_integrates_to_the_measured_counts_on_every_spot(crop):
    centres, radii, smooth, counts = crop
    before = disk_integrals(smooth, centres, radii)
    factors = spot_factors(counts, before)
    field = CorrectionField(centres[:, ::-1], radii, factors)
    finest = calibrated_levels([smooth], field, PIXEL)[0]
    after = disk_integrals(np.asarray(finest), centres, radii)
    assert counts.max() > 10 * max(counts.min(), 1)  # a gene that varies: the factors differ from spot to spot
    np.testing.assert_allclose(after, counts, rtol=1e-5, atol=1e-4)  # exact, to float32 sums
    assert not np.allclose(before / before.sum(), counts / counts.sum(), rtol=0.1)  # there was something to fix
    # reading a window gives the same values as the whole level
    np.testing.assert_allclose(finest[10:40:3, 5:60], np.asarray(finest)[10:40:3, 5:60])
    assert finest[12].shape == (smooth.shape[1],) and np.isclose(finest[12, 7], np.asarray(finest)[12, 7])


def test_between_spots_the_factor_blends_continuously_from_the_rims(crop):
    centres, radii, smooth, counts = crop
    factors = spot_factors(counts, disk_integrals(smooth, centres, radii))
    field = CorrectionField(centres[:, ::-1], radii, factors)
    yx = centres[:, ::-1]
    spot = int(np.argmax(factors))
    # just inside and just outside the spot's rim: its own factor, then nearly so
    direction = np.array([0.0, 1.0])
    inside = field.at(yx[spot : spot + 1] + direction * (radii[spot] - 0.5))
    outside = field.at(yx[spot : spot + 1] + direction * (radii[spot] + 0.5))
    assert inside[0] == pytest.approx(factors[spot])
    assert outside[0] == pytest.approx(factors[spot], rel=0.05)
    # midway between it and its nearest neighbour: a blend, strictly between the spots' extremes
    nearest = np.argsort(np.linalg.norm(yx - yx[spot], axis=1))[1]
    middle = field.at((yx[spot : spot + 1] + yx[nearest : nearest + 1]) / 2)[0]
    assert factors.min() < middle < factors[spot]
    # on a grid (what a view reads): the same factors, exactly on the disks, within 5 % between them
    rows, cols, pixel = np.arange(7, 300), np.arange(3, 230), 3.0
    y, x = np.meshgrid((rows + 0.5) * pixel, (cols + 0.5) * pixel, indexing="ij")
    pointwise = field.at(np.column_stack([y.ravel(), x.ravel()]), reach=2.0).reshape(y.shape)
    gridded = field.grid(rows, cols, pixel, reach=2.0)
    on_disk = np.zeros(y.shape, bool)
    for (cy, cx), r in zip(yx, radii, strict=True):
        on_disk |= np.hypot(y - cy, x - cx) <= r + 2.0
    assert on_disk.mean() > 0.1 and (~on_disk).mean() > 0.1
    np.testing.assert_array_equal(gridded[on_disk], pointwise[on_disk])
    np.testing.assert_allclose(gridded, pointwise, rtol=0.05)
    # a window of the grid reads the same values as the whole
    np.testing.assert_array_equal(field.grid(rows[50:90], cols[21:40], pixel, 2.0), gridded[50:90, 21:40])


def test_nan_stays_nan_and_unpredicted_spots_are_left_out(crop):
    centres, radii, smooth, counts = crop
    integrals = disk_integrals(smooth, centres, radii)
    integrals[3] = 0.0  # the map gives this spot nothing: no factor can rescale it
    factors = spot_factors(counts, integrals)
    assert np.isnan(factors[3]) and np.isfinite(np.delete(factors, 3)).all()
    field = CorrectionField(centres[:, ::-1], radii, factors)
    assert (field.spots, field.left_out) == (len(counts) - 1, 1)
    holes = smooth.copy()
    holes[:5, :5] = np.nan  # not predicted yet
    shown = np.asarray(calibrated_levels([holes], field, PIXEL)[0])
    assert np.isnan(shown[:5, :5]).all() and np.isfinite(shown[5:, 5:]).all()
    with pytest.raises(GenemapInputError, match="no measured spot has a predicted integral"):
        CorrectionField(centres[:, ::-1], radii, np.full(len(counts), np.nan))
