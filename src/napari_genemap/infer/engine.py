"""The tile engine: predict gene-map tiles with a halo, cache them, build coarser levels from finer ones.

One thread owns the model; every request (from dask's threads, napari's, the CLI's) goes through its
queue, so the model is never called concurrently and CUDA state stays on one thread. Window reading
happens in the callers' threads and overlaps with the model's work. Tiles without tissue (a threshold on
a low pyramid level) are written as zeros without running the model. Level L > 0 tiles are the 2 x 2
mean of level L - 1, never the model run on downsampled H&E.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..data.resample import ModelFrameReader
from ..data.stain import apply_od_matrix, normalising_matrix, slide_stains
from ..device import device_type
from ..errors import GenemapDataWarning, GenemapInputError
from ..models.registry import GENE_MAP_MODELS
from .backends import DihedralMean, Runner, build_runner, exports_folder, resolve_backend
from .cache import GeneMapCache, signature, slide_identity
from .grid import DEFAULT_HALO, DEFAULT_TILE, TileGrid

Tile = tuple[int, int]
RunnerFactory = Callable[[int | None], tuple[Runner, str]]
Progress = Callable[[int, int, str], None]

logger = logging.getLogger(__name__)


class ModelOwner:
    """A thread that owns the model: batches of windows (n, H, W, 3) uint8 in, density maps out.

    The thread builds its runner first (`backends.build_runner`: an export or compile may take seconds),
    so a caller that needs the model ready waits with `ready`; ``margin`` output pixels are dropped on
    each side of every window's map; ``shapes``: the (n, H, W) of the windows to come, prepared while
    building; ``threads``: the model's CPU threads (None: the backend's own choice); ``tta``: average each
    window's map over its 8 dihedral views (`backends.DihedralMean`)."""

    def __init__(
        self,
        loaded,
        device: str = "auto",
        *,
        backend: str = "auto",
        margin: int = 0,
        exports: str | Path | None = None,
        shapes: tuple[tuple[int, int, int], ...] = (),
        threads: int | None = None,
        runner_factory: RunnerFactory | None = None,
        tta: bool = False,
    ):
        self.device = device_type(device)
        self.backend = ""  # the one it got, once ready
        self.busy_seconds = 0.0  # time spent in the model, to tell model cost from overhead
        self._build = runner_factory or (
            lambda threads: build_runner(loaded, backend, device, margin, exports, threads, shapes)
        )
        self._threads = threads
        self._tta = tta
        self._ready: Future[str] = Future()
        self._requests: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="genemap-model", daemon=True)
        self._thread.start()

    def ready(self, timeout: float | None = None) -> str:
        """Wait until the runner is built; returns its backend (raises what building it raised)."""
        return self._ready.result(timeout)

    def submit(self, windows: np.ndarray) -> Future:
        future: Future = Future()
        self._requests.put((windows, future))
        return future

    def _serve(self) -> None:
        run: Runner | None = None
        try:
            run, self.backend = self._build(self._threads)
            if self._tta:
                run = DihedralMean(run)
            self._ready.set_result(self.backend)
        except BaseException as error:  # every request then re-raises it
            self._ready.set_exception(error)
        while True:
            item = self._requests.get()
            if item is None:
                return
            windows, future = item
            if not future.set_running_or_notify_cancel():
                continue
            started = time.perf_counter()
            try:
                if run is None:
                    self._ready.result()  # re-raises why there is no runner
                    raise RuntimeError("no model runner")  # not reached: the line above raised
                result = run(windows)
                self.busy_seconds += time.perf_counter() - started
                future.set_result(result)
            except BaseException as error:  # handed to the waiting caller, which re-raises it
                future.set_exception(error)

    def close(self) -> None:
        self._requests.put(None)
        self._thread.join(timeout=10)


GLASS_MARGIN = 12  # grey levels below the glass's brightness where tissue starts
GLASS_FLOOR = 225  # glass is at least this bright: a crop without glass keeps its palest tissue (~210)
CLOSING_UM = 50.0  # gaps in tissue narrower than this (pale stroma, fat) stay tissue


