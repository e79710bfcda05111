"""The Slide & model and Gene maps widgets in a real napari viewer (Xvfb): the sample opens, the model
starts in its own process, a gene layer fills the view with the engine's values and shows over the tissue."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui


@pytest.fixture
def viewer_with_sample(make_napari_viewer, monkeypatch, tmp_path):
    from napari_genemap.widgets.session import session_for

    monkeypatch.setenv("GENEMAP_CACHE_DIR", str(tmp_path / "cache"))
    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-genemap", "her2st_b4_crop")
    yield viewer
    session_for(viewer).close()


def test_gene_layer_fills_the_view_with_the_engines_values(viewer_with_sample, qtbot, tmp_path):
    from napari_genemap.checkpoints import shipped_checkpoint
    from napari_genemap.infer.engine import TileEngine
    from napari_genemap.sample import read_sample
    from napari_genemap.train.checkpoint import load_checkpoint
    from napari_genemap.widgets.gene_maps import GeneMapsWidget
    from napari_genemap.widgets.slide_model import SlideModelWidget

    viewer = viewer_with_sample
    slide_widget = SlideModelWidget(viewer)
    maps = GeneMapsWidget(viewer)
    viewer.window.add_dock_widget(slide_widget)
    viewer.window.add_dock_widget(maps)
    assert slide_widget.slides.currentText() == "B4_crop H&E"
    assert "0.6854 µm/px" in slide_widget.slide_info.text()
    assert "785" in slide_widget.card.toPlainText() and "hist2st" in slide_widget.card.toPlainText()
    session = slide_widget.session
    qtbot.waitUntil(lambda: session.cache is not None, timeout=120_000)
    assert maps.genes.count() == 785
    # measured variance orders the list when the checkpoint records none: the first gene varies most
    from napari_genemap.layers import log_normalised

    measured = log_normalised(session.slide.tables["counts"]).var(0)
    assert maps.genes.item(0).text() == measured.idxmax()
    maps.search.setText("krt")
    shown_genes = [maps.genes.item(i).text() for i in range(maps.genes.count()) if not maps.genes.item(i).isHidden()]
    assert "KRT8" in shown_genes and all("KRT" in gene for gene in shown_genes)

    layer = maps.add_gene("KRT8")
    assert layer.multiscale and layer.data_level == 0
    qtbot.waitUntil(lambda: maps.tiles_done >= 1 and maps.queued == 0, timeout=120_000)
    assert "view predicted" in maps.status.text()
    assert np.isfinite(layer._slicing_state._slice.image.raw).all()  # what napari shows was re-read
    shown = np.asarray(layer.data[0][:, :])
    assert np.isfinite(shown).all()  # the sample is one tile: all predicted

    engine = TileEngine(load_checkpoint(shipped_checkpoint()), read_sample(), tmp_path / "direct")
    try:
        direct = engine.predict_tiles([(0, 0)])[(0, 0)][engine.genes.index("KRT8")]
    finally:
        engine.close()
    assert shown.shape == direct.shape == (176, 176)
    assert np.abs(shown - direct).max() <= 2e-3 * direct.max()  # float16 cache of the same numbers
    assert layer.contrast_limits[1] == pytest.approx(np.percentile(direct, 99.5), rel=0.02)

    # it sits on the H&E: map pixel (i, j) covers slide pixels [i, i + 1) * 11.67 (4 model px of 2 µm)
    he = viewer.layers["B4_crop H&E"]
    centre_world = layer.data_to_world((10, 20))
    he_pixel = np.asarray(he.world_to_data(centre_world))
    np.testing.assert_allclose(he_pixel, (np.array([10, 20]) + 0.5) * 2.0 * 4 / he.scale[0] - 0.5, atol=1e-6)

    # the measured spots of the same gene, and the Pearson over those in view
    assert viewer.layers["KRT8 (measured)"].face_color.shape == (49, 4)
    qtbot.waitUntil(lambda: maps.pcc is not None, timeout=60_000)
    assert -1 <= maps.pcc <= 1 and "49 measured spots" in maps.pcc_label.text()

    # visible over the tissue: the canvas changes where the map is, and the map is not uniform
    viewer.reset_view()
    qtbot.wait(200)
    with_map = viewer.screenshot(canvas_only=True, flash=False).astype(float)
    layer.visible = False
    without = viewer.screenshot(canvas_only=True, flash=False).astype(float)
    layer.visible = True
    changed = np.abs(with_map - without).sum(-1) > 30
    assert changed.mean() > 0.2
    assert with_map[changed][:, :3].std(0).min() > 10 and with_map[changed][:, :3].mean() > 20

    # switching genes reads the cache: no model run
    before = maps.tiles_done
    second = maps.add_gene(
        maps.genes.item(1).text() if maps.genes.item(1).text() != "KRT8" else maps.genes.item(2).text()
    )
    qtbot.wait(500)
    assert np.isfinite(np.asarray(second.data[0][:, :])).all() and maps.tiles_done == before


def test_a_bad_checkpoint_is_reported_in_one_line(viewer_with_sample, tmp_path):
    from napari_genemap.widgets.slide_model import SlideModelWidget

    widget = SlideModelWidget(viewer_with_sample)
    widget.checkpoint.setText(str(tmp_path / "missing"))
    widget.apply_model()
    assert widget.status.text() == f"error: {tmp_path / 'missing'}: no such checkpoint"
