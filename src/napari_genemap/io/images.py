"""Slide images as lazy pyramids of (channel, y, x) uint8 RGB dask arrays.

Tiled TIFF / OME-TIFF slides are read through tifffile's zarr view, so opening a slide larger than
memory costs only its headers and reading a region decodes only the tiles under it. JPEG and PNG
have no tiles: they are decoded once, on the first read, and the pyramid is built from that.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
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

#: Pixel sizes (µm per pixel) an H&E slide can plausibly have: 0.05 is beyond any scanner's resolution,
#: 20 is a thumbnail. Outside, the number was almost surely typed in another unit (nm, mm) or is damaged.
MPP_RANGE = (0.05, 20.0)

#: At most this many pixels per byte of file, per format: a baseline or progressive Huffman JPEG spends at
#: least one bit per 8 x 8 luma block (512 px/byte; 4x margin), deflate expands at most 1032:1 and a PNG
#: pixel is at least 1 bit (x 8). A header claiming more is damaged or forged, whatever memory there is.
MAX_PIXELS_PER_BYTE = {"JPEG": 2048, "PNG": 8 * 1100}
#: At most this many decoded bytes per stored byte for a compressed strip TIFF (deflate: 1032, LZW about
#: 1400, JPEG about 6000; zstd of a flat image can do more, which no scanned slide is).
MAX_TIFF_EXPANSION = 20_000
#: Slide pixel modes PIL reads that are not 8 bits per channel: converting them to RGB clips to 255.
WIDE_MODES = ("I", "F")


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
        pyramid.mpp = check_mpp(mpp, path)
    return pyramid


def check_mpp(mpp: float, source: object) -> float:
    """A pixel size in µm per pixel that an H&E slide can have (`MPP_RANGE`), else one clear line."""
    try:
        mpp = float(mpp)
    except (TypeError, ValueError):
        raise GenemapInputError(f"{source}: pixel size {mpp!r} is not a number; expected µm per pixel") from None
    if not np.isfinite(mpp) or mpp <= 0:
        raise GenemapInputError(f"{source}: pixel size {mpp} µm/px is not a positive number")
    low, high = MPP_RANGE
    if not low <= mpp <= high:
        hint = " (was it given in nm? 1000 nm = 1 µm)" if mpp > high else " (was it given in mm? 1 mm = 1000 µm)"
        raise GenemapInputError(
            f"{source}: pixel size {mpp:g} µm/px is outside the plausible range for H&E, {low:g} to {high:g} "
            f"micrometres per pixel{hint}"
        )
    return mpp


def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup (container) limit; None if
    neither can be read."""
    sizes = []
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as handle:
            line = next(line for line in handle if line.startswith("MemAvailable:"))
        sizes.append(int(line.split()[1]) * 1024)
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            sizes.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    if not sizes:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            sizes.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return min(sizes) if sizes else None


def _gigabytes(size: float) -> str:
    return f"{size / 2**30:.1f} GiB"


def _check_fits_in_memory(path: Path, what: str, needed: int) -> None:
    available = available_memory()
    if available is not None and needed > available:
        raise GenemapInputError(
            f"{path}: {what} needs about {_gigabytes(needed)} of memory, more than the {_gigabytes(available)} "
            "available; expected a smaller image or a tiled TIFF (read lazily, tile by tile)"
        )


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _check_unchanged(path: Path, stamp: tuple[int, int]) -> None:
    """Refuse to go on reading a file that was replaced or rewritten since it was opened."""
    try:
        now = _stamp(path)
    except OSError as error:
        raise GenemapInputError(f"{path}: the file went away while it was being read ({error.strerror})") from None
    if now != stamp:
        raise GenemapInputError(
            f"{path}: the file changed while it was being read (size {stamp[0]} -> {now[0]} bytes or a new "
            "modification time); expected it to stay as it was until the read is done"
        )


# --- JPEG / PNG -------------------------------------------------------------------------------------


