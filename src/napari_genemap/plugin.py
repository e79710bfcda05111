"""npe2 contributions: the reader, the SpatialData writer and the sample data (see napari.yaml)."""

from __future__ import annotations

import warnings
from pathlib import Path

from .errors import GenemapInputError


def get_reader(path):
    """napari's reader hook: a reader function for slides we recognise, else None (never raises)."""
    import os

    from .io import detect_format

    if isinstance(path, list | tuple):
        if len(path) != 1:
            return None
        path = path[0]
    if not isinstance(path, str | os.PathLike):  # napari may offer other things; they are not ours
        return None
    try:
        if detect_format(path) is None:
            return None
    except (GenemapInputError, OSError, ValueError, TypeError, RuntimeError):  # unreadable: another reader's turn
        return None
    return read_layers


def read_layers(path) -> list[tuple]:
    from .io import SlideSource, detect_format, open_image
    from .layers import pyramid_layer, roi_layer, slide_layers

    path = Path(path[0] if isinstance(path, list) else path)
    if detect_format(path) == "image":
        pyramid = open_image(path)
        if pyramid.mpp is None:
            warnings.warn(f"{path.name}: the file gives no pixel size; shown in pixels", stacklevel=2)
            return [pyramid_layer(pyramid)]
    source = SlideSource(str(path))
    sdata = source.read()
    layers = slide_layers(sdata, source=source)
    rois = roi_layer(sdata)  # ROIs saved by the Spots widget
    return layers if rois is None else [*layers, rois]


def write_spatialdata(path: str, layer_data: list[tuple]) -> list[str]:
    """Save the slide behind the given layers as a SpatialData store."""
    from .io import write_store

    slides = {
        id(meta["metadata"]["sdata"]): meta["metadata"]["sdata"]
        for _, meta, _ in layer_data
        if "sdata" in meta.get("metadata", {})
    }
    if len(slides) != 1:
        raise GenemapInputError(
            f"{path}: select layers of exactly one slide opened with napari-genemap (got {len(slides)})"
        )
    return [str(write_store(next(iter(slides.values())), path, overwrite=False))]


def sample_data() -> list[tuple]:
    """The bundled HER2ST B4 crop: H&E pyramid and 49 measured spots."""
    from .io import SlideSource
    from .layers import slide_layers
    from .sample import SECTION, read_sample, sample_root

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return slide_layers(read_sample(), source=SlideSource(str(sample_root()), SECTION))
