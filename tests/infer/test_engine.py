"""The tile engine on the bundled H&E crop: seams, the signed cache, coarser levels, lazy arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_genemap.data.protocols import Protocol
from napari_genemap.errors import GenemapInputError
from napari_genemap.infer.cache import GeneMapCache, any_downsample, genes_per_chunk
from napari_genemap.infer.engine import TileEngine, map_tissue, mean_downsample
from napari_genemap.infer.grid import TileGrid
from napari_genemap.infer.lazy import gene_pyramid, level_array
from napari_genemap.models.checkpoint import GeneMapModel
from napari_genemap.models.encoders import EncoderConfig
from napari_genemap.models.pixnet import PixNet, PixNetConfig


def small_model(stride: int = 16, seed: int = 0, digest: str = "a" * 64) -> GeneMapModel:
    torch.manual_seed(seed)
    genes = ("g0", "g1", "g2")
    model = PixNet(PixNetConfig(len(genes), EncoderConfig(weights="random"), stride=stride)).eval()
    model.set_output_scale(torch.tensor([0.5, 1.0, 2.0]))
    protocol = Protocol("test", genes, target_sum=1e4, log="ln")
    return GeneMapModel(model=model, protocol=protocol, mpp=4.0, window=128, digest=digest)


@pytest.fixture
def engine(sample_slide, tmp_path):
    engine = TileEngine(small_model(), sample_slide, tmp_path, tile=64, halo=64, skip_background=False)
    yield engine
    engine.close()


def test_tiles_agree_with_one_large_window(sample_slide, tmp_path):
    """2 x 2 tiles with a 448 px halo, each predicted alone, against one window over all four (1e-4)."""
    engine = TileEngine(
        small_model(), sample_slide, tmp_path, tile=64, halo=448, skip_background=False, backend="torch"
    )
    try:
        tiles = engine.predict_tiles([(1, 1), (1, 2), (2, 1), (2, 2)])
        window = engine.reader.read(64 - 448, 192 + 448, 64 - 448, 192 + 448)
        with torch.no_grad():
            whole = engine.loaded.model(torch.from_numpy(window).permute(2, 0, 1)[None].float() / 255)[0].numpy()
        whole = whole[:, 28:36, 28:36]  # the 4 x 4 map pixels of each tile, past the 28 px halo (448 / 16)
        block = np.block([[tiles[(1, 1)], tiles[(1, 2)]], [tiles[(2, 1)], tiles[(2, 2)]]])
        assert block.shape == whole.shape == (3, 8, 8)
        assert np.abs(block - whole).max() / np.abs(whole).max() < 1e-4
    finally:
        engine.close()


def test_cache_holds_tiles_and_coarser_levels_are_means(engine):
    grid = engine.grid
    assert (grid.height, grid.width) == (351, 351) and grid.map_shape(0) == (22, 22)
    assert engine.n_levels == 1  # a 22 px map needs no coarser level
    level0 = engine.read(0, 0, 22, 0, 22).astype(np.float32)
    assert engine.stats["predicted"] == 36  # 6 x 6 tiles of 64 px
    direct = engine.predict_tiles([(2, 3)])[(2, 3)]
    np.testing.assert_allclose(level0[:, 8:12, 12:16], direct, rtol=2e-3)  # float16 in the cache
    again = engine.read(0, 3, 9, 3, 9)
    assert engine.stats["predicted"] == 36  # read from the cache, not recomputed
    np.testing.assert_array_equal(again, level0[:, 3:9, 3:9].astype(np.float16))
    n_genes = len(engine.genes)
    assert engine.cache.arrays[0].chunks == (genes_per_chunk(n_genes), 64 // grid.stride, 64 // grid.stride)


def test_a_tile_is_written_in_chunks_of_several_genes():
    """Fewer, larger chunks per tile (zarr's per-chunk work dominated writing a tile): the largest divisor
    of the gene count up to 8, since a shard holds every gene."""
    assert [genes_per_chunk(n) for n in (1, 7, 50, 64, 300, 785, 787)] == [1, 7, 5, 8, 6, 5, 1]


def test_coarser_levels_come_from_the_finer_level(sample_slide, tmp_path):
    engine = TileEngine(
        small_model(stride=4), sample_slide, tmp_path, tile=64, halo=32, skip_background=False, min_level_side=16
    )
    try:
        assert [engine.level_shape(level) for level in range(engine.n_levels)] == [
            (88, 88),
            (44, 44),
            (22, 22),
            (11, 11),
        ]
        coarse = engine.read(2, 0, 22, 0, 22).astype(np.float32)  # 2 x 2 tiles of 16 px, the last ones partial
        assert engine.stats == {"predicted": 36, "empty": 0, "downsampled": 9 + 4}
        fine = engine.read(0, 0, 88, 0, 88).astype(np.float32)
        assert engine.stats["predicted"] == 36  # level 0 was filled on the way
        expected = mean_downsample(mean_downsample(fine).astype(np.float16).astype(np.float32))
        np.testing.assert_allclose(coarse, expected, rtol=2e-3)
    finally:
        engine.close()


def test_mean_downsample_of_odd_sizes():
    values = np.arange(15, dtype=np.float32).reshape(1, 3, 5)
    out = mean_downsample(values)
    assert out.shape == (1, 2, 3)
    assert out[0, 0, 0] == pytest.approx((0 + 1 + 5 + 6) / 4)
    assert out[0, 0, 2] == pytest.approx((4 + 9) / 2)  # the odd last column
    assert out[0, 1, 2] == pytest.approx(14)  # the corner pixel alone


@pytest.mark.parametrize("factor, stride, mask_scale", [(2.9, 4, 8.0), (5.8, 16, 8.0), (1.0, 4, 16.0), (0.5, 4, 1.0)])
def test_tissue_on_map_pixels_is_any_mask_pixel_inside(factor, stride, mask_scale):
    """Map pixels larger and smaller than mask pixels, against a pixel-by-pixel count."""
    grid = TileGrid(301, 277, stride, tile=64, halo=0, factor=factor)
    mask = (
        np.random.default_rng(0).random(
            (int(np.ceil(301 * factor / mask_scale)), int(np.ceil(277 * factor / mask_scale)))
        )
        > 0.97
    )
    tissue = map_tissue(mask, mask_scale, grid)
    assert tissue.shape == grid.map_shape(0)
    to_mask = factor / mask_scale
    for i, j in np.ndindex(tissue.shape):
        top, left = int(i * stride * to_mask), int(j * stride * to_mask)
        bottom = max(top + 1, int(np.ceil(min((i + 1) * stride, 301) * to_mask)))
        right = max(left + 1, int(np.ceil(min((j + 1) * stride, 277) * to_mask)))
        assert tissue[i, j] == mask[top:bottom, left:right].any(), (i, j)
    assert 0.02 < tissue.mean() < 0.98  # neither all nor nothing: the comparison means something


def test_the_cache_keeps_the_tissue_mask_and_glass_tiles_count_as_done(sample_slide, tmp_path):
    engine = TileEngine(small_model(stride=4), sample_slide, tmp_path / "a", tile=64, halo=32, min_level_side=16)
    try:
        stored = GeneMapCache.open(engine.cache.path)
        np.testing.assert_array_equal(stored.tissue(0), map_tissue(engine.mask, engine.mask_scale, engine.grid))
        np.testing.assert_array_equal(stored.tissue(2), any_downsample(any_downsample(stored.tissue(0))))
        # tiles agree with the stored pixels: a tile has tissue iff one of its map pixels has
        engine.mask = np.zeros_like(engine.mask)  # glass with three specks of tissue
        engine.mask[[100, 1500, 2047], [200, 30, 2047]] = True
        side, tissue = engine.grid.tile_map, map_tissue(engine.mask, engine.mask_scale, engine.grid)
        tiles = [(r, c) for r in range(engine.grid.rows) for c in range(engine.grid.columns)]
        with_tissue = {
            t for t in tiles if tissue[t[0] * side : (t[0] + 1) * side, t[1] * side : (t[1] + 1) * side].any()
        }
        assert {t for t in tiles if engine.has_tissue(*t)} == with_tissue and len(with_tissue) == 3
        # a glass tile is written as zeros (zarr writes no shard for it) and is done all the same
        glass = next(t for t in tiles if t not in with_tissue)
        engine.ensure(0, [glass])
        engine.ensure(0, [glass])
        assert engine.stats == {"predicted": 0, "empty": 1, "downsampled": 0}
        assert engine.cache.has(0, *glass) and stored.has(0, *glass)
        np.testing.assert_array_equal(stored.read(0, glass[0] * side, (glass[0] + 1) * side, 0, 4), 0)
    finally:
        engine.close()
    plain = TileEngine(small_model(stride=4), sample_slide, tmp_path / "b", tile=64, halo=32, skip_background=False)
    try:
        assert GeneMapCache.open(plain.cache.path).tissue(0) is None  # shows everything
    finally:
        plain.close()


def test_changing_the_checkpoint_invalidates_the_cache(sample_slide, tmp_path, engine):
    first = engine.cache.path
    other = TileEngine(small_model(seed=1, digest="b" * 64), sample_slide, tmp_path, tile=64, halo=64)
    try:
        assert other.cache.path != first and not other.cache.has(0, 0, 0)
    finally:
        other.close()
    import zarr

    group = zarr.open_group(first, mode="r+")
    group.attrs["signature"] = {**group.attrs["signature"], "stride": 2}  # a store that lies about itself
    with pytest.raises(GenemapInputError, match="cache signature does not match"):
        TileEngine(small_model(), sample_slide, tmp_path, tile=64, halo=64)


def test_lazy_arrays_have_stable_names_and_read_through_the_engine(engine):
    one = level_array(engine, 0, gene=1)
    assert one.shape == (22, 22) and one.dtype == np.float16 and one.chunksize == (4, 4)
    assert one.name == level_array(engine, 0, gene=1).name
    assert engine.stats["predicted"] == 0  # building graphs runs nothing
    region = one[4:8, 0:8].compute()
    assert engine.stats["predicted"] == 2
    np.testing.assert_array_equal(region, engine.cache.read(0, 4, 8, 0, 8, 1))
    pyramid = gene_pyramid(engine, "g2")
    assert [level.shape for level in pyramid] == [(22, 22)]
    everything = level_array(engine, 0).compute()
    assert everything.shape == (3, 22, 22) and engine.stats["predicted"] == 36


def test_polygons_and_circles_from_the_engine(engine, sample_slide):
    """A pixel-aligned square integrates to the sum of its pixels; a fine polygonal disk to the circle."""
    import geopandas as gpd
    import shapely

    from napari_genemap.infer.aggregate import GeneMapSource, aggregate_shapes
    from napari_genemap.io import slide_mpp

    source = GeneMapSource.from_engine(engine, slide_mpp(sample_slide))
    pixel = source.pixel_size  # slide px per map px
    square = shapely.box(3 * pixel, 5 * pixel, 9 * pixel, 8 * pixel)  # map columns 3..8, rows 5..7
    center, radius = (150.0, 170.0), 60.0
    polygon_disk = shapely.Point(center).buffer(radius, quad_segs=256)
    shapes = gpd.GeoDataFrame(
        {"radius": [np.nan, radius, np.nan]},
        geometry=[square, shapely.Point(center), polygon_disk],
        index=["square", "circle", "polygon"],
    )
    table = aggregate_shapes(source, shapes)
    assert list(table.obs_names) == ["square", "circle", "polygon"]
    level0 = engine.read(0, 0, 22, 0, 22).astype(np.float64)
    np.testing.assert_allclose(table["square"].layers["integral"][0], level0[:, 5:8, 3:9].sum((1, 2)), rtol=1e-5)
    circle, polygon = table["circle"].layers["integral"][0], table["polygon"].layers["integral"][0]
    np.testing.assert_allclose(polygon, circle, rtol=1e-3)  # the 1024-gon is 1e-5 short of the disk's area
    np.testing.assert_allclose(table.obsm["spatial"][1], center)
    assert table.uns["genemap"]["protocol"]["name"] == "test"


def test_the_tissue_mask_calls_tinted_glass_glass_and_pale_tissue_tissue(her2st, sample_slide):
    """C3's glass around the section is eosin-tinted (a fixed colour rule called 30% of the slide tissue,
    painting the map over glass); the sample is tissue edge to edge, pale stroma included."""
    from napari_genemap.errors import GenemapDataWarning
    from napari_genemap.infer.engine import tissue_mask
    from napari_genemap.io import image_levels, read_slide, slide_mpp

    with pytest.warns(GenemapDataWarning, match="dropped 2 spots"):  # two C3 spots have no counts
        c3 = read_slide(her2st, section="C3")
    mask, scale = tissue_mask(*image_levels(c3), slide_mpp(c3))
    assert scale * slide_mpp(c3) >= 4.0 and 0.15 < mask.mean() < 0.25
    levels, scales = image_levels(c3)
    pixels = np.asarray(levels[scales.index(scale)]).astype(np.int16)
    from scipy import ndimage

    far_from_dark = ndimage.distance_transform_edt(pixels.mean(0) > 200) * scale * slide_mpp(c3) > 150  # µm
    tinted_glass = (pixels.mean(0) > 215) & ((pixels.max(0) - pixels.min(0)) > 20) & far_from_dark
    assert tinted_glass.mean() > 0.05 and mask[tinted_glass].mean() < 0.3  # the colour rule alone: 1.0
    sample_mask, _ = tissue_mask(*image_levels(sample_slide), slide_mpp(sample_slide))
    assert sample_mask.mean() > 0.97
