"""Use the plugin as a pathologist would and keep screenshots of each step (1920 x 1080 window).

1. `make napari`'s layout (the example's panels) on the sample; KRT8's map once the view is predicted.
2. A second gene straight from the cache: its contrast and colour bar.
3. A full HER2ST section opened with *Open slide…*: it becomes the active slide; KRT8 over the whole
   section until "view predicted", glass transparent; then calibrated to its measured spots.
4. A model switch (the shipped checkpoint with its gene head's bias lowered by 1, or ``--switch-to CKPT``,
   e.g. a DiffBulk stage-2 dense checkpoint): the maps are rebuilt.
5. A circle clicked in the Spots panel, with its table row.

Run: ``xvfb-run -a -s "-screen 0 1920x1080x24" .venv/bin/python benchmarks/gui_walkthrough.py``.
Prints the time each step took and writes ``benchmarks/results/walkthrough_*.png``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "her2st"


def wait_until(app, condition, timeout: float, what: str) -> float:
    started = time.perf_counter()
    while not condition():
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        app.processEvents()
        time.sleep(0.01)
    return time.perf_counter() - started


def dimmer_checkpoint(folder: Path) -> Path:
    from safetensors.numpy import load_file, save_file

    from napari_genemap.checkpoints import shipped_checkpoint

    shutil.copytree(shipped_checkpoint(), folder)
    weights = load_file(folder / "model.safetensors")
    weights["head.bias"] = (weights["head.bias"].astype(np.float32) - 1.0).astype(weights["head.bias"].dtype)
    save_file(weights, folder / "model.safetensors")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", default="C3")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--switch-to", type=Path, help="the checkpoint step 4 switches to (default: a dimmer PixNet)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="genemap-walkthrough-"))
    os.environ["GENEMAP_CACHE_DIR"] = str(scratch / "cache")
    out = Path(args.out)

    import napari
    from qtpy.QtCore import QEvent
    from qtpy.QtWidgets import QApplication

    from napari_genemap.widgets.session import session_for

    spec = importlib.util.spec_from_file_location("example", ROOT / "examples" / "open_sample_in_napari.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    viewer = napari.Viewer()
    viewer.window._qt_window.resize(1920, 1080)  # the screen; no window manager under Xvfb to maximise
    app = QApplication.instance()
    session = session_for(viewer)
    viewer.open_sample("napari-genemap", "her2st_b4_crop")
    example.dock_panels(viewer)
    slide_panel = viewer.window._dock_widgets["Slide & model (napari-genemap)"].widget()
    maps = viewer.window._dock_widgets["Gene maps (napari-genemap)"].widget()
    spots = viewer.window._dock_widgets["Spots (ROIs) (napari-genemap)"].widget()

    def shot(name: str) -> None:
        app.processEvents()
        time.sleep(0.3)
        app.processEvents()
        # a line whose text changed in that last pass still has its old height until its layout request is
        # handled, which napari's grab does not wait for (a user never sees it: Qt lays out before painting)
        app.sendPostedEvents(None, QEvent.Type.LayoutRequest)
        viewer.screenshot(str(out / f"walkthrough_{name}.png"), canvas_only=False, flash=False)
        print(f"  screenshot {out / f'walkthrough_{name}.png'}")

    def predicted(timeout: float) -> float:
        return wait_until(app, lambda: maps.status.text() == "view predicted", timeout, "view predicted")

    started = time.perf_counter()
    wait_until(app, lambda: session.cache is not None, 120, "model ready")
    print(f"1. model ready {time.perf_counter() - started:.1f} s after opening the sample")
    maps.search.setText("KRT8")
    maps.search.returnPressed.emit()
    print(f"   KRT8 view predicted in {predicted(120):.1f} s: {maps.status.text()!r}")
    wait_until(app, lambda: maps.pcc is not None, 60, "Pearson")
    print(f"   {maps.pcc_label.text()}")
    shot("1_sample_krt8")

    maps.search.setText("MUCL1")
    maps.search.returnPressed.emit()
    app.processEvents()
    layer = maps.active_gene_layer()
    print(f"2. {layer.name} from the cache: contrast {layer.contrast_limits}, colour bar {layer.colorbar.visible}")
    shot("2_second_gene_from_cache")

    started = time.perf_counter()
    slide_panel.open_slide(DATA / "images" / f"{args.section}.jpg")
    wait_until(app, lambda: slide_panel.slides.currentText() == f"{args.section} H&E", 120, "section read")
    seconds = time.perf_counter() - started
    print(f"3. {args.section} read in the background in {seconds:.1f} s; {slide_panel.active.text()}")
    wait_until(app, lambda: session.cache is not None and maps.genes.count() > 0, 120, "model ready on the section")
    viewer.reset_view()
    maps.search.setText("KRT8")
    maps.search.returnPressed.emit()
    wait_until(app, lambda: maps.status.text().startswith("predicting"), 60, "prediction starts")
    app.processEvents()
    print(f"   first status: {maps.status.text()!r}")
    shot("3a_section_predicting")
    print(f"   whole view predicted in {predicted(600):.1f} s; tiles done {maps.tiles_done}")
    shot("3b_section_view_predicted")
    started = time.perf_counter()
    maps.calibrate_box.setChecked(True)
    wait_until(app, lambda: "calibrated to" in maps.status.text(), 600, "calibrated")
    print(f"   calibrated to the measured spots in {time.perf_counter() - started:.1f} s: {maps.status.text()!r}")
    app.processEvents()
    shot("3c_section_calibrated")
    maps.calibrate_box.setChecked(False)

    checkpoint = args.switch_to or dimmer_checkpoint(scratch / "pixnet-dimmer")
    slide_panel.checkpoint.setText(str(checkpoint))
    started = time.perf_counter()
    slide_panel.apply_model()
    wait_until(app, lambda: f"KRT8 · {Path(checkpoint).name}" in viewer.layers, 300, "maps rebuilt")
    print(f"4. model switched; maps rebuilt after {time.perf_counter() - started:.1f} s: {maps.status.text()!r}")
    print(f"   view predicted in {predicted(600):.1f} s")
    print(f"   gene layers: {[lay.name for lay in maps.gene_layers()]}")
    shot("4_model_switch")

    centre = np.asarray(viewer.scene.camera.center[-2:])
    spots.add_circle(centre[1], centre[0], 300.0)

    def aggregated() -> bool:
        values = spots.table_frame().iloc[:, 3:].to_numpy(float)
        return values.size > 0 and np.isfinite(values).all()

    wait_until(app, aggregated, 300, "ROI")
    print(f"5. circle: {spots.table_frame().iloc[:, :6].to_dict('records')}")
    shot("5_circle")
    session.close()
    viewer.close()


if __name__ == "__main__":
    main()
