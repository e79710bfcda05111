"""Training tiles encoded once: an ``.npy`` cache of each slide's tile latents, keyed by what made them.

Encoding H&E tiles through TAEF2 costs about as much per tile as a training step, and a diffusion run
visits every tile many times, so each slide's tiles are encoded once and kept in
``<cache>/<slide>-<key>.npy`` (float16, shape (tiles, variants, channels, h, w)). The key is the sha256 of
everything that changes the array (`cache_key`: the image file's path, size and modification time, the tile
boxes, the tile size in pixels and µm/px, the encoder's weights digest, the augmentation variants), so a
changed setting writes a new file and a stale one is never read. Files are written under a temporary name
and renamed (`io.atomic.atomic_file`). This module knows nothing of the encoder: the caller passes a
function from RGB tiles to latents (pixel-space runs pass one that keeps the RGB).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..io.atomic import atomic_file

#: The dihedral group's 8 elements as (rotations by 90°, flip left-right), identity first.
DIHEDRAL = ((0, False), (1, False), (2, False), (3, False), (0, True), (1, True), (2, True), (3, True))

Progress = Callable[[int, int, str], None]


def file_identity(path: str | os.PathLike) -> dict:
    """What identifies a file's content cheaply: its resolved path, size and modification time (ns)."""
    path = Path(path).resolve()
    if not path.exists():
        return {"path": str(path)}
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cache_key(parts: dict) -> str:
    """sha256 of the parts as canonical JSON (sorted keys; arrays as their bytes' digest)."""

    def plain(value):
        if isinstance(value, np.ndarray):
            return {"sha256": hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest(), "shape": value.shape}
        raise TypeError(f"cannot key {type(value).__name__}")

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=plain).encode()).hexdigest()


def cache_path(folder: str | os.PathLike, name: str, key: str) -> Path:
    """``<folder>/<name>-<first 16 hex of key>.npy``, the name made safe for a file system."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "slide"
    return Path(folder) / f"{safe}-{key[:16]}.npy"


def dihedral(images: np.ndarray, variants: int) -> np.ndarray:
    """(N, H, W, C) -> (N, variants, H, W, C): the first ``variants`` elements of `DIHEDRAL` (1 to 8)."""
    if not 1 <= variants <= len(DIHEDRAL):
        raise ValueError(f"variants {variants}: expected 1 to {len(DIHEDRAL)}")
    out = []
    for turns, flip in DIHEDRAL[:variants]:
        moved = np.flip(images, axis=2) if flip else images
        out.append(np.rot90(moved, turns, axes=(1, 2)))
    return np.ascontiguousarray(np.stack(out, axis=1))


def encode_tiles(
    images: np.ndarray,
    encode: Callable[[np.ndarray], np.ndarray],
    *,
    batch: int = 16,
    progress: Progress | None = None,
    label: str = "encoding tiles",
) -> np.ndarray:
    """(N, V, H, W, 3) uint8 tiles -> (N, V, C, h, w) float16, ``encode`` taking (n, H, W, 3) uint8 to
    (n, C, h, w) floats ``batch`` tiles at a time."""
    n, variants = images.shape[:2]
    flat = images.reshape(n * variants, *images.shape[2:])
    parts = []
    for start in range(0, len(flat), batch):
        parts.append(np.asarray(encode(flat[start : start + batch]), dtype=np.float16))
        if progress is not None:
            progress(min(start + batch, len(flat)), len(flat), label)
    if not parts:
        raise ValueError("encode_tiles: no tiles to encode")
    latents = np.concatenate(parts)
    return latents.reshape(n, variants, *latents.shape[1:])


def cached_latents(path: str | os.PathLike, make: Callable[[], np.ndarray]) -> tuple[np.ndarray, bool]:
    """The array cached at ``path``, or ``make()``'s, written there atomically; and whether it was made now."""
    path = Path(path)
    if path.is_file():
        try:
            return np.load(path, allow_pickle=False), False
        except (OSError, ValueError):  # a damaged file (a disk that filled up): make it again
            pass
    array = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as temporary:  # the temporary name ends in .npy too, so np.save adds nothing
        np.save(temporary, array, allow_pickle=False)
    return array, True