def tissue_mask(levels, scales: list[float], mpp: float, max_side: int = 2048) -> tuple[np.ndarray, float]:
    """A boolean tissue mask and its slide px per pixel, from a low pyramid level (at most ``max_side`` px,
    pixels at least 4 µm).

    Tissue is darker than the slide's glass (its 95th-percentile grey level, so a pink-tinted slide is
    measured against its own glass; at least 225) and coloured (max - min channel > 20) or dark (mean
    < 160); specks go, and gaps up to 50 µm and enclosed holes are closed so pale tissue is not called
    glass. A fixed
    colour rule alone called eosin-tinted glass around sections tissue (a third of HER2ST C3)."""
    from scipy import ndimage

    from ..io.canonical import overview_level

    index = overview_level(levels, scales, mpp, max_side)
    pixels = np.asarray(levels[index]).astype(np.int16)
    grey = pixels.mean(0)
    glass = max(float(np.percentile(grey, 95)), GLASS_FLOOR)
    tissue = (grey < glass - GLASS_MARGIN) & (((pixels.max(0) - pixels.min(0)) > 20) | (grey < 160))
    tissue = ndimage.binary_opening(tissue)
    radius = max(1, round(CLOSING_UM / (scales[index] * mpp)))
    # padded with its own edge so that tissue running off the slide is not eroded there
    padded = ndimage.binary_closing(np.pad(tissue, radius, mode="edge"), iterations=radius)
    tissue = padded[radius:-radius, radius:-radius]
    return ndimage.binary_fill_holes(tissue), float(scales[index])


