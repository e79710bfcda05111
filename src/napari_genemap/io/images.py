"""Slide images as lazy pyramids of (channel, y, x) uint8 RGB dask arrays.

Tiled TIFF / OME-TIFF slides are read through tifffile's zarr view, so opening a slide larger than
memory costs only its headers and reading a region decodes only the tiles under it. JPEG and PNG
have no tiles: they are decoded once, on the first read, and the pyramid is built from that.
"""

from __future__ import annotations

import hashlib
import os
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import dask.array as da
import numpy as np

from ..errors import GenemapInputError

#: Chunk edge (pixels) of every pyramid level; a napari tile and a prediction tile read a few chunks.
CHUNK = 1024
#: The pyramid stops once the longest side of a level is at most this many pixels.
SMALLEST_LEVEL = 512

TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ome.tif", ".ome.tiff")
FLAT_SUFFIXES = (".jpg", ".jpeg", ".png")
IMAGE_SUFFIXES = TIFF_SUFFIXES + FLAT_SUFFIXES


@dataclass
class ImagePyramid:
    """An RGB slide as lazy levels, finest first; level k is downsampled by ``2**k``-ish."""

    levels: list[da.Array]
    path: Path
    mpp: float | None = None  # µm per level-0 pixel, None when the file does not say
    metadata: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of level 0 in pixels."""
        _, height, width = self.levels[0].shape  # levels are (channels, y, x)
        return int(height), int(width)

    @property
    def downsamples(self) -> list[float]:
        """Level-0 pixels per pixel of each level (exact powers of two for pyramids we build)."""
        if "downsamples" in self.metadata:
            return list(self.metadata["downsamples"])
        width = self.levels[0].shape[2]
        return [width / level.shape[2] for level in self.levels]


def is_image_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(IMAGE_SUFFIXES)


def open_image(path: str | os.PathLike, mpp: float | None = None) -> ImagePyramid:
    """Open a slide lazily; ``mpp`` (µm per pixel) overrides what the file says."""
    path = Path(path)
    if not path.is_file():
        raise GenemapInputError(f"{path}: no such image file")
    name = path.name.lower()
    if name.endswith(TIFF_SUFFIXES):
        pyramid = _open_tiff(path)
    elif name.endswith(FLAT_SUFFIXES):
        pyramid = _open_flat(path)
    else:
        raise GenemapInputError(f"{path}: unsupported image type; expected one of {', '.join(IMAGE_SUFFIXES)}")
    if mpp is not None:
        pyramid.mpp = _check_mpp(mpp, path)
    return pyramid


def _check_mpp(mpp: float, source: Path | str) -> float:
    mpp = float(mpp)
    if not np.isfinite(mpp) or mpp <= 0:
        raise GenemapInputError(f"{source}: pixel size {mpp} µm/px is not a positive number")
    return mpp


# --- JPEG / PNG -------------------------------------------------------------------------------------


class _FlatPyramid:
    """A JPEG/PNG and its mean-downsampled levels, made once on first access and kept.

    Why: these formats cannot be read by region, so the whole file is decoded anyway; building every level
    from it at once (a third more memory) makes each later read a plain slice, where lazy dask levels would
    recompute 2 x 2 means of the full-resolution pixels for every region napari or the model asks for.
    Instances are shared per file (and per process: pickles carry the path only, for dask workers).
    """

    _open: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def __init__(self, path: Path):
        self.path = path
        self._levels: list[np.ndarray] | None = None

    @classmethod
    def shared(cls, path: Path) -> _FlatPyramid:
        key = (str(path), _file_token(path))
        pyramid = cls._open.get(key)
        if pyramid is None:
            pyramid = cls._open[key] = cls(path)
        return pyramid

    def level(self, index: int) -> np.ndarray:
        if self._levels is None:
            levels = [_decode_flat(self.path)]
            while max(levels[-1].shape[:2]) > SMALLEST_LEVEL:
                finer = levels[-1]
                height, width = (s - s % 2 for s in finer.shape[:2])
                blocks = finer[:height, :width].reshape(height // 2, 2, width // 2, 2, 3)
                levels.append(np.round(blocks.sum((1, 3), dtype=np.uint16) / np.float32(4)).astype(np.uint8))
            self._levels = levels
        return self._levels[index]


class _FlatLevel:
    """Array-like over one level of a `_FlatPyramid` (what `da.from_array` wraps)."""

    def __init__(self, path: Path, index: int, shape: tuple[int, int, int]):
        self.path, self.index, self.shape = path, index, shape
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3
        self.pyramid = _FlatPyramid.shared(path)  # kept alive as long as any of its levels is

    def __getitem__(self, key):
        return self.pyramid.level(self.index)[key]

    def __getstate__(self):  # ship the path to dask workers, not the decoded pixels
        return {"path": self.path, "index": self.index, "shape": self.shape}

    def __setstate__(self, state):
        self.__init__(state["path"], state["index"], state["shape"])


def _decode_flat(path: Path) -> np.ndarray:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # whole-slide JPEGs exceed PIL's decompression-bomb guard
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except OSError as error:
        raise GenemapInputError(f"{path}: cannot decode image ({error})") from None


def _open_flat(path: Path) -> ImagePyramid:
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as image:
            width, height = image.size
            image_format = image.format
            if image_format == "PNG":
                image.verify()  # checks every chunk's CRC without decoding pixels
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise GenemapInputError(f"{path}: not a readable JPEG/PNG image ({error})") from None
    if image_format == "JPEG" and not _jpeg_has_end_marker(path):
        raise GenemapInputError(f"{path}: JPEG is truncated (no end-of-image marker); the file is incomplete")
    token = _file_token(path)
    levels, index = [], 0
    while True:
        name = f"decoded-{token}" + (f"-level{index}" if index else "")
        array = da.from_array(_FlatLevel(path, index, (height, width, 3)), chunks=(CHUNK, CHUNK, 3), name=name)
        levels.append(array.transpose(2, 0, 1))
        if max(height, width) <= SMALLEST_LEVEL:
            break
        height, width, index = height // 2, width // 2, index + 1
    return ImagePyramid(
        levels=levels,
        path=path,
        metadata={"format": image_format, "downsamples": [2.0**k for k in range(len(levels))]},
    )


def _jpeg_has_end_marker(path: Path) -> bool:
    """A complete JPEG ends with the EOI marker FFD9 (some writers pad a few bytes after it)."""
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - 4096))
        tail = handle.read()
    return b"\xff\xd9" in tail


def _file_token(path: Path) -> str:
    """A dask name that is the same in every process for the same file version."""
    stat = path.stat()
    return hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]


# --- TIFF --------------------------------------------------------------------------------------------


def _open_tiff(path: Path) -> ImagePyramid:
    import tifffile
    import zarr

    try:
        tif = tifffile.TiffFile(path)
    except Exception as error:  # tifffile raises many types for damaged files
        raise GenemapInputError(f"{path}: not a readable TIFF ({error})") from None
    try:
        series = tif.series[0]
        axes = series.axes
        shapes = [level.shape for level in series.levels]
        mpp = _tiff_mpp(tif)
        _check_tiff_complete(tif, path)
        store = series.aszarr()
        group = zarr.open(store, mode="r")
    except Exception as error:
        tif.close()
        if isinstance(error, GenemapInputError):
            raise
        raise GenemapInputError(f"{path}: not a readable TIFF ({error})") from None
    # The file stays open while anything reads the slide; close it when the last reader is gone.
    weakref.finalize(store, tif.close)
    arrays = [group] if isinstance(group, zarr.Array) else [group[str(i)] for i in range(len(shapes))]
    levels = [_to_cyx(da.from_zarr(array), axes, path) for array in arrays]
    metadata: dict = {"format": "TIFF", "axes": axes}
    if len(levels) == 1:
        levels = _downsampled_levels(levels[0].rechunk((3, CHUNK, CHUNK)))
        metadata["downsamples"] = [2.0**k for k in range(len(levels))]
    return ImagePyramid(levels=levels, path=path, mpp=mpp, metadata=metadata)


def _to_cyx(array: da.Array, axes: str, path: Path) -> da.Array:
    axes = axes.upper()
    if axes == "YX":
        array = da.stack([array] * 3, axis=-1)
        axes = "YXS"
    if axes in ("YXS", "YXC"):
        array = array.transpose(2, 0, 1)
    elif axes not in ("SYX", "CYX"):
        raise GenemapInputError(f"{path}: image axes {axes!r} not supported; expected a 2-D RGB slide (YXS)")
    if array.shape[0] == 4:
        array = array[:3]
    if array.shape[0] != 3 or array.dtype != np.uint8:
        raise GenemapInputError(
            f"{path}: image is {array.shape[0]}-channel {array.dtype}; expected 8-bit RGB (uint8, 3 channels)"
        )
    return array


def _check_tiff_complete(tif, path: Path) -> None:
    """Refuse a TIFF whose tiles point past the end of the file (a truncated copy)."""
    size = path.stat().st_size
    for page in tif.pages:
        offsets, counts = page.dataoffsets, page.databytecounts
        if len(offsets) and max(o + c for o, c in zip(offsets, counts)) > size:
            raise GenemapInputError(f"{path}: TIFF is truncated (image data runs past the end of the file)")


_UNIT_TO_UM = {"pm": 1e-6, "nm": 1e-3, "µm": 1.0, "um": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _tiff_mpp(tif) -> float | None:
    """Pixel size in µm from OME metadata, an Aperio description, or the resolution tags."""
    if tif.is_ome and tif.ome_metadata:
        match = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
        if match:
            unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
            return float(match.group(1)) * _UNIT_TO_UM.get(unit.group(1) if unit else "µm", 1.0)
    page = tif.pages[0]
    description = page.description or ""
    match = re.search(r"MPP\s*=\s*([0-9.]+)", description)
    if match:
        return float(match.group(1))
    resolution = page.tags.get("XResolution")
    unit = page.tags.get("ResolutionUnit")
    if resolution is not None and unit is not None and int(unit.value) in (2, 3):
        numerator, denominator = resolution.value
        if numerator > 0 and denominator > 0:
            pixels_per_unit = numerator / denominator
            um_per_unit = 25400.0 if int(unit.value) == 2 else 10000.0
            mpp = um_per_unit / pixels_per_unit
            # 72 or 96 dpi and 1 px/unit are screen defaults, not a scanner's pixel size.
            if 0.01 < mpp < 100:
                return mpp
    return None


# --- pyramid -----------------------------------------------------------------------------------------


def pyramid_from_array(level0: da.Array, path: str | os.PathLike, mpp: float | None = None) -> ImagePyramid:
    """A pyramid over an RGB(A) (c, y, x) array another library already opened lazily."""
    if level0.ndim != 3 or level0.shape[0] not in (3, 4) or level0.dtype != np.uint8:
        raise GenemapInputError(f"{path}: image is {level0.shape} {level0.dtype}; expected 8-bit RGB (c, y, x)")
    levels = _downsampled_levels(level0[:3].rechunk((3, CHUNK, CHUNK)))
    return ImagePyramid(
        levels=levels,
        path=Path(path),
        mpp=mpp,
        metadata={"downsamples": [2.0**k for k in range(len(levels))]},
    )


def _downsampled_levels(level0: da.Array) -> list[da.Array]:
    """Mean-downsample by 2 until the longest side is at most SMALLEST_LEVEL pixels."""
    levels = [level0]
    while max(levels[-1].shape[1:]) > SMALLEST_LEVEL:
        finer = levels[-1]
        height, width = (s - s % 2 for s in finer.shape[1:])
        finer = finer[:, :height, :width].rechunk((3, CHUNK, CHUNK))
        coarser = da.coarsen(np.mean, finer, {1: 2, 2: 2}, trim_excess=True)
        levels.append(da.round(coarser).astype(np.uint8).rechunk((3, CHUNK, CHUNK)))
    return levels
