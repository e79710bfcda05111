"""A tile service: one child process owns the model and fills the gene-map cache on request.

Why a process: napari's process stays free of torch (importing triton after Mesa's GL context segfaults,
torch threads starve Qt's), a process can be stopped at once and frees its memory, and the cache is the
only thing the two share. The viewer reads tiles straight from the cache (`GeneMapCache.open`).

The viewer sends what it wants: a list of tiles (level, row, column) in priority order that *replaces*
the previous one, so work for a view the user has left is dropped. The service works through it one
model call at a time, checking for new messages in between, and reports each finished tile with the
progress of the current list (tiles asked for, still queued, an estimate of the time left). A tile of a
coarser level is made from its level-0 tiles (predicted first, nearest the view first) by the engine's
2 x 2 means. ROIs (a SpatialData shapes GeoDataFrame in slide pixels) are aggregated here too, after
the tiles they need are predicted; those requests go before the viewport's tiles.

The child is ``python -m napari_genemap.infer.service`` (`subprocess`), not a `multiprocessing` spawn:
spawn re-imports the parent's ``__main__``, which re-runs any script without an ``if __name__ ==
"__main__"`` guard (a second viewer, then a dead service). The two talk over a
`multiprocessing.connection` socket (the parent listens; the address is on the child's command line,
the authentication key on its stdin) in the frozen dataclasses below (requests `Want`, `Pause`,
`Aggregate`, `Stop`; events `Ready`, `TilesDone`, `Aggregated`, `Failed`), pickled: both ends import
this module, so a field is read by name, never by position. `poll` hands callers a `ServiceEvent` (kind,
payload dict) made from each event at the boundary. The child ends itself when its parent goes away
(the socket closes or it is re-parented), even in the middle of a model call, so a crashed or killed
viewer leaves no orphan computing. This module imports neither torch nor Qt. The child logs under
"napari_genemap" (level from ``GENEMAP_LOG_LEVEL``) to its stderr, which is the viewer's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

from ..errors import GenemapInputError
from .predict import EngineSpec

TileKey = tuple[int, int, int]  # (level, row, column)
NICENESS = 10
CHILD_MODULE = "napari_genemap.infer.service"
PARENT_CHECK_S = 0.5  # how often the child checks that its parent is still there
TIMING_WINDOW = 8  # model calls the time estimate averages over

logger = logging.getLogger(__name__)


# --- messages: requests (viewer -> service) ----------------------------------------------------------------
@dataclass(frozen=True)
class Start:
    """The first message: what to build, with how many torch threads."""

    spec: EngineSpec
    threads: int


@dataclass(frozen=True)
class Want:
    """Tiles in priority order; replaces the previous list."""

    tiles: tuple[TileKey, ...]


@dataclass(frozen=True)
class Pause:
    paused: bool


@dataclass(frozen=True)
class Aggregate:
    """Aggregate ``shapes`` (GeoDataFrame, slide pixels); ``only_cached``: leave out ROIs whose tiles are
    not all cached rather than wait for the model."""

    request: int
    shapes: Any
    only_cached: bool


@dataclass(frozen=True)
class Stop:
    pass


Request = Start | Want | Pause | Aggregate | Stop


# --- messages: events (service -> viewer) ------------------------------------------------------------------
@dataclass(frozen=True)
class Ready:
    cache: str  # the store's path: the viewer opens it itself
    genes: list[str]
    device: str
    backend: str  # what runs the model: `backends.BACKENDS`, "auto" resolved


@dataclass(frozen=True)
class TilesDone:
    """Tiles finished (possibly none: a progress report) and the progress of the current wanted list."""

    done: tuple[TileKey, ...]
    queued: int
    paused: bool
    total: int
    eta_s: float | None


@dataclass(frozen=True)
class Aggregated:
    """The answer to `Aggregate` number ``request``: a table (None when no ROI was left) or an error."""

    request: int
    table: Any = None
    error: str | None = None


@dataclass(frozen=True)
class Failed:
    """The service cannot go on; ``traceback`` is the child's, when it has one."""

    message: str
    traceback: str | None = None


Event = Ready | TilesDone | Aggregated | Failed


