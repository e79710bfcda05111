"""Exact integrals of a gene map over many disks, streamed region by region: `aggregate_circles`' engine.

What: for each disk, sum over map pixels of area(pixel ∩ disk) x G[:, pixel] (map pixel (i, j) covers
[j, j+1) x [i, i+1)), the integral `models.aggregation.aggregate_disks` computes with torch, here for
10^5 disks x 785 genes in a few seconds and in bounded memory (`benchmarks/roi_scale.py`; the torch
path took a minute and 3 GB, and lost up to 2.6e-4 to float32 cancellation).

How, and why this way (measured on the bundled sample's 176 x 176 x 785-gene map, 2 shared CPU cores):

- A disk crosses ~2r map rows. In each row the pixels its rim cuts get their exact area in closed form
  (one arctan2 per pixel edge, shared by the two pixels beside it), and the run of whole pixels between the
  two rims is a sum of consecutive pixels of the row.
- That run is read from *dyadic row sums*: tables of the sums of aligned 1, 2, 4, ... pixels of each row,
  so a run of L pixels costs at most ~2 log2(L) terms. The usual alternative, a row-wise prefix sum (a
  "row summed-area table", two terms per run), needs float64 to stay exact: in float32 a faint run beside
  a bright stretch of the same row is lost in the rounding of the large prefix sums (cancellation), and a
  float64 product runs at half the speed and twice the memory. Dyadic terms are all sums of the pixels
  being added, so with a map that is >= 0 nothing cancels and float32 tables stay within ~1e-6 relative.
- The integral of every disk is then a weighted sum of rows of one table (pixels, dyadic sums) x genes:
  one sparse matrix (disks x table rows, ~110 terms per disk for radii of 1-25 map pixels) times the table,
  scipy.sparse's CSR product, which releases the GIL: a large batch is split into one span of disks per
  thread (10^5 disks: 2.15 s against 2.9 s in one product, two cores). `torch.nn.functional.embedding_bag`
  computes the same with FBGEMM on several threads (0.8 s faster than one product for 10^5 disks), but
  importing torch costs 1.2 s, more than it saves in `genemap aggregate`, and the viewer's tile service
  runs its model without torch (`infer.backends`). The weights are built with vectorised numpy in batches
  small enough to stay in cache, on two threads.
  A 2-D summed-area table was not used: whole pixels are not rectangles (the rows' runs all differ) and
  its float32 sums cancel worse still. Dense per-tile products (weights x tile, BLAS) were estimated no
  faster: a disk of these radii cuts ~8 tiles of 8 x 8 pixels, ~500 dense weights against ~110 terms.
- Streaming: the map is read in regions aligned to its chunks (at most `REGION_SIDE` pixels a side) and,
  within a region, in groups of genes sized by `TABLE_BUDGET_BYTES` (at most `GENE_GROUP`: the table's rows
  stay in cache). A region's weights are built once and used for each of its gene groups, so one group's
  table is the only copy of the map held at a time. Disks crossing regions are split exactly: each region
  integrates the part of the disk inside it (rows and columns clipped to the region), as the map's own
  border clips a disk. Disks are visited along a Z-order curve so neighbours reuse the table's rows.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

#: largest side of a region read at once (map pixels); the store's chunks decide the exact size
REGION_SIDE = 256
#: most genes per table (its rows stay in cache; measured best at 64-128 on this CPU)
GENE_GROUP = 64
#: most bytes of one gene group's table (float32 pixels and dyadic sums) and its raw block
TABLE_BUDGET_BYTES = 64 * 2**20
#: most weight terms held for one region at once (8 bytes each); beyond, its disks are done in parts
MAX_TERMS = 2**25
#: widest region whose runs' dyadic decompositions are tabulated (width² / 2 runs; wider ones are computed)
DYADIC_LOOKUP_WIDTH = 512
#: fewest weight terms whose product is split across the pool's threads; below, a gene group's product
#: takes about as long as reading the next group (the reader's thread, on the other core), so splitting it
#: measured slower (10^4 disks, ~10^6 terms: 0.55 s against 0.49 s; 10^5: 2.0 s against 2.6 s)
SPLIT_TERMS = 2**22
#: result rows put into the output at once (a temporary below 4 MB)
SUM_ROWS = 4096
#: threads building the weights and summing the products (the pool's size)
GEOMETRY_THREADS = max(1, min(4, os.cpu_count() or 1))
#: disks whose weights are built in one vectorised batch (arrays stay in cache)
BATCH_DISKS = 2048

Reader = Callable[[int, int, int, int, slice], np.ndarray]  # (i0, i1, j0, j1, genes) -> (genes, rows, cols)


# --- geometry ------------------------------------------------------------------------------------------
def _runs(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For runs (start, count): the run index and the value start + k of every element, concatenated."""
    owner = np.repeat(np.arange(len(counts)), counts)
    first = np.cumsum(counts) - counts
    return owner, starts[owner] + (np.arange(len(owner)) - first[owner])


