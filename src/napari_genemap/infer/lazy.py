"""Each level of the gene maps as a lazy dask array whose blocks come from the cache or the tile engine.

One block = one tile of that level. The arrays are built with ``map_blocks`` (``meta=`` given, so dask never
calls the engine while building the graph) and named from the cache's signature, level and gene, so the
same map always has the same keys. Computing a block reads the cache and, when the tile is missing, asks
the engine, which de-duplicates requests and runs the model on its own thread; this works with dask's
threaded scheduler (napari, notebooks). Whole-slide prediction on a cluster drives the engine directly.
"""

from __future__ import annotations

from functools import partial

import dask.array as da
import numpy as np

from .cache import DTYPE


def _chunks(total: int, side: int) -> tuple[int, ...]:
    return (side,) * (total // side) + ((total % side,) if total % side else ())


def _block(engine, level: int, gene: int | None, block_id=None, block_info=None) -> np.ndarray:
    (i0, i1), (j0, j1) = block_info[None]["array-location"][-2:]
    genes = slice(None) if gene is None else gene
    return engine.read(level, i0, i1, j0, j1, genes)


def level_array(engine, level: int, gene: int | None = None) -> da.Array:
    """Level ``level`` as (genes, h, w), or (h, w) for one gene (by index), float16, lazily predicted."""
    height, width = engine.level_shape(level)
    side = engine.grid.tile_map
    spatial = (_chunks(height, side), _chunks(width, side))
    chunks = spatial if gene is not None else ((len(engine.genes),), *spatial)
    label = "all" if gene is None else engine.genes[gene]
    return da.map_blocks(
        partial(_block, engine, level, gene),
        chunks=chunks,
        dtype=DTYPE,
        meta=np.empty((0,) * len(chunks), dtype=DTYPE),
        name=f"genemap-{engine.cache.digest[:16]}-level{level}-{label}",
    )


def gene_pyramid(engine, gene: int | str) -> list[da.Array]:
    """Every level of one gene's map, finest first (what a napari multiscale layer takes)."""
    index = engine.genes.index(gene) if isinstance(gene, str) else int(gene)
    return [level_array(engine, level, index) for level in range(engine.n_levels)]
