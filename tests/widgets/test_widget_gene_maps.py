"""The Slide & model and Gene maps widgets in a real napari viewer (Xvfb): the sample opens, the model
starts in its own process, a gene layer fills the view with the engine's values and shows over the tissue."""

from __future__ import annotations

import re

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


@pytest.mark.slow
def test_gene_layer_fills_the_view_with_the_engines_values(viewer_with_sample, qtbot, tmp_path):
    from napari_genemap.checkpoints import shipped_checkpoint
    from napari_genemap.infer.engine import TileEngine
    from napari_genemap.models.checkpoint import load_checkpoint
    from napari_genemap.sample import read_sample
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
    from napari_genemap.explore.genes import log_normalised

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


@pytest.fixture
def ready_panels(viewer_with_sample, qtbot):
    """The sample with the Slide & model and Gene maps panels docked as napari docks them (through the
    plugin menu, so the panels get napari's proxy of the viewer) and the shipped model ready."""
    viewer = viewer_with_sample
    _, slide_widget = viewer.window.add_plugin_dock_widget("napari-genemap", "Slide & model")
    _, maps = viewer.window.add_plugin_dock_widget("napari-genemap", "Gene maps")
    qtbot.waitUntil(lambda: slide_widget.session.cache is not None, timeout=180_000)
    return viewer, slide_widget, maps


def test_the_view_is_predicted_as_soon_as_the_model_is_ready_before_any_gene(ready_panels, qtbot):
    """One model call makes every gene, so the panel asks for the H&E's view once the model is ready: the
    first gene chosen then shows from the cache, with no model call left to wait for."""
    viewer, slide_widget, maps = ready_panels
    cache = slide_widget.session.cache
    assert not maps.gene_layers()
    assert maps.slide_view_plan(cache)[0] == (0, 0, 0)  # the sample is one tile
    viewer.layers["B4_crop H&E"].visible = False
    assert maps.slide_view_plan(cache) == []  # nothing in view to ask for
    viewer.layers["B4_crop H&E"].visible = True
    qtbot.waitUntil(lambda: cache.has(0, 0, 0), timeout=120_000)
    layer = maps.add_gene("KRT8")
    qtbot.waitUntil(lambda: np.isfinite(layer._slicing_state._slice.image.raw).all(), timeout=10_000)


def _predicted(maps, qtbot) -> None:
    qtbot.waitUntil(lambda: maps.status.text() == "view predicted", timeout=180_000)


def _percentile_in_view(maps, layer) -> float:
    level, (i0, i1, j0, j1) = maps.view_box(layer)
    values = layer.data[level].read(max(i0, 0), i1, max(j0, 0), j1)
    return float(np.percentile(values[np.isfinite(values)], 99.5))


def test_cached_maps_get_contrast_from_what_is_visible_and_keep_a_users_own(ready_panels, qtbot):
    """A second gene, or a gene removed and added again, reads cached tiles only: no tile arrives, yet its
    contrast must follow its values (it used to stay at 0-1, i.e. black, at ~0.03 per map pixel)."""
    viewer, _, maps = ready_panels
    first = maps.add_gene("KRT8")
    _predicted(maps, qtbot)
    qtbot.waitUntil(lambda: first.contrast_limits[1] < 0.9, timeout=30_000)

    second = maps.add_gene("MUCL1")
    qtbot.wait(300)
    assert second.colorbar.visible and not first.colorbar.visible  # one colour bar: the active map's
    assert second.contrast_limits[1] == pytest.approx(_percentile_in_view(maps, second), rel=0.02)
    assert second.contrast_limits[1] < 0.5  # not the placeholder 0-1

    viewer.layers.remove(first)
    again = maps.add_gene("KRT8")
    assert again.contrast_limits[1] == pytest.approx(_percentile_in_view(maps, again), rel=0.02)

    # the view moves to a smaller region: the limits follow what is visible there
    viewer.scene.camera.zoom *= 4
    viewer.scene.camera.center = (0, 200, 200)
    qtbot.wait(600)
    assert again.contrast_limits[1] == pytest.approx(_percentile_in_view(maps, again), rel=0.11)

    # limits set by hand stay, whatever the view does
    again.contrast_limits = (0.0, 0.123)
    viewer.reset_view()
    qtbot.wait(600)
    assert again.contrast_limits == pytest.approx((0.0, 0.123))


