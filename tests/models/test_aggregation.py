"""The disk integral against analytic integrals and a brute-force supersampled mask."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_genemap.models.aggregation import aggregate_disks, disk_rectangle_area, disk_weights


def test_rectangle_areas_by_hand():
    r = torch.tensor(1.0, dtype=torch.float64)
    big = torch.tensor(5.0, dtype=torch.float64)
    zero = torch.tensor(0.0, dtype=torch.float64)
    assert float(disk_rectangle_area(-big, big, -big, big, r)) == pytest.approx(math.pi)
    assert float(disk_rectangle_area(zero, big, zero, big, r)) == pytest.approx(math.pi / 4)  # a quadrant
    assert float(disk_rectangle_area(zero, big, -big, big, r)) == pytest.approx(math.pi / 2)  # a half
    # the unit square's corner region: [0, 1] x [0, 1] holds exactly the quarter disk
    assert float(disk_rectangle_area(zero, 1 + zero, zero, 1 + zero, r)) == pytest.approx(math.pi / 4)
    # a square wholly inside the disk is all covered
    half = torch.tensor(0.5, dtype=torch.float64)
    assert float(disk_rectangle_area(-half, half, -half, half, r)) == pytest.approx(1.0)
    # circular segment beyond x = 0.5: r² acos(d/r) - d sqrt(r² - d²)
    segment = math.acos(0.5) - 0.5 * math.sqrt(0.75)
    assert float(disk_rectangle_area(half, big, -big, big, r)) == pytest.approx(segment)


def test_constant_map_gives_the_disk_area_for_any_radius_and_centre():
    dense = torch.ones(1, 64, 64, dtype=torch.float64)
    radii = torch.tensor([0.05, 0.3, 0.5, 1.0, 2.7, 7.25, 20.0], dtype=torch.float64)
    centers = torch.tensor(
        [[31.3, 30.9], [10.5, 10.5], [12.0, 40.0], [20.2, 50.7], [33.3, 12.1], [40.0, 40.0], [32.0, 32.0]],
        dtype=torch.float64,
    )
    result = aggregate_disks(dense, centers, radii)[:, 0]
    assert result.numpy() == pytest.approx((math.pi * radii**2).numpy(), rel=1e-9)


def test_linear_map_integrates_to_the_centre_value_times_the_area():
    # G(x, y) = 2 + 0.5 x - 0.25 y sampled as exact pixel averages: the mean of a linear function over a
    # unit square is its value at the square's centre, and a disk's integral is area x value at its centre.
    height, width = 40, 50
    yy, xx = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    dense = (2 + 0.5 * xx - 0.25 * yy).to(torch.float64)[None]
    centers = torch.tensor([[20.3, 17.8], [25.0, 20.0], [9.9, 30.1]], dtype=torch.float64)
    radii = torch.tensor([0.4, 6.0, 3.3], dtype=torch.float64)
    result = aggregate_disks(dense, centers, radii)[:, 0]
    # inside a pixel the map is constant, so the analytic value holds up to rim effects: check the large disk
    # analytically and every disk against the supersampled mask
    expected = (2 + 0.5 * centers[:, 0] - 0.25 * centers[:, 1]) * math.pi * radii**2
    assert float(result[1]) == pytest.approx(float(expected[1]), rel=1e-3)
    assert result.numpy() == pytest.approx(_supersampled(dense[0].numpy(), centers.numpy(), radii.numpy()), rel=2e-3)


def _supersampled(dense: np.ndarray, centers: np.ndarray, radii: np.ndarray, samples: int = 64) -> np.ndarray:
    """Brute force: every pixel split into samples x samples points, counted if inside the disk."""
    height, width = dense.shape
    offsets = (np.arange(samples) + 0.5) / samples
    ys = (np.arange(height)[:, None] + offsets[None, :]).reshape(-1)
    xs = (np.arange(width)[:, None] + offsets[None, :]).reshape(-1)
    fine = np.repeat(np.repeat(dense, samples, 0), samples, 1)
    out = []
    for (cx, cy), r in zip(centers, radii):
        inside = (xs[None, :] - cx) ** 2 + (ys[:, None] - cy) ** 2 <= r**2
        out.append((fine * inside).sum() / samples**2)
    return np.array(out)


def test_random_map_matches_brute_force_and_clips_at_the_border():
    rng = np.random.default_rng(7)
    dense = rng.gamma(2.0, 1.0, size=(24, 30))
    centers = np.array([[5.2, 7.7], [0.3, 0.4], [29.5, 12.0], [15.0, 12.0], [11.1, 23.9]])
    radii = np.array([3.1, 2.0, 4.5, 0.7, 1.45])
    result = aggregate_disks(torch.from_numpy(dense)[None], torch.from_numpy(centers), torch.from_numpy(radii))
    assert result[:, 0].numpy() == pytest.approx(_supersampled(dense, centers, radii), rel=3e-3)


def test_continuous_in_radius_and_centre():
    dense = torch.from_numpy(np.random.default_rng(1).random((1, 20, 20)))
    radii = torch.linspace(2.0, 2.01, 11, dtype=torch.float64)
    centers = torch.tensor([[10.0, 10.0]], dtype=torch.float64).repeat(11, 1)
    values = aggregate_disks(dense, centers, radii)[:, 0]
    steps = values.diff().abs()
    assert steps.max() < 0.01 * 2 * math.pi * 2.0 * float(dense.max())  # bounded by rim length x step x max
    assert torch.all(values.diff() >= 0)  # growing a disk over a non-negative map never loses mass
    shifted = aggregate_disks(dense, centers + 1e-6, radii)[:, 0]
    assert (shifted - values).abs().max() < 1e-4


def test_gradient_reaches_the_map_only_inside_the_disk():
    dense = torch.ones(3, 16, 16, dtype=torch.float64, requires_grad=True)
    aggregate_disks(dense, torch.tensor([[8.0, 8.0]]), torch.tensor([2.5])).sum().backward()
    grad = dense.grad[0]
    assert float(grad.sum()) == pytest.approx(math.pi * 2.5**2)
    assert float(grad[0, 0]) == 0 and float(grad[8, 8]) == pytest.approx(1.0)


def test_stride_converts_image_pixels_to_map_pixels():
    dense = torch.ones(1, 32, 32, dtype=torch.float64)
    at_stride = aggregate_disks(dense, torch.tensor([[64.0, 64.0]]), torch.tensor([20.0]), stride=4)
    assert float(at_stride) == pytest.approx(math.pi * 5.0**2)


def test_weights_are_sparse_and_refuse_bad_radii():
    rim, span = disk_weights(torch.tensor([[50.0, 50.0]]), torch.tensor([30.0]), 100, 100)
    assert rim.is_sparse and span.is_sparse
    # O(radius) entries: 58 rows with an interior run (2 each; the first and last rows are all rim) and the
    # cut rim pixels, not the ~2,800 pixels inside
    assert span._nnz() == 2 * 58 and rim._nnz() < 400
    with pytest.raises(ValueError, match="positive"):
        disk_weights(torch.tensor([[1.0, 1.0]]), torch.tensor([0.0]), 4, 4)


def test_no_disks_give_an_empty_result():
    assert aggregate_disks(torch.rand(3, 8, 8), torch.zeros(0, 2), torch.zeros(0)).shape == (0, 3)
