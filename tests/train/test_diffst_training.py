"""Diff-ST end to end at a small size on the bundled sample: train, checkpoint, resume, cancel, super-resolve
into a SpatialData store and read it back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_genemap.cli import main
from napari_genemap.errors import GenemapInputError
from napari_genemap.sample import SECTION, sample_root
from napari_genemap.train.diffst import DiffSTTrainConfig, standardisation_of, train_diffst

GENES = ["HLA-B", "ISG15", "TFF3", "CD74", "KRT8", "MUCL1"]


def config(out, pathology, **changes) -> DiffSTTrainConfig:
    settings = dict(
        slides=[{"path": str(sample_root()), "section": SECTION}],
        out=str(out),
        pathology=str(pathology),
        protocol="hist2st",
        genes=GENES,
        patch=8,
        width=[32, 64],
        steps=4,
        batch_size=4,
        eval_every=2,
        samples=2,
        sample_steps=4,
        threads=1,
        device="cpu",
    )
    return DiffSTTrainConfig.from_dict({**settings, **changes})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, random_checkpoint):
    out = tmp_path_factory.mktemp("diffst") / "run"
    return out, train_diffst(config(out, random_checkpoint))


def test_a_run_validates_saves_and_its_checkpoint_loads(trained, sample_slide):
    from napari_genemap.data.protocols import hist2st
    from napari_genemap.data.superres import section_pair
    from napari_genemap.models.diffst_checkpoint import load_diffst

    out, summary = trained
    assert summary["steps"] == 4 and not summary["cancelled"]
    validated = [r for r in summary["history"] if "validation" in r]
    assert [r["step"] for r in validated] == [2, 4]
    assert set(validated[-1]["validation"]) == {SECTION}
    assert validated[-1]["validation_on"] == "training slides"  # no validation slide was named
    loaded = load_diffst(out)
    assert loaded.protocol.genes == tuple(GENES) and loaded.model.config.genes == len(GENES)
    assert loaded.model.config.histology_channels > 0 and loaded.pathology is not None
    assert loaded.config["metrics"]["step"] == 4
    # the target is each spot's departure from its 2 x 2 block's LR value (residual, the default): its
    # statistics over the training spots, computed here spot by spot
    rule = hist2st()
    pair = section_pair(sample_slide, type(rule)("p", tuple(GENES), rule.target_sum, rule.log), 2)
    rows, cols = np.nonzero(pair.hr_mask)
    departures = pair.hr[:, rows, cols] - pair.lr[:, rows // 2, cols // 2]
    assert loaded.standardisation.residual
    np.testing.assert_allclose(loaded.standardisation.hr_mean, departures.mean(1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(loaded.standardisation.hr_std, departures.std(1), rtol=1e-4)
    # without the residual, the spots' own statistics
    plain = standardisation_of([pair], residual=False)
    np.testing.assert_allclose(plain.hr_mean, pair.hr[:, rows, cols].mean(1), rtol=1e-5)
    assert not plain.residual and not np.allclose(plain.hr_mean, loaded.standardisation.hr_mean)


def test_a_run_resumes_where_it_stopped_and_cancels_cleanly(trained, random_checkpoint, tmp_path):
    import shutil

    from napari_genemap.models.diffst_checkpoint import load_diffst

    out, _ = trained
    run = tmp_path / "run"
    shutil.copytree(out, run)
    before = {k: v.clone() for k, v in load_diffst(run).model.state_dict().items()}
    summary = train_diffst(config(run, random_checkpoint, steps=6, resume=str(run / "checkpoint")))
    assert [r["step"] for r in summary["history"]] == [5, 6]
    after = load_diffst(run)
    assert after.config["metrics"]["step"] == 6
    assert any(not torch.equal(before[k], v) for k, v in after.model.state_dict().items())
    with pytest.raises(GenemapInputError, match="at step 6 of 6"):
        train_diffst(config(run, random_checkpoint, steps=6, resume=str(run / "checkpoint")))
    stopped = train_diffst(config(tmp_path / "cancelled", random_checkpoint), cancel=lambda: True)
    assert stopped["cancelled"] and stopped["checkpoint"] is None and stopped["steps"] == 0


def test_bad_settings_are_refused_in_one_line(tmp_path):
    with pytest.raises(GenemapInputError, match="'pathology' names no PixNet"):
        config(tmp_path / "x", "", histology=True)
    with pytest.raises(GenemapInputError, match="'factor' is 1"):
        config(tmp_path / "x", "p", factor=1)
    with pytest.raises(GenemapInputError, match="validation slide 'C9'"):
        config(tmp_path / "x", "p", validation=["C9"])


def test_superres_writes_a_store_that_spatialdata_reads_back(trained, tmp_path, sample_slide, capsys):
    import spatialdata as sd

    from napari_genemap.infer.superres import SUPERRES_CELLS, SUPERRES_TABLE

    out, _ = trained
    store = tmp_path / "superres.zarr"
    argv = ["superres", str(sample_root()), "--section", SECTION, "--model", str(out), "--out", str(store)]
    assert main([*argv, "--samples", "3", "--steps", "4", "--device", "cpu"]) == 0
    sdata = sd.read_zarr(store)
    table = sdata.tables[SUPERRES_TABLE]
    assert list(table.var_names) == GENES and len(sdata.shapes[SUPERRES_CELLS]) == table.n_obs
    assert int(table.obs["measured"].sum()) == 49  # every measured spot is an HR cell
    blocks = table.obs["row"].to_numpy() // 2 * 1000 + table.obs["col"].to_numpy() // 2
    assert set(blocks) == set(blocks[table.obs["measured"].to_numpy()])  # every cell's block holds a spot
    # a measured cell points at its spot's row in the counts table, at the same place on the slide
    measured = table.obs[table.obs["measured"]]
    spots = sdata.shapes["spots"]
    centres = np.column_stack([spots.geometry.x, spots.geometry.y])[measured["spot_index"].to_numpy()]
    np.testing.assert_allclose(table.obsm["spatial"][table.obs["measured"].to_numpy()], centres)
    assert np.isfinite(table.X).all() and (table.layers["spread"] >= 0).all() and table.layers["spread"].max() > 0
    assert table.uns["genemap_superres"]["samples"] == 3
    # the same seed draws the same maps; the LR layer is constant over each block
    again = tmp_path / "again.zarr"
    assert main([*argv[:-1], str(again), "--samples", "3", "--steps", "4", "--device", "cpu"]) == 0
    np.testing.assert_array_equal(sd.read_zarr(again).tables[SUPERRES_TABLE].X, table.X)
    lr = table.layers["lr"]
    for block in np.unique(blocks)[:5]:
        assert np.ptp(lr[blocks == block], axis=0).max() == 0
    capsys.readouterr()
    assert main([*argv, "--device", "cpu"]) == 2  # exists, no --overwrite: one line
    assert capsys.readouterr().err.strip().endswith("already exists (pass --overwrite)")


def test_a_super_resolved_store_opens_in_napari_with_both_layers(trained, tmp_path, make_napari_viewer):
    """The store `genemap superres` writes, opened as a user opens it (the plugin's reader): H&E, the
    measured spots, and the super-resolved and uncertainty layers of one gene coloured by their values."""
    from napari_genemap.layers import SUPER_RESOLVED, UNCERTAINTY, element_of
    from napari_genemap.plugin import get_reader

    out, _ = trained
    store = tmp_path / "sample_superres.zarr"
    argv = ["superres", str(sample_root()), "--section", SECTION, "--model", str(out), "--out", str(store)]
    assert main([*argv, "--samples", "3", "--steps", "4", "--device", "cpu"]) == 0
    viewer = make_napari_viewer(show=True)
    for data, meta, kind in get_reader(str(store))(str(store)):
        getattr(viewer, f"add_{kind}")(data, **meta)
    elements = [element_of(layer) for layer in viewer.layers]
    assert elements == ["he", "spots", SUPER_RESOLVED, UNCERTAINTY]
    mean, spread = viewer.layers[2], viewer.layers[3]
    gene = mean.metadata["genemap"]["gene"]
    assert gene in GENES and spread.metadata["genemap"]["gene"] == gene
    assert len(mean.data) == len(spread.data) and int(mean.features["measured"].sum()) == 49
    # colours follow the values: the cell of the highest mean is the brightest magma (not one flat colour)
    values = mean.features[gene].to_numpy()
    brightness = mean.face_color[:, :3].sum(1)
    assert brightness[values.argmax()] > brightness[values.argmin()]
    assert mean.visible and not spread.visible
    # the cells sit on the H&E: inside the image's extent in µm
    image_extent = np.asarray(viewer.layers[0].extent.world)
    cells = mean.data * np.asarray(mean.scale)
    assert (cells >= image_extent[0]).all() and (cells <= image_extent[1]).all()
    viewer.layers[3].visible = True
    viewer.screenshot(str(tmp_path / "superres.png"), canvas_only=False)


def test_the_training_panel_stage_makes_configs_the_run_accepts_and_reads_its_step(trained, tmp_path):
    from napari_genemap.train import stages

    out, _ = trained
    stage = stages.stage_named("diffst")
    slides = [{"path": str(sample_root()), "section": SECTION}]
    with_histology = stage.config(slides, [], {"pathology": str(out / "checkpoint" / "pathology")}, str(tmp_path / "a"))
    assert DiffSTTrainConfig.from_dict(with_histology).histology
    without = DiffSTTrainConfig.from_dict(stage.config(slides, [], {}, str(tmp_path / "b")))
    assert not without.histology and without.pathology == ""
    assert not stage.makes_gene_maps  # never offered to Slide & model: it needs measured spots
    assert stages.checkpoint_step(out, stage.read_checkpoint) == 4
    with pytest.raises(GenemapInputError, match="holds a checkpoint already"):
        stages.check_output(out, 10, read=stage.read_checkpoint)


def test_the_residual_target_is_the_spot_minus_its_block_and_unscales_back(sample_slide):
    from napari_genemap.data.protocols import hist2st
    from napari_genemap.data.superres import cut_patches, patch_origins, section_pair
    from napari_genemap.models.diffst_section import patch_batch, prior_of

    rule = hist2st()
    pair = section_pair(sample_slide, type(rule)("p", tuple(GENES), rule.target_sum, rule.log), 2)
    standardisation = standardisation_of([pair])
    patches = cut_patches(pair, patch_origins(pair, 4), 4, views=np.arange(len(patch_origins(pair, 4))) % 8)
    target = patch_batch(patches, standardisation).hr.numpy()
    prior = prior_of(patches, standardisation)
    measured = patches.hr_mask[:, None].repeat(len(GENES), 1)
    # a spot's prior is its own block's LR value, in the patch's (turned) view as well
    rows, cols = np.nonzero(patches.hr_mask[0])
    np.testing.assert_array_equal(prior[0][:, rows, cols], patches.lr[0][:, rows // 2, cols // 2])
    expected = (patches.hr - prior - standardisation.hr_mean[:, None, None]) / standardisation.hr_std[:, None, None]
    np.testing.assert_allclose(target[measured], expected[measured], rtol=1e-5, atol=1e-5)
    # what the model draws comes back as protocol values: the round trip is exact on measured spots
    back = standardisation.unscale(target, prior)
    np.testing.assert_allclose(back[measured], patches.hr[measured], atol=1e-5)
    assert np.abs(prior[measured]).max() > 0.1  # the prior carries the LR map (not zeros)
