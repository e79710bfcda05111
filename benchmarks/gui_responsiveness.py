"""Is napari responsive while the model predicts? And how soon do predicted tiles show?

1. The bundled sample: time from opening it (napari's sample menu path) to the first predicted tile on
   screen (the gene layer's displayed slice holds values) and to the whole view predicted.
2. An uncached HER2ST section (default C3, 92 MPx): a gene layer is shown while a scripted camera pans and
   zooms across the slide for 30 s; a 10 ms heartbeat timer on the Qt event loop records every gap. The
   report gives the longest stall and the 99th percentile of the gaps (minus the 10 ms period), with the
   tiles predicted meanwhile (the model runs in the tile service's process the whole time).

Run (needs a display; Xvfb works): ``xvfb-run -a .venv/bin/python benchmarks/gui_responsiveness.py``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st"
HEARTBEAT_MS = 10


def wait_until(app, condition, timeout: float) -> float:
    started = time.perf_counter()
    while not condition():
        if time.perf_counter() - started > timeout:
            raise TimeoutError("condition not met")
        app.processEvents()
        time.sleep(0.005)
    return time.perf_counter() - started


def shown_values(layer) -> np.ndarray:
    return np.asarray(layer._slicing_state._slice.image.raw)  # what napari last sliced for display


def export_once() -> float:
    """Start the tile service on the sample once, headless, so the measured viewer finds the model's export as
    a user does after their first session (torch stays out of this process: it would crash under Mesa's GL)."""
    from napari_genemap.checkpoints import shipped_checkpoint
    from napari_genemap.infer.predict import EngineSpec
    from napari_genemap.infer.service import TileService
    from napari_genemap.sample import SECTION, sample_root

    started = time.perf_counter()
    spec = EngineSpec(
        slide=str(sample_root()),
        section=SECTION,
        checkpoint=str(shipped_checkpoint()),
        cache_root=tempfile.mkdtemp(prefix="genemap-gui-bench-export-"),
    )
    service = TileService(spec)
    try:
        service.wait("ready", timeout=600)
    finally:
        service.close()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", default="C3")
    parser.add_argument("--gene", default="KRT8")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--screenshot", default="benchmarks/results/plugin_in_use.png")
    args = parser.parse_args()
    os.environ["GENEMAP_CACHE_DIR"] = tempfile.mkdtemp(prefix="genemap-gui-bench-")
    os.environ["GENEMAP_EXPORT_DIR"] = str(Path(os.environ["GENEMAP_CACHE_DIR"]) / "exports")
    made = export_once()
    print(f"first start on this machine: the model's graph exported and compiled in {made:.1f} s (reused below)")

    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_genemap.io import SlideSource, read_slide
    from napari_genemap.layers import slide_layers
    from napari_genemap.widgets.gene_maps import GeneMapsWidget
    from napari_genemap.widgets.session import session_for
    from napari_genemap.widgets.slide_model import SlideModelWidget

    # --- 1. the sample ---------------------------------------------------------------------------------
    viewer = napari.Viewer()
    app = QApplication.instance()
    viewer.window._qt_window.resize(1400, 900)
    started = time.perf_counter()
    viewer.open_sample("napari-genemap", "her2st_b4_crop")
    slide_widget, maps = SlideModelWidget(viewer), GeneMapsWidget(viewer)
    viewer.window.add_dock_widget(slide_widget, name="Slide & model")
    viewer.window.add_dock_widget(maps, name="Gene maps")
    session = session_for(viewer)
    wait_until(app, lambda: session.cache is not None, 120)
    ready = time.perf_counter() - started
    layer = maps.add_gene(args.gene)
    wait_until(app, lambda: np.isfinite(shown_values(layer)).any(), 300)
    first = time.perf_counter() - started
    wait_until(app, lambda: maps.queued == 0 and np.isfinite(shown_values(layer)).all(), 300)
    whole = time.perf_counter() - started
    print(
        f"sample: model ready {ready:.1f} s after opening; first predicted tile on screen {first:.1f} s; "
        f"whole view predicted {whole:.1f} s (gene {args.gene})"
    )
    if args.screenshot:
        Path(args.screenshot).parent.mkdir(parents=True, exist_ok=True)
        viewer.screenshot(args.screenshot, canvas_only=False, flash=False)
        print(f"screenshot: {args.screenshot}")

    # --- 2. an uncached section, panned and zoomed while the model runs --------------------------------
    for name in [layer.name for layer in viewer.layers]:
        viewer.layers.remove(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = read_slide(DATA, section=args.section)
    for data, meta, kind in slide_layers(sdata, source=SlideSource(str(DATA), args.section)):
        getattr(viewer, f"add_{kind}")(data, **meta)
    wait_until(app, lambda: session.cache is not None and session.slide is sdata, 120)
    he = viewer.layers[f"{args.section} H&E"]
    extent = np.asarray(he.extent.world)
    (y0, x0), (y1, x1) = extent[0][-2:], extent[1][-2:]
    viewer.reset_view()
    zoom_fit = viewer.camera.zoom

    def tour(seconds: float) -> np.ndarray:
        """Pan and zoom along a Lissajous path for ``seconds``; the heartbeat's stalls in ms."""
        gaps: list[float] = []
        last = [time.perf_counter()]
        begun = time.perf_counter()

        def beat() -> None:
            now = time.perf_counter()
            gaps.append(now - last[0])
            last[0] = now

        def move() -> None:  # between the whole slide and 8x closer
            t = time.perf_counter() - begun
            viewer.camera.center = (
                y0 + (y1 - y0) * (0.5 + 0.4 * np.sin(t / 3.1)),
                x0 + (x1 - x0) * (0.5 + 0.4 * np.sin(t / 4.3)),
            )
            viewer.camera.zoom = zoom_fit * 2 ** (1.5 + 1.5 * np.sin(t / 2.3))

        heartbeat, camera = QTimer(), QTimer()
        heartbeat.setInterval(HEARTBEAT_MS)
        heartbeat.timeout.connect(beat)
        camera.setInterval(50)
        camera.timeout.connect(move)
        heartbeat.start()
        camera.start()
        wait_until(app, lambda: time.perf_counter() - begun > seconds, seconds + 60)
        camera.stop()
        heartbeat.stop()
        return np.maximum(np.asarray(gaps[1:]) - HEARTBEAT_MS / 1000, 0) * 1000

    def report(label: str, stalls: np.ndarray, extra: str = "") -> None:
        print(
            f"{label}: longest stall {stalls.max():.0f} ms, 99th percentile {np.percentile(stalls, 99):.0f} ms, "
            f"median {np.median(stalls):.1f} ms{extra}"
        )

    shape = sdata.images["he"]["scale0"]["image"].shape[1:]
    print(
        f"section {args.section} ({shape[1]} x {shape[0]} px, uncached), scripted pan + zoom, heartbeat every "
        f"{HEARTBEAT_MS} ms, window {viewer.window._qt_window.width()} x {viewer.window._qt_window.height()}:"
    )
    report(f"  H&E only (napari alone), {args.seconds / 2:.0f} s", tour(args.seconds / 2))
    layer = maps.add_gene(args.gene)
    done_before = maps.tiles_done
    stalls = tour(args.seconds)
    report(
        f"  with the {args.gene} map while the model predicts, {args.seconds:.0f} s",
        stalls,
        f"; {maps.tiles_done - done_before} tiles predicted meanwhile",
    )
    session.close()
    viewer.close()


if __name__ == "__main__":
    main()
