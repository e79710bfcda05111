"""Readers and writers: slides and ST data in, one canonical SpatialData out (no torch, no Qt)."""

from .canonical import (
    COORDINATE_SYSTEM,
    IMAGE_KEY,
    SPOTS_KEY,
    TABLE_KEY,
    counts_table,
    image_levels,
    slide_info,
    slide_mpp,
    spot_geometry,
)
from .h5ad import read_h5ad_slide
from .images import ImagePyramid, open_image
from .legacy_st import read_her2st, read_legacy_st, read_mouse_olfactory_bulb
from .read import SlideSource, detect_format, read_counts, read_image_slide, read_slide
from .store import read_store, write_store
from .visium import read_visium

__all__ = [
    "COORDINATE_SYSTEM",
    "IMAGE_KEY",
    "SPOTS_KEY",
    "TABLE_KEY",
    "ImagePyramid",
    "SlideSource",
    "counts_table",
    "detect_format",
    "image_levels",
    "open_image",
    "read_counts",
    "read_h5ad_slide",
    "read_her2st",
    "read_image_slide",
    "read_legacy_st",
    "read_mouse_olfactory_bulb",
    "read_slide",
    "read_store",
    "read_visium",
    "slide_info",
    "slide_mpp",
    "spot_geometry",
    "write_store",
]
