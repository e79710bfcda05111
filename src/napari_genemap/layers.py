"""Canonical slides as napari layer-data tuples (plain data: no napari or Qt import here).

Layers are in µm: ``scale`` is the slide's µm per pixel, so the H&E, measured spots and, later, gene maps
line up whatever their resolution. Each layer's ``metadata["genemap"]`` says which element of which slide
it shows (and, under "open", the `SlideSource` the tile service reads the slide again from),
and ``metadata["sdata"]`` holds the slide so a writer can save it back.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .explore.genes import log_normalised
from .io import IMAGE_KEY, SPOTS_KEY, TABLE_KEY, ImagePyramid, SlideSource, image_levels, slide_info, spot_geometry

#: Genes offered as spot colours: the most variable ones (all of them for small panels).
MAX_SPOT_FEATURES = 100

# What a layer shows, as ``metadata["genemap"]["element"]``: the one place these names are spelled.
HE = IMAGE_KEY
MEASURED_SPOTS = SPOTS_KEY
GENE_MAP = "gene_map"
MEASURED_ON_MAP = "measured_spots"
ROIS = "ROIs"
SUPER_RESOLVED = "super_resolved"
UNCERTAINTY = "uncertainty"


def element_of(layer) -> str | None:
    """Which genemap element a layer shows (None for layers this plugin did not make)."""
    return layer.metadata.get("genemap", {}).get("element")


def find_layers(layers, element: str, gene: str | None = None, slide: str | None = None) -> list:
    """The layers of one element, optionally of one gene and one slide (``layers``: a viewer's layer list).

    By provenance in the metadata, never by name: a user may rename a layer.
    """
    found = []
    for layer in layers:
        info = layer.metadata.get("genemap", {})
        if info.get("element") != element:
            continue
        if (gene is None or info.get("gene") == gene) and (slide is None or info.get("slide") == slide):
            found.append(layer)
    return found


def view_corners(layer):
    """The part of a (multiscale) layer in view: (2, 2) array of its top-left and bottom-right corners as
    (y, x) in world units (µm), from the corner pixels of the level napari shows."""
    level = layer.data_level
    corners = np.asarray(layer.corner_pixels, float)[:, -2:] * np.asarray(layer.downsample_factors[level])[-2:]
    corners[1] += 1  # corner_pixels are inclusive
    return corners * np.asarray(layer.scale)[-2:] + np.asarray(layer.translate)[-2:]


def slide_name(sdata) -> str:
    info = slide_info(sdata)
    return info.get("section") or Path(info.get("source", "slide")).name.split(".")[0]


def image_layer(sdata, source: SlideSource | None = None) -> tuple:
    """The H&E pyramid; ``source``: where the tile service reads the slide again."""
    levels, scales = image_levels(sdata)
    mpp = slide_info(sdata)["mpp"]
    data = [level.transpose(1, 2, 0) for level in levels]
    meta = {
        "name": f"{slide_name(sdata)} H&E",
        "rgb": True,
        "multiscale": True,
        "scale": (mpp * scales[0], mpp * scales[0]),
        "units": ("µm", "µm"),
        "metadata": {"genemap": {"element": IMAGE_KEY, **slide_info(sdata), "open": source}, "sdata": sdata},
    }
    return data, meta, "image"


def pyramid_layer(pyramid: ImagePyramid) -> tuple:
    """An image alone; in pixels when the file gives no pixel size."""
    scale = (pyramid.mpp, pyramid.mpp) if pyramid.mpp else (1.0, 1.0)
    meta = {
        "name": pyramid.path.name,
        "rgb": True,
        "multiscale": True,
        "scale": scale,
        "units": ("µm", "µm") if pyramid.mpp else ("pixel", "pixel"),
        "metadata": {"genemap": {"element": IMAGE_KEY, "source": str(pyramid.path), "mpp": pyramid.mpp}},
    }
    return [level.transpose(1, 2, 0) for level in pyramid.levels], meta, "image"


def spot_features(table, gene: str | None = None) -> pd.DataFrame:
    values = log_normalised(table)
    order = values.var(0).sort_values(ascending=False, kind="stable").index
    columns = list(order[:MAX_SPOT_FEATURES])
    if gene is not None and gene not in columns:
        columns.insert(0, gene)
    return values[columns].reset_index(drop=True)


def spots_layer(sdata, gene: str | None = None) -> tuple | None:
    """Measured spots as points coloured by ``gene`` (default: the most variable gene)."""
    if SPOTS_KEY not in sdata.shapes or TABLE_KEY not in sdata.tables:
        return None
    table = sdata.tables[TABLE_KEY]
    if gene is not None and gene not in table.var_names:
        raise KeyError(f"gene {gene!r} is not measured on this slide")
    centers, radius = spot_geometry(sdata)
    mpp = slide_info(sdata)["mpp"]
    features = spot_features(table, gene)
    gene = gene or features.columns[0]
    features.insert(0, "spot", table.obs_names.astype(str))
    meta = {
        "name": f"{slide_name(sdata)} spots",
        "features": features,
        "size": 2 * radius,
        "scale": (mpp, mpp),
        "units": ("µm", "µm"),
        "face_color": gene,
        "face_colormap": "viridis",
        "border_width": 0,
        "opacity": 0.8,
        "metadata": {"genemap": {"element": SPOTS_KEY, "gene": gene, **slide_info(sdata)}, "sdata": sdata},
    }
    return centers[:, ::-1].copy(), meta, "points"


def slide_layers(sdata, gene: str | None = None, source: SlideSource | None = None) -> list[tuple]:
    layers = [image_layer(sdata, source)]
    spots = spots_layer(sdata, gene)
    if spots is not None:
        layers.append(spots)
    return layers + superres_layers(sdata)


def superres_layers(sdata, gene: str | None = None) -> list[tuple]:
    """A store written by ``genemap superres``: its HR cells as two point layers for ``gene`` (default: the
    gene whose super-resolved map varies most), "Super-resolved" (the mean of the draws) and "Uncertainty"
    (their standard deviation, hidden at first); both carry every gene as a feature to colour by. Empty
    for a slide without them."""
    from .infer.superres import SUPERRES_CELLS, SUPERRES_TABLE

    if SUPERRES_TABLE not in sdata.tables or SUPERRES_CELLS not in sdata.shapes:
        return []
    table = sdata.tables[SUPERRES_TABLE]
    genes = [str(g) for g in table.var_names]
    mean = pd.DataFrame(np.asarray(table.X), columns=genes)
    if gene is None:
        gene = str(mean.var(0).idxmax())
    elif gene not in genes:
        raise KeyError(f"gene {gene!r} is not super-resolved in this store")
    cells = sdata.shapes[SUPERRES_CELLS]
    points = np.column_stack([cells.geometry.y.to_numpy(), cells.geometry.x.to_numpy()])
    mpp = slide_info(sdata)["mpp"]
    settings = table.uns.get("genemap_superres", {})
    layers = []
    for element, values, colormap, label in (
        (SUPER_RESOLVED, mean, "magma", "super-resolved"),
        (UNCERTAINTY, pd.DataFrame(np.asarray(table.layers["spread"]), columns=genes), "viridis", "uncertainty"),
    ):
        features = values.copy()
        features.insert(0, "measured", table.obs["measured"].to_numpy())
        meta = {
            "name": f"{gene} {label}",
            "features": features,
            "size": 2 * cells["radius"].to_numpy(),
            "scale": (mpp, mpp),
            "units": ("µm", "µm"),
            "face_color": gene,
            "face_colormap": colormap,
            "border_width": 0,
            "opacity": 0.9,
            "visible": element == SUPER_RESOLVED,
            "metadata": {
                "genemap": {
                    "element": element,
                    "gene": gene,
                    **slide_info(sdata),
                    "units": f"{label}: protocol values ({_protocol_name(settings)})",
                },
                "sdata": sdata,
            },
        }
        layers.append((points.copy(), meta, "points"))
    return layers


def _protocol_name(settings: dict) -> str:
    """The protocol's name in a super-resolved table's settings (stored as JSON)."""
    import json

    try:
        return str(json.loads(settings.get("protocol", "{}")).get("name", "?"))
    except (TypeError, ValueError):
        return "?"


def map_pixel_um(cache, sdata) -> float:
    """µm per pixel of a gene-map cache's finest level on ``sdata``."""
    return cache.grid.map_pixel_size(0) * slide_info(sdata)["mpp"]


def gene_map_layer(
    cache, gene: str, sdata, *, slide: str, model: str, checkpoint, smooth: bool = False, taken=()
) -> tuple:
    """The predicted map of ``gene`` from a `GeneMapCache` as a multiscale image on the slide, named
    "GENE · model" (plus the slide's name when that is ``taken``, i.e. another slide has it). ``slide``: the
    session's key of the slide; ``checkpoint``: the model's folder. Starts at contrast 0-1 (the panel sets
    it from what is in view)."""
    from .infer.view import gene_levels

    mpp = slide_info(sdata)["mpp"]
    pixel_um = map_pixel_um(cache, sdata)
    name = f"{gene} · {model}"
    if name in taken:
        name += f" · {slide_name(sdata)}"
    offset = (pixel_um - mpp) / 2  # map pixel 0 covers slide pixels [0, size): its centre vs a pixel's centre
    meta = {
        "name": name,
        "multiscale": True,
        "colormap": "magma",
        "opacity": 0.75,
        "scale": (pixel_um, pixel_um),
        "translate": (offset, offset),
        "units": ("µm", "µm"),
        "contrast_limits": (0.0, 1.0),
        "interpolation2d": "linear" if smooth else "nearest",
        "metadata": {
            "genemap": {
                "element": GENE_MAP,
                "gene": gene,
                "slide": slide,
                "cache": str(cache.path),
                "model": model,
                "checkpoint": str(checkpoint),
                "units": f"predicted counts per {pixel_um:.1f} µm map pixel",
                "contrast_user": False,
            }
        },
    }
    return gene_levels(cache, gene), meta, "image"


def calibrated_map(cache, gene: str, sdata, field) -> tuple[list, str]:
    """The levels and colour-bar units of ``gene``'s map calibrated by a correction field
    (`explore.calibration.field_for`), or of the map itself when ``field`` is None."""
    from .explore.calibration import calibrated_levels
    from .infer.view import gene_levels

    pixel_um = map_pixel_um(cache, sdata)
    if field is None:
        return gene_levels(cache, gene), f"predicted counts per {pixel_um:.1f} µm map pixel"
    levels = calibrated_levels(gene_levels(cache, gene), field, cache.grid.map_pixel_size(0))
    return levels, f"calibrated counts per {pixel_um:.1f} µm pixel"  # short: the canvas clips long lines


def map_legend(cache, sdata, calibrated: bool = False) -> str:
    """What the colours of `gene_map_layer` and `measured_on_map_layer` mean, and that they differ."""
    what = "counts calibrated to the measured spots" if calibrated else "predicted counts"
    return (
        f"Map (magma): {what} per {map_pixel_um(cache, sdata):.0f} µm pixel. Measured spots (viridis): "
        "ln(1 + counts per 10,000). Different scales: compare patterns, not colours."
    )


def show_only(layers, belongs: Callable[[Any], bool]) -> None:
    """Hide the ``layers`` that do not ``belong`` (remembering which were shown) and show again those that
    do and that an earlier switch hid: the layers a user hid stay hidden."""
    for layer in layers:
        info = layer.metadata["genemap"]
        if not belongs(layer) and layer.visible:
            layer.visible = False
            info["hidden_by_switch"] = True
        elif belongs(layer) and info.pop("hidden_by_switch", False):
            layer.visible = True


def show_only_slide(layers, slide: str | None) -> None:
    """`show_only` the layers whose metadata names ``slide`` (the session's key of the active slide)."""
    show_only(layers, lambda layer: layer.metadata["genemap"].get("slide") == slide)


def measured_on_map_layer(sdata, gene: str, slide: str, taken=()) -> tuple | None:
    """The measured spots of ``gene`` to compare with its map, or None when the slide does not measure it;
    named "GENE (measured)", plus the slide's name when that is ``taken`` (another slide has it)."""
    if TABLE_KEY not in sdata.tables or gene not in sdata.tables[TABLE_KEY].var_names:
        return None
    spots = spots_layer(sdata, gene)
    if spots is None:
        return None
    data, meta, kind = spots
    meta["name"] = f"{gene} (measured)"
    if meta["name"] in taken:
        meta["name"] += f" · {slide_name(sdata)}"
    meta["metadata"]["genemap"] |= {"element": MEASURED_ON_MAP, "slide": slide}
    return data, meta, kind


def roi_layer_meta(sdata, names: list[str] | tuple[str, ...] = ()) -> dict:
    """A shapes layer of ROIs named ``names`` on slide ``sdata`` (in slide pixels, scaled to µm): yellow
    outlines labelled with their name, a width that suits the slide's size."""
    levels, scales = image_levels(sdata)
    mpp = float(slide_info(sdata)["mpp"])
    return {
        "name": ROIS,
        "features": pd.DataFrame({"name": pd.Series(list(names), dtype=object)}),
        "scale": (mpp, mpp),
        "units": ("µm", "µm"),
        "metadata": {"genemap": {"element": ROIS, **slide_info(sdata)}},
        "edge_color": "yellow",
        "face_color": [1.0, 1.0, 0.0, 0.08],
        "edge_width": max(2.0, max(levels[0].shape[1:]) * scales[0] / 500),
        # the name above each ROI, as large as the table's text and in the outline's colour
        "text": {"string": "{name}", "color": "yellow", "size": 12, "anchor": "upper_left"},
        "feature_defaults": {"name": ""},
    }


def roi_layer(sdata) -> tuple | None:
    """The ROIs saved in a slide's store as a shapes layer-data tuple, or None when it holds none."""
    from .explore.rois import shapes_from_rois
    from .io.rois import read_rois

    rois, _ = read_rois(sdata)
    if rois is None:
        return None
    data, types, names = shapes_from_rois(rois)
    meta = roi_layer_meta(sdata, names)
    meta["shape_type"] = types
    meta["metadata"]["sdata"] = sdata
    return data, meta, "shapes"
