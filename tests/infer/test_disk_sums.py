"""The streamed disk integrals (`infer.disk_sums`) against the exact closed-form integral.

The reference is `models.aggregation.aggregate_disks` on the whole map in float64: the same closed-form
partial-pixel areas, no streaming, no float32. The fast path must match it to 1e-5 relative for every
circle and gene: radii from 1/100 of a map pixel to larger than a tile, centres on tile (chunk) and region
boundaries, and circles partly or wholly off the map.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_genemap.infer import disk_sums
from napari_genemap.infer.aggregate import aggregate_circles, read_prediction
from napari_genemap.models.aggregation import aggregate_disks

RTOL = 1e-5


@pytest.fixture(scope="module")
def store(small_prediction):
    return small_prediction[1]


def exact(dense: np.ndarray, centers: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """The closed-form integral (float64, the whole map at once): (circles, genes)."""
    values = torch.from_numpy(np.asarray(dense, np.float64))
    return aggregate_disks(values, torch.from_numpy(centers), torch.from_numpy(radii)).numpy()


def assert_exact(got: np.ndarray, reference: np.ndarray) -> float:
    """Relative error per circle and gene (the map is >= 0, so no integral cancels); returns its maximum."""
    assert got.shape == reference.shape
    assert np.isfinite(got).all()
    scale = np.maximum(np.abs(reference), 1e-30)
    error = np.abs(got - reference) / scale
    worst = np.unravel_index(np.argmax(error), error.shape)
    assert error[worst] <= RTOL, (worst, got[worst], reference[worst])
    return float(error.max())


def circles(height: int, width: int, tile: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) centres and radii in map pixels: random ones over and around the map, radii log-uniform in
    0.01-30 px, plus ones centred on tile corners and edges, straddling the map's border, and off it."""
    rng = np.random.default_rng(seed)
    n = 600
    centers = np.column_stack([rng.uniform(-8, width + 8, n), rng.uniform(-8, height + 8, n)])
    radii = np.exp(rng.uniform(np.log(0.01), np.log(30), n))
    corners = np.array([(x, y) for x in range(0, width + 1, tile) for y in range(0, height + 1, tile)], float)
    special = [
        (corners, 0.3),  # sub-pixel, exactly on a tile corner
        (corners + 0.5, 3.7),  # crossing four tiles
        (corners + [0.25, 7.0], 12.0),  # crossing a tile edge, several pixels each side
        (np.array([[-3.0, height / 2], [width / 2, height + 2.0], [-1.0, -1.0]]), 4.0),  # partly off the map
        (np.array([[-50.0, -50.0], [width + 40.0, 5.0]]), 6.0),  # wholly off the map
        (np.array([[width / 2, height / 2]]), 2.0 * max(height, width)),  # covers the whole map
    ]
    for at, radius in special:
        centers = np.vstack([centers, at])
        radii = np.concatenate([radii, np.full(len(at), radius)])
    return centers, radii


def test_streamed_integrals_equal_the_closed_form_on_a_prediction_store(store):
    source = read_prediction(store)
    height, width = source.shape
    dense = source.read(0, height, 0, width, slice(None))
    tile = source.chunks[0]
    assert tile < height  # the store has several tiles: circles cross chunk boundaries
    centers, radii = circles(height, width, tile)
    reference = exact(dense, centers, radii)
    assert (reference[-3:-1] == 0).all() and (reference > 0).any()  # the ones off the map integrate nothing
    # regions as the store's chunks make them; one chunk each; and 5 x 7-ish pieces that cut every circle
    for chunks, side in ((source.chunks, disk_sums.REGION_SIDE), (source.chunks, tile), (None, 5)):
        got = disk_sums.integrate_disks(
            source.read, source.shape, len(source.genes), centers, radii, chunks, None, side
        )
        assert_exact(got, reference)
        assert (got[-3:-1] == 0).all()


def test_products_split_across_threads_stay_exact(store, monkeypatch):
    """Large batches are summed in one span of disks per thread (each setting its home disks' rows and
    adding to its guests'): forced here for every batch, with three threads, so spans are uneven and
    regions of 5 pixels give every span guests."""
    monkeypatch.setattr(disk_sums, "SPLIT_TERMS", 1)
    monkeypatch.setattr(disk_sums, "GEOMETRY_THREADS", 3)
    source = read_prediction(store)
    height, width = source.shape
    centers, radii = circles(height, width, source.chunks[0], seed=3)
    reference = exact(source.read(0, height, 0, width, slice(None)), centers, radii)
    for chunks, side in ((source.chunks, disk_sums.REGION_SIDE), (None, 5)):
        got = disk_sums.integrate_disks(
            source.read, source.shape, len(source.genes), centers, radii, chunks, None, side
        )
        assert_exact(got, reference)


