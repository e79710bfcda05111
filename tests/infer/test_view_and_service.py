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


@pytest.mark.slow
def test_service_predicts_what_is_wanted_and_aggregates(sample_slide, tmp_path):
    import geopandas as gpd
    import shapely

    from napari_genemap.checkpoints import shipped_checkpoint
    from napari_genemap.infer.aggregate import GeneMapSource, aggregate_shapes
    from napari_genemap.infer.engine import TileEngine
    from napari_genemap.infer.predict import EngineSpec
    from napari_genemap.infer.service import TileService
    from napari_genemap.models.checkpoint import load_checkpoint
    from napari_genemap.sample import SECTION, sample_root

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
        assert event.payload == {"done": [(0, 0, 0)], "queued": 0, "paused": False, "total": 1, "eta_s": 0.0}
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


# --- a HER2ST section with glass, a small real model --------------------------------------------------------
@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A small real PixNet (random weights; stride 4, 4 µm/px) saved as a checkpoint: with 512 px tiles a
    HER2ST section is 4 x 4 tiles (3 of them glass), each a fraction of a second on the CPU."""
    import torch

    from napari_genemap.data.protocols import Protocol
    from napari_genemap.models.checkpoint import save_checkpoint
    from napari_genemap.models.encoders import EncoderConfig
    from napari_genemap.models.pixnet import PixNet, PixNetConfig

    torch.manual_seed(0)
    genes = ("g0", "g1", "g2")
    model = PixNet(PixNetConfig(len(genes), EncoderConfig(weights="random"), stride=4)).eval()
    model.set_output_scale(torch.tensor([0.5, 1.0, 2.0]))
    protocol = Protocol("test", genes, target_sum=1e4, log="ln")
    return save_checkpoint(
        tmp_path_factory.mktemp("checkpoint") / "small", model, protocol=protocol, mpp=4.0, window=128
    )


@pytest.fixture(scope="module")
def c3(her2st):
    from napari_genemap.errors import GenemapDataWarning
    from napari_genemap.io import read_slide

    with pytest.warns(GenemapDataWarning, match="dropped 2 spots"):  # two C3 spots have no counts
        return read_slide(her2st, section="C3")


def tile_tissue(cache: GeneMapCache) -> dict[tuple[int, int], float]:
    """Fraction of each level-0 tile's map pixels that the stored mask calls tissue."""
    side, tissue = cache.grid.tile_map, cache.tissue(0)
    rows, columns = cache.tile_counts(0)
    return {
        (r, c): tissue[r * side : (r + 1) * side, c * side : (c + 1) * side].mean()
        for r in range(rows)
        for c in range(columns)
    }


@pytest.mark.slow
def test_service_finishes_a_section_with_glass_and_estimates_the_time_left(her2st, small_checkpoint, tmp_path):
    """Glass tiles are written as zeros (no shard file); they must still count as done, or the service
    predicts them forever and never reports an empty queue."""
    import time

    from napari_genemap.infer.predict import EngineSpec
    from napari_genemap.infer.service import TileService

    spec = EngineSpec(
        slide=str(her2st), section="C3", checkpoint=str(small_checkpoint), cache_root=str(tmp_path), tile=512, halo=64
    )
    service = TileService(spec)
    try:
        cache = GeneMapCache.open(service.wait("ready", timeout=180).payload["cache"])
        fractions = tile_tissue(cache)
        glass = {t for t, f in fractions.items() if f == 0}
        assert cache.tile_counts(0) == (4, 4) and cache.n_levels == 2 and len(glass) == 8
        wanted = [(0, *t) for t in fractions] + [(1, r, c) for r in range(2) for c in range(2)]
        service.want(wanted)
        reports = []
        while not reports or reports[-1][1]["queued"]:
            assert len(reports) <= 2 * len(wanted), (
                f"still {reports[-1][1]['queued']} queued after {len(reports)} reports"
            )
            reports.append((time.monotonic(), service.wait("tiles", timeout=120).payload))
        assert all(p["total"] == len(wanted) == 20 and not p["paused"] for _, p in reports)
        assert reports[0][1] == {"done": [], "queued": 20, "paused": False, "total": 20, "eta_s": None}
        finished = [tuple(t) for _, p in reports for t in p["done"]]
        assert sorted(finished) == sorted(wanted)  # each tile once, glass included
        assert all(cache.has(*t) for t in wanted)
        assert reports[-1][1]["eta_s"] == 0.0
        # the estimate: tissue tiles left x seconds per model call, against the calls' measured pace
        model_reports = [(s, p) for s, p in reports if any(t[0] == 0 and t[1:] not in glass for t in p["done"])]
        assert len(model_reports) == 16 - len(glass)
        pace = (model_reports[-1][0] - model_reports[0][0]) / (len(model_reports) - 1)
        left = len(model_reports)
        for index, (_, payload) in enumerate(model_reports[:-1]):
            left -= 1
            assert payload["eta_s"] > 0
            if index >= 2:  # past the first calls, which include the model's warm-up
                assert 0.3 * pace * left < payload["eta_s"] < 3 * pace * left, (payload["eta_s"], pace, left)
        # asking again predicts nothing
        service.want(wanted)
        assert service.wait("tiles", timeout=30).payload == {
            "done": [], "queued": 0, "paused": False, "total": 20, "eta_s": 0.0
        }  # fmt: skip
        time.sleep(1.0)
        assert service.poll() == []
    finally:
        service.close()
    for row, column in glass:
        np.testing.assert_array_equal(cache.read(0, row * 128, (row + 1) * 128, column * 128, (column + 1) * 128), 0)
        assert np.isnan(CachedLevel(cache, 0, 1)[row * 128 : (row + 1) * 128, column * 128 : (column + 1) * 128]).all()


