"""The README's ``make napari`` and scripts without a ``__main__`` guard: the tile service starts as its
own module (never re-running the user's script) and does not outlive a killed viewer."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 240  # napari start + the model's load, on two loaded cores
ORPHAN_TIMEOUT_S = 5  # the service checks its parent every 0.5 s


def read_lines(stream, lines: queue.Queue) -> threading.Thread:
    """Stdout line by line into a queue (so the test's waits have timeouts)."""

    def pump():
        for line in iter(stream.readline, ""):
            lines.put(line)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def wait_for_line(lines: queue.Queue, text: str, timeout: float, seen: list[str]) -> str:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=min(left, 1.0))
        except queue.Empty:
            continue
        seen.append(line)
        if text in line:
            return line
    raise AssertionError(f"no {text!r} line within {timeout:.0f} s; stdout was:\n{''.join(seen)}")


@pytest.mark.slow
@pytest.mark.gui
def test_make_napari_starts_the_model_and_a_killed_viewer_leaves_no_service(tmp_path):
    environment = dict(os.environ, GENEMAP_CACHE_DIR=str(tmp_path / "cache"))
    assert environment.get("DISPLAY"), "pytest-xvfb provides the display"
    stderr = (tmp_path / "stderr.txt").open("w")
    started = time.monotonic()
    make = subprocess.Popen(
        ["make", "napari"],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        start_new_session=True,  # its own process group, killed whole at the end
    )
    lines: queue.Queue = queue.Queue()
    seen: list[str] = []
    reader = read_lines(make.stdout, lines)
    try:
        try:
            line = wait_for_line(lines, "model ready", READY_TIMEOUT_S, seen)
        except AssertionError as error:
            raise AssertionError(f"{error}\nstderr:\n{(tmp_path / 'stderr.txt').read_text()[-4000:]}") from None
        print(f"make napari: model ready after {time.monotonic() - started:.1f} s")
        assert line.strip() == "napari-genemap: model ready (785 genes)"
        viewer = next(
            p
            for p in psutil.Process(make.pid).children(recursive=True)
            if any("open_sample_in_napari.py" in part for part in p.cmdline())
        )
        services = [p for p in viewer.children() if "napari_genemap.infer.service" in p.cmdline()]
        assert len(services) == 1, [p.cmdline() for p in viewer.children()]
        viewer.send_signal(signal.SIGKILL)  # a crash: no close(), no atexit
        gone, alive = psutil.wait_procs(services, timeout=ORPHAN_TIMEOUT_S)
        assert not alive, f"the tile service outlived its viewer by {ORPHAN_TIMEOUT_S} s"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(make.pid, signal.SIGKILL)
        make.wait(10)
        reader.join(10)  # the pipe ends with the group
        make.stdout.close()
        stderr.close()


def test_a_script_without_main_guard_starts_the_service(tmp_path):
    """Spawn-based multiprocessing re-ran such a script in the child, which then died."""
    from napari_genemap.checkpoints import shipped_checkpoint
    from napari_genemap.sample import SECTION, sample_root

    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(
            f"""
            from napari_genemap.infer.predict import EngineSpec
            from napari_genemap.infer.service import TileService

            print("script body runs", flush=True)
            spec = EngineSpec(slide={str(sample_root())!r}, section={SECTION!r},
                              checkpoint={str(shipped_checkpoint())!r}, cache_root={str(tmp_path / "cache")!r})
            service = TileService(spec)
            ready = service.wait("ready", timeout=150)
            print("ready", len(ready.payload["genes"]), flush=True)
            service.close()
            print("closed", service.alive, flush=True)
            """
        )
    )
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=200, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == ["script body runs", "ready 785", "closed False"], result.stderr[-3000:]


@pytest.mark.gui
def test_the_four_panels_fit_a_1080p_screen(make_napari_viewer, monkeypatch, tmp_path):
    """make napari's layout: the window's smallest height with the four panels docked fits 1920 x 1080
    (the Training panel alone wanted 806 px, pushing the window to 1357 px)."""
    import importlib.util

    from napari_genemap.widgets.session import session_for

    monkeypatch.setenv("GENEMAP_CACHE_DIR", str(tmp_path / "cache"))
    spec = importlib.util.spec_from_file_location("example", ROOT / "examples" / "open_sample_in_napari.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    viewer = make_napari_viewer(show=True)
    try:
        example.dock_panels(viewer)
        assert viewer.window._qt_window.minimumSizeHint().height() <= 1080 - 60  # room for a taskbar
    finally:
        session_for(viewer).close()