def map_tissue(mask: np.ndarray, mask_scale: float, grid: TileGrid) -> np.ndarray:
    """The tissue mask on level-0 map pixels: a map pixel is tissue if any mask pixel it touches is (the
    same rounding as `TileEngine.has_tissue`, so a tile without tissue has no tissue pixel)."""
    height, width = grid.map_shape(0)
    to_mask = grid.factor / mask_scale  # model px -> mask px

    def spans(n: int, frame: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        edges = np.minimum(np.arange(n + 1) * grid.stride, frame) * to_mask  # the last pixel ends with the frame
        start = np.minimum(np.floor(edges[:-1]).astype(np.int64), size - 1)
        stop = np.clip(np.ceil(edges[1:]).astype(np.int64), start + 1, size)
        return start, stop

    def any_in_spans(values: np.ndarray, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
        """Along axis 0: whether any value in [start, stop) is set (running sums, one axis at a time)."""
        running = np.zeros((values.shape[0] + 1, *values.shape[1:]), np.int32)
        np.cumsum(values, axis=0, dtype=np.int32, out=running[1:])
        return running[stop] > running[start]

    top, bottom = spans(height, grid.height, mask.shape[0])
    left, right = spans(width, grid.width, mask.shape[1])
    rows = any_in_spans(np.asarray(mask, bool), top, bottom)  # (map rows, mask columns)
    return np.ascontiguousarray(any_in_spans(rows.T, left, right).T)


class TileEngine:
    """Predicts and caches the gene maps of one slide with one model."""

    def __init__(
        self,
        model,
        sdata,
        cache_root: str | Path,
        *,
        tile: int = DEFAULT_TILE,
        halo: int = DEFAULT_HALO,
        batch_size: int | None = None,
        device: str = "auto",
        skip_background: bool = True,
        min_level_side: int = 256,
        backend: str = "auto",
        threads: int | None = None,
        start_model: bool = False,
        runner_factory: RunnerFactory | None = None,
        tta: bool = False,
    ):
        """``model``: a loaded checkpoint (`GeneMapModel`); ``sdata``: a canonical slide; ``batch_size``:
        windows per model call (default 1 on the CPU, where batching gains nothing and costs memory, 4 on CUDA);
        ``backend``: one of `backends.BACKENDS` (part of the cache's signature: backends differ in the last
        bits, bfloat16 in the third digit, and one cache never mixes them); ``threads``: the model's CPU
        threads (None: the backend's choice); ``start_model``: build the model's runner now, while the
        tissue mask is computed (what a viewer waits for), not on the first prediction; ``runner_factory``:
        (threads) -> (runner, name), for a backend measured outside `backends.BACKENDS` (the benchmark's int8
        graphs); ``tta``: test-time augmentation, each window's map the mean of its 8 dihedral views (8 model
        calls a window; part of the cache's signature, as it changes the values). The default tile and halo
        are rounded up to the model's input multiple (a DiffBulk model's feature tile, e.g. 224 px: 1120 and
        448); sizes given otherwise must be multiples of it."""
        from ..io import image_levels, slide_mpp

        if model.model_class not in GENE_MAP_MODELS:
            raise GenemapInputError(
                f"{model.path or 'the model'}: a {model.model_class} gives one expression vector per spot-centred "
                f"tile, not a gene map; expected one of {', '.join(sorted(GENE_MAP_MODELS))}"
            )
        multiple = model.input_multiple
        if tile == DEFAULT_TILE:
            tile = -(-tile // multiple) * multiple
        if halo == DEFAULT_HALO:
            halo = -(-halo // multiple) * multiple
        self.loaded = model
        self.genes = list(model.genes)
        self.reader = ModelFrameReader.from_sdata(sdata, model.mpp)
        levels, scales = image_levels(sdata)
        self.slide_mpp = slide_mpp(sdata)
        factor = model.mpp / self.slide_mpp
        self.grid = TileGrid(
            self.reader.height, self.reader.width, model.stride, tile, halo, factor, model.input_multiple
        )
        kind = device_type(device)
        self.backend = resolve_backend(backend, kind, exportable=bool(model.digest) and model.exportable)
        value = signature(slide_identity(sdata), model.digest, model.protocol.to_json(), self.grid, model.mpp)
        value["backend"] = self.backend if runner_factory is None else f"custom-{id(runner_factory)}"
        if tta:  # only then: the caches of every run without it keep their names
            value["tta"] = "dihedral-8"
        # a model trained on stain-normalised input sees every tile of this slide through one fixed map
        self.stain_matrix = None if model.stain is None else normalising_matrix(slide_stains(sdata), model.stain)
        if self.stain_matrix is not None:
            value["stain"] = [round(float(x), 6) for x in self.stain_matrix.ravel()]
        self.tta = tta
        self.batch_size = batch_size or (4 if kind == "cuda" else 1)
        self._runner_factory = runner_factory
        self._device, self._threads, self._exports = device, threads, exports_folder(cache_root)
        self._lock = threading.Lock()
        # the model thread starts on the first prediction, or now to build the runner while the rest is set up
        self._owner: ModelOwner | None = self._new_owner() if start_model else None
        self.mask: np.ndarray | None
        try:
            self.mask, self.mask_scale = tissue_mask(levels, scales, self.slide_mpp) if skip_background else (None, 1.0)
            tissue = None if self.mask is None else map_tissue(self.mask, self.mask_scale, self.grid)
            levels_count = self.grid.levels(min_level_side)
            self.cache = GeneMapCache(cache_root, value, self.grid, self.genes, levels_count, tissue=tissue)
        except BaseException:
            if self._owner is not None:
                self._owner.close()
            raise
        self._pending: dict[tuple[int, int, int], Future] = {}
        self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="genemap-read")
        self.stats = {"predicted": 0, "empty": 0, "downsampled": 0}
        rows, columns = self.grid.tile_counts(0)
        logger.info(
            "engine: %d x %d tiles of %d model px (halo %d), cache %s", rows, columns, tile, halo, self.cache.path
        )

    # --- public ------------------------------------------------------------------------------------------
    @property
    def n_levels(self) -> int:
        return self.cache.n_levels

    def level_shape(self, level: int) -> tuple[int, int]:
        return self.grid.map_shape(level)

    def has_tissue(self, row: int, column: int) -> bool:
        if self.mask is None:
            return True
        y0, y1, x0, x1 = self.grid.tile_box(row, column)
        to_mask = self.grid.factor / self.mask_scale  # model px -> mask px
        top, left = int(y0 * to_mask), int(x0 * to_mask)
        bottom, right = max(top + 1, int(np.ceil(y1 * to_mask))), max(left + 1, int(np.ceil(x1 * to_mask)))
        return bool(self.mask[top:bottom, left:right].any())

    def ensure(
        self,
        level: int,
        tiles: Iterable[Tile],
        progress: Progress | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> None:
        """Make sure the given tiles of ``level`` are in the cache (computing what is missing)."""
        tiles = list(dict.fromkeys(tiles))
        missing = [t for t in tiles if not self.cache.has(level, *t)]
        if not missing:
            return
        if level == 0:
            self._predict(missing, progress, cancel)
            return
        children = [child for tile in missing for child in self.grid.children(level, *tile)]
        self.ensure(level - 1, children, progress, cancel)
        for row, column in missing:
            self._downsample(level, row, column)

    def read(self, level: int, i0: int, i1: int, j0: int, j1: int, genes=slice(None)) -> np.ndarray:
        """Map values (genes, i1 - i0, j1 - j0) of a region of ``level``, predicting what is missing."""
        tiles = self.grid_tiles(level, i0, i1, j0, j1)
        self.ensure(level, tiles)
        try:
            return self.cache.read(level, i0, i1, j0, j1, genes)
        except Exception:  # a damaged tile (checksum, codec or shard index): recompute it, then read again
            if not self.heal(level, tiles):
                raise
            self.ensure(level, tiles)
            return self.cache.read(level, i0, i1, j0, j1, genes)

    def heal(self, level: int | None = None, tiles: Iterable[Tile] | None = None) -> int:
        """Make damaged cached tiles missing again (one warning for all), so that the next `ensure`
        recomputes them; returns how many there were. Default: every tile of every level."""
        bad: list[tuple[int, int, int]] = []
        for index in range(self.n_levels) if level is None else [level]:
            if tiles is None or level is None:
                rows, columns = self.grid.tile_counts(index)
                candidates: Iterable[Tile] = [(r, c) for r in range(rows) for c in range(columns)]
            else:
                candidates = tiles
            bad += [(index, *tile) for tile in self.cache.damaged(index, candidates)]
        for key in bad:
            self.cache.invalidate(*key)
        if bad:
            named = ", ".join(f"level {L} tile {r}-{c}" for L, r, c in bad[:3]) + (", ..." if len(bad) > 3 else "")
            warnings.warn(
                f"{self.cache.path}: {len(bad)} cached tile(s) fail to decode or to match their checksums "
                f"({named}); predicting them again",
                GenemapDataWarning,
                stacklevel=2,
            )
        return len(bad)

    def grid_tiles(self, level: int, i0: int, i1: int, j0: int, j1: int) -> list[Tile]:
        """Tiles of ``level`` holding a pixel of the region."""
        return self.grid.tiles(level, (i0, i1, j0, j1))

    @property
    def owner(self) -> ModelOwner:
        with self._lock:
            if self._owner is None:
                self._owner = self._new_owner()
            return self._owner

    def _new_owner(self) -> ModelOwner:
        margin, _ = self.grid.valid_in_output()
        y0, y1, _, _ = self.grid.window_box(0, 0)  # every window is this square
        return ModelOwner(
            self.loaded,
            self._device,
            backend=self.backend,
            margin=margin,
            exports=self._exports,
            shapes=((self.batch_size, y1 - y0, y1 - y0),),
            threads=self._threads,
            runner_factory=self._runner_factory,
            tta=self.tta,
        )

    def close(self) -> None:
        self._readers.shutdown(wait=True)
        if self._owner is not None:
            self._owner.close()

    # --- level 0: the model ------------------------------------------------------------------------------
    def _predict(self, tiles: list[Tile], progress: Progress | None, cancel: Callable[[], bool] | None) -> None:
        mine, theirs = self._claim(0, tiles)
        others: list[Tile] = []
        try:
            mine, others = self._claim_files(mine)
            work = []
            for tile in mine:
                if self.has_tissue(*tile):
                    work.append(tile)
                else:
                    rows, cols = self.grid.tile_shape(0, *tile)
                    self.cache.write(0, *tile, np.zeros((len(self.genes), rows, cols), np.float32))
                    self.stats["empty"] += 1
                    self._release(0, tile)
                    self.cache.release(0, *tile)
            done, total = len(mine) - len(work), len(mine)
            logger.debug("level 0: %d tiles to compute, %d of them glass (zeros)", total, total - len(work))
            for batch, density in self._predict_batches(work, cancel):
                for tile, values in zip(batch, density, strict=True):
                    self.cache.write(0, *tile, values)
                    self.stats["predicted"] += 1
                    self._release(0, tile)
                    self.cache.release(0, *tile)
                done += len(batch)
                logger.debug("predicted tiles %s (%d/%d)", batch, done, total)
                if progress is not None:
                    progress(done, total, f"{done}/{total} tiles")
            self._await_others(others, progress, cancel)
        except BaseException as error:
            for tile in mine + others:
                self._release(0, tile, error)
                if tile in mine:
                    self.cache.release(0, *tile)
            raise
        for future in theirs:
            future.result()

    def _claim_files(self, tiles: list[Tile]) -> tuple[list[Tile], list[Tile]]:
        """Split this thread's tiles into those it claimed in the cache (another process may be filling the
        same store) and those another live process is computing; a tile finished meanwhile is let go."""
        mine, others = [], []
        for tile in tiles:
            if not self.cache.claim(0, *tile):
                others.append(tile)
            elif self.cache.has(0, *tile):  # finished by its previous owner just before we claimed it
                self.cache.release(0, *tile)
                self._release(0, tile)
            else:
                mine.append(tile)
        return mine, others

    def _await_others(
        self, tiles: list[Tile], progress: Progress | None, cancel: Callable[[], bool] | None, poll: float = 0.1
    ) -> None:
        """Wait for tiles other processes claimed; compute those whose claim goes stale (owner died)."""
        waiting = list(tiles)
        if waiting:
            logger.info("waiting for %d tiles another process is computing", len(waiting))
        while waiting:
            if cancel is not None and cancel():
                raise InterruptedError("prediction cancelled")
            still = []
            for tile in waiting:
                if self.cache.has(0, *tile):
                    self._release(0, tile)
                elif self.cache.claim_alive(0, *tile):
                    still.append(tile)
                elif not self._predict_claimed(tile):  # released unfinished, or its owner died: ours now
                    still.append(tile)  # ...unless a third process took it over first
            waiting = still
            if waiting:
                time.sleep(poll)

    def _predict_claimed(self, tile: Tile) -> bool:
        """Compute one tile another process gave up, if this process can claim it now (else False)."""
        if not self.cache.claim(0, *tile):
            return False
        try:
            if not self.cache.has(0, *tile):
                if self.has_tissue(*tile):
                    for _, density in self._predict_batches([tile]):
                        self.cache.write(0, *tile, density[0])
                    self.stats["predicted"] += 1
                else:
                    rows, cols = self.grid.tile_shape(0, *tile)
                    self.cache.write(0, *tile, np.zeros((len(self.genes), rows, cols), np.float32))
                    self.stats["empty"] += 1
        finally:
            self.cache.release(0, *tile)
        self._release(0, tile)
        return True

    def predict_tiles(self, tiles: list[Tile]) -> dict[Tile, np.ndarray]:
        """Float32 level-0 values of tiles, straight from the model (no cache): (genes, h, w) each."""
        return {t: v for batch, density in self._predict_batches(tiles) for t, v in zip(batch, density, strict=True)}

    def _predict_batches(
        self, tiles: list[Tile], cancel: Callable[[], bool] | None = None
    ) -> Iterator[tuple[list[Tile], list[np.ndarray]]]:
        """Yield (tiles, their valid values) batch by batch, keeping the model busy: while the caller
        handles batch k (writes it), the model runs batch k + 1 and the readers prepare batch k + 2."""
        batches = [tiles[i : i + self.batch_size] for i in range(0, len(tiles), self.batch_size)]
        if not batches:
            return
        reads: list[Future[np.ndarray] | None] = [self._readers.submit(self._windows, b) for b in batches[:2]]
        first = reads[0]
        assert first is not None  # just submitted
        running = self.owner.submit(first.result())
        for index, batch in enumerate(batches):
            if cancel is not None and cancel():
                raise InterruptedError("prediction cancelled")
            density = running.result()
            if index + 1 < len(batches):
                following = reads[index + 1]
                assert following is not None  # only reads before index + 1 have been freed
                running = self.owner.submit(following.result())
                if index + 2 < len(batches):
                    reads.append(self._readers.submit(self._windows, batches[index + 2]))
            values = []
            for tile, tile_density in zip(batch, density, strict=True):
                rows, cols = self.grid.tile_shape(0, *tile)
                values.append(tile_density[:, :rows, :cols])  # the runner dropped the halo
            reads[index] = None  # free the windows
            yield batch, values

    def _windows(self, tiles: list[Tile]) -> np.ndarray:
        windows = np.stack([self.reader.read(*self.grid.window_box(*tile)) for tile in tiles])
        return windows if self.stain_matrix is None else apply_od_matrix(windows, self.stain_matrix)

    # --- coarser levels ----------------------------------------------------------------------------------
    def _downsample(self, level: int, row: int, column: int) -> None:
        mine, theirs = self._claim(level, [(row, column)])
        if mine:
            try:
                children = self.grid.children(level, row, column)  # row-major: first top-left, last bottom-right
                i0, _, j0, _ = self.grid.map_box(*children[0], level - 1)
                _, i1, _, j1 = self.grid.map_box(*children[-1], level - 1)
                fine = self.cache.read(level - 1, i0, i1, j0, j1)
                self.cache.write(level, row, column, mean_downsample(fine.astype(np.float32)))
                self.stats["downsampled"] += 1
                logger.debug("level %d tile (%d, %d) from %d finer tiles", level, row, column, len(children))
                self._release(level, (row, column))
            except BaseException as error:
                self._release(level, (row, column), error)
                raise
        for future in theirs:
            future.result()

    # --- de-duplication between threads ------------------------------------------------------------------
    def _claim(self, level: int, tiles: list[Tile]) -> tuple[list[Tile], list[Future]]:
        """Split tiles into those this thread computes and futures for those another thread is on."""
        mine, theirs = [], []
        with self._lock:
            for tile in tiles:
                key = (level, *tile)
                if key in self._pending:
                    theirs.append(self._pending[key])
                elif not self.cache.has(level, *tile):
                    self._pending[key] = Future()
                    mine.append(tile)
        return mine, theirs

    def _release(self, level: int, tile: Tile, error: BaseException | None = None) -> None:
        with self._lock:
            future = self._pending.pop((level, *tile), None)
        if future is not None and not future.done():
            future.set_exception(error) if error is not None else future.set_result(None)


def mean_downsample(values: np.ndarray) -> np.ndarray:
    """2 x 2 mean of (genes, h, w); an odd last row or column averages the pixels that exist."""
    genes, height, width = values.shape
    padded_h, padded_w = height + height % 2, width + width % 2
    total = np.zeros((genes, padded_h, padded_w), np.float32)
    count = np.zeros((1, padded_h, padded_w), np.float32)
    total[:, :height, :width] = values
    count[:, :height, :width] = 1
    total = total.reshape(genes, padded_h // 2, 2, padded_w // 2, 2).sum((2, 4))
    count = count.reshape(1, padded_h // 2, 2, padded_w // 2, 2).sum((2, 4))
    return total / count