def _half_chord_integral(t: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """W(t) = ∫_0^t sqrt(r² - s²) ds for |t| <= r. arctan2 with the factorised height, not arcsin(t / r):
    arcsin loses ~sqrt(eps) near |t| = r, where rim pixels are thin."""
    height = radius - t
    height *= radius + t
    np.sqrt(np.maximum(height, 0.0, out=height), out=height)
    value = np.arctan2(t, height)
    value *= radius
    value *= radius
    height *= t
    value += height
    value *= 0.5
    return value


def _corner_pieces(y: np.ndarray, radius: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The area F(x) of the disk (centre 0, radius r) ∩ {X <= x, Y <= y}, per value of y, as pieces in
    t = clip(x, -r, r): ``F = alpha[s] + beta[s] * W(t) + gamma[s] * t`` with s = 0 left of the chord at y
    (t <= -a, a = sqrt(r² - y²), 0 when |y| >= r), 1 across it, 2 right of it. Returns a and the (n, 3)
    tables alpha, beta, gamma.

    It is `models.aggregation._corner_area`'s integral, rearranged so that an x needs one W(t): left of the
    chord the part below y is the full height 2h when y >= 0, else nothing; across it, y + h; right of it,
    the chord's part (2ya + 2W(a)) plus the full-height part beyond."""
    a = np.sqrt(np.maximum((radius - y) * (radius + y), 0.0))
    w_a = _half_chord_integral(a, radius)
    quarter = 0.25 * np.pi * radius * radius
    upper = (y >= 0).astype(np.float64)
    alpha, beta, gamma = np.empty((len(y), 3)), np.empty((len(y), 3)), np.zeros((len(y), 3))
    alpha[:, 0] = 2 * quarter * upper
    alpha[:, 1] = y * a + w_a + 2 * upper * (quarter - w_a)
    alpha[:, 2] = 2 * (y * a + w_a) + 2 * upper * (quarter - 2 * w_a)
    beta[:, 0] = beta[:, 2] = 2 * upper
    beta[:, 1] = 1.0
    gamma[:, 1] = y
    return a, alpha, beta, gamma


def _row_pieces(cx: np.ndarray, cy: np.ndarray, radius: np.ndarray, height: int, width: int):
    """One entry per (disk, map row) the disk crosses, rows clipped to [0, height): the disk, the row, its
    lower boundary's index among the disks' row boundaries (row k of a disk lies between its boundaries k
    and k + 1), and the columns of its left rim [left_out, left_in), whole pixels [left_in, right_in) and
    right rim [right_in, right_out) (unclipped; see `models.aggregation.disk_weights`). Also each
    boundary's y relative to its disk's centre, and the disk's radius."""
    top = np.clip(np.floor(cy - radius), 0, height).astype(np.int64)
    rows = np.maximum(np.clip(np.ceil(cy + radius), 0, height).astype(np.int64) - top, 0)
    disk, row = _runs(top, rows)
    # the boundaries top .. bottom of each disk: the strip areas need F once per boundary, not per row
    crossing = np.flatnonzero(rows)
    owner, line = _runs(top[crossing], rows[crossing] + 1)
    boundary_disk = crossing[owner]
    boundary_y, boundary_radius = line - cy[boundary_disk], radius[boundary_disk]
    lower = np.arange(len(disk)) + (np.cumsum(rows > 0) - (rows > 0))[disk]
    x, y0, r = cx[disk], row - cy[disk], radius[disk]
    y1 = y0 + 1.0
    near = np.clip(0.0, y0, y1)  # the strip's y closest to the centre (0 when it holds it)
    far = np.maximum(np.abs(y0), np.abs(y1))
    outer = np.sqrt(np.maximum((r - near) * (r + near), 0.0))  # half-chord where the strip is widest
    inner = np.sqrt(np.maximum((r - far) * (r + far), 0.0))  # half-chord where it is narrowest
    left_out = np.floor(x - outer).astype(np.int64)
    right_out = np.ceil(x + outer).astype(np.int64)  # exclusive
    left_in = np.ceil(x - inner).astype(np.int64)
    right_in = np.floor(x + inner).astype(np.int64)  # exclusive: pixels [left_in, right_in) are whole
    solid = (far < r) & (right_in > left_in)
    left_in = np.where(solid, left_in, right_out)
    right_in = np.where(solid, right_in, right_out)
    return disk, row, lower, (left_out, left_in, right_in, right_out), (boundary_y, boundary_radius)


def _rim(cx, r, lower, columns, boundaries, width: int):
    """The rim pixels of each entry inside [0, width): (entry, column, exact area), grouped by entry
    (left rim first). Pixel area = S(c + 1) - S(c), S(x) = F(x, y1) - F(x, y0) the area of the disk's strip
    left of x (F: `_corner_pieces`, per row boundary)."""
    left_out, left_in, right_in, right_out = columns
    starts = np.stack([np.clip(left_out, 0, width), np.clip(right_in, 0, width)], axis=1).ravel()
    stops = np.stack([np.clip(left_in, 0, width), np.clip(right_out, 0, width)], axis=1).ravel()
    pixels = np.maximum(stops - starts, 0)
    piece = np.flatnonzero(pixels)
    edges = pixels[piece] + 1
    # the edges c .. c + n of each piece of n pixels: S at each edge once, areas are the differences;
    # per-entry values reach the edges by np.repeat (sequential), not by fancy indexing
    entry_of_piece = piece // 2
    edge = np.repeat(starts[piece] - np.cumsum(edges) + edges, edges) + np.arange(int(edges.sum()))
    radius = np.repeat(r[entry_of_piece], edges)
    t = edge - np.repeat(cx[entry_of_piece], edges)
    np.minimum(np.maximum(t, -radius, out=t), radius, out=t)
    w_t = _half_chord_integral(t, radius)
    a, alpha, beta, gamma = _corner_pieces(*boundaries)
    boundary = np.repeat(lower[entry_of_piece], edges)
    strip = np.zeros(len(edge))
    for sign, at in ((1.0, boundary + 1), (-1.0, boundary)):  # S = F(x, y1) - F(x, y0)
        chord = np.take(a, at)
        which = 3 * at
        which += t > -chord
        which += t >= chord
        value = np.take(beta, which)
        value *= w_t
        value += np.take(alpha, which)
        value += np.take(gamma, which) * t
        strip += value if sign > 0 else -value
    entry = np.repeat(entry_of_piece, edges)
    is_pixel = np.ones(len(edge), bool)
    is_pixel[np.cumsum(edges) - 1] = False  # a piece's last edge starts no pixel
    pixel = np.flatnonzero(is_pixel)
    area = np.maximum(strip[pixel + 1] - strip[pixel], 0.0)
    return entry[pixel], edge[pixel], area


def _dyadic(a: np.ndarray, b: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split each run of columns [a, b) into aligned dyadic cells: (run, level, cell), the cell covering
    columns [cell * 2^level, (cell + 1) * 2^level); at most two per level, grouped by run, left to right.

    Up the levels a cell is taken wherever the run's next column is not aligned to the next level; down
    them, the largest cells that still fit fill the rest."""
    passes = [*range(levels + 1), *range(levels, -1, -1)]
    taken = np.empty((len(passes), len(a)), bool)  # pass-major: each pass writes contiguous rows
    at = np.empty((len(passes), len(a)), np.int64)
    current = a.copy()
    for number, level in enumerate(passes):
        size = 1 << level
        take = taken[number]
        np.less_equal(current + size, b, out=take)
        if number <= levels:
            take &= (current & size) != 0
        at[number] = current
        current += take * size
    run, which = np.nonzero(np.ascontiguousarray(taken.T))  # by run: the terms of one disk must be adjacent
    level = np.asarray(passes, np.int64)[which]
    return run, level, at[which, run] >> level


@functools.lru_cache(maxsize=16)
def _dyadic_lookup(height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every run [a, b) of a row of a height x width region, decomposed once (`_dyadic`): its terms' first
    index and count by ``a * (width + 1) + b``, and each term's table row as ``base + row * stride``."""
    levels, level_offset, _ = table_layout(height, width)
    a, b = (v.ravel() for v in np.meshgrid(np.arange(width + 1), np.arange(width + 1), indexing="ij"))
    valid = np.flatnonzero(b > a)
    run, level, cell = _dyadic(a[valid], b[valid], levels)
    count = np.zeros((width + 1) ** 2, np.int64)
    count[valid] = np.bincount(run, minlength=len(valid))
    base = np.asarray(level_offset, np.int64)[level] + cell
    return np.cumsum(count) - count, count, base, (width >> level).astype(np.int64)


def table_layout(height: int, width: int) -> tuple[int, list[int], int]:
    """(levels, first row of each level, rows) of a region's table: level l holds (width >> l) cells a row."""
    levels = max(0, int(width).bit_length() - 1)
    offsets, total = [], 0
    for level in range(levels + 1):
        offsets.append(total)
        total += height * (width >> level)
    return levels, offsets, total


class DiskTerms(NamedTuple):
    """Each disk's integral over a region as rows of the region's table (`build_table`): disk k is
    ``sum(rim_weights[i] * table[rim_rows[i]] for i in rim_offsets[k]:rim_offsets[k + 1])`` plus
    ``sum(table[run_rows[i]] for i in run_offsets[k]:run_offsets[k + 1])`` (whole pixels, dyadic cells)."""

    rim_rows: np.ndarray  # int32
    rim_weights: np.ndarray  # float32: exact partial-pixel areas
    rim_offsets: np.ndarray  # (disks + 1,)
    run_rows: np.ndarray  # int32
    run_offsets: np.ndarray  # (disks + 1,)


def disk_terms(cx: np.ndarray, cy: np.ndarray, radius: np.ndarray, height: int, width: int) -> DiskTerms:
    """The terms of each disk's integral (centres and radii in map pixels, relative to a height x width
    region); the parts of a disk outside the region contribute nothing."""
    levels, level_offset, _ = table_layout(height, width)
    disk, row, lower, columns, boundaries = _row_pieces(cx, cy, radius, height, width)
    rim_entry, rim_column, rim_area = _rim(cx[disk], radius[disk], lower, columns, boundaries, width)
    run_a, run_b = np.clip(columns[1], 0, width), np.clip(columns[2], 0, width)
    runs = np.flatnonzero(run_b > run_a)
    if width <= DYADIC_LOOKUP_WIDTH:  # the decomposition of every possible run, made once per width
        first, count, base, stride = _dyadic_lookup(height, width)
        pair = run_a[runs] * (width + 1) + run_b[runs]
        run, term = _runs(first[pair], count[pair])
        run_entry = runs[run]
        run_rows = base[term] + row[run_entry] * stride[term]
    else:
        run, level, cell = _dyadic(run_a[runs], run_b[runs], levels)
        run_entry = runs[run]
        run_rows = np.asarray(level_offset, np.int64)[level] + row[run_entry] * (width >> level) + cell

    def offsets(entry: np.ndarray) -> np.ndarray:  # entries are in disk order, so each disk's terms are too
        return np.concatenate([[0], np.cumsum(np.bincount(disk[entry], minlength=len(radius)))])

    return DiskTerms(
        (row[rim_entry] * width + rim_column).astype(np.int32),
        rim_area.astype(np.float32),
        offsets(rim_entry),
        run_rows.astype(np.int32),
        offsets(run_entry),
    )


def build_table(block: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """(genes, height, width) map block -> float32 table (pixels then dyadic row sums, genes): the rows
    `disk_terms` refers to. Sums of pairs of the level below, so every cell is a plain sum of pixels.
    ``out``: a table of the same shape to fill (reused between gene groups: no fresh pages to fault in)."""
    genes, height, width = block.shape
    levels, offsets, size = table_layout(height, width)
    table = out if out is not None and out.shape == (size, genes) else np.empty((size, genes), np.float32)
    below = table[: height * width].reshape(height, width, genes)
    below[...] = block.transpose(1, 2, 0)
    for level in range(1, levels + 1):
        cells = width >> level
        here = table[offsets[level] : offsets[level] + height * cells].reshape(height, cells, genes)
        np.add(below[:, 0 : 2 * cells : 2], below[:, 1 : 2 * cells : 2], out=here)
        below = here
    return table


# --- streaming -----------------------------------------------------------------------------------------
def _region_sides(shape: tuple[int, int], chunks: tuple[int, int] | None, side: int) -> tuple[int, int]:
    """Region height and width: whole chunks (a chunk is decoded whole, so a region never splits one),
    as many as fit in ``side``, at least one."""
    sides = []
    for size, chunk in zip(shape, chunks or (side, side)):
        chunk = max(1, int(chunk))
        sides.append(max(1, min(size, chunk * max(1, side // chunk))))
    return sides[0], sides[1]


def integrate_disks(
    read: Reader,
    shape: tuple[int, int],
    n_genes: int,
    centers: np.ndarray,
    radii: np.ndarray,
    chunks: tuple[int, int] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    region_side: int = REGION_SIDE,
    prefetch: bool = True,
) -> np.ndarray:
    """The integral of a (n_genes, *shape) map over disks with ``centers`` (n, 2) as (x, y) and ``radii``
    in map pixels -> (n, n_genes) float32.

    ``read(i0, i1, j0, j1, genes)`` gives a block of the map; ``chunks`` (rows, columns) its storage
    chunks, which regions of at most ``region_side`` pixels follow; ``prefetch``: read the next gene group
    in a thread while the current one is summed (for readers that may run in another thread)."""
    height, width = shape
    centers = np.asarray(centers, np.float64).reshape(-1, 2)
    radii = np.asarray(radii, np.float64).reshape(-1)
    n = len(radii)
    if not n or not n_genes or not height or not width:
        return np.zeros((n, n_genes), np.float32)
    cx, cy = centers[:, 0], centers[:, 1]
    top = np.clip(np.floor(cy - radii), 0, height).astype(np.int64)
    bottom = np.clip(np.ceil(cy + radii), 0, height).astype(np.int64)
    left = np.clip(np.floor(cx - radii), 0, width).astype(np.int64)
    right = np.clip(np.ceil(cx + radii), 0, width).astype(np.int64)
    region_h, region_w = _region_sides(shape, chunks, region_side)
    columns = -(-width // region_w)
    alive = np.flatnonzero((bottom > top) & (right > left))
    # Each disk's home is the region of its box's first pixel: regions are visited in raster order, so its
    # home comes before every other region it crosses (where it is a guest). A home region sets the disk's
    # sums (no zeroing, no read-add-write of the output), guests add theirs. Within a region disks are
    # visited along a Z-order curve of their centres, so neighbours read the same table rows while cached.
    home = (top[alive] // region_h) * columns + left[alive] // region_w
    cells = np.clip(centers[alive], 0, [width, height]) // 4
    work = alive[np.lexsort((_z_code(cells[:, 0], cells[:, 1]), home))]
    home = np.sort(home)
    first_row, first_col = top[alive] // region_h, left[alive] // region_w
    by_row, region_row = _runs(first_row, (bottom[alive] - 1) // region_h - first_row + 1)
    by_col, region_col = _runs(first_col[by_row], ((right[alive] - 1) // region_w - first_col)[by_row] + 1)
    guest, guest_region = alive[by_row[by_col]], region_row[by_col] * columns + region_col
    is_guest = guest_region != (top[guest] // region_h) * columns + left[guest] // region_w
    guest, guest_region = guest[is_guest], guest_region[is_guest]
    order = np.argsort(guest_region, kind="stable")
    guest, guest_region = guest[order], guest_region[order]
    regions = np.union1d(home, guest_region)
    out = np.empty((n, n_genes), np.float32)
    out[np.setdiff1d(np.arange(n), alive, assume_unique=True)] = 0.0  # wholly off the map: nothing there
    # one reading thread (the next gene group is decoded while one is summed) and the geometry threads
    with contextlib.ExitStack() as stack:
        reader = stack.enter_context(ThreadPoolExecutor(1)) if prefetch else None
        pool = stack.enter_context(ThreadPoolExecutor(GEOMETRY_THREADS))
        for number, region in enumerate(regions, 1):
            own = work[slice(*np.searchsorted(home, [region, region + 1]))]
            guests = guest[slice(*np.searchsorted(guest_region, [region, region + 1]))]
            i0, j0 = int(region) // columns * region_h, int(region) % columns * region_w
            box = (i0, min(height, i0 + region_h), j0, min(width, j0 + region_w))
            disks = np.concatenate([own, guests])
            local = (cx[disks] - j0, cy[disks] - i0, radii[disks])
            _integrate_region(read, box, n_genes, *local, disks, len(own), out, pool, reader)
            if progress is not None:
                progress(number, len(regions), f"{number}/{len(regions)} map regions")
    return out


def _z_code(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Positions along a Z-order (Morton) curve of the integer cells (x, y), both < 2^16."""
    code = np.zeros(len(x), np.uint64)
    x, y = x.astype(np.uint64), y.astype(np.uint64)
    for bit in range(16):
        code |= ((x >> np.uint64(bit)) & np.uint64(1)) << np.uint64(2 * bit)
        code |= ((y >> np.uint64(bit)) & np.uint64(1)) << np.uint64(2 * bit + 1)
    return code


def _integrate_region(read: Reader, box, n_genes: int, cx, cy, radius, disks, owned: int, out, pool, reader) -> None:
    """Put the part inside ``box`` (i0, i1, j0, j1) of each disk (centres relative to the box) into
    ``out[disks]``: set for the first ``owned`` (this is their home region), added for the others. Weights
    are built once, a batch of disks at a time by the ``pool``'s threads, and used for every gene group
    (read by ``reader``'s thread, if any); past `MAX_TERMS` the disks are done in parts."""
    i0, i1, j0, j1 = box
    height, width = i1 - i0, j1 - j0
    starts = range(0, len(radius), BATCH_DISKS)

    def terms(start: int) -> DiskTerms:
        stop = start + BATCH_DISKS
        return disk_terms(cx[start:stop], cy[start:stop], radius[start:stop], height, width)

    parts: list[DiskTerms] = []
    held, done = 0, 0
    # batches of weights are built by GEOMETRY_THREADS threads (numpy releases the GIL in its loops), a few
    # ahead (reading the first gene group meanwhile measured no faster: three threads on two busy cores)
    pending = collections.deque(pool.submit(terms, start) for start in starts[: 2 * GEOMETRY_THREADS])
    for number, start in enumerate(starts):
        parts.append(pending.popleft().result())
        if number + 2 * GEOMETRY_THREADS < len(starts):
            pending.append(pool.submit(terms, starts[number + 2 * GEOMETRY_THREADS]))
        held += len(parts[-1].rim_rows) + len(parts[-1].run_rows)
        stop = min(len(radius), start + BATCH_DISKS)
        if held >= MAX_TERMS or stop == len(radius):
            _apply(read, box, n_genes, parts, disks[done:stop], max(0, owned - done), out, pool, reader)
            parts, held, done = [], 0, stop


def _gene_groups(box, n_genes: int) -> list[slice]:
    """The gene groups a region is read in: at most `GENE_GROUP` genes, their table and block within
    `TABLE_BUDGET_BYTES`."""
    i0, i1, j0, j1 = box
    _, _, table_rows = table_layout(i1 - i0, j1 - j0)
    bytes_per_gene = table_rows * 4 + (i1 - i0) * (j1 - j0) * 4  # the table and the block it is made from
    step = max(1, min(GENE_GROUP, TABLE_BUDGET_BYTES // bytes_per_gene))
    return [slice(g0, min(n_genes, g0 + step)) for g0 in range(0, n_genes, step)]


def _joined(parts: list[DiskTerms], rows: str, offsets: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch's rows and offsets (disks + 1) from several."""
    all_rows = np.concatenate([getattr(p, rows) for p in parts])
    shift = np.cumsum([0] + [len(getattr(p, rows)) for p in parts])
    all_offsets = np.concatenate([getattr(p, offsets)[:-1] + s for p, s in zip(parts, shift)] + [shift[-1:]])
    return all_rows, all_offsets


def _apply(read: Reader, box, n_genes: int, parts, disks, owned: int, out, pool=None, reader=None) -> None:
    """Sum the terms of ``parts`` over every gene group of ``box`` into ``out[disks]``: set for the first
    ``owned`` disks, added for the rest. Large batches are split into one span of disks per ``pool`` thread,
    each span's product and writes done in its thread (scipy's product releases the GIL: 10^5 disks took
    1.3 s on one core of two); with a ``reader`` (thread), each next gene group is read while one is summed."""
    from scipy import sparse

    i0, i1, j0, j1 = box
    _, _, table_rows = table_layout(i1 - i0, j1 - j0)
    groups = _gene_groups(box, n_genes)
    step = groups[0].stop - groups[0].start
    rim_rows, rim_offsets = _joined(parts, "rim_rows", "rim_offsets")
    run_rows, run_offsets = _joined(parts, "run_rows", "run_offsets")
    rim_weights = np.concatenate([p.rim_weights for p in parts]).astype(np.float32, copy=False)
    shape = (len(rim_offsets) - 1, table_rows)
    # one sparse matrix: each disk's weighted rim pixels and its whole runs (weight 1) as a row
    terms = sparse.csr_matrix((rim_weights, rim_rows, rim_offsets), shape=shape) + sparse.csr_matrix(
        (np.ones(len(run_rows), np.float32), run_rows, run_offsets), shape=shape
    )
    owned = min(owned, len(disks))
    threads = GEOMETRY_THREADS if pool is not None and terms.nnz >= SPLIT_TERMS else 1
    # owned disks are split by output row (each span then writes a band of the output, one slice when the
    # rows are consecutive), guests evenly; within a span the Z-order is kept
    by_row = np.array_split(np.argsort(disks[:owned], kind="stable"), threads)
    guests = np.array_split(np.arange(owned, len(disks)), threads)
    spans = []
    for own, guest in zip(by_row, guests):
        at = np.concatenate([np.sort(own), guest])
        spans.append(_Span(terms[at] if threads > 1 else terms, disks[at], len(own)))
    buffer = np.empty(table_rows * step, np.float32)

    def add(genes: slice, block) -> None:
        table = build_table(
            np.asarray(block), buffer[: table_rows * (genes.stop - genes.start)].reshape(table_rows, -1)
        )
        if len(spans) == 1:
            spans[0].add(table, genes, out)
        else:
            for done in [pool.submit(span.add, table, genes, out) for span in spans]:
                done.result()

    if reader is None:
        for genes in groups:
            add(genes, read(i0, i1, j0, j1, genes))
        return
    # the next gene group is read (decoded) in a thread while this one is summed: both release the GIL
    ahead = reader.submit(read, i0, i1, j0, j1, groups[0])
    for number, genes in enumerate(groups):
        block = ahead.result()
        if number + 1 < len(groups):
            ahead = reader.submit(read, i0, i1, j0, j1, groups[number + 1])
        add(genes, block)


class _Span:
    """A share of the disks of one `_apply` batch (their rows of its sparse terms), summed in one thread: the
    first ``owned`` are set in the output, the rest added. Disks are unique within a batch, so spans never
    write the same output rows."""

    def __init__(self, terms, disks: np.ndarray, owned: int) -> None:
        self.terms, self.disks, self.owned = terms, disks, owned
        # results come in Z-order; written in the output's row order (page after page, not a random row each
        # time: 10^5 random rows of a 0.3 GB table cost ~10x more), as one slice when the rows are consecutive
        self.order = np.argsort(disks[:owned], kind="stable")
        rows = disks[:owned][self.order]
        consecutive = owned and rows[-1] - rows[0] == owned - 1
        self.rows: np.ndarray | slice = slice(int(rows[0]), int(rows[0]) + owned) if consecutive else rows

    def add(self, table: np.ndarray, genes: slice, out: np.ndarray) -> None:
        values = np.asarray(self.terms @ table, np.float32)
        for lo in range(0, self.owned, SUM_ROWS):
            # temporaries stay below numpy's huge-page size (4 MB): fresh huge pages are zeroed on every allocation
            rows = (
                self.rows[lo : lo + SUM_ROWS]
                if isinstance(self.rows, np.ndarray)
                else slice(self.rows.start + lo, min(self.rows.stop, self.rows.start + lo + SUM_ROWS))
            )
            out[rows, genes] = values[self.order[lo : lo + SUM_ROWS]]
        if self.owned < len(self.disks):
            out[self.disks[self.owned :], genes] += values[self.owned :]