def test_cached_level_hides_glass_and_shows_tissue(c3, small_checkpoint, tmp_path):
    """NaN (transparent in napari) on map pixels whose H&E is all glass, values on tissue; coarser levels
    hide a pixel only if all four finer ones are glass; a cache without a mask shows everything."""
    from napari_genemap.infer.cache import any_downsample
    from napari_genemap.infer.engine import TileEngine
    from napari_genemap.io import image_levels
    from napari_genemap.models.checkpoint import load_checkpoint

    model = load_checkpoint(small_checkpoint)
    engine = TileEngine(model, c3, tmp_path / "masked", tile=512, halo=64)
    try:
        fractions = tile_tissue(engine.cache)
        partly = next(t for t, f in fractions.items() if 0 < f < 0.5)  # tissue at one edge, glass elsewhere
        engine.ensure(1, [(partly[0] // 2, partly[1] // 2)])  # its level-1 tile (and the 4 level-0 tiles under it)
    finally:
        engine.close()
    viewer_cache = GeneMapCache.open(engine.cache.path)  # what napari's process opens (no model)
    side = viewer_cache.grid.tile_map
    (r, c), box = partly, np.s_[partly[0] * side : (partly[0] + 1) * side, partly[1] * side : (partly[1] + 1) * side]
    values = CachedLevel(viewer_cache, 0, 2)[box]
    hidden = np.isnan(values)
    assert 0.3 < hidden.mean() < 0.95 and np.isfinite(values[~hidden]).all()
    # the H&E at each map pixel's centre, on the pyramid level the mask was made from: glass where hidden
    levels, scales = image_levels(c3)
    index = scales.index(engine.mask_scale)
    pixel = viewer_cache.grid.map_pixel_size(0) / engine.mask_scale
    centres_y = ((np.arange(r * side, (r + 1) * side) + 0.5) * pixel).astype(int).clip(0, levels[index].shape[1] - 1)
    centres_x = ((np.arange(c * side, (c + 1) * side) + 0.5) * pixel).astype(int).clip(0, levels[index].shape[2] - 1)
    rgb = np.asarray(levels[index])[:, centres_y[:, None], centres_x[None, :]].astype(np.int16)
    grey = rgb.mean(0)  # C3's glass is ~228 (pink-tinted), its tissue darker
    assert (grey[hidden] > 205).mean() > 0.97
    assert np.median(grey[~hidden]) < np.median(grey[hidden]) - 15
    # level 1: hidden only where the 2 x 2 level-0 pixels are all glass
    coarse = CachedLevel(viewer_cache, 1, 2)[:, :]
    tile1 = np.s_[(r // 2) * side : (r // 2 + 1) * side, (c // 2) * side : (c // 2 + 1) * side]
    np.testing.assert_array_equal(np.isnan(coarse[tile1]), ~any_downsample(viewer_cache.tissue(0))[tile1])
    assert np.isfinite(coarse[tile1][~np.isnan(coarse[tile1])]).all() and np.isnan(coarse[tile1]).any()
    # a box reaching past the map's edge (a view at the slide's corner) reads NaN there, the rest as before
    rows, cols = coarse.shape
    wide = CachedLevel(viewer_cache, 1, 2).read(-3, rows + 40, 0, cols + 7)
    assert wide.shape == (rows + 43, cols + 7) and np.isnan(wide[:3]).all() and np.isnan(wide[-40:]).all()
    np.testing.assert_array_equal(wide[3 : rows + 3, :cols], coarse)

    plain = TileEngine(model, c3, tmp_path / "plain", tile=512, halo=64, skip_background=False)
    try:
        plain.ensure(0, [partly])
    finally:
        plain.close()
    unmasked = GeneMapCache.open(plain.cache.path)
    assert unmasked.tissue(0) is None and np.isfinite(CachedLevel(unmasked, 0, 2)[box]).all()


def test_a_service_that_dies_is_reported_once_and_closes_at_once(tmp_path):
    """Killed right after its start (before or just after it connects): one "error" from poll, wait
    raises instead of hanging, close returns at once."""
    import signal
    import time

    import psutil

    from napari_genemap.checkpoints import shipped_checkpoint
    from napari_genemap.infer.predict import EngineSpec
    from napari_genemap.infer.service import TileService
    from napari_genemap.sample import SECTION, sample_root

    spec = EngineSpec(
        slide=str(sample_root()), section=SECTION, checkpoint=str(shipped_checkpoint()), cache_root=str(tmp_path)
    )
    earlier = {p.pid for p in psutil.Process().children()}  # an earlier test's killed service may be still exiting
    service = TileService(spec)
    try:
        (child,) = [
            p
            for p in psutil.Process().children()
            if p.pid not in earlier and "napari_genemap.infer.service" in p.cmdline()
        ]
        child.send_signal(signal.SIGKILL)
        service.want([(0, 0, 0)])  # goes nowhere, blocks nothing
        events, deadline = [], time.monotonic() + 30
        while not events and time.monotonic() < deadline:
            events = service.poll()
            time.sleep(0.05)
        assert [(e.kind, e.payload) for e in events] == [("error", {"message": "tile service stopped (exit -9)"})]
        time.sleep(0.3)
        assert service.poll() == [] and not service.alive
        with pytest.raises(RuntimeError, match=r"tile service stopped \(exit -9\)"):
            service.wait("ready", timeout=30)
    finally:
        started = time.monotonic()
        service.close()
        assert time.monotonic() - started < 3