def _dimmer_checkpoint(tmp_path):
    """The shipped checkpoint with its gene head's bias lowered: a real, different model."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from napari_genemap.checkpoints import shipped_checkpoint

    folder = tmp_path / "pixnet-dimmer"
    shutil.copytree(shipped_checkpoint(), folder)
    weights = load_file(folder / "model.safetensors")
    weights["head.bias"] = (weights["head.bias"].astype(np.float32) - 1.0).astype(weights["head.bias"].dtype)
    save_file(weights, folder / "model.safetensors")
    return folder


@pytest.mark.slow
def test_a_model_switch_replaces_the_maps_and_names_the_model(ready_panels, qtbot, tmp_path):
    viewer, slide_widget, maps = ready_panels
    old = maps.add_gene("KRT8")
    assert old.name == "KRT8 · pixnet-her2st"
    _predicted(maps, qtbot)
    old_values = np.asarray(old.data[0][:, :])
    old_cache = str(maps.session.cache.path)

    slide_widget.checkpoint.setText(str(_dimmer_checkpoint(tmp_path)))
    slide_widget.apply_model()
    qtbot.waitUntil(
        lambda: maps.session.cache is not None and str(maps.session.cache.path) != old_cache, timeout=180_000
    )
    qtbot.waitUntil(lambda: "KRT8 · pixnet-dimmer" in viewer.layers, timeout=30_000)
    assert "KRT8 · pixnet-her2st" not in viewer.layers  # the old model's map is gone, not left on screen
    [layer] = maps.gene_layers("KRT8")
    assert layer.metadata["genemap"]["cache"] == str(maps.session.cache.path)
    _predicted(maps, qtbot)
    new_values = np.asarray(layer.data[0][:, :])
    assert np.isfinite(new_values).all() and new_values.mean() < 0.8 * old_values.mean()
    # adding the gene again shows the new model's layer, never a stale one
    assert maps.add_gene("KRT8") is layer


@pytest.mark.slow
def test_pearson_follows_the_active_gene_and_says_what_it_counts(ready_panels, qtbot):
    viewer, _, maps = ready_panels
    krt8 = maps.add_gene("KRT8")
    _predicted(maps, qtbot)
    other = maps.add_gene("MUCL1")
    qtbot.waitUntil(lambda: "MUCL1: Pearson" in maps.pcc_label.text(), timeout=60_000)
    viewer.layers.move(viewer.layers.index(other), 1)  # below KRT8: the topmost is not what counts
    viewer.layers.selection.active = other
    qtbot.waitUntil(lambda: "MUCL1: Pearson" in maps.pcc_label.text(), timeout=60_000)
    viewer.layers.selection.active = krt8
    qtbot.waitUntil(lambda: "KRT8: Pearson" in maps.pcc_label.text(), timeout=60_000)
    text = maps.pcc_label.text()
    assert "49 of 49 measured spots in view" in text
    assert "(B4) was in the model's training data" in text  # the sample is a crop of a training section
    # the canvas names the active map and its unit in lines short enough for a 1400 px window's canvas
    # (one line of both was clipped at its left edge there)
    lines = viewer.canvas.overlays.text.text.splitlines()
    assert lines[0] == "KRT8 (pixnet-her2st)" and lines[1].startswith("colour bar: predicted counts per")
    assert max(map(len, lines)) <= 50


def test_gene_search_says_what_is_missing_and_never_acts_on_a_hidden_gene(ready_panels, qtbot):
    viewer, _, maps = ready_panels
    maps.genes.setCurrentRow(3)
    hidden_before = maps.genes.currentItem().text()
    maps.search.setText("ERBB2")
    assert maps.genes.count() == 0
    assert maps.search_note.text() == "ERBB2 is not among this model's 785 genes"
    maps.add_button.click()
    assert not maps.gene_layers() and hidden_before not in " ".join(layer.name for layer in viewer.layers)

    maps.search.setText("krt8")
    assert maps.genes.item(0).text() == "KRT8"  # the exact match first, before KRT80, KRT81, ...
    assert all("KRT8" in maps.genes.item(i).text() for i in range(maps.genes.count()))
    qtbot.keyClick(maps.search, "\r")
    assert [layer.metadata["genemap"]["gene"] for layer in maps.gene_layers()] == ["KRT8"]


@pytest.mark.slow
def test_a_second_slide_becomes_the_active_one_and_hides_the_first(ready_panels, qtbot, sample_copy):
    """Slides open at the same place: the new one is where the model runs, the old one's layers are hidden
    (never removed), and switching back shows them again."""
    viewer, slide_widget, maps = ready_panels
    krt8 = maps.add_gene("KRT8")
    first_he = viewer.layers["B4_crop H&E"]
    for folder, suffix in (("images", ".jpg"), ("counts", ".tsv.gz"), ("spots", "_selection.tsv")):
        (sample_copy / folder / f"B4_crop{suffix}").rename(sample_copy / folder / f"B4_copy{suffix}")
    viewer.open(str(sample_copy / "images" / "B4_copy.jpg"), plugin="napari-genemap")
    assert slide_widget.slides.currentText() == "B4_copy H&E"
    assert slide_widget.active.text().startswith("The model runs on: B4_copy H&E (1 other slide open, hidden")
    assert krt8 in viewer.layers and not krt8.visible and not first_he.visible
    assert viewer.layers["B4_copy H&E"].visible
    qtbot.waitUntil(lambda: maps.session.cache is not None and maps.genes.count() == 785, timeout=180_000)
    copy_map = maps.add_gene("KRT8")
    assert copy_map is not krt8 and copy_map.metadata["genemap"]["slide"].endswith("B4_copy.jpg::")
    assert copy_map.name == "KRT8 · pixnet-her2st · B4_copy"  # the other slide has a KRT8 of this model
    # the Pearson is recomputed on the new slide (the request pending at the switch died with the service)
    qtbot.waitUntil(lambda: "KRT8: Pearson" in maps.pcc_label.text(), timeout=120_000)
    assert "not among the model's recorded training slides" in maps.pcc_label.text()

    slide_widget.slides.setCurrentText("B4_crop H&E")
    assert first_he.visible and krt8.visible and not copy_map.visible
    assert not viewer.layers["B4_copy H&E"].visible


def test_open_slide_reads_in_the_background_with_a_busy_bar(viewer_with_sample, qtbot, sample_copy, tmp_path):
    from napari_genemap.widgets.slide_model import SlideModelWidget, he_layers

    viewer = viewer_with_sample
    widget = SlideModelWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.open_slide(sample_copy / "images" / "B4_crop.jpg")
    # open_slide returned before the slide was added: the layer can only arrive through the event loop,
    # however fast the read is (counting timer ticks during the read failed on a fast CI machine).
    assert len(he_layers(viewer)) == 1
    assert not widget.reading.isHidden() and widget.slide_info.text() == "reading B4_crop.jpg…"
    qtbot.waitUntil(lambda: len(he_layers(viewer)) == 2, timeout=60_000)
    qtbot.waitUntil(lambda: widget.reading.isHidden(), timeout=10_000)
    assert widget.slides.currentText() == he_layers(viewer)[-1].name

    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    widget.open_slide(bad)
    qtbot.waitUntil(lambda: widget.slide_info.text().startswith("error: "), timeout=30_000)
    assert "notes.jpg" in widget.slide_info.text() and "\n" not in widget.slide_info.text()
    qtbot.waitUntil(lambda: widget.reading.isHidden(), timeout=10_000)
    widget.session.close()


@pytest.mark.slow
def test_on_a_section_the_pearson_shows_while_tiles_arrive(make_napari_viewer, qtbot, her2st, monkeypatch, tmp_path):
    """A full section predicts for minutes; the Pearson must show "k of n spots" meanwhile (a reply that
    came while tiles arrived used to be dropped as stale, forever)."""
    from napari_genemap.widgets.session import session_for

    monkeypatch.setenv("GENEMAP_CACHE_DIR", str(tmp_path / "cache"))
    viewer = make_napari_viewer(show=True)
    _, slide_widget = viewer.window.add_plugin_dock_widget("napari-genemap", "Slide & model")
    _, maps = viewer.window.add_plugin_dock_widget("napari-genemap", "Gene maps")
    try:
        with pytest.warns(UserWarning, match="dropped 2 spots"):
            viewer.open(str(her2st / "images" / "C3.jpg"), plugin="napari-genemap")
        qtbot.waitUntil(lambda: maps.session.cache is not None and maps.genes.count() == 785, timeout=180_000)
        maps.add_gene("KRT8")
        qtbot.waitUntil(lambda: "KRT8: Pearson" in maps.pcc_label.text(), timeout=180_000)
        text = maps.pcc_label.text()
        assert maps.queued > 0 and "(the rest are not predicted yet)" in text, (text, maps.status.text())
        predicted, in_view = (int(v) for v in text.split(" over ")[1].split(" measured")[0].split(" of "))
        assert 3 <= predicted < in_view
        assert "This slide (C3) was in the model's training data" in text
        # the plan's size depends on the level napari shows when the view is asked for (before the layer is
        # first drawn: level 0); the count of tiles done, out of the plan, is what a reader needs
        assert re.fullmatch(r"predicting: \d+ / \d+ tiles of this view done.*", maps.status.text())
    finally:
        session_for(viewer).close()


def test_pause_is_acknowledged_at_once_and_the_map_can_be_smooth(ready_panels):
    viewer, _, maps = ready_panels
    layer = maps.add_gene("KRT8")
    assert layer.interpolation2d == "nearest"
    maps.smooth_box.setChecked(True)
    assert layer.interpolation2d == "linear" and maps.add_gene("MUCL1").interpolation2d == "linear"
    maps.pause_box.setChecked(True)  # before the service answers: the status says so now
    assert maps.status.text().startswith("paused: the tile being predicted finishes")
    assert viewer.canvas.overlays.scale_bar.visible


def test_the_panel_scrolls_rather_than_overlap_in_a_1400_by_900_window(viewer_with_sample, qtbot):
    """The README's four docked panels in a 1400 x 900 window: once the status, Pearson and legend lines
    are long, the gene list, its buttons and the check boxes must still not overlap (they did)."""
    from qtpy.QtCore import QPoint

    viewer = viewer_with_sample
    viewer.window._qt_window.resize(1400, 900)
    for widget, tabify in (("Slide & model", False), ("Training", True), ("Gene maps", True), ("Spots (ROIs)", False)):
        viewer.window.add_plugin_dock_widget("napari-genemap", widget, tabify=tabify)
    maps = viewer.window._dock_widgets["Gene maps (napari-genemap)"].widget()
    long_line = "KRT8: Pearson 0.210 over 49 of 49 measured spots in view (protocol hist2st, spot integrals). " * 2
    maps.pcc_label.setText(long_line)
    maps.legend.setText(long_line)
    maps.status.setText("view predicted")

    def top_and_bottom(widget):
        top = widget.mapTo(maps, QPoint(0, 0)).y()
        return top, top + widget.height()

    def stacked() -> bool:
        order = [maps.search, maps.genes, maps.add_button, maps.pause_box, maps.smooth_box, maps.status]
        spans = [top_and_bottom(w) for w in order + [maps.pcc_label, maps.legend]]
        return all(upper[1] <= lower[0] for upper, lower in zip(spans, spans[1:], strict=False))

    qtbot.waitUntil(lambda: maps.isVisible() and maps.genes.height() > 0, timeout=10_000)
    qtbot.wait(200)
    assert stacked(), [(w, top_and_bottom(getattr(maps, w))) for w in ("genes", "add_button", "pause_box")]
    assert maps.genes.height() >= 120  # a few genes stay visible

    # a line that grows after the panel is laid out gets the height its wrapped text needs, not its old one
    one_line = maps.status.height()
    maps.status.setText(long_line * 2)

    def shown_whole(label) -> bool:
        return label.height() >= label.heightForWidth(label.width()) > one_line

    qtbot.waitUntil(lambda: shown_whole(maps.status), timeout=5_000)
    assert shown_whole(maps.pcc_label) and shown_whole(maps.legend) and stacked()


def test_a_map_calibrated_to_the_measured_spots_integrates_to_their_counts(ready_panels, qtbot):
    """The "calibrate to measured spots" box: the shown map integrates to each spot's measured counts; unticked,
    the model's own map is back."""
    from napari_genemap.infer.disk_sums import integrate_disks
    from napari_genemap.io import spot_geometry

    viewer, slide_widget, maps = ready_panels
    layer = maps.add_gene("KRT8")
    _predicted(maps, qtbot)
    raw = np.asarray(layer.data[0][:, :])
    assert maps.calibrate_box.isEnabled()
    maps.calibrate_box.setChecked(True)
    qtbot.waitUntil(lambda: "calibrated to 49 measured spots" in maps.status.text(), timeout=120_000)
    shown = np.asarray(layer.data[0][:, :])
    centres, radii = spot_geometry(maps.session.slide)
    pixel = maps.session.cache.grid.map_pixel_size(0)

    def integrals(values):
        def read(i0, i1, j0, j1, genes):
            return values[None, i0:i1, j0:j1]

        return integrate_disks(read, values.shape, 1, centres / pixel, radii / pixel)[:, 0]

    measured = np.asarray(maps.session.counts()[:, "KRT8"].X.todense()).ravel()
    np.testing.assert_allclose(integrals(shown), measured, rtol=1e-4, atol=1e-3)
    assert not np.allclose(integrals(raw), measured, rtol=0.1)  # the model's own map did not agree
    assert viewer.canvas.overlays.text.text.splitlines()[1].startswith("colour bar: calibrated counts per")
    assert maps.legend.text().startswith("Map (magma): counts calibrated to the measured spots per")
    # a second gene added while ticked is calibrated too
    second = maps.add_gene("MUCL1")
    qtbot.waitUntil(lambda: second.metadata["genemap"].get("calibrated"), timeout=120_000)
    maps.calibrate_box.setChecked(False)
    np.testing.assert_array_equal(np.asarray(layer.data[0][:, :]), raw)
    assert not layer.metadata["genemap"]["calibrated"]
    assert maps.legend.text().startswith("Map (magma): predicted counts per")
