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
the authentication key on its stdin) in plain picklable tuples. The child ends itself when its parent
goes away (the socket closes or it is re-parented), even in the middle of a model call, so a crashed or
killed viewer leaves no orphan computing. This module imports neither torch nor Qt.
"""

from __future__ import annotations

import contextlib
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

from ..errors import GenemapInputError
from .predict import EngineSpec

TileKey = tuple[int, int, int]  # (level, row, column)
NICENESS = 10
CHILD_MODULE = "napari_genemap.infer.service"
PARENT_CHECK_S = 0.5  # how often the child checks that its parent is still there
TIMING_WINDOW = 8  # model calls the time estimate averages over


@dataclass
class ServiceEvent:
    """What the service reports: ``kind`` is "ready", "tiles", "aggregated" or "error"."""

    kind: str
    payload: dict


class TileService:
    """The viewer's handle on the service process (start, send requests, poll events, stop). Nothing here
    blocks: requests wait in an outbox until the child has connected, and a thread receives events. A
    service dropped without `close` is closed when collected or at exit."""

    def __init__(self, spec: EngineSpec, threads: int | None = None):
        """``threads``: torch threads in the service (default: all cores but one, which the viewer keeps
        for drawing and input)."""
        threads = threads or max(1, (os.cpu_count() or 2) - 1)
        self.spec = spec
        self._next_request = 0
        self._died_reported = False
        self._link = _Link(spec, threads)
        self._process = self._link.process
        self._finalizer = weakref.finalize(self, self._link.close)

    # --- requests ----------------------------------------------------------------------------------------
    def want(self, tiles: list[TileKey]) -> None:
        """Replace the queue of wanted tiles (highest priority first)."""
        self._link.outbox.put(("want", [tuple(int(v) for v in t) for t in tiles]))

    def pause(self, paused: bool) -> None:
        self._link.outbox.put(("pause", bool(paused)))

    def aggregate(self, shapes, only_cached: bool = False) -> int:
        """Ask for the aggregation of ``shapes`` (GeoDataFrame in slide pixels; circles are points with a
        ``radius`` column); the answer is an "aggregated" event with the same ``request`` number. With
        ``only_cached``, ROIs whose tiles are not all cached get NaN instead of a prediction."""
        self._next_request += 1
        self._link.outbox.put(("aggregate", self._next_request, shapes, bool(only_cached)))
        return self._next_request

    # --- events ------------------------------------------------------------------------------------------
    def poll(self) -> list[ServiceEvent]:
        """Every event that has arrived (never blocks); a dead process reports one "error"."""
        events = []
        while True:
            try:
                events.append(ServiceEvent(*self._link.events.get_nowait()))
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
                event = ServiceEvent(*self._link.events.get(timeout=min(0.1, left)))
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
            connection.send(("start", spec, threads))
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
            self.outbox.put(("stop",))
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        if self.process.poll() is None:
            self.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
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
    address, parent = argv[0], int(argv[1])
    _watch_parent(parent)
    key = sys.stdin.readline().strip()
    if not key or os.getppid() != parent:
        return 3  # the parent is gone already
    try:
        connection = Client(address, authkey=bytes.fromhex(key))
        _, spec, threads = connection.recv()
    except (OSError, EOFError, ValueError) as error:
        print(f"genemap tile service: cannot reach the viewer ({_one_line(error)})", file=sys.stderr)
        return 3
    requests: queue.Queue = queue.Queue()
    threading.Thread(target=_read_requests, args=(connection, requests), name="genemap-requests", daemon=True).start()
    serve(spec, requests, _Events(connection), threads)
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
        if message[0] == "stop":
            return


class _Events:
    """The child's side of the event channel (``put`` like a queue)."""

    def __init__(self, connection: Connection):
        self.connection = connection

    def put(self, event: tuple) -> None:
        try:
            self.connection.send(event)
        except OSError:  # nobody to report to
            os._exit(0)


def serve(spec: EngineSpec, requests: queue.Queue, events, threads: int) -> None:
    """The service's main loop (runs in the child)."""
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
        self.aggregations: deque = deque()
        self.paused = False

    @property
    def idle(self) -> bool:
        return not self.aggregations and (self.paused or not self.wanted)

    def handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "want":
            cache = self.engine.cache
            wanted = list(dict.fromkeys(message[1]))
            self.total = len(wanted)
            self.wanted = deque(t for t in wanted if not cache.has(*t))
            leaves = {leaf for tile in self.wanted for leaf in self._leaves(*tile)}
            self.needed = {t for t in leaves if not cache.has(0, *t) and self.engine.has_tissue(*t)}
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
        leaves = [t for t in self._leaves(level, row, column) if not cache.has(0, *t)]
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
        payload = {"done": done, "queued": len(self.wanted), "paused": self.paused}
        self.events.put(("tiles", payload | {"total": self.total, "eta_s": self.eta_seconds()}))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
