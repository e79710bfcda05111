"""The npe2 manifest, the reader hook, the writer and the sample in a real napari viewer (under Xvfb)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_genemap.io import read_slide, slide_mpp, write_store
from napari_genemap.plugin import get_reader, read_layers, write_spatialdata
from napari_genemap.sample import read_sample, sample_root

SAMPLE_IMAGE = sample_root() / "images" / "B4_crop.jpg"


def test_manifest_validates_with_imports():
    npe2 = Path(sys.executable).parent / "npe2"
    result = subprocess.run([str(npe2), "validate", "napari-genemap", "--imports"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


def test_reader_returns_none_for_what_it_does_not_handle(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "empty").mkdir()
    for path in [
        tmp_path / "notes.txt",
        tmp_path / "empty",
        tmp_path / "missing.jpg",
        str(tmp_path / "x.csv"),
        [str(SAMPLE_IMAGE), str(SAMPLE_IMAGE)],
    ]:
        assert get_reader(path) is None
    assert get_reader(str(SAMPLE_IMAGE)) is read_layers


def test_reader_layers_from_a_slide_and_from_a_store(tmp_path):
    image, spots = read_layers(str(SAMPLE_IMAGE))
    data, meta, kind = image
    assert kind == "image" and meta["rgb"] and meta["multiscale"]
    assert [level.shape for level in data] == [(2048, 2048, 3), (1024, 1024, 3), (512, 512, 3)]
    mpp = meta["scale"][0]
    assert mpp == pytest.approx(0.6854, abs=1e-3)
    points, meta, kind = spots
    assert kind == "points" and points.shape == (49, 2)
    assert meta["size"] * mpp == pytest.approx(np.full(49, 100.0))  # 100 µm spots
    # the store written from these layers reads back as the same slide
    [written] = write_spatialdata(str(tmp_path / "s.zarr"), [image, spots])
    assert slide_mpp(read_slide(written)) == pytest.approx(mpp)
    assert get_reader(written) is read_layers
    assert len(read_layers(written)) == 2


def test_writer_refuses_layers_without_a_slide(tmp_path):
    from napari_genemap.errors import GenemapInputError

    with pytest.raises(GenemapInputError, match="exactly one slide"):
        write_spatialdata(str(tmp_path / "s.zarr"), [(np.zeros((4, 4)), {"metadata": {}}, "image")])


@pytest.mark.gui
def test_sample_opens_as_pyramid_and_coloured_spots(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer(show=True)
    layers = viewer.open_sample("napari-genemap", "her2st_b4_crop")
    assert [layer.name for layer in layers] == ["B4_crop H&E", "B4_crop spots"]
    image, spots = layers
    assert image.multiscale and image.rgb and len(image.data) == 3
    assert image.scale[0] == pytest.approx(slide_mpp(read_sample()))
    assert len(spots.data) == 49
    gene = spots.metadata["genemap"]["gene"]
    values = spots.features[gene].to_numpy()
    assert values.std() > 0
    colours = spots.face_color
    assert len(np.unique(colours.round(3), axis=0)) > 5  # coloured by expression, not one colour
    # spots sit on the H&E: every spot's extent lies inside the image's extent (µm)
    extent = image.extent.world
    assert np.all(spots.data * spots.scale >= extent[0]) and np.all(spots.data * spots.scale <= extent[1])
    # the viewer draws tissue, not a black or uniform canvas
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot[..., :3].std() > 10 and shot[..., :3].mean() > 40


@pytest.mark.gui
def test_file_open_uses_the_reader_and_save_writes_spatialdata(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer(show=True)
    layers = viewer.open(str(SAMPLE_IMAGE), plugin="napari-genemap")
    assert len(layers) == 2
    out = tmp_path / "saved.zarr"
    viewer.layers.save(str(out), plugin="napari-genemap")
    assert out.is_dir()
    assert read_slide(out).tables["counts"].n_obs == 49


def test_visium_store_written_with_write_store_opens(tmp_path, shared_data):
    store = write_store(read_slide(shared_data / "visium_mouse_brain"), tmp_path / "v.zarr")
    image, spots = read_layers(str(store))
    assert spots[0].shape == (100, 2)
    # the hires image is 1/6.666 of full resolution: the layer's scale makes up for it
    assert image[1]["scale"][0] == pytest.approx(55 / 89.42751063343188 / 0.150015, rel=1e-6)