class _FlatPyramid:
    """A JPEG/PNG and its mean-downsampled levels, made once on first access and kept.

    Why: these formats cannot be read by region, so the whole file is decoded anyway; building every level
    from it at once (a third more memory) makes each later read a plain slice, where lazy dask levels would
    recompute 2 x 2 means of the full-resolution pixels for every region napari or the model asks for.
    Instances are shared per file (and per process: pickles carry the path only, for dask workers).
    """

    _open: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def __init__(self, path: Path, stamp: tuple[int, int]):
        self.path, self.stamp = path, stamp
        self._levels: list[np.ndarray] | None = None

    @classmethod
    def shared(cls, path: Path, stamp: tuple[int, int]) -> _FlatPyramid:
        key = (str(path), stamp)
        pyramid = cls._open.get(key)
        if pyramid is None:
            pyramid = cls._open[key] = cls(path, stamp)
        return pyramid

    def level(self, index: int) -> np.ndarray:
        if self._levels is None:
            _check_unchanged(self.path, self.stamp)
            decoded = _decode_flat(self.path)
            _check_unchanged(self.path, self.stamp)  # rewritten while it was being decoded
            levels = [decoded]
            while max(levels[-1].shape[:2]) > SMALLEST_LEVEL:
                finer = levels[-1]
                height, width = (s - s % 2 for s in finer.shape[:2])
                blocks = finer[:height, :width].reshape(height // 2, 2, width // 2, 2, 3)
                levels.append(np.round(blocks.sum((1, 3), dtype=np.uint16) / np.float32(4)).astype(np.uint8))
            self._levels = levels
        return self._levels[index]


class _FlatLevel:
    """Array-like over one level of a `_FlatPyramid` (what `da.from_array` wraps)."""

    def __init__(self, path: Path, index: int, shape: tuple[int, int, int], stamp: tuple[int, int]):
        self.path, self.index, self.shape, self.stamp = path, index, shape, stamp
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3
        self.pyramid = _FlatPyramid.shared(path, stamp)  # kept alive as long as any of its levels is

    def __getitem__(self, key):
        return self.pyramid.level(self.index)[key]

    def __getstate__(self):  # ship the path (and the version opened) to dask workers, not the pixels
        return {"path": self.path, "index": self.index, "shape": self.shape, "stamp": self.stamp}

    def __setstate__(self, state):
        self.__init__(state["path"], state["index"], state["shape"], tuple(state["stamp"]))


_PIL_GUARD = threading.Lock()


def _open_pil(path: Path):
    """``Image.open`` with PIL's decompression-bomb guard (checked there only) off for this call, as
    whole-slide JPEGs exceed it; our own check (`_check_flat_size`: pixels per byte of file, and memory)
    runs before any decode instead. PIL's setting is left as it was for everyone else."""
    from PIL import Image

    with _PIL_GUARD:
        previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _decode_flat(path: Path) -> np.ndarray:
    try:
        with _open_pil(path) as image:
            image_format = image.format
            pixels = np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError) as error:
        raise GenemapInputError(f"{path}: cannot decode image ({error})") from None
    if image_format == "JPEG" and _jpeg_ends_in_fill(pixels):
        raise GenemapInputError(
            f"{path}: JPEG data is corrupt (premature end of data segment: its last blocks decode as flat grey "
            "fill); the file is damaged, copy it again"
        )
    return pixels


def _jpeg_ends_in_fill(pixels: np.ndarray) -> bool:
    """libjpeg, on running out of entropy-coded data ("premature end of data segment", a hole or a cut in
    the file), warns (PIL hides the warning) and fills every remaining block with zero coefficients: exact
    mid-grey (128, 128, 128) up to the last block. A photograph's last 8 x 8 block is never exactly that,
    unless the whole image is flat (whose first block is then the same grey)."""
    if min(pixels.shape[:2]) < 8:
        return False
    return bool(np.all(pixels[-8:, -8:] == 128)) and not np.all(pixels[:8, :8] == 128)


