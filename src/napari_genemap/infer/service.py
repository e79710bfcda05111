"""A tile service: one child process owns the model and fills the gene-map cache on request.

Why a process: napari's process stays free of torch (importing triton after Mesa's GL context segfaults,
torch threads starve Qt's), a process can be stopped at once and frees its memory, and the cache is the
only thing the two share. The viewer reads tiles straight from the cache (`GeneMapCache.open`).

The viewer sends what it wants: a list of tiles (level, row, column) in priority order that *replaces*
the previous one, so work for a view the user has left is dropped. The service works through it one
model call at a time, checking for new messages in between, and reports each finished tile. A tile of a
coarser level is made from its level-0 tiles (predicted first, nearest the view first) by the engine's
2 x 2 means. ROIs (a SpatialData shapes GeoDataFrame in slide pixels) are aggregated here too, after
the tiles they need are predicted; those requests go before the viewport's tiles.

Messages are plain tuples on two `multiprocessing` queues; this module imports neither torch nor Qt.
"""

from __future__ import annotations

import multiprocessing
import queue
import traceback
from collections import deque
from dataclasses import dataclass

from ..errors import GenemapInputError
from .predict import EngineSpec

TileKey = tuple[int, int, int]  # (level, row, column)
NICENESS = 10


@dataclass
class ServiceEvent:
    """What the service reports: ``kind`` is "ready", "tiles", "aggregated" or "error"."""

    kind: str
    payload: dict


class TileService:
    """The viewer's handle on the service process (start, send requests, poll events, stop)."""

    def __init__(self, spec: EngineSpec, threads: int | None = None):
        """``threads``: torch threads in the service (default: all cores but one, which the viewer keeps
        for drawing and input)."""
        import os

        threads = threads or max(1, (os.cpu_count() or 2) - 1)
        context = multiprocessing.get_context("spawn")  # never fork a process that holds Qt or GL state
        self.spec = spec
        self._requests = context.Queue()
        self._events = context.Queue()
        self._process = context.Process(
            target=serve, args=(spec, self._requests, self._events, threads), name="genemap-tiles", daemon=True
        )
        self._process.start()
        self._next_request = 0
        self._died_reported = False

    # --- requests ----------------------------------------------------------------------------------------
    def want(self, tiles: list[TileKey]) -> None:
        """Replace the queue of wanted tiles (highest priority first)."""
        self._requests.put(("want", [tuple(int(v) for v in t) for t in tiles]))

    def pause(self, paused: bool) -> None:
        self._requests.put(("pause", bool(paused)))

    def aggregate(self, shapes, only_cached: bool = False) -> int:
        """Ask for the aggregation of ``shapes`` (GeoDataFrame in slide pixels; circles are points with a
        ``radius`` column); the answer is an "aggregated" event with the same ``request`` number. With
        ``only_cached``, ROIs whose tiles are not all cached get NaN instead of a prediction."""
        self._next_request += 1
        self._requests.put(("aggregate", self._next_request, shapes, bool(only_cached)))
        return self._next_request

    # --- events ------------------------------------------------------------------------------------------
    def poll(self) -> list[ServiceEvent]:
        """Every event that has arrived (never blocks); a dead process reports one "error"."""
        events = []
        while True:
            try:
                kind, payload = self._events.get_nowait()
            except queue.Empty:
                break
            events.append(ServiceEvent(kind, payload))
        if not events and not self._died_reported and not self._process.is_alive() and self._process.exitcode:
            events.append(ServiceEvent("error", {"message": f"tile service stopped (exit {self._process.exitcode})"}))
            self._died_reported = True
        return events

    def wait(self, kind: str, timeout: float = 120.0) -> ServiceEvent:
        """Block until an event of ``kind`` (scripts and tests; the GUI polls instead)."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = ServiceEvent(*self._events.get(timeout=0.1))
            except queue.Empty:
                if not self._process.is_alive():
                    raise RuntimeError(f"tile service stopped (exit {self._process.exitcode})") from None
                continue
            if event.kind == "error":
                raise GenemapInputError(event.payload["message"])
            if event.kind == kind:
                return event
        raise TimeoutError(f"no {kind!r} event from the tile service within {timeout:.0f} s")

    @property
    def alive(self) -> bool:
        return self._process.is_alive()

    def close(self, timeout: float = 5.0) -> None:
        if self._process.is_alive():
            self._requests.put(("stop",))
            self._process.join(timeout)
        if self._process.is_alive():  # in the middle of a model call: no need to wait for it
            self._process.terminate()
            self._process.join(timeout)
        for channel in (self._requests, self._events):
            channel.cancel_join_thread()
            channel.close()


# --- the child process -------------------------------------------------------------------------------------
def serve(spec: EngineSpec, requests, events, threads: int) -> None:
    """The service's main loop (runs in the child)."""
    import os

    import torch

    # background work: the viewer's process (drawing, input) goes first when they compete for cores
    os.nice(NICENESS)
    torch.set_num_threads(threads)
    try:
        engine = spec.build()
    except Exception as error:  # reported to the viewer as one line
        events.put(("error", {"message": _one_line(error)}))
        return
    worker = _Worker(engine, events)
    events.put(("ready", {"cache": str(engine.cache.path), "genes": engine.genes, "device": str(engine.owner.device)}))
    try:
        while True:
            message = _next_message(requests, block=worker.idle)
            while message is not None:
                if message[0] == "stop":
                    return
                worker.handle(message)
                message = _next_message(requests, block=False)
            worker.step()
    except Exception as error:
        events.put(("error", {"message": _one_line(error), "traceback": traceback.format_exc()}))
    finally:
        engine.close()


