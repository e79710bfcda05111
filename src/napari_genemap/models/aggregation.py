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


def disk_weights(centers: torch.Tensor, radii: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Sparse (spots, height*width) matrix of each pixel's area inside each disk (map units).

    Pixels outside the map contribute nothing: a disk over the border integrates what the map holds.
    """
    centers = torch.as_tensor(centers, dtype=torch.float64)
    radii = torch.as_tensor(radii, dtype=torch.float64).reshape(-1)
    if centers.ndim != 2 or centers.shape[1] != 2 or len(centers) != len(radii):
        raise ValueError(f"centers {tuple(centers.shape)} and radii {tuple(radii.shape)}: expected (n, 2) and (n,)")
    if not bool(torch.all(radii > 0)):
        raise ValueError("disk radii must be positive")
    rows, columns, values = [], [], []
    # Spots are grouped by the side of their pixel window so each group is one dense, vectorised block.
    sides = (torch.ceil(2 * radii) + 1).to(torch.int64)
    for side in torch.unique(sides).tolist():
        members = torch.nonzero(sides == side).reshape(-1)
        offsets = torch.arange(side + 1, dtype=torch.float64)
        chunk = max(1, 2**20 // (side + 1) ** 2)  # about 8 MB per float64 temporary
        for start in range(0, len(members), chunk):
            spots = members[start : start + chunk]
            cx, cy, r = centers[spots, 0], centers[spots, 1], radii[spots]
            x_edges = torch.floor(cx - r)[:, None] + offsets  # (n, side + 1) pixel column edges
            y_edges = torch.floor(cy - r)[:, None] + offsets  # (n, side + 1) pixel row edges
            # the corner function once per pixel corner, then each pixel by inclusion-exclusion
            corner = _corner_area(
                (x_edges - cx[:, None])[:, None, :], (y_edges - cy[:, None])[:, :, None], r[:, None, None]
            )
            area = (corner[:, 1:, 1:] - corner[:, :-1, 1:] - corner[:, 1:, :-1] + corner[:, :-1, :-1]).clamp(min=0)
            left, top = x_edges[:, :-1], y_edges[:, :-1]
            column = left[:, None, :].expand_as(area)
            row = top[:, :, None].expand_as(area)
            keep = (area > 0) & (column >= 0) & (column < width) & (row >= 0) & (row < height)
            spot_index = spots[:, None, None].expand_as(area)
            rows.append(spot_index[keep])
            columns.append((row[keep] * width + column[keep]).to(torch.int64))
            values.append(area[keep])
    indices = torch.stack([torch.cat(rows), torch.cat(columns)])
    shape = (len(radii), height * width)
    # indices are in range by construction (the `keep` mask), so torch's invariant check is skipped
    return torch.sparse_coo_tensor(indices, torch.cat(values), shape, check_invariants=False).coalesce()


def aggregate_disks(
    dense_map: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, stride: float = 1.0
) -> torch.Tensor:
    """Integral of ``dense_map`` (genes, H, W) over each disk -> (spots, genes); differentiable in the map.

    ``centers`` (x, y) and ``radii`` are in image pixels when ``stride`` is the map's output stride.
    """
    genes, height, width = dense_map.shape
    centers = torch.as_tensor(centers, dtype=torch.float64) / stride
    radii = torch.as_tensor(radii, dtype=torch.float64) / stride
    weights = disk_weights(centers, radii, height, width).to(dense_map.dtype).to(dense_map.device)
    return torch.sparse.mm(weights, dense_map.reshape(genes, height * width).T)
