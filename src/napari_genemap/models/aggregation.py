"""The integral of a dense map over disks, with exact partial-pixel coverage at the rim.

A spot's expression is the integral of the dense map G (genes x H x W) over the spot's disk. Pixel
(row i, column j) of G covers the square [j, j+1) x [i, i+1) in map units, so a map pixel's value is
expression per map pixel. Each pixel is weighted by the exact area of its intersection with the disk
(closed form, below), so the result is continuous in the centre and radius and a disk smaller than one
pixel gets the right fraction of it.

Why closed form rather than supersampling: supersampled masks are piecewise constant in the radius (a
10 µm change of radius can change nothing, then jump), which breaks the "any radius" promise for small
circles, and they cost a factor of samples^2 more.

Coordinates: centres (x, y) and radii in map pixels; x runs along columns. To aggregate at image pixels
with an output stride s, divide image coordinates and radii by s (`aggregate_disks` takes ``stride``).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch


def _safe_sqrt(value: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """sqrt that keeps a finite gradient at 0 (the disk's edge); its value error is below sqrt(floor)."""
    return torch.sqrt(torch.clamp(value, min=0) + floor)


def _half_chord_integral(t: torch.Tensor, radius: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """W(t) = ∫_0^t sqrt(r² - s²) ds for t clamped to [-r, r]."""
    t = torch.maximum(torch.minimum(t, radius), -radius)
    height = _safe_sqrt(radius**2 - t**2, floor)
    return 0.5 * (t * height + radius**2 * torch.atan2(t, height))


def _corner_area(x: torch.Tensor, y: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Area of the disk (centre 0, radius r) ∩ {X <= x, Y <= y}.

    Integrate over X the length of {Y <= y} ∩ [-w, w] with w(X) = sqrt(r² - X²). With a = sqrt(r² - y²)
    (0 when |y| >= r): for |X| < a that length is y + w; for |X| >= a it is 2w when y >= 0 and 0 otherwise.
    """
    floor = (1e-12 * radius**2).clamp(min=1e-30)
    w = lambda t: _half_chord_integral(t, radius, floor)  # noqa: E731 - a local shorthand reads better here
    a = torch.where(y.abs() < radius, _safe_sqrt(radius**2 - y**2, floor), torch.zeros_like(y))
    x_inside = torch.maximum(torch.minimum(x, a), -a)
    area = y * (x_inside + a) + w(x_inside) - w(-a)
    outside = (
        w(torch.maximum(torch.minimum(x, -a), -radius))
        - w(-radius)
        + w(torch.maximum(torch.minimum(x, radius), a))
        - w(a)
    )
    return area + torch.where(y >= 0, 2 * outside, torch.zeros_like(outside))


def disk_rectangle_area(
    x0: torch.Tensor, x1: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor, radius: torch.Tensor
) -> torch.Tensor:
    """Exact area of the disk (centre 0, radius r) ∩ [x0, x1] x [y0, y1] (broadcasting)."""
    area = (
        _corner_area(x1, y1, radius)
        - _corner_area(x0, y1, radius)
        - _corner_area(x1, y0, radius)
        + _corner_area(x0, y0, radius)
    )
    return area.clamp(min=0)


class DiskWeights(NamedTuple):
    """The disk integral as two sparse matrices: ``rim @ G + span @ cumsum(G, along rows)``.

    Pixels wholly inside a disk weigh exactly 1, so each map row's run of them is a difference of two
    entries of the row-wise cumulative sum (``span``: +1 at the run's last pixel, -1 before its first); only
    the pixels the rim cuts need the closed-form area (``rim``). That makes the work per disk O(radius)
    instead of O(radius^2): a 50 px disk touches ~100 rows and ~400 rim pixels rather than 10,000 pixels.
    """

    rim: torch.Tensor  # sparse (spots, H*W): partial-pixel areas
    span: torch.Tensor  # sparse (spots, H*W): +-1 on the row-wise cumulative sum


def _runs(starts: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For runs (start, count): the run index and the value start + k of every element, concatenated."""
    owner = torch.repeat_interleave(torch.arange(len(counts)), counts)
    first = torch.cumsum(counts, 0) - counts
    return owner, starts[owner] + torch.arange(int(counts.sum())) - first[owner]


def disk_weights(centers: torch.Tensor, radii: torch.Tensor, height: int, width: int) -> DiskWeights:
    """The sparse weights of the integral over each disk of a (height, width) map (map pixels).

    Pixels outside the map contribute nothing: a disk over the border integrates what the map holds.
    """
    centers = torch.as_tensor(centers, dtype=torch.float64)
    radii = torch.as_tensor(radii, dtype=torch.float64).reshape(-1)
    if centers.ndim != 2 or centers.shape[1] != 2 or len(centers) != len(radii):
        raise ValueError(f"centers {tuple(centers.shape)} and radii {tuple(radii.shape)}: expected (n, 2) and (n,)")
    if not bool(torch.all(radii > 0)):
        raise ValueError("disk radii must be positive")
    # one entry per (disk, map row) the disk crosses, rows clipped to the map
    top = torch.floor(centers[:, 1] - radii).clamp(0, height).to(torch.int64)
    bottom = torch.ceil(centers[:, 1] + radii).clamp(0, height).to(torch.int64)
    spot, row = _runs(top, (bottom - top).clamp(min=0))
    cx, cy, r = centers[spot, 0], centers[spot, 1], radii[spot]
    near = torch.clamp(cy, row, row + 1) - cy  # the strip's y closest to the centre (0 when it holds it)
    far = torch.maximum((row - cy).abs(), (row + 1 - cy).abs())
    outer = torch.sqrt(torch.clamp(r**2 - near**2, min=0))  # half-chord where the strip is widest
    inner = torch.sqrt(torch.clamp(r**2 - far**2, min=0))  # half-chord where it is narrowest
    left_out = torch.floor(cx - outer).to(torch.int64)
    right_out = torch.ceil(cx + outer).to(torch.int64)  # exclusive
    left_in = torch.ceil(cx - inner).to(torch.int64)
    right_in = torch.floor(cx + inner).to(torch.int64)  # exclusive: pixels [left_in, right_in) are whole
    solid = (far < r) & (right_in > left_in)
    left_in = torch.where(solid, left_in, right_out)
    right_in = torch.where(solid, right_in, right_out)
    # interior runs: +1 at the run's last pixel and -1 just before its first, on the row-wise cumsum
    run_left, run_right = left_in.clamp(0, width), right_in.clamp(0, width)
    has_run = run_right > run_left
    span_rows = torch.cat([spot[has_run], spot[has_run & (run_left > 0)]])
    span_columns = torch.cat(
        [
            row[has_run] * width + run_right[has_run] - 1,
            row[has_run & (run_left > 0)] * width + run_left[has_run & (run_left > 0)] - 1,
        ]
    )
    span_values = torch.cat(
        [
            torch.ones(int(has_run.sum()), dtype=torch.float64),
            -torch.ones(int((has_run & (run_left > 0)).sum()), dtype=torch.float64),
        ]
    )
    # rim pixels: [left_out, left_in) and [right_in, right_out) of each row, area by the closed form
    starts = torch.cat([left_out, right_in])
    counts = torch.cat([left_in - left_out, right_out - right_in]).clamp(min=0)
    which, column = _runs(starts, counts)
    which = which % len(spot)
    rim_spot, rim_row = spot[which], row[which]
    area = disk_rectangle_area(
        column - cx[which], column + 1 - cx[which], rim_row - cy[which], rim_row + 1 - cy[which], r[which]
    )
    keep = (area > 0) & (column >= 0) & (column < width)
    shape = (len(radii), height * width)
    # indices are in range by construction (rows and columns clipped to the map), so torch's check is skipped
    rim = torch.sparse_coo_tensor(
        torch.stack([rim_spot[keep], rim_row[keep] * width + column[keep]]), area[keep], shape, check_invariants=False
    )
    span = torch.sparse_coo_tensor(torch.stack([span_rows, span_columns]), span_values, shape, check_invariants=False)
    return DiskWeights(rim.coalesce(), span.coalesce())


def aggregate_disks(
    dense_map: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, stride: float = 1.0
) -> torch.Tensor:
    """Integral of ``dense_map`` (genes, H, W) over each disk -> (spots, genes); differentiable in the map.

    ``centers`` (x, y) and ``radii`` are in image pixels when ``stride`` is the map's output stride.
    Half-precision maps are integrated in float32 (the row-wise cumulative sum needs the mantissa).
    """
    genes, height, width = dense_map.shape
    if dense_map.dtype in (torch.float16, torch.bfloat16):
        dense_map = dense_map.float()
    centers = torch.as_tensor(centers, dtype=torch.float64) / stride
    radii = torch.as_tensor(radii, dtype=torch.float64) / stride
    rim, span = (w.to(dense_map.dtype).to(dense_map.device) for w in disk_weights(centers, radii, height, width))
    flat = dense_map.reshape(genes, height * width).T
    cumulative = torch.cumsum(dense_map, dim=-1).reshape(genes, height * width).T
    if torch.is_grad_enabled() and dense_map.requires_grad:
        return torch.sparse.mm(rim, flat) + torch.sparse.mm(span, cumulative)
    # without gradients, CSR products are ~20x faster than COO ones on the CPU (measured, torch 2.14)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        return rim.to_sparse_csr() @ flat.contiguous() + span.to_sparse_csr() @ cumulative.contiguous()
