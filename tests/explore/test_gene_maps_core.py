"""What the Gene maps panel decides, without a viewer: the gene list and its search, the contrast of what is
in view, the layers it adds, the progress line and the Pearson over the measured spots in view."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from napari_genemap.data.protocols import Protocol
from napari_genemap.evaluate.in_view import MIN_SPOTS, InViewPearson, in_view_pearson, spots_in_view
from napari_genemap.explore.contrast import view_contrast
from napari_genemap.explore.genes import gene_order, model_ready_note, no_match_note, search_genes
from napari_genemap.infer.cache import GeneMapCache
from napari_genemap.infer.grid import TileGrid
from napari_genemap.infer.view import CachedLevel, progress_text
from napari_genemap.layers import (
    GENE_MAP,
    MEASURED_ON_MAP,
    find_layers,
    gene_map_layer,
    map_legend,
    measured_on_map_layer,
    show_only_slide,
)

GENES = ["KRT81", "AKRT8", "KRT8", "ERBB3", "KRT80"]


# --- the gene list ---------------------------------------------------------------------------------------
def test_search_puts_the_exact_match_first_then_prefixes_then_the_rest():
    assert search_genes(GENES, " krt8 ") == ["KRT8", "KRT81", "KRT80", "AKRT8"]
    assert search_genes(GENES, "") == GENES
    assert search_genes(GENES, "erbb2") == []


def test_a_miss_names_what_the_slide_measures():
    assert no_match_note("ERBB2", 785) == "ERBB2 is not among this model's 785 genes"
    measured = ["ERBB2", "ERBB2IP", "GAPDH"]
    assert no_match_note("erbb2 ", 785, measured) == (
        "erbb2 is not among this model's 785 genes; this slide measures ERBB2, ERBB2IP (not predicted by this model)"
    )


def test_genes_are_ordered_by_recorded_then_measured_variance():
    card = {"genes": ["A", "B", "C"], "gene_variance": [0.1, np.nan, 0.5]}
    assert gene_order(card) == ["C", "A", "B"]
    assert gene_order({"genes": ["A", "B"]}) == ["A", "B"]
    # two spots of 100 counts: ln(1 + per 10,000) is 6.9 / 9.1 for A, 6.9 / 6.9 for B, 9.0 / 0 for C
    counts = ad.AnnData(np.array([[10.0, 10.0, 80.0], [90.0, 10.0, 0.0]], np.float32))
    counts.var_names = ["A", "B", "C"]
    assert gene_order({"genes": ["NOT_MEASURED", "B", "A", "C"]}, counts) == ["C", "A", "B", "NOT_MEASURED"]


def test_the_ready_note_says_what_a_model_switch_changed():
    assert model_ready_note("m", 785, [], []) == "model ready (m, 785 genes): add a gene map"
    assert model_ready_note("m", 2, ["KRT8", "MUCL1"], ["ERBB2"]) == (
        "model ready: KRT8, MUCL1 now from m; removed ERBB2 (not among this model's genes)"
    )


# --- contrast --------------------------------------------------------------------------------------------
def test_contrast_is_zero_to_the_995th_percentile_of_the_finite_values():
    values = np.append(np.arange(1001, dtype=float), np.nan)  # percentile 99.5 of 0..1000 is 995
    contrast = view_contrast(values, (0.0, 1.0), (0.0, 1.0), following=False, user_set=False)
    assert contrast.limits == (0.0, 995.0) and contrast.range == (0.0, 1000.0)
    inside = view_contrast(values, (0.0, 1.0), (0.0, 2000.0), following=False, user_set=False)
    assert inside.limits == (0.0, 995.0) and inside.range is None  # the slider already holds it


def test_contrast_ignores_changes_within_ten_percent_and_keeps_the_users_limits():
    values = np.arange(1001, dtype=float)
    assert view_contrast(values, (0, 905.0), (0, 1000), following=True, user_set=False) is None  # 9.9% off
    assert view_contrast(values, (0, 890.0), (0, 1000), following=True, user_set=False).limits == (0.0, 995.0)
    assert view_contrast(values, (0, 905.0), (0, 1000), following=False, user_set=False).limits == (0.0, 995.0)
    assert view_contrast(values, (0, 0.1), (0, 1), following=False, user_set=True) is None


def test_contrast_of_nothing_predicted_or_a_mostly_zero_view():
    assert view_contrast(np.full(4, np.nan), (0, 1), (0, 1), following=False, user_set=False) is None
    assert view_contrast(np.zeros(4), (0, 1), (0, 1), following=False, user_set=False) is None
    sparse = np.zeros(1000)
    sparse[0] = 3.0  # the percentile is 0: the maximum instead, never limits (0, 0)
    assert view_contrast(sparse, (0, 1), (0, 1), following=False, user_set=False).limits == (0.0, 3.0)


# --- progress --------------------------------------------------------------------------------------------
def test_progress_says_how_much_of_the_view_is_left_and_how_long():
    assert progress_text(0, False, 21, None) == "view predicted"
    assert progress_text(5, False, 21, 30.4) == "predicting: 16 / 21 tiles of this view done, about 30 s left"
    assert progress_text(5, False, 21, 600.0) == "predicting: 16 / 21 tiles of this view done, about 10 min left"
    assert progress_text(5, True, 21, 30.0) == "paused: 16 / 21 tiles of this view done"
    assert progress_text(5, False, None, None) == "predicting: 5 tiles to go"


# --- layers ----------------------------------------------------------------------------------------------
class FakeLayer:
    """What `find_layers` and `show_only_slide` read of a napari layer."""

    def __init__(self, meta: dict, visible: bool = True):
        self.metadata, self.visible, self.name = meta["metadata"], visible, meta["name"]


def test_the_gene_map_layer_sits_on_the_slide_and_says_its_model(sample_slide, tmp_path):
    mpp = sample_slide.attrs["genemap"]["mpp"]
    grid = TileGrid(200, 200, stride=4, tile=64, halo=32, factor=2.0 / mpp)
    cache = GeneMapCache(tmp_path, {"test": 1}, grid, ["KRT8", "MUCL1"], levels=2)
    data, meta, kind = gene_map_layer(cache, "MUCL1", sample_slide, slide="s::", model="m", checkpoint=tmp_path)
    assert kind == "image" and [type(level) for level in data] == [CachedLevel, CachedLevel]
    assert data[0].gene == 1 and meta["name"] == "MUCL1 · m" and meta["colormap"] == "magma"
    pixel_um = grid.map_pixel_size(0) * mpp
    assert pixel_um == pytest.approx(8.0)  # 4 model pixels of 2 µm
    assert meta["scale"] == (pixel_um, pixel_um) and meta["translate"][0] == pytest.approx((8.0 - mpp) / 2)
    assert meta["interpolation2d"] == "nearest" and meta["contrast_limits"] == (0.0, 1.0)
    info = meta["metadata"]["genemap"]
    assert info["element"] == GENE_MAP and info["slide"] == "s::" and info["cache"] == str(cache.path)
    assert info["units"] == "predicted counts per 8.0 µm map pixel"
    taken = gene_map_layer(cache, "MUCL1", sample_slide, slide="t::", model="m", checkpoint="m", taken=["MUCL1 · m"])
    assert taken[1]["name"] == "MUCL1 · m · B4_crop"
    assert map_legend(cache, sample_slide).startswith("Map (magma): predicted counts per 8 µm pixel.")
    layer = FakeLayer(meta)
    assert find_layers([layer], GENE_MAP, "MUCL1", "s::") == [layer] and not find_layers([layer], GENE_MAP, "KRT8")


def test_measured_spots_on_the_map_only_for_measured_genes(sample_slide):
    data, meta, kind = measured_on_map_layer(sample_slide, "KRT8", "s::")
    assert kind == "points" and data.shape == (49, 2) and meta["name"] == "KRT8 (measured)"
    assert meta["face_color"] == "KRT8" and meta["metadata"]["genemap"]["element"] == MEASURED_ON_MAP
    assert meta["metadata"]["genemap"]["slide"] == "s::"
    assert measured_on_map_layer(sample_slide, "NOT_A_GENE", "s::") is None


def test_measured_spots_of_a_gene_another_slide_shows_are_named_by_slide(sample_slide):
    """Found in use: C3's KRT8 spots came out as napari's "KRT8 (measured) [1]" beside B4's."""
    _, meta, _ = measured_on_map_layer(sample_slide, "KRT8", "s::", taken=["KRT8 (measured)"])
    assert meta["name"] == "KRT8 (measured) · B4_crop"


