"""Reading the cache for a viewer (NaN where not predicted), the order of tiles a view asks for, and the
tile service process (torch-free on the caller's side)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_genemap.infer.cache import GeneMapCache
from napari_genemap.infer.grid import TileGrid
from napari_genemap.infer.view import CachedLevel, gene_levels, view_plan


def small_cache(tmp_path, genes=("A", "B")) -> GeneMapCache:
    """A 3 x 3 tile cache (tile 64 model px, stride 4 -> 16 map px per tile; 150 x 150 px frame)."""
    grid = TileGrid(150, 150, stride=4, tile=64, halo=32, factor=1.0)
    return GeneMapCache(tmp_path, {"test": 1}, grid, list(genes), levels=2)


def test_cached_level_reads_tiles_and_gives_nan_where_missing(tmp_path):
    cache = small_cache(tmp_path)
    assert cache.grid.map_shape(0) == (38, 38)
    values = np.arange(2 * 16 * 16, dtype=np.float32).reshape(2, 16, 16)
    cache.write(0, 1, 0, values)
    level = gene_levels(GeneMapCache.open(cache.path), "B")[0]  # a viewer's read-only handle
    assert level.shape == (38, 38) and level.dtype == np.float32 and level.ndim == 2
    block = level[10:40, 0:20]
    assert block.shape == (28, 20)
    np.testing.assert_array_equal(block[6:22, 0:16], values[1])  # map rows 16..31 = tile row 1
    assert np.isnan(block[:6]).all() and np.isnan(block[22:]).all() and np.isnan(block[6:22, 16:]).all()
    assert level[20, 3] == values[1, 4, 3]
    np.testing.assert_array_equal(level[16:32:4, 0:16:8], values[1, ::4, ::8])
    assert np.asarray(CachedLevel(cache, 0, 0)).shape == (38, 38)


def test_view_plan_orders_view_then_ring_then_coarser(tmp_path):
    cache = small_cache(tmp_path)
    plan = view_plan(cache, 0, (16, 32, 16, 32), ring=1)  # exactly tile (1, 1)
    assert plan[0] == (0, 1, 1)
    assert sorted(plan[1:9]) == sorted((0, r, c) for r in range(3) for c in range(3) if (r, c) != (1, 1))
    assert plan[9:] == [(1, 0, 0)]  # the coarser level's one tile (19 x 19 px)
    # a view over two tiles: the one nearer its centre first
    assert view_plan(cache, 0, (0, 16, 4, 40), ring=0)[:3] == [(0, 0, 1), (0, 0, 0), (0, 0, 2)]
    assert view_plan(cache, 0, (-50, -10, -50, -10), ring=0) == []  # a view beside the map wants nothing


def test_service_predicts_what_is_wanted_and_aggregates(sample_slide, tmp_path):
    import geopandas as gpd
    import shapely

    from napari_genemap.checkpoints import shipped_checkpoint
    from napari_genemap.infer.aggregate import GeneMapSource, aggregate_shapes
    from napari_genemap.infer.engine import TileEngine
    from napari_genemap.infer.predict import EngineSpec
    from napari_genemap.infer.service import TileService
    from napari_genemap.sample import SECTION, sample_root
    from napari_genemap.train.checkpoint import load_checkpoint

    spec = EngineSpec(
        slide=str(sample_root()), section=SECTION, checkpoint=str(shipped_checkpoint()), cache_root=str(tmp_path)
    )
    service = TileService(spec)
    try:
        ready = service.wait("ready", timeout=120)
        cache = GeneMapCache.open(ready.payload["cache"])
        assert cache.grid.rows == cache.grid.columns == 1 and not cache.has(0, 0, 0)
        service.want([(0, 0, 0)])
        while not (event := service.wait("tiles", timeout=120)).payload["done"]:
            pass
        assert event.payload == {"done": [(0, 0, 0)], "queued": 0, "paused": False}
        assert cache.has(0, 0, 0)
        circles = gpd.GeoDataFrame(
            {"radius": [40.0, 120.0]}, geometry=shapely.points([(500, 600), (1400, 900)]), index=["a", "b"]
        )
        service.aggregate(circles)
        table = service.wait("aggregated", timeout=120).payload["table"]
    finally:
        service.close()
    assert not service.alive
    # the same numbers in this process, from the same cache
    engine = TileEngine(load_checkpoint(shipped_checkpoint()), sample_slide, tmp_path)
    try:
        assert engine.cache.path == cache.path
        direct = aggregate_shapes(GeneMapSource.from_engine(engine, engine.slide_mpp), circles)
        assert engine.stats["predicted"] == 0  # read from the service's cache
        tile = engine.predict_tiles([(0, 0)])[(0, 0)]
    finally:
        engine.close()
    np.testing.assert_allclose(table.X, direct.X, rtol=1e-6)
    assert list(table.obs_names) == ["a", "b"] and table.obs["radius"].tolist() == [40.0, 120.0]
    stored = cache.read(0, 0, 176, 0, 176).astype(np.float32)
    assert np.abs(stored - tile).max() <= 2e-3 * np.abs(tile).max()  # float16 storage of the model's output


def test_service_reports_a_bad_checkpoint_in_one_line(tmp_path):
    from napari_genemap.errors import GenemapInputError
    from napari_genemap.infer.predict import EngineSpec
    from napari_genemap.infer.service import TileService
    from napari_genemap.sample import SECTION, sample_root

    (tmp_path / "empty").mkdir()
    spec = EngineSpec(
        slide=str(sample_root()), section=SECTION, checkpoint=str(tmp_path / "empty"), cache_root=str(tmp_path)
    )
    service = TileService(spec)
    try:
        with pytest.raises(GenemapInputError, match="checkpoint folder lacks"):
            service.wait("ready", timeout=120)
    finally:
        service.close()
