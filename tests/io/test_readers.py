"""Every reader on the shared real data, and every kind of bad input, end in canonical SpatialData or one line."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest

from napari_genemap.errors import GenemapDataWarning, GenemapInputError
from napari_genemap.io import (
    counts_table,
    detect_format,
    image_levels,
    open_image,
    read_h5ad_slide,
    read_her2st,
    read_mouse_olfactory_bulb,
    read_slide,
    slide_mpp,
    spot_geometry,
)

HER2ST_SPOTS = {"B4": 283, "C2": 187, "C3": 180, "C4": 184, "C5": 181}
HER2ST_SELECTION_ROWS = {"B4": 284, "C2": 187, "C3": 182, "C4": 187, "C5": 183}


@pytest.mark.parametrize("section", sorted(HER2ST_SPOTS))
def test_her2st_sections_have_the_published_spot_counts(her2st, section):
    dropped = HER2ST_SELECTION_ROWS[section] - HER2ST_SPOTS[section]
    if dropped:
        with pytest.warns(GenemapDataWarning, match=f"dropped {dropped} spots that have no row"):
            sdata = read_her2st(her2st, section)
    else:
        sdata = read_her2st(her2st, section)
    table = counts_table(sdata)
    assert table.n_obs == HER2ST_SPOTS[section]
    assert table.n_vars > 15000
    # 200 µm spot pitch over ~291 px (data README: about 0.686 µm/px); spots are 100 µm across
    assert slide_mpp(sdata) == pytest.approx(0.686, abs=0.004)
    centers, radius = spot_geometry(sdata)
    assert radius * slide_mpp(sdata) == pytest.approx(np.full(len(radius), 50.0))
    # the first selection row of B4 is array (9, 13) at pixel (2307.86, 3500.48)
    if section == "B4":
        index = list(table.obs_names).index("9x13")
        assert centers[index] == pytest.approx([2307.86, 3500.48])
        raw = pd.read_csv(her2st / "counts" / "B4.tsv.gz", sep="\t", index_col=0)
        assert np.array_equal(table[["9x13"], ["GNAS"]].X.toarray().ravel(), raw.loc[["9x13"], "GNAS"].to_numpy())


def test_her2st_image_is_a_lazy_pyramid(her2st):
    with pytest.warns(GenemapDataWarning):
        sdata = read_her2st(her2st, "B4")
    levels, scales = image_levels(sdata)
    assert levels[0].shape == (3, 9923, 9272)
    assert scales[:3] == [1.0, 2.0, 4.0]
    assert max(levels[-1].shape[1:]) <= 512
    # a coarse pixel is the mean of the 2x2 block under it
    fine = np.asarray(levels[0][:, :64, :64]).astype(float)
    coarse = np.asarray(levels[1][:, :32, :32]).astype(float)
    block_mean = fine.reshape(3, 32, 2, 32, 2).mean((2, 4))
    assert np.abs(coarse - block_mean).max() <= 0.5 + 1e-9


def test_visium_folder_through_spatialdata_io(shared_data):
    sdata = read_slide(shared_data / "visium_mouse_brain")
    table = counts_table(sdata)
    centers, radius = spot_geometry(sdata)
    assert table.n_obs == 100
    assert radius == pytest.approx(np.full(100, 89.42751063343188 / 2))
    assert radius[0] == pytest.approx(44.7, abs=0.05)
    assert slide_mpp(sdata) == pytest.approx(55 / 89.42751063343188)
    # spot AAACAAGTATCTCCCA-1 sits at full-resolution row 8513, column 9811
    assert centers[list(table.obs_names).index("AAACAAGTATCTCCCA-1")] == pytest.approx([9811, 8513])
    levels, scales = image_levels(sdata)
    assert levels[0].shape == (3, 2000, 2000)  # the hires PNG, alpha dropped
    assert scales[0] == pytest.approx(1 / 0.150015)


def test_h5ad_fixture_has_49_spots_of_radius_44_7(shared_data):
    folder = shared_data / "visium_mouse_brain"
    mpp = 55 / 89.44476048022638
    sdata = read_h5ad_slide(
        folder / "test_data.h5ad", folder / "test_img.jpg", 89.44476048022638, mpp=mpp, require_raw=False
    )
    centers, radius = spot_geometry(sdata)
    assert counts_table(sdata).n_obs == 49
    assert radius == pytest.approx(np.full(49, 44.72238), abs=1e-4)
    assert centers.min() >= 0


def test_h5ad_with_normalised_values_is_refused_where_raw_counts_are_expected(shared_data):
    folder = shared_data / "visium_mouse_brain"
    with pytest.raises(GenemapInputError, match="non-integer values .* expected raw counts"):
        read_h5ad_slide(folder / "test_data.h5ad", folder / "test_img.jpg", 89.44, mpp=0.6)


@pytest.mark.parametrize(
    ("section", "spots", "unmatched"),
    [("MOB1", 379, 11), ("MOB2", 407, 8), ("MOB3", 438, 11), ("MOB4", 403, 9)],
)
def test_mouse_olfactory_bulb_on_tissue_spots(shared_data, section, spots, unmatched):
    with pytest.warns(GenemapDataWarning, match=f"dropped {unmatched} count rows that match no spot"):
        sdata = read_mouse_olfactory_bulb(shared_data / "st_mouse_olfactory_bulb", section)
    table = counts_table(sdata)
    assert table.n_obs == spots
    assert table.n_vars == 1000
    assert table.var_names[0].startswith("ENSMUSG")
    # the images are low resolution: about 24 px per 200 µm array step
    assert 7.5 < slide_mpp(sdata) < 10


def test_layout_is_recognised_from_the_image_path(shared_data, tmp_path):
    assert detect_format(shared_data / "her2st" / "images" / "C2.jpg") == "her2st"
    assert detect_format(shared_data / "st_mouse_olfactory_bulb" / "MOB3.jpg") == "legacy_st"
    assert detect_format(shared_data / "visium_mouse_brain") == "visium"
    assert detect_format(shared_data / "visium_mouse_brain" / "test_img.jpg") == "image"
    assert detect_format(shared_data / "her2st") == "her2st"
    assert detect_format(tmp_path) is None
    assert detect_format(tmp_path / "missing.jpg") is None
    (tmp_path / "notes.txt").write_text("hello")
    assert detect_format(tmp_path / "notes.txt") is None


def test_image_only_slide_needs_a_pixel_size(shared_data):
    path = shared_data / "visium_mouse_brain" / "test_img.jpg"
    with pytest.raises(GenemapInputError, match="pixel size unknown; pass its µm per pixel"):
        read_slide(path)
    sdata = read_slide(path, mpp=0.5)
    assert slide_mpp(sdata) == 0.5
    assert image_levels(sdata)[0][0].shape == (3, 1717, 950)
    assert "spots" not in sdata.shapes


def _write_pyramidal_tiff(path, image, mpp):
    import tifffile

    with tifffile.TiffWriter(path, ome=True) as tif:
        options = {"tile": (256, 256), "photometric": "rgb"}
        tif.write(image, subifds=2, metadata={"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp}, **options)
        tif.write(image[::2, ::2], subfiletype=1, **options)
        tif.write(image[::4, ::4], subfiletype=1, **options)


def test_pyramidal_ome_tiff_opens_lazily_with_its_pixel_size(her2st, tmp_path):
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(her2st / "images" / "C3.jpg") as image:
        pixels = np.asarray(image.crop((2000, 3000, 4048, 5048)).convert("RGB"))
    path = tmp_path / "slide.ome.tif"
    _write_pyramidal_tiff(path, pixels, 0.25)
    pyramid = open_image(path)
    assert pyramid.mpp == pytest.approx(0.25)
    assert [level.shape for level in pyramid.levels] == [(3, 2048, 2048), (3, 1024, 1024), (3, 512, 512)]
    region = np.asarray(pyramid.levels[0][:, 700:900, 1000:1300])
    assert np.array_equal(region, pixels[700:900, 1000:1300].transpose(2, 0, 1))
    assert np.array_equal(np.asarray(pyramid.levels[2]), pixels[::4, ::4].transpose(2, 0, 1))
    sdata = read_slide(path)
    assert slide_mpp(sdata) == pytest.approx(0.25)


def test_plain_tiff_resolution_tags_give_the_pixel_size(tmp_path):
    import tifffile

    pixels = np.random.default_rng(0).integers(0, 255, (600, 700, 3), dtype=np.uint8)
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, pixels, photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    pyramid = open_image(path)
    assert pyramid.mpp == pytest.approx(0.5)
    assert [level.shape for level in pyramid.levels] == [(3, 600, 700), (3, 300, 350)]
    assert np.array_equal(np.asarray(pyramid.levels[0]), pixels.transpose(2, 0, 1))


# --- bad input: one clear line, nothing half-done ---------------------------------------------------------


def test_truncated_jpeg_is_refused(sample_copy):
    image = sample_copy / "images" / "B4_crop.jpg"
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    with pytest.raises(GenemapInputError, match="truncated") as error:
        read_her2st(sample_copy, "B4_crop")
    assert "\n" not in str(error.value) and "B4_crop.jpg" in str(error.value)


def test_truncated_tiff_is_refused(tmp_path):
    import tifffile

    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, np.zeros((512, 512, 3), np.uint8) + 7, photometric="rgb", tile=(256, 256), compression=None)
    path.write_bytes(path.read_bytes()[:-100_000])
    with pytest.raises(GenemapInputError, match="cut.tif.*truncated"):
        open_image(path)


def test_counts_naming_a_spot_outside_the_image_are_refused(sample_copy):
    spots_file = sample_copy / "spots" / "B4_crop_selection.tsv"
    spots = pd.read_csv(spots_file, sep="\t")
    spots.loc[3, "pixel_x"] = 5000.0  # the crop is 2048 px wide
    spots.to_csv(spots_file, sep="\t", index=False)
    with pytest.raises(GenemapInputError, match=r"1 spot centres lie outside the 2048 x 2048 px image"):
        read_her2st(sample_copy, "B4_crop")


def test_counts_rows_that_match_no_spot(sample_copy):
    counts_file = sample_copy / "counts" / "B4_crop.tsv.gz"
    counts = pd.read_csv(counts_file, sep="\t", index_col=0)
    renamed = counts.rename(index={counts.index[0]: "99x99"})
    renamed.to_csv(counts_file, sep="\t")
    with pytest.warns(GenemapDataWarning) as record:
        sdata = read_her2st(sample_copy, "B4_crop")
    messages = sorted(str(w.message) for w in record)
    assert "dropped 1 count rows that match no spot" in messages[0]  # the renamed row ...
    assert "dropped 1 spots that have no row" in messages[1]  # ... and the spot that lost its row
    assert counts_table(sdata).n_obs == len(counts) - 1
    counts.rename(index=lambda name: f"row{name}").to_csv(counts_file, sep="\t")
    with pytest.raises(GenemapInputError, match="no count row matches a spot"):
        read_her2st(sample_copy, "B4_crop")


def test_empty_gene_list_is_refused(sample_copy):
    counts_file = sample_copy / "counts" / "B4_crop.tsv.gz"
    counts = pd.read_csv(counts_file, sep="\t", index_col=0)
    counts.iloc[:, :0].to_csv(counts_file, sep="\t")
    with pytest.raises(GenemapInputError, match="the gene list is empty"):
        read_her2st(sample_copy, "B4_crop")


def test_duplicate_gene_names_are_refused(sample_copy):
    counts_file = sample_copy / "counts" / "B4_crop.tsv.gz"
    with gzip.open(counts_file, "rt") as handle:
        lines = handle.read().splitlines()
    header = lines[0].split("\t")
    header[2] = header[1]
    with gzip.open(counts_file, "wt") as handle:
        handle.write("\n".join(["\t".join(header), *lines[1:]]) + "\n")
    with pytest.raises(GenemapInputError, match=f"1 duplicate gene names \\(e.g. {header[1]}\\)"):
        read_her2st(sample_copy, "B4_crop")


@pytest.mark.parametrize(("value", "message"), [(-2, "negative values"), (1.5, "non-integer values")])
def test_counts_that_are_not_raw_are_refused(sample_copy, value, message):
    counts_file = sample_copy / "counts" / "B4_crop.tsv.gz"
    counts = pd.read_csv(counts_file, sep="\t", index_col=0).astype(float)
    counts.iloc[4, 7] = value
    counts.to_csv(counts_file, sep="\t")
    with pytest.raises(GenemapInputError, match=message):
        read_her2st(sample_copy, "B4_crop")


def test_a_folder_of_the_wrong_kind_is_refused(tmp_path, shared_data):
    (tmp_path / "readme.txt").write_text("not a slide")
    with pytest.raises(GenemapInputError, match="this folder is not a slide napari-genemap reads"):
        read_slide(tmp_path)
    with pytest.raises(GenemapInputError, match="needs a section \\(one of B4, C2, C3, C4, C5\\)"):
        read_slide(shared_data / "her2st")
    (tmp_path / "fake.zarr").mkdir()
    (tmp_path / "fake.zarr" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    with pytest.raises(GenemapInputError, match="fake.zarr"):
        read_slide(tmp_path / "fake.zarr")
