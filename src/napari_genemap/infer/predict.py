"""Whole-slide prediction on dask.distributed: every tissue tile into the cache, then a SpatialData store.

Each worker builds one `TileEngine` (and so loads the model once) through a worker plugin; tasks hand it
batches of tiles. The cache is the only shared state, so an interrupted run resumes where it stopped and
a tile that is already cached is never computed again. By default a `LocalCluster` with one worker
process (torch uses as many threads there as in this process) runs the tasks; ``scheduler`` names an
existing cluster instead: its workers must see the slide, the checkpoint and the cache folder at the same
paths, and a worker whose engine would fill another cache (another slide file, checkpoint or package
version) is refused. Each run registers its own plugin and removes it at the end, so runs sharing a
cluster keep their own engines and a finished run leaves no model behind. Every task reports its tiles
as a ``genemap-tiles`` event on the scheduler (``Client.get_events``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import GenemapInputError
from .grid import DEFAULT_HALO, DEFAULT_TILE

logger = logging.getLogger(__name__)

PLUGIN_NAME = "genemap-engine"  # each run's plugin is named PLUGIN_NAME-<random>
EVENT_TOPIC = "genemap-tiles"  # one scheduler event per task: run, worker, tiles, predicted
TASKS_PER_THREAD = 4  # tasks are cut so that each worker thread gets about this many...
MAX_TILES_PER_TASK = 8  # ...of at most this many neighbouring tiles
GENE_MAPS_KEY = "gene_maps"
TOTAL_KEY = "gene_maps_total"  # sum over all the model's genes; written when only some genes are


@dataclass(frozen=True)
class EngineSpec:
    """What a worker needs to build the same engine as the driver (plain, picklable values)."""

    slide: str
    checkpoint: str
    cache_root: str
    section: str | None = None
    mpp: float | None = None
    tile: int = DEFAULT_TILE
    halo: int = DEFAULT_HALO
    batch_size: int | None = None
    device: str = "auto"
    backend: str = "auto"
    read_options: dict = field(default_factory=dict)
    tta: bool = False  # test-time augmentation: each window's map the mean of its 8 dihedral views

    def build(self, threads: int | None = None, start_model: bool = False):
        """The engine; ``start_model``: build the model's runner while the tissue mask is made (`TileEngine`),
        from a lazily opened checkpoint, so that a backend with its export made never imports torch (what the
        viewer's tile service waits for; a bad weights file is then reported when the runner is built).
        Otherwise the checkpoint is checked whole before anything is written."""
        from ..io import read_slide
        from ..models.checkpoint import load_checkpoint
        from .engine import TileEngine

        model = load_checkpoint(self.checkpoint, lazy=start_model)
        sdata = read_slide(self.slide, section=self.section, mpp=self.mpp)
        return TileEngine(
            model,
            sdata,
            self.cache_root,
            tile=self.tile,
            halo=self.halo,
            batch_size=self.batch_size,
            device=self.device,
            backend=self.backend,
            threads=threads,
            start_model=start_model,
            tta=self.tta,
        )


def _engine_plugin(spec: EngineSpec, name: str, signature: dict):
    from distributed import WorkerPlugin

    class EnginePlugin(WorkerPlugin):
        def __init__(self, spec: EngineSpec, name: str, signature: dict):
            self.spec, self.name, self.signature = spec, name, signature
            self.engine = None

        def setup(self, worker):
            from ..log import configure_logging

            self._lock, self._users, self._closing = threading.Lock(), 0, False  # not pickled: made here
            configure_logging()  # a worker is a fresh process: GENEMAP_LOG_LEVEL applies there too
            try:
                engine = self.spec.build()
            except GenemapInputError as error:  # e.g. the checkpoint is not at this path on the worker
                raise GenemapInputError(f"worker {worker.address}: {error}") from None
            differences = _differences(_plain(engine.cache.signature), _plain(self.signature))
            if differences:  # its tiles would go to another cache, and the client would predict them again
                engine.close()
                raise GenemapInputError(
                    f"worker {worker.address}: its cache signature differs from the client's "
                    f"({'; '.join(differences[:3])}): every worker needs the same slide file, checkpoint and "
                    "napari-genemap version, at the same paths"
                )
            self.engine = engine
            logger.info("worker %s: engine ready for %s", worker.address, self.spec.slide)

        def acquire(self):
            with self._lock:
                if self.engine is None or self._closing:
                    raise RuntimeError(f"{self.name}: the run has ended")
                self._users += 1
                return self.engine

        def release(self) -> None:
            with self._lock:
                self._users -= 1
                close = self._closing and self._users == 0
            if close:
                self._close()

        def teardown(self, worker):
            # a task still running (the client was interrupted) keeps the engine until it returns
            with self._lock:
                self._closing = True
                close = self._users == 0
            if close:
                self._close()

        def _close(self) -> None:
            if self.engine is not None:
                engine, self.engine = self.engine, None
                logger.info("%s: closing the engine after %s", self.name, engine.stats)
                engine.close()

    return EnginePlugin(spec, name, signature)


def _plain(value: dict) -> dict:
    return json.loads(json.dumps(value))


def _differences(here: dict, there: dict, prefix: str = "") -> list[str]:
    """'key: worker value, client value' for every (nested) key whose values differ."""
    lines = []
    for key in sorted(set(here) | set(there)):
        mine, theirs = here.get(key), there.get(key)
        if isinstance(mine, dict) and isinstance(theirs, dict):
            lines += _differences(mine, theirs, f"{prefix}{key}.")
        elif mine != theirs:
            lines.append(f"{prefix}{key}: {mine!r} here, {theirs!r} on the client")
    return lines


def task_size(tiles: int, threads: int) -> int:
    """Tiles in one task: about `TASKS_PER_THREAD` tasks per worker thread, so that a small slide is still
    shared by all the workers, at most `MAX_TILES_PER_TASK` (neighbours share pyramid chunks)."""
    return max(1, min(MAX_TILES_PER_TASK, -(-tiles // (TASKS_PER_THREAD * max(1, threads)))))


def _predict_tiles_on_worker(tiles: list[tuple[int, int]], plugin_name: str = PLUGIN_NAME) -> int:
    """Runs on a worker: fill these level-0 tiles; returns how many the model actually predicted."""
    from distributed import get_worker

    worker = get_worker()
    plugin: Any = worker.plugins[plugin_name]  # the EnginePlugin (a local class) _engine_plugin makes
    engine = plugin.acquire()
    try:
        before = engine.stats["predicted"]
        engine.ensure(0, [tuple(t) for t in tiles])
        predicted = engine.stats["predicted"] - before
    finally:
        plugin.release()
    logger.debug("predicted %d of tiles %s", predicted, tiles)
    report = {"run": plugin_name, "worker": worker.address, "tiles": len(tiles), "predicted": predicted}
    worker.log_event(EVENT_TOPIC, report)
    return predicted


def _local_cluster():
    """One worker process with one task thread, whose torch uses as many threads as torch does here: dask's
    nanny sets OMP/MKL/OPENBLAS_NUM_THREADS to 1 in its workers, and torch would run on one core."""
    import torch
    from distributed import LocalCluster

    threads = str(torch.get_num_threads())
    env = dict.fromkeys(("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"), threads)
    # ":0", a free port: with None the scheduler's HTTP server still tries 8787 and warns when another
    # cluster (a second predict run) holds it
    return LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0", env=env)


def predict_slide(
    spec: EngineSpec,
    out: str | os.PathLike,
    *,
    genes: list[str] | None = None,
    scheduler: str | None = None,
    tiles_per_task: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict:
    """Predict every tissue tile of the slide, then write the SpatialData store ``out``.

    ``tiles_per_task``: by default `task_size` of the tissue tiles and the cluster's threads.
    Returns counts: tiles in the grid, with tissue, already cached, predicted by this run."""
    from distributed import Client, as_completed

    out = Path(out)
    if out.exists() and not overwrite:
        raise GenemapInputError(f"{out}: already exists (pass overwrite)")
    engine = spec.build()  # the driver's engine: tile bookkeeping, coarser levels, output; no model thread
    try:
        wanted = _check_genes(genes, engine.genes)
        grid = engine.grid
        all_tiles = [(r, c) for r in range(grid.rows) for c in range(grid.columns)]
        engine.heal()  # damaged cached tiles (checksums) count as missing: predicted again, one warning
        cached = [t for t in all_tiles if engine.cache.has(0, *t)]
        todo = [t for t in all_tiles if not engine.cache.has(0, *t)]
        # tasks hold neighbouring tiles in raster order (they share pyramid chunks)
        tissue = [t for t in todo if engine.has_tissue(*t)]
        tissue_set = set(tissue)
        background = [t for t in todo if t not in tissue_set]
        engine.ensure(0, background)  # written as zeros, no model
        logger.info(
            "%s: %d tiles, %d cached, %d with tissue to predict", spec.slide, len(all_tiles), len(cached), len(tissue)
        )
        predicted = 0
        if tissue:
            cluster = _local_cluster() if scheduler is None else None
            try:
                with Client(scheduler or cluster) as client:
                    name = f"{PLUGIN_NAME}-{uuid.uuid4().hex[:12]}"  # runs sharing a cluster keep their own engines
                    futures = []
                    try:
                        client.register_plugin(_engine_plugin(spec, name, engine.cache.signature))
                        per_task = tiles_per_task or task_size(len(tissue), sum(client.nthreads().values()))
                        batches = [tissue[i : i + per_task] for i in range(0, len(tissue), per_task)]
                        futures = client.map(_predict_tiles_on_worker, batches, plugin_name=name, pure=False)
                        for done, future in enumerate(as_completed(futures), 1):
                            predicted += future.result()  # a worker's one-line error (e.g. a full cache) is raised here
                            if progress is not None:
                                shown = f"{min(done * per_task, len(tissue))}/{len(tissue)} tiles"
                                progress(done, len(batches), shown)
                    finally:  # also after an error or Ctrl-C: no task of this run starts, no engine stays
                        with contextlib.suppress(OSError):  # the scheduler is gone
                            client.cancel(futures)
                        with contextlib.suppress(ValueError, OSError):  # never registered; the scheduler is gone
                            client.unregister_worker_plugin(name)
            finally:
                if cluster is not None:  # also after a worker's error: no worker process left behind
                    cluster.close()
        for level in range(1, engine.n_levels):
            rows, columns = engine.cache.tile_counts(level)
            engine.ensure(level, [(r, c) for r in range(rows) for c in range(columns)])
        write_prediction(engine, spec, out, wanted, overwrite=overwrite)
        return {
            "tiles": len(all_tiles),
            "tissue_tiles": sum(engine.has_tissue(*t) for t in all_tiles),
            "cached_before": len(cached),
            "predicted": predicted,
            "cache": str(engine.cache.path),
        }
    finally:
        engine.close()


def _check_genes(genes: list[str] | None, available: list[str]) -> list[int]:
    if not genes:
        return list(range(len(available)))
    unknown = [g for g in genes if g not in available]
    if unknown:
        raise GenemapInputError(f"--genes: {unknown[0]!r} is not among the model's {len(available)} genes")
    return [available.index(g) for g in genes]


def write_prediction(engine, spec: EngineSpec, out: Path, genes: list[int], overwrite: bool = False) -> Path:
    """A SpatialData store: the H&E, the gene maps (multiscale, genes as channels) and the provenance."""
    import dask.array as da

    from ..io import read_slide, write_store
    from ..io.canonical import ATTRS_KEY, pyramid_to_datatree

    sdata = read_slide(spec.slide, section=spec.section, mpp=spec.mpp)
    levels = [da.from_zarr(engine.cache.arrays[level])[genes] for level in range(engine.n_levels)]
    downsamples = [2.0**level for level in range(engine.n_levels)]
    names = [engine.genes[i] for i in genes]
    pixel = engine.grid.map_pixel_size(0)
    sdata.images[GENE_MAPS_KEY] = pyramid_to_datatree(levels, downsamples, pixel, names)
    if len(genes) < len(engine.genes):
        total = da.from_zarr(engine.cache.arrays[0]).astype("float32").sum(0, keepdims=True)
        sdata.images[TOTAL_KEY] = pyramid_to_datatree([total], [1.0], pixel, ["total"])
    loaded = engine.loaded
    sdata.attrs[ATTRS_KEY] = {
        **dict(sdata.attrs.get(ATTRS_KEY) or {}),
        "prediction": {
            "model": str(loaded.path) if loaded.path else None,
            "model_sha256": loaded.digest,
            "protocol": loaded.protocol.to_dict(),
            "model_mpp": loaded.mpp,
            "stride": engine.grid.stride,
            "tile": engine.grid.tile,
            "halo": engine.grid.halo,
            "map_pixel_size": engine.grid.map_pixel_size(0),
            "units": "expression (raw counts scale) per map pixel",
            "cache_signature": engine.cache.signature,
        },
    }
    return write_store(sdata, out, overwrite=overwrite)
