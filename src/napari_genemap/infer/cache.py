"""The gene-map cache: one zarr v3 store per (slide, model, settings), signed so a stale one is never read.

Layout: ``level{L}`` arrays of shape (genes, rows, columns), float16, one shard per tile holding
(genes, C, C) with inner chunks (k, C, C) (C = the tile's side in map pixels; k = `genes_per_chunk`, 5
for 785 genes), so showing one gene reads one inner chunk per tile and a tile is written as one file.
zarr's local store writes each file to a temporary name and renames it, so a tile's shard is either whole
or absent.

"Done" is an empty marker file ``level{L}/done/{row}-{column}`` written after the tile's data, not the
shard's existence: zarr writes no shard for a tile that is all fill value (glass, written as zeros), so
such a tile would never count as done. Data first, marker second: a killed process can leave data without
a marker (recomputed), never a marker without data.

Every inner chunk is zstd-compressed, then checksummed (crc32c; the shard index has its own crc32c), so a
damaged tile (flipped bytes, a truncated or zeroed shard) fails to decode instead of being served:
`damaged` finds such tiles and `invalidate` makes them missing again, to be recomputed. Caches of format 3
and earlier had no chunk checksums; their signature differs, so they are ignored (left on disk, never read
by a writer) and a new store is built beside them.

Several processes may fill one store (two ``genemap predict`` runs, a viewer's tile service): a level-0
tile being computed is claimed by an exclusive file ``level0/claims/{row}-{column}`` holding the owner's
host, pid and start time. Others wait for it rather than compute it again; a claim whose owner is dead (same
host) or older than `CLAIM_STALE_SECONDS` is taken over. Claims only save work: a tile computed twice is
written twice with the same values.

``tissue`` (bool, level-0 map pixels, optional) is the engine's tissue mask, written with the store: a map
pixel is tissue if any mask pixel inside it is. Viewers hide the rest (glass).

The signature covers the slide's identity (path, size, modification time, dimensions, µm/px), the
checkpoint (sha256 of its weights), the protocol, stride, tile, halo, model µm/px and the package
version; it is part of the store's name and repeated in its attributes, which are checked on opening.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import GenemapInputError
from .grid import TileGrid

if TYPE_CHECKING:
    import zarr

CACHE_FORMAT = 4  # 2: the grid in the attributes (viewers open a store without the model); 3: done markers,
# tissue; 4: crc32c-checksummed chunks (older stores are ignored: their signature, so their name, differs)
DTYPE = "float16"
#: most genes in one inner chunk. A tile is written faster in fewer, larger chunks (785 genes of 176 x 176
#: map pixels: 0.28 s in chunks of 5 genes against 0.46 s in chunks of 1, zarr's per-chunk work); showing
#: one gene decodes its chunk's other genes too (1.6 ms a tile against 1.2 ms)
MAX_GENES_PER_CHUNK = 8
CLAIM_STALE_SECONDS = 30 * 60  # a claim from another host (whose pid cannot be checked) is taken over after this


def genes_per_chunk(n_genes: int) -> int:
    """Genes in one inner chunk: the largest divisor of ``n_genes`` up to `MAX_GENES_PER_CHUNK` (a shard
    holds all genes, so its inner chunks must divide them)."""
    return max(k for k in range(1, min(MAX_GENES_PER_CHUNK, max(1, n_genes)) + 1) if n_genes % k == 0)


def slide_identity(sdata) -> dict:
    """What identifies a slide cheaply (no pixel hashing: slides are tens of GB)."""
    from ..io import image_levels, slide_info, slide_mpp

    levels, _ = image_levels(sdata)
    info = slide_info(sdata)
    identity = {"shape": [int(s) for s in levels[0].shape], "mpp": round(float(slide_mpp(sdata)), 9)}
    source = info.get("source")
    if source and Path(source).exists():
        stat = Path(source).stat()
        identity |= {"path": os.path.abspath(source), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    else:  # an in-memory slide: fall back to its pixels' dask name, which hashes how they were made
        identity["pixels"] = levels[0].name
    return identity


def signature(slide: dict, model_digest: str, protocol_json: str, grid: TileGrid, model_mpp: float) -> dict:
    from .. import __version__

    return {
        "cache_format": CACHE_FORMAT,
        "package_version": __version__,
        "slide": slide,
        "model_sha256": model_digest,
        "protocol": hashlib.sha256(protocol_json.encode()).hexdigest(),
        "model_mpp": model_mpp,
        "stride": grid.stride,
        "tile": grid.tile,
        "halo": grid.halo,
        "shape": [grid.height, grid.width],
    }


def signature_hash(value: dict) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


class GeneMapCache:
    """The signed store of one slide's gene maps; levels are created on first use."""

    def __init__(
        self,
        root: str | os.PathLike,
        value: dict,
        grid: TileGrid,
        genes: list[str],
        levels: int,
        tissue: np.ndarray | None = None,
    ):
        """``tissue``: bool mask of level-0 map pixels, stored if this call creates the store (an existing
        store keeps the mask, or the lack of one, it was created with)."""
        import zarr

        self.grid, self.genes, self.n_levels = grid, list(genes), levels
        self.signature = value
        self.digest = signature_hash(value)
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise GenemapInputError(f"{root}: not a folder (the gene-map cache goes there)")
        self.path = root / f"genemap-{self.digest[:20]}.zarr"
        if self.path.exists() and not self.path.is_dir():
            raise GenemapInputError(f"{self.path}: a file where the gene-map cache store goes; delete it")
        if not self.path.exists():
            self._create(value, tissue)
        with _unreadable(self.path):
            group = zarr.open_group(self.path, mode="r+")
            if group.attrs.get("signature") != json.loads(json.dumps(value)):
                raise GenemapInputError(f"{self.path}: cache signature does not match; delete the folder")
            self.arrays = [_array(group, f"level{level}") for level in range(levels)]
        self.group = group
        self._tissue: list[np.ndarray] | None = None  # every level's mask, read on first use
        self._tissue_read = False
        self._check_writable()

    @classmethod
    def open(cls, path: str | os.PathLike) -> GeneMapCache:
        """An existing store, read-only, rebuilt from its own attributes: what a viewer needs to show tiles
        another process writes (no model, no slide, no torch)."""
        import zarr

        path = Path(path)
        try:
            group = zarr.open_group(path, mode="r")
            attrs: Mapping[str, Any] = group.attrs  # the JSON _fill wrote
            value, genes, levels, grid = (attrs[key] for key in ("signature", "genes", "levels", "grid"))
        except (FileNotFoundError, KeyError, ValueError, OSError) as error:
            raise GenemapInputError(f"{path}: not a gene-map cache ({type(error).__name__}: {error})") from None
        self = cls.__new__(cls)
        with _unreadable(path):
            self.grid = TileGrid(**grid)
            self.genes, self.n_levels, self.signature = list(genes), int(levels), value
            self.arrays = [_array(group, f"level{level}") for level in range(self.n_levels)]
        self.digest, self.path, self.group = signature_hash(value), path, group
        self._tissue, self._tissue_read = None, False
        return self

    def _create(self, value: dict, tissue: np.ndarray | None) -> None:
        """Create the empty store under a temporary name, then rename it into place."""
        import zarr

        from ..io.atomic import atomic_dir

        try:
            with atomic_dir(self.path) as staging:
                self._fill(zarr.open_group(staging, mode="w"), staging, value, tissue)
        except OSError as error:
            if not self.path.exists():
                raise GenemapInputError(f"{self.path}: cannot create the gene-map cache ({_reason(error)})") from None
            # else another process created the same store first: theirs is as good as ours

    def _check_writable(self) -> None:
        """Fail now, in one line, if tiles could not be written (a read-only folder or file system, a full
        disk: the probe holds one page). A disk that fills later fails at that tile's write, also in one line."""
        probe = self.path / "level0" / "done" / f".probe-{os.getpid()}-{time.monotonic_ns()}"
        try:
            with probe.open("xb") as handle:
                handle.write(bytes(4096))
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:
            raise GenemapInputError(f"{self.path}: cannot write to the gene-map cache ({_reason(error)})") from None
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()

    def _fill(self, group, staging: Path, value: dict, tissue: np.ndarray | None) -> None:
        from zarr.codecs import Crc32cCodec, ZstdCodec

        side = self.grid.tile_map
        for level in range(self.n_levels):
            group.create_array(
                f"level{level}",
                shape=(len(self.genes), *self.grid.map_shape(level)),
                chunks=(genes_per_chunk(len(self.genes)), side, side),
                shards=(len(self.genes), side, side),
                dtype=DTYPE,
                compressors=(ZstdCodec(), Crc32cCodec()),  # the checksum covers the compressed bytes
                fill_value=0,
                config={"write_empty_chunks": True},
                dimension_names=("c", "y", "x"),
            )
            (staging / f"level{level}" / "done").mkdir()
            (staging / f"level{level}" / "claims").mkdir()
        if tissue is not None:
            if tissue.shape != self.grid.map_shape(0):
                raise ValueError(f"tissue mask {tissue.shape}: expected the level-0 map's {self.grid.map_shape(0)}")
            group.create_array("tissue", data=np.asarray(tissue, bool), dimension_names=("y", "x"))
        group.attrs.update(
            {"signature": value, "genes": self.genes, "levels": self.n_levels, "grid": dataclasses.asdict(self.grid)}
        )

    # --- tiles -------------------------------------------------------------------------------------------
    def _marker(self, level: int, row: int, column: int) -> Path:
        return self.path / f"level{level}" / "done" / f"{row}-{column}"

    def has(self, level: int, row: int, column: int) -> bool:
        return self._marker(level, row, column).exists()

    def write(self, level: int, row: int, column: int, values: np.ndarray) -> None:
        """Write one tile (genes, h, w) of ``level`` (h, w cut at the map's edge), then mark it done.

        A failed write (full disk, read-only folder) leaves no marker, and zarr's own write-then-rename
        leaves no partial shard: the tile stays missing."""
        i0, _, j0, _ = self.grid.map_box(row, column, level)
        height, width = values.shape[1:]
        try:
            self.arrays[level][:, i0 : i0 + height, j0 : j0 + width] = values.astype(DTYPE)
            self._marker(level, row, column).touch()
        except OSError as error:
            raise GenemapInputError(
                f"{self.path}: cannot write tile ({row}, {column}) of level {level} ({_reason(error)})"
            ) from None

    def damaged(self, level: int, tiles) -> list[tuple[int, int]]:
        """Those of ``tiles`` marked done whose data fail to decode or to match their checksums."""
        bad = []
        for row, column in tiles:
            if not self.has(level, row, column):
                continue
            shard = self._shard(level, row, column)
            if not shard.is_file() or shard.stat().st_size == 0:  # zarr reads a missing or empty shard as zeros
                bad.append((row, column))
                continue
            i0, i1, j0, j1 = self.grid.map_box(row, column, level)
            try:
                values = np.asarray(self.arrays[level][:, i0:i1, j0:j1])
            except Exception:  # checksum, codec and shard-index errors have many types
                bad.append((row, column))
                continue
            if not np.isfinite(values).all():  # a store written before checksums, or by someone else
                bad.append((row, column))
        return bad

    def invalidate(self, level: int, row: int, column: int) -> None:
        """Make a (damaged) tile missing: its marker goes first, then its shard."""
        self._marker(level, row, column).unlink(missing_ok=True)
        self._shard(level, row, column).unlink(missing_ok=True)

    def _shard(self, level: int, row: int, column: int) -> Path:
        """The file of a tile's shard (one shard per tile, all genes: shard key 0 on the gene axis)."""
        return self.path / f"level{level}" / "c" / "0" / str(row) / str(column)

    # --- claims between processes (level 0) ---------------------------------------------------------------
    def _claim_path(self, level: int, row: int, column: int) -> Path:
        return self.path / f"level{level}" / "claims" / f"{row}-{column}"

    def claim(self, level: int, row: int, column: int) -> bool:
        """Claim a tile for this process: True if it is ours now (a stale claim is taken over), False while
        another live process holds it. A store without a claims folder (read-only use) claims everything."""
        path = self._claim_path(level, row, column)
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()})
        for _ in range(2):
            try:
                descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._stale(path):
                    return False
                path.unlink(missing_ok=True)  # the owner is gone: take it over
                continue
            except FileNotFoundError:
                return True
            except OSError as error:
                raise GenemapInputError(f"{path}: cannot claim a tile ({_reason(error)})") from None
            try:
                os.write(descriptor, record.encode())
            except OSError as error:
                path.unlink(missing_ok=True)
                raise GenemapInputError(f"{path}: cannot claim a tile ({_reason(error)})") from None
            finally:
                os.close(descriptor)
            return True
        return False  # another process took it over at the same moment

    def release(self, level: int, row: int, column: int) -> None:
        self._claim_path(level, row, column).unlink(missing_ok=True)

    def claim_alive(self, level: int, row: int, column: int) -> bool:
        """Whether another process holds a live claim on the tile."""
        path = self._claim_path(level, row, column)
        return path.exists() and not self._stale(path)

    @staticmethod
    def _stale(path: Path) -> bool:
        """A claim whose owner is dead (same host), or too old to trust, or unreadable (a half-written one
        from a process killed between creating and filling it, once a few seconds old)."""
        try:
            owner = json.loads(path.read_text())
            host, pid, started = str(owner["host"]), int(owner["pid"]), float(owner["time"])
        except FileNotFoundError:
            return False  # released meanwhile: not ours to take; the caller checks again
        except (OSError, ValueError, KeyError, TypeError):
            try:
                return time.time() - path.stat().st_mtime > 5
            except OSError:
                return False
        if time.time() - started > CLAIM_STALE_SECONDS:
            return True
        if host == socket.gethostname():
            if pid == os.getpid():
                return False
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return False

    def read(self, level: int, i0: int, i1: int, j0: int, j1: int, genes=slice(None)) -> np.ndarray:
        return np.asarray(self.arrays[level][genes, i0:i1, j0:j1])  # already numpy: asarray only types it

    def tissue(self, level: int) -> np.ndarray | None:
        """Bool mask of ``level``'s map pixels (True = tissue; a coarser pixel is tissue if any of its 2 x 2
        is), or None when the store has no mask (everything is shown)."""
        if not self._tissue_read:
            if "tissue" in self.group:
                masks = [np.asarray(_array(self.group, "tissue")[...], bool)]
                for _ in range(1, self.n_levels):
                    masks.append(any_downsample(masks[-1]))
                self._tissue = masks
            self._tissue_read = True
        return None if self._tissue is None else self._tissue[level]

    def tile_shape(self, level: int, row: int, column: int) -> tuple[int, int]:
        return self.grid.tile_shape(level, row, column)

    def tile_counts(self, level: int) -> tuple[int, int]:
        """(rows, columns) of tiles (= shards) in ``level``."""
        return self.grid.tile_counts(level)


def _reason(error: OSError) -> str:
    return error.strerror or type(error).__name__


@contextlib.contextmanager
def _unreadable(path: Path) -> Iterator[None]:
    """Damaged store metadata (a ``zarr.json`` that is not JSON, a missing array) in one line."""
    try:
        yield
    except GenemapInputError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as error:
        detail = f"{type(error).__name__}: {error}".splitlines()[0]
        raise GenemapInputError(f"{path}: damaged gene-map cache ({detail}); delete the folder") from None


def _array(group: zarr.Group, name: str) -> zarr.Array:
    """The array ``name`` of a cache store (a group there means the store is not one of ours)."""
    import zarr

    array = group[name]
    if not isinstance(array, zarr.Array):
        raise GenemapInputError(f"{group.store}: {name!r} is a group; expected an array")
    return array


def any_downsample(mask: np.ndarray) -> np.ndarray:
    """2 x 2 "any" of a bool mask; an odd last row or column uses the pixels that exist."""
    height, width = mask.shape
    padded = np.zeros((height + height % 2, width + width % 2), bool)
    padded[:height, :width] = mask
    return np.asarray(padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2).any((1, 3)))