@dataclass
class ServiceEvent:
    """What `TileService.poll` reports: ``kind`` is "ready", "tiles", "aggregated" or "error"."""

    kind: str
    payload: dict

    @classmethod
    def of(cls, event: Event) -> ServiceEvent:
        """The caller's view of a typed event (the payload keys the widgets read)."""
        match event:
            case Ready(cache, genes, device, backend):
                return cls("ready", {"cache": cache, "genes": genes, "device": device, "backend": backend})
            case TilesDone(done, queued, paused, total, eta_s):
                payload = {"done": list(done), "queued": queued, "paused": paused, "total": total, "eta_s": eta_s}
                return cls("tiles", payload)
            case Aggregated(request, table, None):
                return cls("aggregated", {"request": request, "table": table})
            case Aggregated(request, _, error):
                return cls("aggregated", {"request": request, "error": error})
            case Failed(message, None):
                return cls("error", {"message": message})
            case Failed(message, trace):
                return cls("error", {"message": message, "traceback": trace})
        raise TypeError(f"not a service event: {event!r}")


class TileService:
    """The viewer's handle on the service process (start, send requests, poll events, stop). Nothing here
    blocks: requests wait in an outbox until the child has connected, and a thread receives events. A
    service dropped without `close` is closed when collected or at exit."""

    def __init__(self, spec: EngineSpec, threads: int | None = None):
        """``threads``: the model's threads in the service (default: every core; the service runs at a lower
        priority, so the viewer's drawing and input still come first)."""
        threads = threads or os.cpu_count() or 1
        self.spec = spec
        self._next_request = 0
        self._died_reported = False
        self._link = _Link(spec, threads)
        self._process = self._link.process
        self._finalizer = weakref.finalize(self, self._link.close)

    # --- requests ----------------------------------------------------------------------------------------
    def want(self, tiles: list[TileKey]) -> None:
        """Replace the queue of wanted tiles (highest priority first)."""
        self._link.outbox.put(Want(tuple((int(level), int(row), int(column)) for level, row, column in tiles)))

    def pause(self, paused: bool) -> None:
        self._link.outbox.put(Pause(bool(paused)))

    def aggregate(self, shapes, only_cached: bool = False) -> int:
        """Ask for the aggregation of ``shapes`` (GeoDataFrame in slide pixels; circles are points with a
        ``radius`` column); the answer is an "aggregated" event with the same ``request`` number. With
        ``only_cached``, ROIs whose tiles are not all cached get NaN instead of a prediction."""
        self._next_request += 1
        self._link.outbox.put(Aggregate(self._next_request, shapes, bool(only_cached)))
        return self._next_request

    # --- events ------------------------------------------------------------------------------------------
    def poll(self) -> list[ServiceEvent]:
        """Every event that has arrived (never blocks); a dead process reports one "error"."""
        events = []
        while True:
            try:
                events.append(ServiceEvent.of(self._link.events.get_nowait()))
            except queue.Empty:
                break
        if not events and not self._died_reported and self._link.stopped_unexpectedly():
            events.append(ServiceEvent("error", {"message": f"tile service stopped (exit {self._process.returncode})"}))
            self._died_reported = True
        return events

    def wait(self, kind: str, timeout: float = 120.0) -> ServiceEvent:
        """Block until an event of ``kind`` (scripts and tests; the GUI polls instead)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = ServiceEvent.of(self._link.events.get(timeout=min(0.1, left)))
            except queue.Empty:
                if self._process.poll() is not None and self._link.drained():
                    raise RuntimeError(f"tile service stopped (exit {self._process.returncode})") from None
                continue
            if event.kind == "error":
                raise GenemapInputError(event.payload["message"])
            if event.kind == kind:
                return event
        raise TimeoutError(f"no {kind!r} event from the tile service within {timeout:.0f} s")

    @property
    def alive(self) -> bool:
        return self._process.poll() is None

    def close(self, timeout: float = 2.0) -> None:
        """Stop the service: ask it to stop, give it ``timeout`` seconds (it finishes the model call it is
        in), then kill it (tiles are written atomically, so nothing is left half done)."""
        if self._finalizer.detach() is not None:
            self._link.close(timeout)


class _Link:
    """The parent's side: the child process and the socket to it. Its threads never refer to the
    `TileService`, so a dropped service can be collected (and closed)."""

    def __init__(self, spec: EngineSpec, threads: int):
        authkey = os.urandom(32)
        self.listener = Listener(authkey=authkey)  # AF_UNIX in a private temporary folder on Linux
        self.address = self.listener.address
        self.events: queue.Queue = queue.Queue()
        self.outbox: queue.Queue = queue.Queue()
        self.connection: Connection | None = None
        self.connected, self.disconnected = threading.Event(), threading.Event()
        self.closed = False
        self.process = subprocess.Popen(
            [sys.executable, *_isolation_flags(), "-m", CHILD_MODULE, str(self.address), str(os.getpid())],
            stdin=subprocess.PIPE,
            env=_child_environment(),
        )
        assert self.process.stdin is not None  # stdin=subprocess.PIPE
        with contextlib.suppress(OSError):  # a child that died at once is reported by poll()
            self.process.stdin.write(authkey.hex().encode() + b"\n")
            self.process.stdin.close()
        self.thread = threading.Thread(target=self.run, args=(spec, threads), name="genemap-link", daemon=True)
        self.thread.start()

    def run(self, spec: EngineSpec, threads: int) -> None:
        """Accept the child, hand it the spec, then send requests from the outbox (a thread: the GUI never
        waits for the child to connect or to read)."""
        while True:
            try:
                connection = self.listener.accept()
                break
            except (OSError, EOFError, ValueError, RuntimeError):  # closed, or a failed handshake
                if self.closed:
                    return
        if self.closed:
            connection.close()
            return
        self.connection = connection
        self.connected.set()
        threading.Thread(target=self.receive, args=(connection,), name="genemap-events", daemon=True).start()
        try:
            connection.send(Start(spec, threads))
            while (message := self.outbox.get()) is not None:
                connection.send(message)
        except (OSError, ValueError):  # the child is gone; poll() says so
            pass

    def receive(self, connection: Connection) -> None:
        try:
            while True:
                self.events.put(connection.recv())
        except (OSError, EOFError, ValueError):
            self.disconnected.set()

    def drained(self) -> bool:
        """Whether every event the (ended) child sent has been received."""
        return (not self.connected.is_set() or self.disconnected.is_set()) and self.events.empty()

    def stopped_unexpectedly(self) -> bool:
        code = self.process.poll()
        return not self.closed and code is not None and (code != 0 or not self.connected.is_set()) and self.drained()

    def close(self, timeout: float = 2.0) -> None:
        self.closed = True
        if self.process.poll() is None and self.connected.is_set():
            self.outbox.put(Stop())
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        if self.process.poll() is None:
            self.process.kill()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:  # a loaded machine: reap it later, never leave a zombie
                threading.Thread(target=self.process.wait, name="genemap-reap", daemon=True).start()
        self.outbox.put(None)
        if not self.connected.is_set():
            self.wake_accept()
        with contextlib.suppress(OSError):
            self.listener.close()
        if self.connection is not None:
            self.connection.close()
        self.thread.join(timeout)

    def wake_accept(self) -> None:
        """Unblock a pending accept (closing a listening socket does not wake it on Linux): connect and
        hang up, which fails the handshake; the link thread then sees the service closed."""
        if not isinstance(self.address, str) or self.address.startswith("\\\\"):  # not AF_UNIX
            return
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
            probe.settimeout(1.0)
            probe.connect(self.address)


def _isolation_flags() -> list[str]:
    """-P: the user's current folder does not shadow modules in the child (it only starts our module)."""
    return ["-P"] if sys.version_info >= (3, 11) else []