def test_a_slide_switch_hides_the_other_slides_and_restores_only_what_it_hid():
    def layer(slide, visible):
        return FakeLayer({"name": slide, "metadata": {"genemap": {"slide": slide}}}, visible)

    mine, other, hidden_by_user = layer("a", False), layer("b", True), layer("b", False)
    mine.metadata["genemap"]["hidden_by_switch"] = True
    show_only_slide([mine, other, hidden_by_user], "a")
    assert mine.visible and not other.visible and not hidden_by_user.visible
    show_only_slide([mine, other, hidden_by_user], "b")
    assert not mine.visible and other.visible and not hidden_by_user.visible


# --- the Pearson in view ---------------------------------------------------------------------------------
def test_spots_in_view_are_circles_of_the_spots_whose_centres_are_inside():
    centres = np.array([[10.0, 20.0], [50.0, 60.0], [30.0, 5.0], [30.0, 40.0]])  # (y, x)
    shapes = spots_in_view(centres, [8, 10, 12, 14], ["a", "b", "c", "d"], (10, 10), (50, 40))
    assert list(shapes.index) == ["a", "d"] and list(shapes["radius"]) == [4.0, 7.0]
    assert (shapes.geometry.x.tolist(), shapes.geometry.y.tolist()) == ([20.0, 40.0], [10.0, 30.0])