def _next_message(requests, block: bool):
    try:
        return requests.get(timeout=0.5) if block else requests.get_nowait()
    except queue.Empty:
        return None


def _one_line(error: BaseException) -> str:
    return str(error) if isinstance(error, GenemapInputError) else f"{type(error).__name__}: {error}"


class _Worker:
    """The child's state: the wanted tiles, pending aggregations, paused or not."""

    def __init__(self, engine, events):
        self.engine, self.events = engine, events
        self.wanted: deque[TileKey] = deque()
        self.aggregations: deque = deque()
        self.paused = False

    @property
    def idle(self) -> bool:
        return not self.aggregations and (self.paused or not self.wanted)

    def handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "want":
            cache = self.engine.cache
            self.wanted = deque(t for t in dict.fromkeys(message[1]) if not cache.has(*t))
            self._report([])
        elif kind == "pause":
            self.paused = message[1]
            self._report([])
        elif kind == "aggregate":
            self.aggregations.append(message[1:])

    def step(self) -> None:
        """One unit of work: an aggregation, or one model call's worth of tiles."""
        if self.aggregations:
            self._aggregate(*self.aggregations.popleft())
        elif self.wanted and not self.paused:
            self._advance()

    def _advance(self) -> None:
        cache = self.engine.cache
        while self.wanted and cache.has(*self.wanted[0]):
            self.wanted.popleft()
        if not self.wanted:
            self._report([])
            return
        level, row, column = self.wanted[0]
        leaves = [t for t in self._leaves(level, row, column) if not cache.has(0, *t)]
        if leaves:
            batch = leaves[: self.engine.batch_size]
            self.engine.ensure(0, batch)
            done = [(0, *t) for t in batch]
        else:
            self.engine.ensure(level, [(row, column)])
            done = [(level, row, column)]
        if cache.has(*self.wanted[0]):
            self.wanted.popleft()
        self.wanted = deque(t for t in self.wanted if t not in set(done))
        self._report(done)

    def _leaves(self, level: int, row: int, column: int) -> list[tuple[int, int]]:
        """The level-0 tiles under a tile of ``level``."""
        if level == 0:
            return [(row, column)]
        rows, columns = self.engine.cache.tile_counts(0)
        span = 2**level
        return [
            (r, c)
            for r in range(row * span, min(rows, (row + 1) * span))
            for c in range(column * span, min(columns, (column + 1) * span))
        ]

    def _aggregate(self, request: int, shapes, only_cached: bool) -> None:
        from .aggregate import GeneMapSource, aggregate_shapes

        engine = self.engine
        try:
            source = GeneMapSource.from_engine(engine, engine.slide_mpp)
            if only_cached:
                source.read = lambda i0, i1, j0, j1, genes: engine.cache.read(0, i0, i1, j0, j1, genes)
                shapes = shapes[[self._cached(box) for box in shapes.geometry.bounds.to_numpy()]]
            table = aggregate_shapes(source, shapes) if len(shapes) else None
            self.events.put(("aggregated", {"request": request, "table": table}))
        except Exception as error:
            self.events.put(("aggregated", {"request": request, "error": _one_line(error)}))

    def _cached(self, box) -> bool:
        """Whether every level-0 tile under a bounding box (slide pixels) is cached."""
        grid = self.engine.grid
        x0, y0, x1, y1 = box
        pixel = grid.map_pixel_size(0)
        tiles = grid.tiles_for_map_region(
            0, int(y0 // pixel), int(y1 // pixel) + 1, int(x0 // pixel), int(x1 // pixel) + 1
        )
        return all(self.engine.cache.has(0, *t) for t in tiles)

    def _report(self, done: list[TileKey]) -> None:
        self.events.put(("tiles", {"done": done, "queued": len(self.wanted), "paused": self.paused}))