def _child_environment() -> dict[str, str]:
    """The parent's environment, with this package importable even when the parent found it through
    ``sys.path`` edits (appended: an installed copy still wins, as it does in the parent)."""
    environment = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    paths = [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
    environment["PYTHONPATH"] = os.pathsep.join([*paths, package_root] if package_root not in paths else paths)
    return environment


# --- the child process -------------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    """The child's entry point: ``python -m napari_genemap.infer.service ADDRESS PARENT_PID``, the
    authentication key (hex) on stdin."""
    from ..log import configure_logging

    configure_logging()
    address, parent = argv[0], int(argv[1])
    _watch_parent(parent)
    key = sys.stdin.readline().strip()
    if not key or os.getppid() != parent:
        return 3  # the parent is gone already
    try:
        connection = Client(address, authkey=bytes.fromhex(key))
        start = connection.recv()
    except (OSError, EOFError, ValueError) as error:
        logger.error("tile service: cannot reach the viewer (%s)", _one_line(error))
        return 3
    if not isinstance(start, Start):
        logger.error("tile service: expected a start message, got %r", start)
        return 3
    requests: queue.Queue = queue.Queue()
    threading.Thread(target=_read_requests, args=(connection, requests), name="genemap-requests", daemon=True).start()
    serve(start.spec, requests, _Events(connection), start.threads)
    return 0


def _watch_parent(parent: int) -> None:
    """End this process when the parent is gone (re-parented), whatever the main thread is doing."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        os._exit(0)

    threading.Thread(target=watch, name="genemap-parent-watch", daemon=True).start()


def _read_requests(connection: Connection, requests: queue.Queue) -> None:
    """Move the parent's messages to the main loop's queue; the socket's end means the parent is gone:
    stop at once (a model call would otherwise run on for seconds)."""
    while True:
        try:
            message = connection.recv()
        except (OSError, EOFError):
            os._exit(0)
        requests.put(message)
        if isinstance(message, Stop):
            return


class _Events:
    """The child's side of the event channel (``put`` like a queue)."""

    def __init__(self, connection: Connection):
        self.connection = connection

    def put(self, event: Event) -> None:
        try:
            self.connection.send(event)
        except OSError:  # nobody to report to
            os._exit(0)


def serve(spec: EngineSpec, requests: queue.Queue, events, threads: int) -> None:
    """The service's main loop (runs in the child). Torch is imported only if the model runs in it."""
    # background work: the viewer's process (drawing, input) goes first when they compete for cores
    os.nice(NICENESS)
    try:
        engine = spec.build(threads=threads, start_model=True)
    except Exception as error:  # reported to the viewer as one line
        logger.exception("tile service: cannot build the engine")
        events.put(Failed(_one_line(error)))
        return
    try:
        backend = engine.owner.ready()  # the model loaded (and exported or compiled) before "ready"
    except Exception as error:
        logger.exception("tile service: cannot run the model")
        events.put(Failed(_one_line(error)))
        engine.close()
        return
    worker = _Worker(engine, events)
    events.put(Ready(str(engine.cache.path), engine.genes, str(engine.owner.device), backend))
    logger.info(
        "tile service ready: %d genes on %s (%s), cache %s",
        len(engine.genes),
        engine.owner.device,
        backend,
        engine.cache.path,
    )
    try:
        while True:
            message = _next_message(requests, block=worker.idle)
            while message is not None:
                if isinstance(message, Stop):
                    logger.info("tile service stopping")
                    return
                worker.handle(message)
                message = _next_message(requests, block=False)
            worker.step()
    except Exception as error:
        trace = traceback.format_exc()
        logger.error("tile service failed: %s\n%s", _one_line(error), trace)
        events.put(Failed(_one_line(error), trace))
    finally:
        engine.close()


def _next_message(requests: queue.Queue, block: bool):
    try:
        return requests.get(timeout=0.5) if block else requests.get_nowait()
    except queue.Empty:
        return None


def _mean(values) -> float:
    return sum(values) / len(values) if values else 0.0


def _one_line(error: BaseException) -> str:
    return str(error) if isinstance(error, GenemapInputError) else f"{type(error).__name__}: {error}"


class _Worker:
    """The child's state: the wanted tiles, pending aggregations, paused or not."""

    def __init__(self, engine, events):
        self.engine, self.events = engine, events
        self.wanted: deque[TileKey] = deque()
        self.total = 0  # tiles in the current wanted list when it came
        self.needed: set[tuple[int, int]] = set()  # level-0 tissue tiles the wanted ones still need the model for
        self.call_seconds: deque[float] = deque(maxlen=TIMING_WINDOW)  # per model call
        self.coarse_seconds: deque[float] = deque(maxlen=TIMING_WINDOW)  # per coarser tile (2 x 2 means)
        self.aggregations: deque[Aggregate] = deque()
        self.paused = False

    @property
    def idle(self) -> bool:
        return not self.aggregations and (self.paused or not self.wanted)

    def handle(self, message: Request) -> None:
        match message:
            case Want(tiles):
                cache = self.engine.cache
                wanted = list(dict.fromkeys(tiles))
                self.total = len(wanted)
                self.wanted = deque(t for t in wanted if not cache.has(*t))
                leaves = {leaf for tile in self.wanted for leaf in self.engine.grid.leaves(*tile)}
                self.needed = {t for t in leaves if not cache.has(0, *t) and self.engine.has_tissue(*t)}
                logger.debug(
                    "want %d tiles (%d not cached, %d model tiles)", self.total, len(self.wanted), len(self.needed)
                )
                self._report([])
            case Pause(paused):
                self.paused = paused
                logger.debug("paused" if paused else "resumed")
                self._report([])
            case Aggregate():
                self.aggregations.append(message)
            case _:
                logger.warning("tile service: ignored an unexpected message %r", message)

    def step(self) -> None:
        """One unit of work: an aggregation, or one model call's worth of tiles."""
        if self.aggregations:
            self._aggregate(self.aggregations.popleft())
            self.needed = {t for t in self.needed if not self.engine.cache.has(0, *t)}  # it may have predicted some
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
        leaves = [t for t in self.engine.grid.leaves(level, row, column) if not cache.has(0, *t)]
        glass = [t for t in leaves if not self.engine.has_tissue(*t)]
        if glass:  # zeros, no model: all of them in one step
            self.engine.ensure(0, glass)
            done = [(0, *t) for t in glass]
        elif leaves:
            batch = leaves[: self.engine.batch_size]
            started = time.perf_counter()
            self.engine.ensure(0, batch)
            self.call_seconds.append(time.perf_counter() - started)
            self.needed.difference_update(batch)
            done = [(0, *t) for t in batch]
        else:
            started = time.perf_counter()
            self.engine.ensure(level, [(row, column)])
            self.coarse_seconds.append(time.perf_counter() - started)
            done = [(level, row, column)]
        if cache.has(*self.wanted[0]):
            self.wanted.popleft()
        finished = set(done)
        self.wanted = deque(t for t in self.wanted if t not in finished)
        self._report(done)

    def _aggregate(self, message: Aggregate) -> None:
        from .aggregate import GeneMapSource, aggregate_shapes

        engine, shapes = self.engine, message.shapes
        try:
            source = GeneMapSource.from_engine(engine, engine.slide_mpp, cached_only=message.only_cached)
            if message.only_cached:
                shapes = shapes[[self._cached(box) for box in shapes.geometry.bounds.to_numpy()]]
            table = aggregate_shapes(source, shapes) if len(shapes) else None
            self.events.put(Aggregated(message.request, table=table))
        except Exception as error:
            logger.warning("aggregation %d failed", message.request, exc_info=True)
            self.events.put(Aggregated(message.request, error=_one_line(error)))

    def _cached(self, box) -> bool:
        """Whether every level-0 tile under a bounding box (slide pixels) is cached."""
        grid = self.engine.grid
        x0, y0, x1, y1 = box
        pixel = grid.map_pixel_size(0)
        tiles = grid.tiles(0, (int(y0 // pixel), int(y1 // pixel) + 1, int(x0 // pixel), int(x1 // pixel) + 1))
        return all(self.engine.cache.has(0, *t) for t in tiles)

    def eta_seconds(self) -> float | None:
        """Model calls the wanted tiles still need times the recent mean seconds per call (glass costs
        nothing), plus the queued coarser tiles times theirs (reading 4 tiles of every gene is not free);
        None while model calls are needed and none has been timed yet."""
        calls = -(-len(self.needed) // self.engine.batch_size)
        if calls and not self.call_seconds:
            return None
        seconds = calls * _mean(self.call_seconds)
        coarse = sum(1 for tile in self.wanted if tile[0] > 0)
        return seconds + coarse * _mean(self.coarse_seconds)  # not timed yet: counted as free

    def _report(self, done: list[TileKey]) -> None:
        self.events.put(TilesDone(tuple(done), len(self.wanted), self.paused, self.total, self.eta_seconds()))


if __name__ == "__main__":
    # run the package's copy of this module, not ``__main__``'s: the messages must unpickle as the
    # classes the parent sends and receives (``napari_genemap.infer.service.Start``, not ``__main__.Start``)
    from napari_genemap.infer import service

    sys.exit(service.main(sys.argv[1:]))