def _spots(n: int, genes=("G", "H")) -> ad.AnnData:
    rng = np.random.default_rng(0)
    table = ad.AnnData(rng.poisson(20, (n, len(genes))).astype(np.float32))
    table.obs_names = [f"s{i}" for i in range(n)]
    table.var_names = list(genes)
    return table


def test_the_pearson_is_over_the_predicted_spots_on_the_protocols_scale():
    counts = _spots(6)
    protocol = Protocol("test", ("G", "H"), target_sum=None, log="ln")
    predicted = counts[["s4", "s1", "s2", "s0"]].copy()
    predicted.X = np.log1p(predicted.X) * 2 + 1  # a linear function of the measured values: r = 1
    result = in_view_pearson("H", predicted, counts, protocol, 6)
    assert result.r == pytest.approx(1.0) and (result.k, result.n) == (4, 6)
    predicted.X[:, 1] = -predicted.X[:, 1]
    assert in_view_pearson("H", predicted, counts, protocol, 6).r == pytest.approx(-1.0)
    rng = np.random.default_rng(1)
    noisy = predicted.copy()
    noisy.X = rng.normal(size=noisy.shape).astype(np.float32)
    measured = np.log1p(counts[["s4", "s1", "s2", "s0"]].X[:, 0])
    expected = np.corrcoef(noisy.X[:, 0], measured)[0, 1]
    assert in_view_pearson("G", noisy, counts, protocol, 6).r == pytest.approx(expected, abs=1e-6)


def test_the_pearson_says_k_of_n_and_whether_the_slide_was_trained_on():
    result = InViewPearson("KRT8", 0.51234, 4, 6, "hist2st")
    assert result.describe("B4") == (
        "KRT8: Pearson 0.512 over 4 of 6 measured spots in view (the rest are not predicted yet) (protocol "
        "hist2st, spot integrals of the map). This slide (B4) was in the model's training data: this shows fit, "
        "not generalisation."
    )
    complete = InViewPearson("KRT8", 0.5, 6, 6, "hist2st").describe(None)
    assert "over 6 of 6 measured spots in view (protocol" in complete
    assert complete.endswith("This slide is not among the model's recorded training slides.")


def test_too_few_or_constant_spots_give_no_pearson():
    counts = _spots(6)
    protocol = Protocol("test", ("G", "H"), target_sum=None, log="ln")
    assert InViewPearson("G", None, 0, 2).describe(None) == (
        f"G: 2 measured spots in view; Pearson needs at least {MIN_SPOTS}"
    )
    waiting = in_view_pearson("G", counts[["s0", "s1"]].copy(), counts, protocol, 6)
    assert (
        waiting.r is None
        and waiting.describe(None) == "G: waiting for the spots' tiles (2 of 6 spots in view predicted)"
    )
    assert in_view_pearson("G", None, counts, protocol, 6).describe(None).endswith("(0 of 6 spots in view predicted)")
    flat = counts[["s0", "s1", "s2"]].copy()
    flat.X[:, 0] = 7.0
    constant = in_view_pearson("G", flat, counts, protocol, 6)
    assert constant.r is None and constant.describe(None) == "G: constant over the 3 spots; Pearson undefined"