def _check_flat_size(path: Path, image_format: str, width: int, height: int) -> None:
    """Refuse, before decoding, a header that claims more pixels than the file can hold or memory can take."""
    pixels = width * height
    size = path.stat().st_size
    per_byte = MAX_PIXELS_PER_BYTE.get(image_format)
    if per_byte is not None and pixels > per_byte * max(size, 1):
        raise GenemapInputError(
            f"{path}: the {image_format} header claims {width} x {height} px, more than a {size}-byte file can "
            f"hold (at most {per_byte} px per byte); the header is damaged or forged"
        )
    # the decoded RGB level, PIL's own buffer while converting, and the smaller levels (a third more)
    _check_fits_in_memory(path, f"decoding this {width} x {height} px {image_format}", pixels * 3 * 2 + pixels)


def _open_flat(path: Path) -> ImagePyramid:
    from PIL import UnidentifiedImageError

    try:
        with _open_pil(path) as image:
            width, height = image.size
            image_format, mode = image.format, image.mode
            if image_format == "PNG":
                image.verify()  # checks every chunk's CRC without decoding pixels
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise GenemapInputError(f"{path}: not a readable JPEG/PNG image ({error})") from None
    if mode.startswith(WIDE_MODES):
        depth = "16-bit" if mode.startswith("I;16") else f"{mode} (32-bit)"
        raise GenemapInputError(
            f"{path}: image is {depth} grayscale {image_format}; expected 8-bit RGB (uint8, 3 channels)"
        )
    if image_format == "JPEG" and not _jpeg_has_end_marker(path):
        raise GenemapInputError(f"{path}: JPEG is truncated (no end-of-image marker); the file is incomplete")
    _check_flat_size(path, image_format, width, height)
    stamp = _stamp(path)
    token = _file_token(path)
    levels, index = [], 0
    meta = np.empty((0, 0, 0), dtype=np.uint8)  # else dask decodes the whole image to learn the dtype
    while True:
        name = f"decoded-{token}" + (f"-level{index}" if index else "")
        level = _FlatLevel(path, index, (height, width, 3), stamp)
        array = da.from_array(level, chunks=(CHUNK, CHUNK, 3), name=name, meta=meta)
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
        _check_tiff_size(series.keyframe, path)
        stamp = _stamp(path)
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
    levels = [_to_cyx(_guarded(da.from_zarr(array), path, stamp), axes, path) for array in arrays]
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


def _guarded(array: da.Array, path: Path, stamp: tuple[int, int]) -> da.Array:
    """The same chunks, each checked after reading that the file is still the version opened."""
    return da.map_blocks(_unchanged_block, array, path=path, stamp=stamp, dtype=array.dtype, meta=array._meta)


def _unchanged_block(block: np.ndarray, path: Path, stamp: tuple[int, int]) -> np.ndarray:
    _check_unchanged(path, stamp)
    return block


def _check_tiff_size(page, path: Path) -> None:
    """A strip (non-tiled) TIFF is decoded a strip at a time: refuse, before any decode, a header claiming
    more pixels than its strips can hold, or a strip larger than memory. Tiled TIFFs stay lazy."""
    if page.is_tiled:
        return
    height, width = int(page.imagelength), int(page.imagewidth)
    row_bytes = -(-width * int(page.samplesperpixel) * int(page.bitspersample) // 8)
    decoded = height * row_bytes
    stored = int(sum(page.databytecounts))
    compressed = int(page.compression) != 1
    if (compressed and decoded > MAX_TIFF_EXPANSION * max(stored, 1)) or (not compressed and stored < decoded):
        raise GenemapInputError(
            f"{path}: the TIFF header claims {width} x {height} px ({_gigabytes(decoded)} decoded) but its image "
            f"data is {stored} bytes; the header is damaged or forged"
        )
    rows_per_strip = min(height, int(page.rowsperstrip or height))
    _check_fits_in_memory(path, f"a {width} x {rows_per_strip} px strip of this TIFF", 2 * rows_per_strip * row_bytes)


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