def test_aggregate_circles_layer_is_the_exact_integral(store):
    source = read_prediction(store)
    height, width = source.shape
    centers, radii = circles(height, width, source.chunks[0], seed=1)
    table = aggregate_circles(source, centers * source.pixel_size, radii * source.pixel_size)
    reference = exact(source.read(0, height, 0, width, slice(None)), centers, radii)
    assert_exact(np.asarray(table.layers["integral"], np.float64), reference)
    expected = source.protocol.normalise(reference, None, source.genes)
    np.testing.assert_allclose(table.X, expected, rtol=1e-5, atol=1e-6)


def test_gene_groups_and_a_constant_map_give_the_disk_areas(monkeypatch):
    """A map of ones integrates to the disk's area inside it (independent of the closed form's code), also
    with genes read in groups of 2 and a region's disks done in parts (few terms held at once)."""
    monkeypatch.setattr(disk_sums, "GENE_GROUP", 2)
    monkeypatch.setattr(disk_sums, "BATCH_DISKS", 16)
    monkeypatch.setattr(disk_sums, "MAX_TERMS", 3000)
    ones = np.ones((5, 60, 70), np.float32) * np.arange(1, 6, dtype=np.float32)[:, None, None]
    rng = np.random.default_rng(2)
    centers = np.column_stack([rng.uniform(25, 45, 200), rng.uniform(25, 35, 200)])
    radii = np.exp(rng.uniform(np.log(0.05), np.log(24), 200))
    got = disk_sums.integrate_disks(
        lambda i0, i1, j0, j1, g: ones[g, i0:i1, j0:j1], (60, 70), 5, centers, radii, (8, 8), None, 16
    )
    area = np.pi * radii**2
    np.testing.assert_allclose(got, area[:, None] * np.arange(1, 6), rtol=RTOL)


def test_no_circles_no_genes_and_nothing_on_the_map():
    read = lambda i0, i1, j0, j1, g: np.ones((3, i1 - i0, j1 - j0), np.float32)[g]  # noqa: E731
    assert disk_sums.integrate_disks(read, (10, 10), 3, np.zeros((0, 2)), np.zeros(0)).shape == (0, 3)
    off = disk_sums.integrate_disks(read, (10, 10), 3, np.array([[-5.0, -5.0], [20.0, 3.0]]), np.array([1.0, 2.0]))
    assert off.shape == (2, 3) and (off == 0).all()


@pytest.mark.parametrize("width", [1, 2, 37, 64])
def test_dyadic_cells_tile_every_run_exactly(width):
    levels, _, _ = disk_sums.table_layout(1, width)
    a, b = (v.ravel() for v in np.meshgrid(np.arange(width + 1), np.arange(width + 1), indexing="ij"))
    keep = b > a
    a, b = a[keep], b[keep]
    run, level, cell = disk_sums._dyadic(a, b, levels)
    start, stop = cell << level, (cell + 1) << level
    assert (np.diff(run) >= 0).all()  # grouped by run
    assert ((start >= a[run]) & (stop <= b[run]) & (stop <= width)).all()
    covered = np.bincount(run, weights=stop - start, minlength=len(a))
    np.testing.assert_array_equal(covered, b - a)  # disjoint cells inside the run that add up to it
    assert np.bincount(run, minlength=len(a)).max() <= 2 * (levels + 1)


def test_circles_are_integrated_without_importing_torch():
    """The viewer's tile service runs its model without torch; its first ROI must not pay torch's import."""
    import subprocess
    import sys

    script = """
import sys
import numpy as np
from napari_genemap.infer.disk_sums import integrate_disks
values = np.arange(2 * 40 * 50, dtype=np.float32).reshape(2, 40, 50)
result = integrate_disks(lambda i0, i1, j0, j1, genes: values[genes, i0:i1, j0:j1], (40, 50), 2,
                         np.array([[20.0, 10.0]]), np.array([3.0]))
assert result.shape == (1, 2) and result[0, 0] > 0, result
assert "torch" not in sys.modules
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
