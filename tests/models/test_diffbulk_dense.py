"""DiffBulk's dense stage-2 model: it starts as its PixNet, its diffusion features live on a slide-wide lattice
(so the tile engine's tiles agree with one large window), it saves and loads as a gene-map checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_genemap.data.protocols import Protocol
from napari_genemap.errors import GenemapInputError
from napari_genemap.infer.engine import TileEngine
from napari_genemap.models.checkpoint import GeneMapModel, load_checkpoint, save_checkpoint

GENES = ("g0", "g1", "g2")


def test_an_untrained_dense_model_predicts_exactly_what_its_pixnet_does(tiny_dense):
    model, pixnet = tiny_dense()
    image = torch.rand(2, 3, 128, 192)
    with torch.no_grad():
        torch.testing.assert_close(model(image), pixnet(image), rtol=0, atol=0)
        torch.testing.assert_close(model(image, margin=2), pixnet(image, margin=2), rtol=0, atol=0)
        model.fusion.project.weight.normal_()
        assert (model(image) - pixnet(image)).abs().max() > 1e-3  # f now counts


def test_diffusion_features_sit_on_a_lattice_that_crops_and_margins_keep(tiny_dense):
    model, _ = tiny_dense()
    image = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        whole = model.diffusion_map(image)
        shifted = model.diffusion_map(image[..., 64:, 128:])  # a window starting one and two tiles further
        margin = model.diffusion_map(image, margin=10)  # 80 px: one tile skipped, 2 map px cut inside the next
    assert whole.shape == (1, model.reducer.dim, 32, 32)
    # equal to float rounding (kernels vary with the number of tiles in a batch); a window off the lattice
    # changes the f-only model's map by 18% of its maximum
    torch.testing.assert_close(shifted, whole[..., 8:, 16:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(margin, whole[..., 10:-10, 10:-10], rtol=1e-5, atol=1e-5)


def test_inputs_off_the_feature_lattice_are_refused_in_one_line(tiny_dense):
    model, _ = tiny_dense()
    assert model.input_multiple == 64
    with pytest.raises(GenemapInputError, match="multiples of 64"):
        model(torch.rand(1, 3, 96, 128))


def _gene_map_model(model) -> GeneMapModel:
    protocol = Protocol("test", GENES, target_sum=1e4, log="ln")
    return GeneMapModel(
        model=model, protocol=protocol, mpp=4.0, window=128, digest="d" * 64, model_class="DiffBulkDense"
    )


def test_engine_tiles_agree_with_one_large_window_for_the_tile_local_features(tiny_dense, sample_slide, tmp_path):
    """f alone (p = 0) depends on its own 64 px tiles only, so 64 px engine tiles with a 64 px halo give
    the map of one large window over them."""
    model, _ = tiny_dense("diffusion")
    with torch.no_grad():
        model.fusion.project.weight.normal_()
    engine = TileEngine(_gene_map_model(model), sample_slide, tmp_path, tile=64, halo=64, skip_background=False)
    try:
        assert engine.backend == "torch"  # not exported: DiffBulk runs in torch
        tiles = engine.predict_tiles([(1, 1), (1, 2), (2, 1), (2, 2)])
        window = engine.reader.read(0, 256, 0, 256)
        with torch.no_grad():
            whole = model(torch.from_numpy(window).permute(2, 0, 1)[None].float() / 255)[0].numpy()
        block = np.block([[tiles[(1, 1)], tiles[(1, 2)]], [tiles[(2, 1)], tiles[(2, 2)]]])
        assert block.shape == (3, 16, 16)
        # float rounding only (oneDNN's kernels differ with the batch size); a window off the lattice differs by 18%
        assert np.abs(block - whole[:, 8:24, 8:24]).max() / np.abs(whole).max() < 1e-4
    finally:
        engine.close()


def test_the_engine_refuses_tiles_off_the_models_lattice_and_rounds_its_defaults(tiny_dense, sample_slide, tmp_path):
    model, _ = tiny_dense()
    with pytest.raises(GenemapInputError, match="tile 96: expected a positive multiple of 64"):
        TileEngine(_gene_map_model(model), sample_slide, tmp_path, tile=96, halo=64)
    model, _ = tiny_dense(feature_tile=96)  # 1024 and 384 are not multiples of 96
    engine = TileEngine(_gene_map_model(model), sample_slide, tmp_path, skip_background=False)
    try:
        assert (engine.grid.tile, engine.grid.halo, engine.grid.alignment) == (1056, 384, 96)
    finally:
        engine.close()


def test_a_dense_checkpoint_saves_and_loads_as_a_gene_map_model(tiny_dense, tmp_path):
    model, _ = tiny_dense()
    with torch.no_grad():
        model.fusion.project.weight.normal_()
    protocol = Protocol("test", GENES, target_sum=1e4, log="ln")
    folder = save_checkpoint(tmp_path / "dense", model, protocol=protocol, mpp=4.0, window=128)
    loaded = load_checkpoint(folder, lazy=True)  # lazily only PixNet: this one is built now
    assert loaded.built and loaded.model_class == "DiffBulkDense" and not loaded.exportable
    assert loaded.input_multiple == 64 and loaded.stride == 8
    image = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(image), model(image))
    assert not any(p.requires_grad for p in loaded.model.diffusion.parameters())
